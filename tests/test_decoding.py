"""Decoding PTs: the seeded sampler, and our loop against `generate` (the same tokens for every layout, cache
and setting)."""

from __future__ import annotations

import warnings

import pytest
import torch

from distilgen.config import GenerationSettings
from distilgen.generation.decode import counter_uniform, decode, gumbel_tokens, seed_tensor, warpers
from distilgen.models import Encoded, load_model
from tests.conftest import tiny_model_config

# ---------------------------------------------------------------------------------------------
# The seeded sampler
# ---------------------------------------------------------------------------------------------


def test_counter_uniforms_are_a_function_of_seed_step_and_column():
    seeds = torch.tensor([1, 2, 2**62 + 3])
    u = counter_uniform(seeds, step=0, size=5000)
    assert u.shape == (3, 5000) and u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
    assert torch.equal(u[1:2], counter_uniform(seeds[1:2], step=0, size=5000))  # a row ignores the others
    assert not torch.equal(u, counter_uniform(seeds, step=1, size=5000))
    assert torch.equal(u, counter_uniform(seeds, step=torch.tensor(0), size=5000))
    assert torch.corrcoef(u[:2])[0, 1].abs() < 0.05  # neighbouring seeds are unrelated


def _sample(logits, seeds, step=0, temperature=1.0, top_k=0, top_p=1.0):
    return gumbel_tokens(logits, seed_tensor(seeds), torch.tensor(step), warpers(temperature, top_k, top_p))


def test_a_seeded_row_samples_the_same_whatever_its_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        alone, batched = _sample(logits[:1], [11], step, 1.5), _sample(logits, [11, 12, 13], step, 1.5)
        assert alone[0] == batched[0]


def test_seeded_sampling_follows_the_warped_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    frequencies = torch.bincount(_sample(logits, range(4000), temperature=2.0), minlength=4) / 4000
    assert torch.allclose(frequencies, torch.softmax(logits[0] / 2.0, -1), atol=0.03)
    assert _sample(logits[:100], range(100), top_k=1).eq(0).all()
    assert _sample(logits[:100], range(100), top_p=0.5).eq(0).all()  # the first token holds 64% of the mass


def test_the_compiled_sampler_draws_exactly_what_the_eager_one_draws():
    """The GPU path compiles `gumbel_tokens`; here inductor's CPU backend stands in for it: the integer hash
    must wrap and shift alike, whatever the batch size (one compile, dynamic in the batch)."""
    from distilgen.generation.decode import _compiled_gumbel_tokens

    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    warp = warpers(0.7, 20, 0.9)
    for rows in (8, 5):
        seeds = seed_tensor(range(100, 100 + rows))
        for step in range(3):
            step = torch.tensor(step)
            compiled = _compiled_gumbel_tokens()(logits[:rows], seeds, step, warp)
            assert torch.equal(compiled, gumbel_tokens(logits[:rows], seeds, step, warp))


# ---------------------------------------------------------------------------------------------
# The loop against `generate`
# ---------------------------------------------------------------------------------------------


class _SeededChoice:
    """The reference: `generate` with a processor putting all the mass on the seeded sample (and greedy
    decoding taking it), so that only the loop around it differs."""

    def __init__(self, seeds, spec):
        self.seeds, self.warp, self.step = seed_tensor(seeds), warpers(spec.temperature, spec.top_k, spec.top_p), 0

    def __call__(self, input_ids, scores):
        tokens = gumbel_tokens(scores, self.seeds, torch.tensor(self.step), self.warp)
        self.step += 1
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens[:, None], 0.0)


class _RisingEos:
    """A forward hook raising the EOS logit a little more at every call, of the rows whose last hidden state's first
    feature is positive, so that rows end at various steps and some run to the limit (a random model rarely writes
    EOS). The choice is the row's own, wherever it sits in the batch (`decode` drops finished rows). `reset` before
    each decoding, which calls the model once per step."""

    def __init__(self, eos: int):
        self.eos, self.rise, self.calls = eos, 0.3, 0

    def reset(self):
        self.calls = 0

    def __call__(self, module, args, out):
        self.calls += 1
        rows = (args[0][:, -1, 0] > 0).to(out.dtype)
        return out.index_add(
            -1, torch.tensor([self.eos]), (self.calls * self.rise * rows)[:, None, None].expand(-1, out.shape[1], 1)
        )


@pytest.fixture
def model_with_eos(arch, tokenizer_dir):
    torch.manual_seed(0)
    tm = load_model(tiny_model_config(arch, tokenizer_dir))
    tm.model.eval()
    tm.rising_eos = _RisingEos(tm.tokenizer.eos_token_id)
    tm.model.get_output_embeddings().register_forward_hook(tm.rising_eos)
    return tm


def _batch(tm, sources, source_multiple=1):
    items = [Encoded("", tm.source_ids(tm.tokenizer(s, add_special_tokens=False)["input_ids"]), []) for s in sources]
    return tm.collate(items, source_multiple)


SOURCES = ["Rukni County beat Vurt 2-1", "a draw", "the home side won 3-0 after a goal in the 62nd minute", "x"]


def _reference(tm, batch, spec, seeds, static):
    from transformers import LogitsProcessorList

    kwargs = {
        "max_new_tokens": spec.max_new_tokens,
        "pad_token_id": tm.tokenizer.pad_token_id,
        "eos_token_id": tm.tokenizer.eos_token_id,
        "no_repeat_ngram_size": spec.no_repeat_ngram_size,
        "do_sample": False,
    }
    if seeds is not None:
        per_input = len(seeds) // batch["source_ids"].shape[0]
        kwargs.update(logits_processor=LogitsProcessorList([_SeededChoice(seeds, spec)]))
        if per_input > 1:  # several return sequences need sampling mode; the one-hot scores make it our draw
            kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=per_input)
    if static:
        kwargs["cache_implementation"] = "static"
    return tm.layout.generate(tm.model, batch, **kwargs)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize(
    "spec",
    [
        GenerationSettings("greedy", max_new_tokens=14),
        GenerationSettings("sample", num_return=3, temperature=1.3, top_k=50, top_p=0.9, max_new_tokens=14),
    ],
    ids=["greedy", "sample"],
)
def test_decode_gives_the_tokens_generate_gives(model_with_eos, spec, static):
    tm = model_with_eos
    batch = _batch(tm, SOURCES)
    seeds = list(range(40, 40 + 3 * len(SOURCES))) if spec.kind == "sample" else None
    tm.rising_eos.reset()
    ours = decode(tm, batch, spec, seeds, static=static)
    tm.rising_eos.reset()
    theirs = _reference(tm, batch, spec, seeds, static)
    assert torch.equal(ours, theirs)
    ended = (ours == tm.tokenizer.eos_token_id).any(1)
    assert 0 < ended.sum() < len(ours)  # some rows end early, some run to the limit: both paths are checked


def test_a_t5_whose_decoder_is_deeper_than_its_encoder_decodes_as_generate_does(tokenizer_dir):
    """T5's config counts its encoder's layers as `num_hidden_layers`, which transformers sizes KV caches by: a
    deeper decoder ran out of cache layers, in `decode` (dynamic or static cache) and in `generate` alike."""
    torch.manual_seed(0)
    tm = load_model(tiny_model_config("t5", tokenizer_dir, encoder_layers=1, decoder_layers=3))
    tm.model.eval()
    batch = _batch(tm, SOURCES)
    greedy = GenerationSettings("greedy", max_new_tokens=8)
    ours = decode(tm, batch, greedy)
    assert torch.equal(decode(tm, batch, greedy, static=True), ours)
    ids = {"pad_token_id": tm.tokenizer.pad_token_id, "eos_token_id": tm.tokenizer.eos_token_id}
    assert torch.equal(tm.layout.generate(tm.model, batch, max_new_tokens=8, do_sample=False, **ids), ours)
    beams = tm.layout.generate(tm.model, batch, max_new_tokens=8, num_beams=2, **ids)
    assert beams.shape[0] == len(SOURCES)


def _a_stop_token(tm, batch, spec, seeds) -> int:
    """A token that, as a stop, ends a row that ran to the limit, while rows ending at EOS and some row running to
    the limit never write it: all three kinds of end in one decoding."""
    tm.rising_eos.reset()
    rows, eos = decode(tm, batch, spec, seeds).tolist(), tm.tokenizer.eos_token_id
    ended = {t for row in rows if eos in row for t in row[: row.index(eos) + 1]}
    running = [row for row in rows if eos not in row]
    return next(row[2] for row in running if row[2] not in ended and any(row[2] not in other for other in running))


@pytest.mark.parametrize("arch", ["bart", "gpt2"])
@pytest.mark.parametrize("kind", ["greedy", "sample"])
def test_finished_rows_leave_the_batch_with_nothing_else_changed(model_with_eos, kind, monkeypatch):
    """A dynamic cache drops finished rows (`COMPACT_SHARE`): the tokens and every step's scores of each row are
    those of a decoding that keeps them, only fewer rows are computed at the late steps."""
    from distilgen.generation import decode as decoding
    from distilgen.generation.hf import StepTopK

    tm = model_with_eos
    batch = _batch(tm, SOURCES)
    spec = GenerationSettings(kind, max_new_tokens=14, **({"num_return": 3} if kind == "sample" else {}))
    seeds = list(range(7, 7 + 3 * len(SOURCES))) if kind == "sample" else None
    stop = _a_stop_token(tm, batch, spec, seeds)
    runs = {}
    for share in (0, 10**6):  # never drop; drop as soon as a row has finished
        monkeypatch.setattr(decoding, "COMPACT_SHARE", share)
        tm.rising_eos.reset()
        topk = StepTopK(3)
        out = decode(tm, batch, spec, seeds, on_scores=topk, stops=[stop])
        runs[share] = out, topk.rows(*out.shape), [len(rows) for rows in topk.at]
    (kept, kept_topk, kept_rows), (dropped, dropped_topk, dropped_rows) = runs[0], runs[10**6]
    assert torch.equal(dropped, kept)
    pad, eos = tm.tokenizer.pad_token_id, tm.tokenizer.eos_token_id
    ends = [row.index(pad) - 1 if pad in row else None for row in kept.tolist()]  # a row's last token
    last = [row[end] if end is not None else None for row, end in zip(kept.tolist(), ends, strict=True)]
    assert eos in last and stop in last and None in ends  # rows end at EOS, at the stop, and at the limit
    assert set(kept_rows) == {len(kept)} and dropped_rows[0] == len(kept) and dropped_rows[-1] < len(kept)
    for b, end in enumerate(ends):  # a row's top-k up to and with its end, and one step after it: the EOS a target
        steps = kept.shape[1] if end is None else end + 2  # appends after a stop token takes that step's top-k
        for got, want in zip(dropped_topk, kept_topk, strict=True):  # ids, then log-probs
            torch.testing.assert_close(torch.tensor(got[b][:steps]), torch.tensor(want[b][:steps]))


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_decode_continues_a_given_prefix_as_generate_does(model_with_eos, static):
    """The diagnostic's completions: the output's first tokens are given (the student's prefix), the model writes on."""
    tm = model_with_eos
    tm.rising_eos.rise = 0.0
    batch = _batch(tm, SOURCES)
    settings = GenerationSettings("greedy", max_new_tokens=9)
    prefix = torch.tensor([tm.output_prefix(p) for p in ([7, 8], [9, 9], [10, 7], [8, 8])])
    ours = decode(tm, batch, settings, static=static, prefix=prefix)
    kwargs = {"max_new_tokens": 9, "do_sample": False, "pad_token_id": tm.tokenizer.pad_token_id}
    theirs = tm.layout.generate(tm.model, batch, prefix, **kwargs)
    assert ours.shape[1] == 9 and torch.equal(ours, theirs)
    assert not torch.equal(ours, decode(tm, batch, settings, static=static))  # the prefix changes what follows


@pytest.mark.parametrize("arch", ["bart"])
def test_decode_forbids_repeated_ngrams_as_generate_does(model_with_eos):
    tm = model_with_eos
    tm.rising_eos.rise = 0.0  # no early EOS: long outputs, where repeats happen
    batch = _batch(tm, SOURCES)
    spec = GenerationSettings("greedy", max_new_tokens=30, no_repeat_ngram_size=2)
    ours = decode(tm, batch, spec)
    assert torch.equal(ours, _reference(tm, batch, spec, None, False))
    assert not torch.equal(ours, decode(tm, batch, GenerationSettings("greedy", max_new_tokens=30)))


@pytest.mark.parametrize("arch", ["bart"])
def test_decode_rejects_what_it_does_not_do(model_with_eos):
    batch = _batch(model_with_eos, SOURCES[:2])
    with pytest.raises(ValueError, match="beam"):
        decode(model_with_eos, batch, GenerationSettings("beam", num_beams=2))
    with pytest.raises(ValueError, match="seeds"):
        decode(model_with_eos, batch, GenerationSettings("sample"))
    with pytest.raises(ValueError, match="3 seeds for 2 inputs"):
        decode(model_with_eos, batch, GenerationSettings("sample", num_return=2), seeds=[1, 2, 3])


@pytest.mark.parametrize("arch", ["bart", "gpt2"])
def test_a_seeded_pt_is_the_same_alone_and_in_a_padded_batch(model_with_eos):
    tm = model_with_eos
    spec = GenerationSettings("sample", num_return=2, temperature=1.5, max_new_tokens=10)
    tm.rising_eos.reset()
    batched = decode(tm, _batch(tm, SOURCES), spec, seeds=list(range(8)))
    tm.rising_eos.reset()
    alone = decode(tm, _batch(tm, SOURCES[2:3]), spec, seeds=[4, 5])  # the longest source: no padding
    assert torch.equal(alone, batched[4:6, : alone.shape[1]])
    tm.rising_eos.reset()
    assert not torch.equal(batched, decode(tm, _batch(tm, SOURCES), spec, seeds=list(range(10, 18))))


@pytest.mark.parametrize("arch", ["bart", "gpt2"])
def test_batches_of_one_shape_reuse_one_static_cache_and_decode_as_with_a_fresh_one(model_with_eos):
    """A CUDA graph is recorded on the static cache's tensors: the next batch of the same shape decodes in the
    same cache (zeroed, and for an encoder-decoder with the new sources' cross-attention), so that the graph
    replays instead of being recorded again."""
    from distilgen.generation import decode as decoding

    tm, spec = model_with_eos, GenerationSettings("greedy", max_new_tokens=12)
    first, second = _batch(tm, SOURCES, source_multiple=64), _batch(tm, SOURCES[::-1], source_multiple=64)
    decode(tm, first, spec, static=True)
    (kept,) = decoding._static_caches[tm.model].values()
    tm.rising_eos.reset()
    reused = decode(tm, second, spec, static=True)
    assert list(decoding._static_caches[tm.model].values()) == [kept]
    del decoding._static_caches[tm.model]
    tm.rising_eos.reset()
    assert torch.equal(reused, decode(tm, second, spec, static=True))  # a fresh cache
    assert list(decoding._static_caches[tm.model].values()) != [kept]
    tm.rising_eos.reset()
    assert torch.equal(reused, _reference(tm, second, spec, None, static=False))


@pytest.mark.parametrize("arch", ["bart"])
def test_static_caches_of_recent_shapes_are_kept_within_a_byte_budget(model_with_eos, monkeypatch):
    """Batches that move between a few shapes keep one cache per shape (each shape's graph recorded once);
    past the budget only the latest shape's cache stays."""
    from distilgen.generation import decode as decoding

    tm, spec = model_with_eos, GenerationSettings("greedy", max_new_tokens=6)
    wide, narrow = _batch(tm, SOURCES, source_multiple=64), _batch(tm, SOURCES[:3], source_multiple=64)

    def caches():
        return list(decoding._static_caches[tm.model].values())

    decode(tm, wide, spec, static=True)
    decode(tm, narrow, spec, static=True)
    wide_cache, narrow_cache = caches()
    assert decoding._cache_bytes(wide_cache) > decoding._cache_bytes(narrow_cache) > 0
    decode(tm, wide, spec, static=True)
    assert caches() == [narrow_cache, wide_cache]  # the latest last
    monkeypatch.setattr(decoding, "KEPT_CACHE_BYTES", decoding._cache_bytes(wide_cache))
    decode(tm, _batch(tm, SOURCES[:2], source_multiple=64), spec, static=True)  # a third shape: the oldest goes
    assert caches()[0] is wide_cache and len(caches()) == 2
    monkeypatch.setattr(decoding, "KEPT_CACHE_BYTES", 0)
    decode(tm, narrow, spec, static=True)
    assert len(caches()) == 1 and caches()[0] is not narrow_cache


@pytest.mark.parametrize("arch", ["bart"])
def test_the_compiled_step_decodes_as_the_eager_one_with_one_graph_for_all_steps(model_with_eos):
    """The GPU path compiles the decoder step (transformers' compiled call); inductor's CPU backend stands in
    for it: the same tokens, and one graph serves every step and batch of a shape (nothing in the inputs
    changes but their values)."""
    from torch._dynamo.utils import counters

    tm = model_with_eos
    tm.model.get_output_embeddings()._forward_hooks.clear()  # the hook's Python counter would be a guard
    batch = _batch(tm, SOURCES, source_multiple=64)
    spec = GenerationSettings("greedy", max_new_tokens=10)
    counters.clear()
    compiled = decode(tm, batch, spec, static=True, compile=True)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert compiled.shape[1] == 10 and torch.equal(compiled, decode(tm, batch, spec, static=True))
    other = _batch(tm, SOURCES[::-1], source_multiple=64)  # the next batch: the same graph
    compiled = decode(tm, other, spec, static=True, compile=True)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert torch.equal(compiled, decode(tm, other, spec, static=True))


@pytest.mark.parametrize("triton", [True, False])
def test_static_cache_auto_compiles_on_a_gpu_with_triton_and_else_stays_dynamic(triton, monkeypatch):
    """Without Triton inductor cannot build GPU code: `auto` then keeps the dynamic cache (an eager static one
    only costs), says so once, and `on` keeps its static cache but is not compiled."""
    import torch.utils._triton

    from distilgen.generation import decode as decoding

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: triton)
    decoding._gpu_compiler_available.cache_clear()
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert decoding.use_static_cache("auto", gpu) is triton
        assert decoding.compiles_decoding(True, gpu) is triton and decoding.use_static_cache("on", gpu)
        assert not decoding.use_static_cache("auto", cpu) and not decoding.compiles_decoding(True, cpu)
        assert not decoding.use_static_cache("off", gpu) and not decoding.compiles_decoding(False, gpu)
    assert len([w for w in caught if "Triton" in str(w.message)]) == (0 if triton else 1)
    decoding._gpu_compiler_available.cache_clear()


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped elsewhere): the compiled path as PT generation and Joint-Teaching run it
# ---------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@needs_gpu
def test_the_seeded_sampler_draws_the_same_on_the_gpu():
    """Integer hashing is exact on both devices, so a PT sampled on a GPU is the one a CPU would sample."""
    from distilgen.generation.decode import _compiled_gumbel_tokens

    seeds, step = seed_tensor([1, 2**63 + 5, 7, 123456789]), torch.tensor(3)
    assert torch.equal(counter_uniform(seeds, step, 1000), counter_uniform(seeds.cuda(), step.cuda(), 1000).cpu())
    logits, warp = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)), warpers(1.3, 50, 0.9)
    on_gpu = _compiled_gumbel_tokens()(logits.cuda(), seeds.cuda(), step.cuda(), warp)
    assert torch.equal(on_gpu.cpu(), gumbel_tokens(logits, seeds, step, warp))


@needs_gpu
@pytest.mark.parametrize("arch", ["bart", "gpt2"])
def test_on_a_gpu_the_compiled_step_is_one_cuda_graph_replayed_for_later_batches(model_with_eos):
    """The default on a GPU: static cache, decoder step in CUDA graphs, compiled sampler. The tokens are the
    eager ones, nothing is skipped, and a batch of the same shape replays the recorded graph."""
    from torch._dynamo.utils import counters

    tm = model_with_eos
    tm.model.get_output_embeddings()._forward_hooks.clear()
    tm.model.cuda()
    spec, seeds = GenerationSettings("sample", num_return=2, top_p=0.9, max_new_tokens=12), list(range(8))
    batches = [{k: v.cuda() for k, v in _batch(tm, s, source_multiple=64).items()} for s in (SOURCES, SOURCES[::-1])]
    counters.clear()
    first = decode(tm, batches[0], spec, seeds, static=True)
    recorded = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    second = decode(tm, batches[1], spec, seeds, static=True)
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] == recorded > 0
    assert not counters["inductor"]["cudagraph_skips"] and not counters["recompiles"]
    for batch, compiled in zip(batches, (first, second), strict=True):
        assert torch.equal(compiled, decode(tm, batch, spec, seeds, static=True, compile=False))


def test_rows_leave_only_caches_that_hold_keys_and_values_per_row(tokenizer_dir):
    """A linear-attention layer's recurrent state is not selected by `batch_select_indices`: such a cache keeps
    its finished rows."""
    from transformers import DynamicCache
    from transformers.cache_utils import LinearAttentionLayer

    from distilgen.generation.decode import _droppable

    tm = load_model(tiny_model_config("llama", tokenizer_dir))
    cache = DynamicCache(config=tm.model.config)
    assert len(cache.layers) == tm.model.config.num_hidden_layers and _droppable(cache)
    cache.layers[0] = LinearAttentionLayer.__new__(LinearAttentionLayer)
    assert not _droppable(cache)
