"""The Hugging Face backend's loop: greedy and per-row seeded sampling around the model's decoder step.

    new_ids = decode(tm, batch, settings, seeds, static=True)   # (B * samples per input, N)

`generate` runs some 60 small ops per token around the model (input preparation, logits processors,
stopping criteria) and waits for the device every token to learn whether all rows have finished. A small
model's decoder step, compiled into a CUDA graph, costs less than those launches. This loop keeps per token
the step, the choice of the next tokens and three bookkeeping ops, and on a GPU learns that every row has
finished one step late, without waiting for the step it has just queued. With a dynamic cache, rows that have
finished leave the batch as they accumulate (`COMPACT_SHARE`), so a batch's late steps compute only the rows still
writing (samples of one batch end at very different lengths). Under a static cache, batches of one
shape decode in one cache, so the step's CUDA graph, recorded on its tensors, is replayed rather than recorded
again for every batch (as it is when `generate` makes a new static cache per call).

Tokens are those `generate` gives for the same greedy or sampling settings (tested against it). What a
model's own generation config adds (a minimum length, forced tokens, ...) is not applied here (`HFGenerator` sends
such a model to `generate` where its rules should hold). Beam search stays with `generate`.

Sampling: row b's noise at step t is `counter_uniform(seeds[b], t)`, and its token is argmax(warped scores +
Gumbel noise), a sample of softmax(warped scores). `generate` samples with one global generator, so a row's
sample there depends on the rows beside it; here it depends only on its seed (and on the float rounding of
its logits in a padded batch, which moves a token across an argmax tie only rarely in fp32).
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from distilgen.config import GenerationSettings
from distilgen.sharding import is_sharded, on_every_process

if TYPE_CHECKING:
    from distilgen.models import TextModel

# ---------------------------------------------------------------------------------------------
# The counter-based noise of a seeded sample
# ---------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 torch stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (products wrap mod 2**64; shifts made logical by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def seed_tensor(seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) int64 seeds (any Python ints, taken mod 2**64), as `counter_uniform` reads them."""
    return torch.tensor([_signed(s & _MASK64) for s in seeds], dtype=torch.int64, device=device)


def counter_uniform(seeds: torch.Tensor, step: int | torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) uniforms in (0, 1): a hash of (seed of the row, step, column), on the seeds' device.

    A counter-based generator: no state, the same numbers on CPU and GPU (integer arithmetic is exact), and
    one vectorised call per decoding step for the whole batch. `step` may be a 0-d int64 tensor (a compiled
    caller then does not recompile for every step).
    """
    columns = torch.arange(size, device=seeds.device, dtype=torch.int64)
    step = torch.as_tensor(step, dtype=torch.int64, device=seeds.device)
    row_keys = _mix64(seeds.to(torch.int64) + step * _signed(_GOLDEN))  # (B,); int64 products wrap mod 2**64
    bits = _mix64(row_keys[:, None] + columns[None, :])  # (B, size)
    top24 = (bits >> 40) & ((1 << 24) - 1)
    return (top24.to(torch.float32) + 0.5) / float(1 << 24)


@functools.cache
def warpers(temperature: float, top_k: int, top_p: float) -> tuple:
    """The warpers `generate` applies when sampling, in its order; one tuple per setting, so that a compiled
    sampler sees the same objects on every call."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    chosen = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    chosen += [TopKLogitsWarper(top_k)] if top_k else []
    chosen += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    return tuple(chosen)


def gumbel_tokens(scores: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor, warpers: tuple) -> torch.Tensor:
    """(B,) tokens: argmax(warped scores + Gumbel noise of the row's seed at `step`), a sample of
    softmax(warped (B, V) scores)."""
    scores = scores.float()
    for warper in warpers:
        scores = warper(None, scores)
    uniform = counter_uniform(seeds, step, scores.shape[1])
    return (scores - torch.log(-torch.log(uniform))).argmax(-1)


@functools.cache
def _compiled_gumbel_tokens():
    """`gumbel_tokens` as one compiled function (dynamic in batch and vocabulary): eager it runs some 50 small
    ops per token with top-p (`bench/decode_overhead.py`), each a kernel launch on a GPU."""
    return torch.compile(gumbel_tokens, dynamic=True)


SOURCE_BUCKET = 64
"""Source widths under a static cache are multiples of this: few compiled shapes, little padding."""


GENERATION_RULES = (
    "min_length",
    "min_new_tokens",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "repetition_penalty",
    "encoder_repetition_penalty",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "forced_decoder_ids",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "guidance_scale",
    "watermarking_config",
    "max_time",
)
"""Rules a model's own generation config may add to `generate` (a pretrained summariser's minimum length, a
translator's forced language token...), which `decode` does not apply."""


def generation_rules(model) -> list[str]:
    """The `GENERATION_RULES` that `model`'s generation config sets (changes from the defaults)."""
    from transformers import GenerationConfig

    default, own = GenerationConfig(), model.generation_config
    return [name for name in GENERATION_RULES if getattr(own, name, None) != getattr(default, name, None)]


def use_static_cache(setting: str, device: torch.device) -> bool:
    """Whether a `static_cache` setting ("on", "off", "auto": where the decoder step compiles) decodes with a
    static KV cache. Without the compile a static cache only costs (attention over every cached position)."""
    return setting == "on" or (setting == "auto" and compiles_decoding(True, device))


def source_multiple(static_cache: bool) -> int:
    """What source widths are padded to a multiple of: `SOURCE_BUCKET` under a static cache, where each width is
    a compiled shape (the cross-attention or prompt length), else 1."""
    return SOURCE_BUCKET if static_cache else 1


def compiles_decoding(static_cache: bool, device: torch.device) -> bool:
    """Whether the decoder step is compiled (into CUDA graphs): with a static cache on a GPU that inductor can
    build code for (Triton installed, compute capability 7 or more). The sampler is compiled with it."""
    return static_cache and device.type == "cuda" and _gpu_compiler_available()


@functools.cache
def _gpu_compiler_available() -> bool:
    """Whether torch.compile can build GPU code here; says once why decoding stays eager when it cannot."""
    from torch.utils._triton import has_triton

    if not has_triton():
        warnings.warn(
            "Triton is not usable on this GPU (not installed, or compute capability below 7): the decoder step "
            "is not compiled, and `static_cache: auto` decodes PTs with a dynamic KV cache (slower for small "
            "models); `pip install triton` for the compiled step",
            stacklevel=3,
        )
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The model's side: a cache and one decoder step at a time
# ---------------------------------------------------------------------------------------------


@functools.cache
def forward_parameters(model_class: type) -> frozenset[str]:
    """The keyword arguments a model class's `forward` takes (which cache name, whether it can skip logits)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def decoder_config(model):
    """The config a KV cache of the decoder is sized by. T5's counts its encoder's layers as `num_hidden_layers`,
    which transformers 5 sizes caches by: a decoder deeper than its encoder ran out of cache layers (`generate`
    too)."""
    config = model.config.get_text_config(decoder=True)
    layers = getattr(config, "num_decoder_layers", None)
    if layers is None or layers == config.num_hidden_layers:
        return config
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    return config


def _cache_kwargs(model, static: bool, rows: int, length: int, cross_length: int | None = None) -> dict[str, Any]:
    """A KV cache for `rows` x `length` positions (`cross_length` encoder positions too: an encoder-decoder), under
    the name the model's `forward` takes it by (`cache` in recent transformers, `past_key_values` before)."""
    from transformers import DynamicCache, EncoderDecoderCache, StaticCache

    config = decoder_config(model)

    def one(size: int):
        return StaticCache(config=config, max_cache_len=size) if static else DynamicCache(config=config)

    def fresh():
        return one(length) if cross_length is None else EncoderDecoderCache(one(length), one(cross_length))

    if static:
        device = model.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else model.dtype
        cache = _kept_static_cache(model, (rows, length, cross_length, dtype), fresh)
    else:
        cache = fresh()
    return {cache_argument(model): cache, "use_cache": True}


def cache_argument(model) -> str:
    """The name `forward` and `generate` take a KV cache by: `cache` in recent transformers, `past_key_values`
    before."""
    return "cache" if "cache" in forward_parameters(type(model)) else "past_key_values"


KEPT_CACHE_BYTES = 256 * 2**20
"""Static caches of shapes other than the latest are kept per model while they total at most this (a small
model's caches for the few source buckets batches move between; a large model keeps only its latest)."""

_static_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> {shape: static cache}, the latest last."""


def _kept_static_cache(model, shape: tuple, fresh: Callable[[], Any]):
    """The static cache of `shape` that the model decoded in before, zeroed, or a new one.

    The compiled step's CUDA graph is recorded on the cache's tensors: a new cache for every batch would have it
    recorded again every batch (a device sync each time, and each recording kept and checked at later steps).
    So caches are kept per shape: the latest always, older ones within `KEPT_CACHE_BYTES`."""
    kept = _static_caches.setdefault(model, {})
    cache = kept.pop(shape, None)
    if cache is not None:
        cache.reset()
    else:
        cache = fresh()
        room = KEPT_CACHE_BYTES
        for old in reversed(list(kept)):  # the most recent first
            size = _cache_bytes(kept[old])
            if size > room:
                del kept[old]
            else:
                room -= size
    kept[shape] = cache
    return cache


def _cache_layers(cache) -> list:
    """Every layer of a cache (an encoder-decoder's self- and cross-attention caches both)."""
    encoder_decoder = hasattr(cache, "cross_attention_cache")
    parts = [cache.self_attention_cache, cache.cross_attention_cache] if encoder_decoder else [cache]
    return [layer for part in parts for layer in part.layers]


def _cache_bytes(cache) -> int:
    tensors = [getattr(layer, name, None) for layer in _cache_layers(cache) for name in ("keys", "values")]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _droppable(cache) -> bool:
    """Whether rows can leave the cache: every layer holds only keys and values per row (not the recurrent states
    of a linear-attention layer, which `batch_select_indices` does not select)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in _cache_layers(cache))


def _cache(inputs: dict[str, Any]):
    """The KV cache among a model call's keyword arguments."""
    return inputs["cache"] if "cache" in inputs else inputs["past_key_values"]


def _step_call(model, compile: bool) -> Callable:
    """The model call for decoding steps after the first: the compiled one `generate` uses with a static cache
    (`reduce-overhead`: CUDA graphs on a GPU), or the model itself."""
    return model.get_compiled_call(None) if compile else model


def _last_logits(output) -> torch.Tensor:
    """(B, V) fp32 copy of the last position's logits, so that nothing holds the model's output (a compiled
    step's CUDA graph overwrites it on its next run)."""
    return output.logits[:, -1].to(dtype=torch.float32, copy=True)


def _width(prefix: torch.Tensor | None) -> int:
    return 0 if prefix is None else prefix.shape[1]


class EncoderDecoderSteps:
    """The decoder fed one token at a time from `decoder_start_token_id` (and the output's given first tokens,
    `prefix`), over the encoder's output, computed once per input and repeated for its `per_input` rows."""

    def __init__(
        self,
        model,
        batch: dict[str, torch.Tensor],
        per_input: int,
        max_new_tokens: int,
        static: bool,
        compile: bool,
        prefix: torch.Tensor | None = None,
    ):
        from transformers.modeling_outputs import BaseModelOutput

        mask = batch["source_mask"]
        hidden = _encoded(model, batch)
        rows = hidden.shape[0] * per_input
        self.model, self.step = model, _step_call(model, compile)
        self.inputs = {
            "encoder_outputs": BaseModelOutput(last_hidden_state=hidden.repeat_interleave(per_input, dim=0)),
            "attention_mask": mask.repeat_interleave(per_input, dim=0),
            **_cache_kwargs(model, static, rows, max_new_tokens + 1 + _width(prefix), hidden.shape[1]),
        }
        self.prefix = torch.full((rows, 1), model.config.decoder_start_token_id, dtype=torch.long, device=mask.device)
        """The tokens before the first new one (what a no-repeat-n-gram rule sees)."""
        if prefix is not None:
            self.prefix = torch.cat([self.prefix, prefix.repeat_interleave(per_input, dim=0)], dim=1)

    def first(self) -> torch.Tensor:
        return _last_logits(self.model(decoder_input_ids=self.prefix, **self.inputs, return_dict=True))

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with only `rows` (indices into the current rows): a dynamic cache, rows that finished dropped."""
        from transformers.modeling_outputs import BaseModelOutput

        hidden = self.inputs["encoder_outputs"].last_hidden_state
        self.inputs["encoder_outputs"] = BaseModelOutput(last_hidden_state=hidden[rows])
        self.inputs["attention_mask"] = self.inputs["attention_mask"][rows]
        _cache(self.inputs).batch_select_indices(rows)
        self.prefix = self.prefix[rows]

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        return _last_logits(self.step(decoder_input_ids=tokens[:, None], **self.inputs, return_dict=True))


def _encoded(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, S, H) the encoder's output. A sharded model computes it in a forward of the whole model (one decoder
    step more, dropped): the root's hooks gather the embedding, which the encoder called alone finds sharded."""
    ids, mask = batch["source_ids"], batch["source_mask"]
    if not is_sharded(model):
        return model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True)[0]
    start = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id, dtype=torch.long, device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start, use_cache=False, return_dict=True)
    return out.encoder_last_hidden_state


class DecoderOnlySteps:
    """The left-padded prompt, then one token at a time. The attention mask covers the new positions from the
    start (causality hides those not yet written), so it keeps one shape under a static cache.

    With a dynamic cache an input's `per_input` rows share one pass over its prompt, whose cache is then
    repeated: an LLM teacher's long prompt (a chat template, demonstrations) is read once per input, not once
    per sample. A static cache keeps its tensors for the compiled step, so there each row reads the prompt."""

    def __init__(
        self,
        model,
        batch: dict[str, torch.Tensor],
        per_input: int,
        max_new_tokens: int,
        static: bool,
        compile: bool,
        prefix: torch.Tensor | None = None,
    ):
        ids, mask = batch["source_ids"], batch["source_mask"]
        if prefix is not None:  # the output's first tokens, given: they follow the prompt
            ids, mask = torch.cat([ids, prefix], dim=1), torch.cat([mask, torch.ones_like(prefix)], dim=1)
        self.shared = per_input if per_input > 1 and not static else 1
        """How many rows share each prompt pass (1: every row reads its prompt)."""
        self.prompt = (ids, mask) if self.shared > 1 else None
        ids, mask = ids.repeat_interleave(per_input, dim=0), mask.repeat_interleave(per_input, dim=0)
        self.model, self.step, self.static = model, _step_call(model, compile), static
        self.width, self.fed = ids.shape[1], 0
        self.mask = torch.cat([mask, mask.new_ones(mask.shape[0], max_new_tokens)], dim=1)
        self.positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as `DecoderOnlyLayout.target_logits` numbers them
        self.inputs = _cache_kwargs(model, static, ids.shape[0], self.width + max_new_tokens)
        if "logits_to_keep" in forward_parameters(type(model)):
            self.inputs["logits_to_keep"] = 1  # the prompt's other positions need no (B, S, V) logits
        self.prefix = ids

    def _mask(self) -> torch.Tensor:
        return self.mask if self.static else self.mask[:, : self.width + self.fed]

    def first(self) -> torch.Tensor:
        if self.prompt is None:
            out = self.model(
                input_ids=self.prefix, attention_mask=self._mask(), position_ids=self.positions, **self.inputs
            )
            return _last_logits(out)
        ids, mask = self.prompt
        positions = self.positions[:: self.shared]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **self.inputs)
        _cache(self.inputs).batch_repeat_interleave(self.shared)  # each input's cache, once per row
        return _last_logits(out).repeat_interleave(self.shared, dim=0)

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with only `rows` (indices into the current rows): a dynamic cache, rows that finished dropped."""
        self.mask, self.positions, self.prefix = self.mask[rows], self.positions[rows], self.prefix[rows]
        _cache(self.inputs).batch_select_indices(rows)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        self.fed += 1
        position = self.positions[:, -1:] + self.fed
        return _last_logits(
            self.step(input_ids=tokens[:, None], attention_mask=self._mask(), position_ids=position, **self.inputs)
        )


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class _AllFinished:
    """Whether every row has emitted EOS. On a GPU the answer read is the previous step's, copied to the host
    without blocking, so the host never waits for the step it has just queued (the loop may run one step
    more than needed; its tokens are padding). For a sharded model, whether every row of every process has:
    its forward is a collective, so all processes step together (`distilgen.sharding`)."""

    def __init__(self, device: torch.device, sharded: bool = False):
        self.sharded = sharded
        self.lagged = device.type == "cuda" and not sharded
        if self.lagged:
            self.flag = torch.zeros((), dtype=torch.bool, pin_memory=True)
            self.copied = torch.cuda.Event()
            self.pending = False

    def __call__(self, finished: torch.Tensor) -> bool:
        if self.sharded:
            return on_every_process(finished.all())
        if not self.lagged:
            return bool(finished.all())
        answer = False
        if self.pending:
            self.copied.synchronize()
            answer = bool(self.flag)
        self.flag.copy_(finished.all(), non_blocking=True)
        self.copied.record()
        self.pending = True
        return answer


COMPACT_SHARE = 8
"""A dynamic-cache batch drops its finished rows once they are at least 1/COMPACT_SHARE of its rows: each drop
copies the cache once (as every step's growth of it does), and every later step computes only the rows left. PT
samples end at very different lengths (tiny teacher, built-in task: 16.5 tokens on average, the longest of a
batch of 64 up to 48), so most of a batch's late steps were spent on finished rows."""

COMPACT_EVERY_ON_GPU = 16
"""On a GPU, finished rows are counted every this many steps: counting waits for the device, which the loop avoids."""


@torch.no_grad()
def decode(
    tm: TextModel,
    batch: dict[str, torch.Tensor],
    settings: GenerationSettings,
    seeds: Sequence[int] | None = None,
    static: bool = False,
    compile: bool | None = None,
    on_scores: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    prefix: torch.Tensor | None = None,
    stops: Sequence[int] = (),
    blanks: Sequence[int] = (),
) -> torch.Tensor:
    """(B * per_input, N) new token ids of greedy or sampling `settings`: input b's rows together, padding after
    EOS (or a `stops` token), N the longest output (at most `settings.max_new_tokens`).

    Args:
        seeds: sampling: one seed per output row, `per_input` = len(seeds) / B rows per input; greedy: None.
        prefix: (B, P) target tokens the outputs start with (given, not returned; the diagnostic's student prefix).
        stops: tokens that end a row as EOS does once it has written text, kept in its output (line breaks, when
            only the first line counts).
        blanks: tokens that write no text (whitespace): a stop after only these does not end a row.
        static: a static KV cache (fixed shapes), as `generate`'s `cache_implementation="static"`. Without it,
            rows that have finished are dropped from the batch as they accumulate (`COMPACT_SHARE`).
        compile: compile the decoder step and the sampler (default: with a static cache on a GPU).
        on_scores: called at each step, before the step's tokens are chosen, with the model's fp32 scores for them,
            before any rule or warper (step t's are the distribution of output column t), and the output rows they
            are for: (R, V) scores and (R,) row indices, every row until finished ones are dropped.
    """
    if settings.kind not in ("greedy", "sample"):
        raise ValueError(f"decode takes greedy and sampling settings, not {settings.kind}")
    if (settings.kind == "sample") != (seeds is not None):
        raise ValueError(f"{settings.kind} settings need seeds exactly when they sample")
    device, inputs = batch["source_ids"].device, batch["source_ids"].shape[0]
    per_input = 1 if seeds is None else len(seeds) // inputs
    if seeds is not None and len(seeds) != per_input * inputs:
        raise ValueError(f"{len(seeds)} seeds for {inputs} inputs: give the same number of rows to each")
    compile = compiles_decoding(static, device) if compile is None else compile
    state = tm.layout.steps(tm.model, batch, per_input, settings.max_new_tokens, static, compile, prefix)
    pad_id, eos_id = tm.tokenizer.pad_token_id, tm.tokenizer.eos_token_id
    breaks = torch.tensor(stops, dtype=torch.long, device=device)
    blank = torch.tensor(blanks, dtype=torch.long, device=device)
    choose = _chooser(settings, compile)
    seeded = seed_tensor(seeds, device) if seeds is not None else None
    no_repeat = None
    if settings.no_repeat_ngram_size:
        from transformers import NoRepeatNGramLogitsProcessor

        no_repeat = NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size)
    rows, width = inputs * per_input, settings.max_new_tokens
    out = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((rows,), width, dtype=torch.long, device=device)
    alive = torch.arange(rows, device=device)  # the output row of each row decoding
    finished = torch.zeros(rows, dtype=torch.bool, device=device)  # of the rows decoding
    written = torch.zeros(rows, dtype=torch.bool, device=device)  # a row has written text (not only blanks)
    all_finished = _AllFinished(device, sharded=is_sharded(tm.model))
    count_every = COMPACT_EVERY_ON_GPU if all_finished.lagged else 1
    step = torch.zeros((), dtype=torch.int64, device=device)
    scores = state.first()
    drops = not static and _droppable(_cache(state.inputs))
    for t in range(width):
        if on_scores is not None:
            on_scores(scores, alive)
        if no_repeat is not None:
            scores = no_repeat(torch.cat([state.prefix, out[alive, :t]], dim=1), scores)
        tokens = choose(scores, step, seeded).masked_fill_(finished, pad_id)  # finished rows write padding
        out[alive, t] = tokens
        ends = ~finished & ((tokens == eos_id) | (torch.isin(tokens, breaks) & written))  # not before any text
        lengths[alive] = torch.where(ends, t + 1, lengths[alive])
        finished |= ends
        written |= ~torch.isin(tokens, blank)
        step += 1
        if t + 1 == width or all_finished(finished):
            break
        if drops and (t + 1) % count_every == 0:
            # rows that ended at this step stay for one more: its scores are those at the EOS a target appends
            # after a stop token (`on_scores`: their top-k)
            gone = finished & ~ends
            done = int(gone.sum())
            if 0 < done < len(alive) and done * COMPACT_SHARE >= len(alive):
                kept = (~gone).nonzero().squeeze(1)
                state.keep(kept)
                alive, tokens, finished, written = alive[kept], tokens[kept], finished[kept], written[kept]
                seeded = seeded[kept] if seeded is not None else None
        scores = state.next(tokens)
    return out[:, : int(lengths.max())]  # up to and with each row's end


def _chooser(
    settings: GenerationSettings, compile: bool
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """(scores (B, V), step, the rows' seeds) -> (B,) tokens: the argmax, or the seeded sample."""
    if settings.kind != "sample":
        return lambda scores, step, seeds: scores.argmax(-1)
    warp = warpers(settings.temperature, settings.top_k, settings.top_p)
    sample = _compiled_gumbel_tokens() if compile else gumbel_tokens
    return lambda scores, step, seeds: sample(scores, seeds, step, warp)
