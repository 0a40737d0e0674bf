"""Distillation methods: the data schedule, Joint-Teaching's mixing, every method end to end, resume."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distilgen.config import ConfigError, ModelConfig
from distilgen.data import load_splits
from distilgen.distill import (
    METHODS,
    Context,
    _weighted_sum,
    distill,
    is_student_step,
    prepare_pts,
    sample_student_pts,
    student_pt_prepare,
    teacher_pt_items,
)
from distilgen.models import load_model
from distilgen.teachers import load_teacher
from tests.conftest import (
    DISTILL_STUDENT,
    cli_env,
    distill_config,
    kill_when,
    launch_two_processes,
    tiny_model_config,
)

ROOT = Path(__file__).resolve().parents[1]
# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def test_alpha_mixes_student_steps_exactly_and_evenly():
    assert [is_student_step(s, 0.5) for s in range(6)] == [False, True] * 3
    assert [is_student_step(s, 0.75) for s in range(8)] == [False, False, False, True] * 2
    assert all(is_student_step(s, 0.0) for s in range(10)) and not any(is_student_step(s, 1.0) for s in range(10))
    for alpha in (0.7, 0.3, 0.1, 0.9):
        assert sum(is_student_step(s, alpha) for s in range(1000)) == round(1000 * (1 - alpha))
        assert sum(is_student_step(s, alpha) for s in range(10)) == round(10 * (1 - alpha))  # no drift early on


@pytest.fixture(scope="module")
def pt_context(tmp_path_factory, teacher_dir):
    tmp_path = tmp_path_factory.mktemp("ctx")
    cfg = distill_config(tmp_path, teacher_dir, "joint_teaching", **{"pts.spec.num_samples": 3})
    teacher = load_teacher(cfg.teacher, "fp32", torch.device("cpu"))
    student = load_model(ModelConfig(**{**DISTILL_STUDENT, "tokenizer": str(teacher_dir)}))
    ctx = Context(cfg, teacher, student, load_splits(cfg.data, ("train", "unlabeled")))

    class OneProcess:
        process_index, num_processes, is_local_main_process = 0, 1, False

        def wait_for_everyone(self):
            pass

    prepare_pts(ctx, OneProcess())
    return ctx


def test_each_input_cycles_through_its_k_teacher_pts_across_epochs(pt_context):
    ctx = pt_context
    items = teacher_pt_items(ctx)
    labeled, unlabeled = ctx.splits["train"][0], ctx.splits["unlabeled"][0]
    pts = ctx.store.get(
        ctx.teacher_fp, ctx.store.spec(ctx.store.stats()[0].spec_fp), [labeled.source, unlabeled.source]
    )
    for epoch in range(4):
        epoch_items = items(epoch)
        assert len(epoch_items) == 24 + 24 + 8  # gold + one PT per labeled input, one PT per unlabeled input
        for example in (labeled, unlabeled):
            mine = [it for it in epoch_items if it.id == example.id]
            from distilgen.pseudo_targets import input_key

            expected_pt = pts[input_key(example.source)][epoch % 3].token_ids
            assert expected_pt in [it.target for it in mine]
        gold = [it for it in epoch_items if it.id == labeled.id]
        assert len(gold) == 2  # its gold target and one PT
    assert [it.id for it in items(0)] == [it.id for it in items(1)]


def _nothing_ahead(steps):
    return {}


def test_a_student_step_swaps_in_fresh_student_pts_and_a_teacher_step_keeps_the_batch(pt_context):
    ctx = pt_context
    items = teacher_pt_items(ctx)(0)[:4]
    batch = ctx.student.collate(items)
    prepare = student_pt_prepare(ctx, alpha=0.5)
    assert prepare(ctx.student, 0, [batch], _nothing_ahead) == [batch]  # step 0: teacher PTs
    (fresh,) = prepare(ctx.student, 1, [batch], _nothing_ahead)  # step 1: student PTs for the same sources
    assert torch.equal(fresh["source_ids"], batch["source_ids"]) and "topk_rows" not in fresh
    assert not torch.equal(fresh["target_ids"][:, :3], batch["target_ids"][:, :3])
    (again,) = sample_student_pts(ctx, ctx.student, {1: [batch]})[1]
    assert torch.equal(again["target_ids"], fresh["target_ids"])  # seeded by (seed, step, row)
    (other,) = sample_student_pts(ctx, ctx.student, {3: [batch]})[3]
    assert not torch.equal(other["target_ids"], fresh["target_ids"])
    (elsewhere,) = sample_student_pts(dataclasses.replace(ctx, process_index=1), ctx.student, {1: [batch]})[1]
    assert not torch.equal(elsewhere["target_ids"], fresh["target_ids"])  # another process, other noise
    eos = ctx.student.tokenizer.eos_token_id
    assert all(eos in row for row in fresh["target_ids"].tolist())
    assert ctx.student.model.training  # generation ran in eval mode and restored the mode


def test_student_pts_with_a_static_cache_pad_sources_to_buckets_and_are_the_same(pt_context, monkeypatch):
    ctx = pt_context
    batch = ctx.student.collate(teacher_pt_items(ctx)(0)[:4])
    seen = []
    steps = ctx.student.layout.steps
    monkeypatch.setattr(
        ctx.student.layout,
        "steps",
        lambda model, b, *args: seen.append((b["source_ids"].shape[1], args[2])) or steps(model, b, *args),
    )
    (dynamic,) = sample_student_pts(ctx, ctx.student, {1: [batch]})[1]  # default auto: off on a CPU
    monkeypatch.setattr(ctx.cfg.student_pts, "static_cache", "on")
    (static,) = sample_student_pts(ctx, ctx.student, {1: [batch]})[1]
    width = batch["source_ids"].shape[1]
    assert width % 64 and seen == [(width, False), (-(-width // 64) * 64, True)]
    assert torch.equal(static["source_ids"], batch["source_ids"])  # the training batch keeps its own width
    assert torch.equal(static["target_ids"], dynamic["target_ids"])


def test_refresh_every_samples_a_window_of_student_steps_in_one_call_with_the_same_draws(pt_context, monkeypatch):
    ctx = pt_context
    items = teacher_pt_items(ctx)(0)
    # step s trains on two micro-batches (grad_accum 2) of 3 rows each, all different sources
    steps = {s: [ctx.student.collate(items[6 * s + 3 * j : 6 * s + 3 * j + 3]) for j in range(2)] for s in range(8)}
    calls = []
    decoder_steps = ctx.student.layout.steps
    monkeypatch.setattr(
        ctx.student.layout,
        "steps",
        lambda model, batch, *args: calls.append(len(batch["source_ids"])) or decoder_steps(model, batch, *args),
    )

    def run(refresh_every: int) -> list[list[dict]]:
        monkeypatch.setattr(ctx.cfg.student_pts, "refresh_every", refresh_every)
        prepare = student_pt_prepare(ctx, alpha=0.5)
        asked = []

        def upcoming(later):
            asked.append(list(later))
            return {s: steps[s] for s in later if s < 8}  # the run ends after step 7

        trained = [prepare(ctx.student, s, steps[s], upcoming) for s in range(8)]
        return trained, asked

    fresh, asked = run(1)
    assert calls == [6] * 4 and asked == [[]] * 4  # steps 1, 3, 5, 7: one call each, no look-ahead
    calls.clear()
    stale, asked = run(3)
    assert calls == [18, 6]  # steps 1, 3, 5 in one call; then step 7 (9 and 11 are past the run)
    assert asked == [[3, 5], [9, 11]]
    for s in range(8):
        for a, b in zip(fresh[s], stale[s], strict=True):
            assert torch.equal(a["source_ids"], b["source_ids"]) and torch.equal(a["target_ids"], b["target_ids"])
        if s % 2 == 0:
            assert stale[s] is steps[s]  # teacher-PT steps are untouched


def test_within_batch_mixing_trains_on_both_kinds_weighted_by_alpha(pt_context, monkeypatch):
    ctx = pt_context
    monkeypatch.setattr(ctx.cfg.student_pts, "mixing", "batch")
    items = teacher_pt_items(ctx)(0)
    step = [ctx.student.collate(items[:4]), ctx.student.collate(items[4:7])]  # two micro-batches
    mixed = student_pt_prepare(ctx, alpha=0.75)(ctx.student, 0, step, _nothing_ahead)
    assert [b["target_ids"].shape[0] for b in mixed] == [8, 6]
    assert torch.equal(mixed[0]["source_ids"][:4, : step[0]["source_ids"].shape[1]], step[0]["source_ids"])
    # Whatever the two halves' lengths, the step's loss is 0.75 x (teacher half's mean) + 0.25 x (student half's):
    # a loss of 1 per teacher-half token and 2 per student-half token gives 0.75 + 0.5 = 1.25.
    total = tokens = 0.0
    for b, rows in zip(mixed, (4, 3), strict=True):
        per_token = torch.where(torch.arange(2 * rows)[:, None] < rows, 1.0, 2.0).expand(b["target_mask"].shape)
        total += _weighted_sum(per_token, b).item()
        tokens += b["target_mask"].sum().item()
    teacher_tokens = sum(b["target_mask"][:rows].sum().item() for b, rows in zip(mixed, (4, 3), strict=True))
    assert teacher_tokens != tokens - teacher_tokens  # the halves differ in length, or the test shows nothing
    assert total / tokens == pytest.approx(1.25)
    assert student_pt_prepare(ctx, alpha=1.0)(ctx.student, 0, step, _nothing_ahead) == step


# ---------------------------------------------------------------------------------------------
# Every method end to end
# ---------------------------------------------------------------------------------------------


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_a_tiny_student_and_its_loss_goes_down(method, tmp_path, teacher_dir):
    cfg = distill_config(tmp_path, teacher_dir, method, final_finetune_epochs=1)
    summary = distill(cfg)
    losses = _losses(Path(cfg.output_dir) / "distill")
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert Path(summary["model"], "model.safetensors").exists()
    if method != "finetune":
        assert summary["finetune"]["steps"] == 3  # one epoch of 24 labeled examples in batches of 8
    else:
        assert "finetune" not in summary  # fewer steps than the others, unless equal_budget


def test_equal_budget_gives_finetune_the_final_stage_too(tmp_path, teacher_dir):
    summary = distill(distill_config(tmp_path, teacher_dir, "finetune", final_finetune_epochs=1, equal_budget=True))
    assert (summary["distill"]["steps"], summary["finetune"]["steps"]) == (12, 3)  # the steps of every KD method


def test_joint_teaching_with_refresh_every_samples_ahead_within_each_epoch(tmp_path, teacher_dir, monkeypatch):
    import distilgen.distill as distill_module

    windows = []
    original = distill_module.sample_student_pts
    monkeypatch.setattr(
        distill_module,
        "sample_student_pts",
        lambda ctx, tm, window: windows.append({s: len(b) for s, b in window.items()}) or original(ctx, tm, window),
    )
    overrides = {"student_pts.refresh_every": 3, "train.batch_size": 4, "train.grad_accum": 2}
    distill(distill_config(tmp_path, teacher_dir, "joint_teaching", **overrides))
    # 56 items an epoch (24 gold, 32 PTs) make 14 batches, 7 steps of 2 micro-batches: steps 0-6, then 7-11
    assert windows == [{1: 2, 3: 2, 5: 2}, {7: 2, 9: 2, 11: 2}]
    losses = _losses(tmp_path / "joint_teaching" / "distill")
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses


def test_a_sequence_level_student_may_train_its_own_tokenizer_and_word_level_methods_refuse_it(tmp_path, teacher_dir):
    from transformers import AutoTokenizer

    own = {"student.tokenizer": "task", "student.vocab_size": 150, "train.max_steps": 2}
    summary = distill(distill_config(tmp_path, teacher_dir, "seq_kd", **own))
    assert len(AutoTokenizer.from_pretrained(summary["model"])) < len(AutoTokenizer.from_pretrained(teacher_dir))
    with pytest.raises(ConfigError, match="tokenizers differ"):
        distill(distill_config(tmp_path, teacher_dir, "logits_kd", **own))


def test_refresh_every_below_one_is_refused_with_its_key(tmp_path, teacher_dir):
    from distilgen.config import ConfigError

    with pytest.raises(ConfigError, match="student_pts.refresh_every.*>= 1"):
        distill_config(tmp_path, teacher_dir, "joint_teaching", **{"student_pts.refresh_every": 0})


def test_stored_topk_replaces_the_teacher_pass_on_teacher_pts(tmp_path, teacher_dir, monkeypatch):
    import distilgen.distill as distill_module

    calls = []
    original = distill_module._teacher_logits
    monkeypatch.setattr(
        distill_module, "_teacher_logits", lambda ctx, batch: calls.append(batch) or original(ctx, batch)
    )
    cfg = distill_config(
        tmp_path, teacher_dir, "logits_kd_pt", **{"pts.topk": 8, "pts.include_gold": False, "train.max_steps": 3}
    )
    distill(cfg)
    assert calls == []  # every target was a PT with stored top-k
    cfg = distill_config(tmp_path, teacher_dir, "logits_kd_pt", output_dir=str(tmp_path / "live"),
               **{"pts.topk": 8, "kd.use_stored_topk": False, "train.max_steps": 3})  # fmt: skip
    distill(cfg)
    assert len(calls) == 3


def test_a_word_level_method_refuses_a_student_with_another_vocabulary(tmp_path, teacher_dir):
    from distilgen.config import ConfigError
    from distilgen.models import train_tokenizer

    train_tokenizer(["completely different words here"] * 20, 120).save_pretrained(tmp_path / "other")
    cfg = distill_config(tmp_path, teacher_dir, "logits_kd", **{"student.tokenizer": str(tmp_path / "other")})
    with pytest.raises(ConfigError, match="seq_kd"):
        distill(cfg)


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def test_sigkill_during_joint_teaching_then_rerun_resumes_and_finishes(tmp_path, teacher_dir):
    cfg = distill_config(
        tmp_path, teacher_dir, "joint_teaching", **{"train.max_steps": 60, "train.checkpoint_every": 3}
    )
    path = tmp_path / "jt.yaml"
    from distilgen.config import to_dict

    path.write_text(yaml.safe_dump(to_dict(cfg)))
    env = cli_env()
    command = [sys.executable, "-m", "distilgen.cli", "distill", str(path)]
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    state_file = Path(cfg.output_dir) / "distill" / "checkpoint" / "trainer_state.json"
    kill_when(proc, lambda: state_file.exists() and 3 <= json.loads(state_file.read_text())["step"] < 50, log=log)
    killed_at = json.loads(state_file.read_text())["step"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"at step {killed_at}/60" in result.stdout
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert summary["distill"]["steps"] == 60


@pytest.mark.parametrize("method", ["joint_teaching", "attention_kd"])
def test_two_processes_under_accelerate_launch_train_on_the_single_process_schedule(tmp_path, teacher_dir, method):
    """Under DDP the student is wrapped: the losses reach its config and attention layers through the wrapper,
    each process samples its own student PTs, the learning rate moves once per optimizer step (as with one
    process), not once per process, and the summary is printed once."""
    from distilgen.config import to_dict

    def run(name: str, launcher: list[str]) -> list[dict]:
        cfg = distill_config(tmp_path, teacher_dir, method, output_dir=str(tmp_path / name))
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(to_dict(cfg)))
        command = [*launcher, "-m", "distilgen.cli", "distill", str(path)]
        result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count('"method":') == 1  # the summary, printed by the main process alone
        assert json.loads((tmp_path / name / "summary.json").read_text())["distill"]["steps"] == 12
        lines = (tmp_path / name / "distill" / "metrics.jsonl").read_text().splitlines()
        return [record for record in map(json.loads, lines) if "lr" in record]

    single = run("single", [sys.executable])
    double = run("double", launch_two_processes())
    assert [r["lr"] for r in double] == [r["lr"] for r in single] and len(double) == 12
    assert double[-1]["loss"] < double[0]["loss"]


def test_a_long_teacher_pt_is_cut_like_encode_does_with_its_topk(pt_context):
    from distilgen.distill import _Encoder
    from distilgen.pseudo_targets import PTRecord

    ctx = pt_context
    example = ctx.splits["train"][0]
    tokens = [*range(5, 5 + 59), ctx.student.tokenizer.eos_token_id]  # 60 tokens, the limit is 48
    record = PTRecord("k", 0, "text", tokens, topk_ids=[[t, 1] for t in tokens], topk_logprobs=[[-0.5, -2.0]] * 60)
    encoder = _Encoder(ctx)
    encoder.placeholder([example])
    item = encoder.pt(example.id, record)
    assert item.target == [*tokens[:47], tokens[-1]]
    assert item.topk_ids[:, 0].tolist() == item.target and item.topk_logprobs.shape == (48, 2)


# ---------------------------------------------------------------------------------------------
# Losses normalised over the optimizer step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_attention_kd_loss_does_not_depend_on_the_micro_batch_split(pt_context, monkeypatch, which):
    """1 micro-batch of 8 or 2 of 4: the relation term is a sum over the step's positions divided by their count,
    like the logits term (it was a mean per micro-batch, weighted by target tokens: 2.107 against 1.833)."""
    from distilgen.distill import attention_kd_plan, gold_items

    ctx = pt_context
    monkeypatch.setattr(ctx.cfg.attention, "which", which)
    monkeypatch.setattr(ctx.cfg.attention, "weight", 5.0)  # the relation term matters
    ctx.student.model.eval()
    items = sorted(gold_items(ctx)[:8], key=lambda it: len(it.source))  # halves of different source lengths
    plan = attention_kd_plan(ctx)

    def step_loss(micro_batches: list) -> float:
        batches = plan.prepare(ctx.student, 0, micro_batches, _nothing_ahead)
        tokens = sum(b["target_mask"].sum() for b in batches)
        with torch.no_grad():
            return sum(plan.loss(ctx.student, b) for b in batches).item() / tokens.item()

    whole = step_loss([ctx.student.collate(items)])
    halves = step_loss([ctx.student.collate(items[:4]), ctx.student.collate(items[4:])])
    assert whole == pytest.approx(halves, rel=1e-5)


def _with_stored_topk(ctx, batch, k: int = 5):
    """`batch` with the teacher's own top-k at every target position stored, as PTs with top-k carry it."""
    with torch.no_grad():
        logprobs = torch.log_softmax(ctx.teacher.target_logits(batch).float(), dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return {**batch, "topk_ids": ids, "topk_logprobs": values, "topk_rows": torch.ones(len(ids), dtype=torch.long)}


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "total_variation"])
def test_stored_topk_is_compared_with_the_configured_divergence(pt_context, monkeypatch, divergence):
    from distilgen.distill import gold_items, kd_per_token
    from distilgen.objectives import sparse_logits_kd

    ctx = pt_context
    monkeypatch.setattr(ctx.cfg.kd, "divergence", divergence)
    monkeypatch.setattr(ctx.cfg.kd, "beta", 0.3)
    batch = _with_stored_topk(ctx, ctx.student.collate(gold_items(ctx)[:4]))
    with torch.no_grad():
        student_logits = ctx.student.target_logits(batch)
        got = kd_per_token(ctx, student_logits, batch)
        args = (student_logits, batch["topk_ids"], batch["topk_logprobs"], batch["target_mask"])
        want = sparse_logits_kd(*args, divergence=divergence, beta=0.3)
        forward = sparse_logits_kd(*args)
    assert torch.allclose(got, want) and not torch.allclose(got, forward)


def test_kd_beta_and_alpha_are_config_keys_that_reach_the_loss(pt_context, monkeypatch):
    from distilgen.distill import gold_items, kd_per_token
    from distilgen.objectives import logits_kd

    ctx = pt_context
    batch = ctx.student.collate(gold_items(ctx)[:4])
    with torch.no_grad():
        student_logits, teacher_logits = ctx.student.target_logits(batch), ctx.teacher.target_logits(batch)
        for divergence, key, value in (("jsd", "beta", 0.2), ("skew_reverse_kl", "alpha", 0.4)):
            monkeypatch.setattr(ctx.cfg.kd, "divergence", divergence)
            monkeypatch.setattr(ctx.cfg.kd, key, value)
            got = kd_per_token(ctx, student_logits, batch)
            want = logits_kd(student_logits, teacher_logits, batch["target_mask"], divergence, **{key: value})
            default = logits_kd(student_logits, teacher_logits, batch["target_mask"], divergence)
            assert torch.allclose(got, want) and not torch.allclose(got, default)


def test_a_temperature_with_stored_topk_is_refused_before_training(tmp_path, teacher_dir):
    from distilgen.config import ConfigError
    from distilgen.distill import check_method

    with pytest.raises(ConfigError, match=r"kd.temperature: .*use_stored_topk=false"):  # asked for: at the start
        distill(distill_config(tmp_path, teacher_dir, "logits_kd_pt", **{"kd.temperature": 2.0, "pts.topk": 8}))
    assert not (tmp_path / "logits_kd_pt").exists()  # before anything was written
    check_method(
        distill_config(
            tmp_path, teacher_dir, "logits_kd_pt", **{"kd.temperature": 2.0, "pts.topk": 8, "kd.use_stored_topk": False}
        )
    )
    check_method(distill_config(tmp_path, teacher_dir, "logits_kd", **{"kd.temperature": 2.0, "pts.topk": 8}))  # no PTs
    distill(distill_config(tmp_path, teacher_dir, "logits_kd_pt", **{"pts.topk": 8, "train.max_steps": 1}))
    later = distill_config(
        tmp_path, teacher_dir, "logits_kd_pt", output_dir=str(tmp_path / "t2"), **{"kd.temperature": 2.0}
    )
    with pytest.raises(ConfigError, match=r"kd.temperature: 2.0, but the PTs in .* hold the teacher's top-8"):
        distill(later)  # the store already holds top-k: found before any training
    assert not (tmp_path / "t2" / "distill").exists()


def test_attention_kd_on_decoder_only_models_does_not_depend_on_the_micro_batch_split(tmp_path, tokenizer_dir):
    from distilgen.distill import attention_kd_plan, gold_items

    cfg = distill_config(tmp_path, tokenizer_dir, "attention_kd", **{"attention.weight": 50.0})
    torch.manual_seed(0)
    teacher, student = (load_model(tiny_model_config("gpt2", tokenizer_dir, hidden_size=h)) for h in (32, 16))
    for tm in (teacher, student):
        tm.model.eval()
    ctx = Context(cfg, teacher, student, load_splits(cfg.data, ("train",)))
    plan = attention_kd_plan(ctx)
    items = gold_items(ctx)[:8]

    def step_loss(groups: list[list[int]]) -> float:
        batches = plan.prepare(student, 0, [student.collate([items[i] for i in g]) for g in groups], _nothing_ahead)
        tokens = sum(b["target_mask"].sum() for b in batches)
        with torch.no_grad():
            return sum(plan.loss(student, b) for b in batches).item() / tokens.item()

    whole = step_loss([list(range(8))])
    assert step_loss([[0, 1, 2, 3], [4, 5, 6, 7]]) == pytest.approx(whole, rel=1e-6)
    assert step_loss([[0], [1, 2, 3, 4, 5, 6, 7]]) == pytest.approx(whole, rel=1e-6)


def test_within_batch_mixing_is_normalised_over_every_process(pt_context, monkeypatch):
    """Two processes, each with its own rows: the weights use the token counts summed over both
    (`Context.reduce`), so the losses of both, divided by all their tokens, mix the halves alpha : 1 - alpha."""
    ctx = pt_context
    monkeypatch.setattr(ctx.cfg.student_pts, "mixing", "batch")
    items, rows = teacher_pt_items(ctx)(0), (2, 5)
    shares = [[ctx.student.collate(items[:2])], [ctx.student.collate(items[2:7])]]  # process 0, process 1

    def mix(p: int, reduce) -> dict:
        monkeypatch.setattr(ctx, "reduce", reduce)
        (batch,) = student_pt_prepare(ctx, 0.75)(ctx.student, 0, shares[p], _nothing_ahead)
        return batch

    alone = [mix(p, lambda counts: counts) for p in (0, 1)]
    counts = [
        torch.stack([b["target_mask"][:r].sum(), b["target_mask"][r:].sum()]).float()  # (teacher, student) tokens
        for b, r in zip(alone, rows, strict=True)
    ]
    mixed = [mix(p, lambda local, p=p: local + counts[1 - p]) for p in (0, 1)]  # what reduce sums over processes
    # Per-token losses differ by process (teacher half 1 or 3, student half 2 or 4), so a process that weighted its
    # rows by its own counts alone would give another mix.
    values = [(1.0, 2.0), (3.0, 4.0)]
    loss = tokens = 0.0
    for b, r, (teacher_value, student_value) in zip(mixed, rows, values, strict=True):
        per_token = torch.where(torch.arange(2 * r)[:, None] < r, teacher_value, student_value)
        loss += _weighted_sum(per_token.expand(b["target_mask"].shape), b).item()
        tokens += b["target_mask"].sum().item()
    (teacher0, student0), (teacher1, student1) = counts
    teacher_mean = (1 * teacher0 + 3 * teacher1) / (teacher0 + teacher1)
    student_mean = (2 * student0 + 4 * student1) / (student0 + student1)
    assert loss / tokens == pytest.approx((0.75 * teacher_mean + 0.25 * student_mean).item())
