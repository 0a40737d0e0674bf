"""PT generation: per-PT seeds, the generation loop against the store, the teacher fingerprint, the commands
(`distilgen generate`, kill -9 and rerun, two processes under `accelerate launch`, `distilgen pts show`)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from distilgen.config import DecodingSpec
from distilgen.generation import hf
from distilgen.generation.hf import HFGenerator
from distilgen.models import Encoded, load_model
from distilgen.pseudo_targets import PTStore, input_key
from distilgen.pt_generation import generate_pts, plan_batches, plan_rows
from distilgen.teachers.hf import teacher_fingerprint
from tests.conftest import cli_env, kill_when, launch_two_processes, tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLE2 = DecodingSpec("sample2", "sample", num_samples=2, max_new_tokens=12)
GREEDY = DecodingSpec("greedy12", max_new_tokens=12)

# ---------------------------------------------------------------------------------------------
# generate_pts
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def teacher(arch, tokenizer_dir):
    torch.manual_seed(0)
    tm = load_model(tiny_model_config(arch, tokenizer_dir))
    tm.model.eval()
    return tm


def _gen(tm, static_cache: str = "off") -> HFGenerator:
    """The teacher's PT generator, as the commands open it."""
    return HFGenerator(tm, 256, batch_size=64, static_cache=static_cache, own_rules=False)


def _spy_decoding(tm) -> list[tuple[int, int, bool]]:
    """(inputs, source width, static cache) of every decoding of greedy or sampled PTs `tm` starts."""
    seen = []
    steps = tm.layout.steps

    def spied(model, batch, per_input, max_new_tokens, static, compile, prefix=None):
        seen.append((batch["source_ids"].shape[0], batch["source_ids"].shape[1], static))
        return steps(model, batch, per_input, max_new_tokens, static, compile, prefix)

    tm.layout.steps = spied  # this instance only
    return seen


def _contents(store, fp, spec, sources):
    return {
        (key, r.sample_index): (r.text, tuple(r.token_ids), r.seed)
        for key, records in store.get(fp, spec, sources).items()
        for r in records
    }


def test_generation_fills_the_store_once_and_only_tops_up(teacher, splits, tmp_path):
    sources = [e.source for e in splits["train"][:10]]
    store, fp = PTStore(tmp_path / "pts"), teacher_fingerprint(teacher, 256)
    calls = _spy_decoding(teacher)
    report = generate_pts(_gen(teacher), store, fp, SAMPLE2, sources + sources[:3], batch_size=4, shard_size=8)
    assert (report.requested, report.missing, report.generated, report.sequences) == (20, 20, 20, 20)
    assert sum(inputs for inputs, _, _ in calls) == 10  # repeated inputs are generated once; 2 samples in one call
    pts = store.get(fp, SAMPLE2, sources)
    assert sorted(len(records) for records in pts.values()) == [2] * 10
    for records in pts.values():
        for r in records:
            assert r.token_ids == teacher.target_ids(teacher.output_tokens(torch.tensor([r.token_ids]))[0])
            assert r.token_ids[-1] == teacher.tokenizer.eos_token_id and len(r.token_ids) <= 12 + 2

    calls.clear()
    again = generate_pts(_gen(teacher), store, fp, SAMPLE2, sources, batch_size=4)
    assert calls == [] and (again.missing, again.generated) == (0, 0)

    more = generate_pts(_gen(teacher), store, fp, dataclasses.replace(SAMPLE2, num_samples=3), sources, batch_size=4)
    assert sum(inputs for inputs, _, _ in calls) == 10 and more.generated == 10  # only sample 2 of each input
    assert _contents(store, fp, SAMPLE2, sources) == {
        k: v for k, v in _contents(store, fp, dataclasses.replace(SAMPLE2, num_samples=3), sources).items() if k[1] < 2
    }


def test_a_slow_teacher_writes_a_shard_per_interval_not_per_shard_size(teacher, splits, tmp_path, monkeypatch):
    """On a CPU a large teacher takes minutes per shard_size PTs: they reach the store every flush_seconds, so a
    kill loses at most that much work."""
    sources = [e.source for e in splits["train"][:10]]
    store, fp = PTStore(tmp_path / "pts"), teacher_fingerprint(teacher, 256)
    writes = []
    add = store.add
    monkeypatch.setattr(store, "add", lambda *args: writes.append(len(args[2])) or add(*args))
    generate_pts(_gen(teacher), store, fp, SAMPLE2, sources, batch_size=4, flush_seconds=0)
    assert writes == [4] * 5  # every batch of 4 rows, at once
    other = PTStore(tmp_path / "other")
    add_other = other.add
    monkeypatch.setattr(other, "add", lambda *args: writes.append(len(args[2])) or add_other(*args))
    writes.clear()
    generate_pts(_gen(teacher), other, fp, SAMPLE2, sources, batch_size=4)
    assert writes == [20]  # within a minute and under shard_size: one shard at the end


@pytest.mark.parametrize("arch", ["bart", "gpt2"])
def test_the_same_pts_come_out_whatever_the_batching_or_sharding(teacher, splits, tmp_path):
    sources = [e.source for e in splits["train"][:12]]
    fp = teacher_fingerprint(teacher, 256)
    one = PTStore(tmp_path / "one")
    generate_pts(_gen(teacher), one, fp, SAMPLE2, sources, batch_size=24)
    sharded = PTStore(tmp_path / "sharded")
    barrier = threading.Barrier(3)  # three "processes", each with its own view of the store

    def shard(rank: int) -> None:
        store = PTStore(tmp_path / "sharded")
        generate_pts(_gen(teacher), store, fp, SAMPLE2, sources, batch_size=5, process_index=rank, num_processes=3,
                     barrier=barrier.wait, progress=False)  # fmt: skip

    threads = [threading.Thread(target=shard, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(sharded.stats()) == 1 and sharded.stats()[0].pts == 24
    assert _contents(one, fp, SAMPLE2, sources) == _contents(sharded, fp, SAMPLE2, sources)
    texts = [text for text, _, _ in _contents(one, fp, SAMPLE2, sources).values()]
    assert len(set(texts)) > 12  # samples differ from each other


@pytest.mark.parametrize("arch", ["bart"])
def test_inputs_another_writer_claimed_are_skipped_then_waited_for(teacher, splits, tmp_path, monkeypatch):
    import distilgen.pt_generation as pt_generation

    monkeypatch.setattr(pt_generation, "CLAIM_POLL_S", 0.05)
    sources = [e.source for e in splits["train"][:10]]
    fp = teacher_fingerprint(teacher, 256)
    reference = PTStore(tmp_path / "reference")
    generate_pts(_gen(teacher), reference, fp, SAMPLE2, sources, batch_size=4, progress=False)
    other = PTStore(tmp_path / "pts")  # another writer, busy with the first 3 inputs
    claimed = sources[:3]
    assert other.claim(fp, SAMPLE2.fingerprint(), [input_key(s) for s in claimed]) == {input_key(s) for s in claimed}

    def stored() -> int:
        return sum(s.pts for s in PTStore(tmp_path / "pts", readonly=True).stats())

    def finish_later():  # once the 7 free inputs are stored, the other writer stores its PTs and releases them
        while stored() < 14:
            time.sleep(0.02)
        other.add(fp, SAMPLE2, [r for records in reference.get(fp, SAMPLE2, claimed).values() for r in records])
        other.release()

    store = PTStore(tmp_path / "pts")
    thread = threading.Thread(target=finish_later)
    thread.start()
    report = generate_pts(_gen(teacher), store, fp, SAMPLE2, sources, batch_size=4, progress=False)
    thread.join()
    assert report.generated == 14 and report.sequences == 14  # 7 inputs x 2 samples: none of the claimed ones
    assert store.missing(fp, SAMPLE2, sources) == []
    assert _contents(store, fp, SAMPLE2, sources) == _contents(reference, fp, SAMPLE2, sources)
    assert not list((tmp_path / "pts" / "claims").iterdir())


def test_rows_cover_an_input_at_once_longest_first_and_batches_count_sequences():
    from distilgen.pseudo_targets import MissingPT

    sources = ["a b", "a b c d e", "a"]
    todo = [MissingPT(input_key(s), i, s) for s in sources for i in (0, 1)]
    beam_spec = DecodingSpec("b", "beam", num_beams=2, num_return=2)
    beam = plan_rows(todo, beam_spec)
    assert [(len(r.source), r.sample_indices) for r in beam] == [(9, (0, 1)), (3, (0, 1)), (1, (0, 1))]
    sample = plan_rows([*todo, MissingPT(input_key("z" * 20), 1, "z" * 20)], SAMPLE2)
    assert [(len(r.source), r.sample_indices) for r in sample] == [(9, (0, 1)), (3, (0, 1)), (1, (0, 1)), (20, (1,))]
    batches = plan_batches(sample, SAMPLE2, batch_size=4)  # 4 sequences: two inputs of 2 samples
    assert [[len(r.source) for r in batch] for batch in batches] == [[9, 3], [1], [20]]
    assert [len(batch) for batch in plan_batches(beam, beam_spec, batch_size=5)] == [2, 1]  # 2 beams each


def test_beam_pts_are_ranked_beams(teacher, splits, tmp_path):
    spec = DecodingSpec("beam3", "beam", num_beams=3, num_return=3, max_new_tokens=8)
    sources = [e.source for e in splits["train"][:3]]
    store, fp = PTStore(tmp_path / "pts"), teacher_fingerprint(teacher, 256)
    generate_pts(_gen(teacher), store, fp, spec, sources, batch_size=2)
    greedy_beam = generate_pts(_gen(teacher), store, fp, dataclasses.replace(spec, num_return=2), sources)
    assert greedy_beam.generated == 0  # fewer beams than stored: nothing to do
    for records in store.get(fp, spec, sources).values():
        assert [r.sample_index for r in records] == [0, 1, 2] and len({r.text for r in records}) == 3


def _eos_where_first_feature_is_high(tm) -> None:
    """EOS becomes the most likely token wherever the last hidden state's first feature is positive: a rule of the
    prefix alone (decoding and teacher forcing agree), so that some outputs end early and others run to the
    limit."""
    eos = tm.tokenizer.eos_token_id

    def hook(module, args, logits):
        high = (args[0][..., :2] > 0).all(-1, keepdim=True)
        is_eos = torch.arange(logits.shape[-1], device=logits.device) == eos
        return torch.where(high & is_eos, logits.amax(-1, keepdim=True) + 1.0, logits)

    tm.model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("spec", [DecodingSpec("greedy", max_new_tokens=12, no_repeat_ngram_size=1), SAMPLE2])
@pytest.mark.parametrize("arch", ["bart", "t5", "gpt2"])
def test_stored_topk_are_the_teachers_log_probs_at_each_pt_token(teacher, splits, tmp_path, monkeypatch, spec):
    """Taken from the decoding steps where a PT is exactly what was decoded (before any rule such as no repeated
    n-grams), else from a teacher-forced pass: either way what the teacher gives at each token of the PT, fed
    alone."""
    _eos_where_first_feature_is_high(teacher)
    forced = []
    teacher_topk = hf.forced_topk

    def spied(tm, sources, targets, k):
        forced.append(len(targets))
        return teacher_topk(tm, sources, targets, k)

    monkeypatch.setattr(hf, "forced_topk", spied)
    sources = [e.source for e in splits["train"][:8]]
    store, fp = PTStore(tmp_path / "pts"), teacher_fingerprint(teacher, 256)
    generate_pts(_gen(teacher), store, fp, spec, sources, batch_size=4, topk=4, progress=False)
    assert store.stats()[0].topk == 4
    pts = len(sources) * spec.num_per_input
    assert sum(forced) < pts  # some from the decoding steps
    for source in sources:
        for record in store.get(fp, spec, [source])[input_key(source)]:
            (enc,), _ = teacher.encode([_Ex(source)], 256, targets=False)
            batch = teacher.collate([Encoded("x", enc.source, record.token_ids)])
            with torch.no_grad():
                logprobs = torch.log_softmax(teacher.target_logits(batch)[0], -1)  # alone: no padding
            values, ids = logprobs.topk(4, -1)
            assert torch.allclose(torch.tensor(record.topk_logprobs), values, atol=1e-4)
            assert torch.equal(torch.tensor(record.topk_ids)[:, 0], ids[:, 0])


def test_topk_come_from_the_steps_for_targets_decoded_as_stored_and_from_a_pass_for_the_others(monkeypatch):
    eos = 2
    generated = torch.tensor([[5, 6, eos, 0], [5, 6, 7, 8], [1, 5, eos, 0]])  # ended; cut at the limit; a special token
    targets = [[5, 6, eos], [5, 6, 7, 8, eos], [5, eos]]  # as `target_ids` writes them back
    steps = hf.StepTopK(2)
    for t in range(4):
        steps(torch.log_softmax(torch.arange(10.0) * (t + 1), -1).expand(3, 10))
    passes = []

    def teacher_topk(tm, sources, targets, k):
        passes.append(sources)
        return [[[-1] * k] * len(t) for t in targets], [[[0.0] * k] * len(t) for t in targets]

    monkeypatch.setattr(hf, "forced_topk", teacher_topk)
    ids, logprobs = hf._output_topk(None, ["a", "b", "c"], targets, generated, steps, 2)
    assert passes == [["b", "c"]]
    assert ids[0] == [[9, 8]] * 3 and [len(x) for x in ids] == [3, 5, 2] and ids[1][0] == [-1, -1]
    assert logprobs[0][0][0] == pytest.approx(torch.log_softmax(torch.arange(10.0), -1)[9].item())
    assert logprobs[0][2][0] > logprobs[0][0][0]  # step 3's distribution is sharper than step 1's


@dataclasses.dataclass
class _Ex:
    source: str
    id: str = "x"
    target: str | None = None


def test_teacher_fingerprint_follows_weights_dtype_and_input_length(tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    tm = load_model(tiny_model_config("bart", tokenizer_dir))
    fp = teacher_fingerprint(tm, 256)
    tm.save(tmp_path / "t")
    from distilgen.config import ModelConfig

    assert teacher_fingerprint(load_model(ModelConfig(path=str(tmp_path / "t"))), 256) == fp
    assert teacher_fingerprint(tm, 128) != fp
    with torch.no_grad():
        tm.model.lm_head.weight[0, 0] += 1e-3
    assert teacher_fingerprint(tm, 256) != fp
    changed = teacher_fingerprint(tm, 256)
    tm.model.to(torch.bfloat16)
    assert teacher_fingerprint(tm, 256) not in (fp, changed)


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------


def _generate_yaml(tmp_path, teacher_dir, store, **overrides) -> Path:
    cfg = {
        "store": str(store),
        "data": {"task": {"train_size": 30, "unlabeled_size": 90, "dev_size": 0, "test_size": 0}},
        "teacher": {"path": str(teacher_dir)},
        "spec": {"name": "s2", "kind": "sample", "num_samples": 2, "max_new_tokens": 16},
        "batch_size": 8,
        "shard_size": 16,
        **overrides,
    }
    path = tmp_path / f"generate-{store.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _store_rows(store_dir) -> set:
    """Every PT in the store of `_generate_yaml`'s inputs, as comparable tuples."""
    from distilgen.config import BuiltinTaskConfig, DataConfig
    from distilgen.data import load_splits

    task = BuiltinTaskConfig(train_size=30, unlabeled_size=90, dev_size=0, test_size=0)
    sources = [e.source for split in load_splits(DataConfig(task=task)).values() for e in split]
    store = PTStore(store_dir)
    (stats,) = store.stats()
    pts = store.get(stats.teacher_fp, store.spec(stats.spec_fp), sources, every_index=True)
    return {(key, r.sample_index, r.text, tuple(r.token_ids), r.seed) for key, records in pts.items() for r in records}


def test_generate_command_sigkill_then_rerun_ends_with_the_uninterrupted_pts(tmp_path, teacher_dir):
    full = _generate_yaml(tmp_path, teacher_dir, tmp_path / "full")
    result = subprocess.run(
        [sys.executable, "-m", "distilgen.cli", "generate", str(full)], env=cli_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert '"requested": 240' in result.stdout and '"stored_pts": 240' in result.stdout

    killed = _generate_yaml(tmp_path, teacher_dir, tmp_path / "killed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "distilgen.cli", "generate", str(killed)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = tmp_path / "killed" / "manifest.json"
    kill_when(proc, lambda: manifest.exists() and 2 <= manifest.read_text().count('"file"') < 15)
    done_before = PTStore(tmp_path / "killed").stats()[0].pts
    assert 32 <= done_before < 240

    rerun = subprocess.run(
        [sys.executable, "-m", "distilgen.cli", "generate", str(killed)], env=cli_env(), capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f'"already_stored": {done_before}' in rerun.stdout
    assert _store_rows(tmp_path / "killed") == _store_rows(tmp_path / "full")

    again = subprocess.run(
        [sys.executable, "-m", "distilgen.cli", "generate", str(killed)], env=cli_env(), capture_output=True, text=True
    )
    assert '"already_stored": 240' in again.stdout and '"generated_here": 0' in again.stdout

    shown = subprocess.run(
        [sys.executable, "-m", "distilgen.cli", "pts", "show", str(killed), "--examples", "1"],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    assert "spec s2 (sample" in shown.stdout and "240 PTs" in shown.stdout
    assert "train: 30/30 inputs with PTs, 60 PTs, 2.00 per input" in shown.stdout
    assert "unlabeled: 90/90 inputs with PTs, 180 PTs" in shown.stdout and "self-BLEU" in shown.stdout
    lines = shown.stdout.splitlines()
    train_line, unlabeled_line = (next(x for x in lines if f"  {n}:" in x) for n in ("train", "unlabeled"))
    assert "against gold: BLEU" in train_line and "against gold" not in unlabeled_line  # only labeled inputs
    assert shown.stdout.count("      PT ") == 2


def test_two_processes_under_accelerate_launch_give_the_single_process_store(tmp_path, teacher_dir):
    single = _generate_yaml(tmp_path, teacher_dir, tmp_path / "single")
    assert subprocess.run(
        [sys.executable, "-m", "distilgen.cli", "generate", str(single)], env=cli_env(), capture_output=True
    ).returncode == 0  # fmt: skip
    double = _generate_yaml(tmp_path, teacher_dir, tmp_path / "double")
    result = subprocess.run(
        [*launch_two_processes(), "-m", "distilgen.cli", "generate", str(double)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"processes": 2' in result.stdout and result.stdout.count('"processes"') == 1  # the main process prints
    assert _store_rows(tmp_path / "double") == _store_rows(tmp_path / "single")
    assert len(json.loads((tmp_path / "double" / "manifest.json").read_text())["shards"]) >= 2


def test_two_generate_commands_on_one_store_decode_each_input_once(tmp_path, teacher_dir):
    """Two independent `distilgen generate` runs (no accelerate launch) started together on one store: each skips
    the inputs the other has claimed, so together they decode every input once (before claims: twice)."""
    task = {"train_size": 30, "unlabeled_size": 600, "dev_size": 0, "test_size": 0}
    cfg = _generate_yaml(tmp_path, teacher_dir, tmp_path / "pts", data={"task": task}, batch_size=4)
    command = [sys.executable, "-m", "distilgen.cli", "generate", str(cfg)]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    runs = [subprocess.Popen(command, env=cli_env(), stdout=log.open("w"), stderr=subprocess.DEVNULL) for log in logs]
    assert [run.wait(timeout=300) for run in runs] == [0, 0]
    summaries = [json.loads(log.read_text()) for log in logs]
    assert sum(s["generated_here"] for s in summaries) == 1260  # 630 inputs x 2 samples, each decoded once
    assert [s["stored_pts"] for s in summaries] == [1260, 1260]
    assert not list((tmp_path / "pts" / "claims").iterdir())


def test_generate_config_errors_name_the_key(tmp_path, teacher_dir, capsys):
    from distilgen.cli import main

    cfg = str(_generate_yaml(tmp_path, teacher_dir, tmp_path / "x", spec="nucleus"))
    assert main(["generate", cfg]) == 2 and "spec: unknown spec 'nucleus'" in capsys.readouterr().err
    assert main(["pts", "show", cfg]) == 2


def test_a_lost_manifest_costs_no_teacher_call_and_a_broken_one_stops_both_commands_untouched(
    tmp_path, teacher_dir, capsys
):
    from distilgen.cli import main

    cfg = str(_generate_yaml(tmp_path, teacher_dir, tmp_path / "pts", limit=8))

    def run(*args) -> tuple[int, dict | str]:
        code = main([*args, cfg])
        out, err = capsys.readouterr()
        return code, json.loads(out) if code == 0 and args == ("generate",) else err

    assert run("generate")[1]["generated_here"] == 32  # 16 inputs x 2 samples
    rows = _store_rows(tmp_path / "pts")
    (tmp_path / "pts" / "manifest.json").unlink()
    code, summary = run("generate")
    assert code == 0 and summary["generated_here"] == 0 and summary["already_stored"] == 32  # rebuilt, not redone
    assert _store_rows(tmp_path / "pts") == rows

    (tmp_path / "pts" / "manifest.json").write_text("{}")
    before = {p: p.read_bytes() for p in (tmp_path / "pts").rglob("*") if p.is_file()}
    for command in (("pts", "show"), ("generate",)):
        code, err = run(*command)
        assert code == 2 and err.count("\n") == 1 and "manifest.json: not a PT store manifest" in err
        assert {p: p.read_bytes() for p in (tmp_path / "pts").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("arch", ["bart", "gpt2"])
def test_a_static_cache_pads_sources_to_buckets_and_gives_the_same_pts(teacher, splits, tmp_path, monkeypatch):
    sources = [e.source for e in splits["train"][:6]]
    fp = teacher_fingerprint(teacher, 256)
    seen = _spy_decoding(teacher)
    for spec in (GREEDY, SAMPLE2):
        dynamic, static = PTStore(tmp_path / f"{spec.name}-dynamic"), PTStore(tmp_path / f"{spec.name}-static")
        generate_pts(_gen(teacher), dynamic, fp, spec, sources, batch_size=4, progress=False)  # auto: off on CPU
        assert not any(cache for _, _, cache in seen) and any(width % 64 for _, width, _ in seen)
        seen.clear()
        generate_pts(_gen(teacher, "on"), static, fp, spec, sources, batch_size=4, progress=False)
        assert seen and all(width % 64 == 0 and cache for _, width, cache in seen)
        seen.clear()
        assert _contents(dynamic, fp, spec, sources) == _contents(static, fp, spec, sources)
    beams = []
    real = type(teacher.layout).generate
    monkeypatch.setattr(
        type(teacher.layout),
        "generate",
        lambda layout, model, batch, prefix=None, **kw: beams.append(kw) or real(layout, model, batch, prefix, **kw),
    )
    beam = DecodingSpec("beam2", "beam", num_beams=2, max_new_tokens=8)
    generate_pts(_gen(teacher, "on"), PTStore(tmp_path / "beam"), fp, beam, sources, progress=False)
    assert beams and not seen and all("cache_implementation" not in kw for kw in beams)  # beams: `generate`'s own cache
