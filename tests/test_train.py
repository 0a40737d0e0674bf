from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from distilgen.config import TrainConfig
from distilgen.data import load_splits
from distilgen.models import load_model
from distilgen.train import TrainingError, cross_entropy_loss, epoch_batches, make_accelerator, train
from tests.conftest import tiny_model_config


def _run(
    tokenizer_dir,
    splits,
    out,
    arch="bart",
    on_step=None,
    evaluate=None,
    loss_fn=None,
    dropout=0.1,
    grads=None,
    **train_kwargs,
):
    torch.manual_seed(0)
    tm = load_model(tiny_model_config(arch, tokenizer_dir, dropout=dropout))
    if grads is not None:  # sum every gradient contribution (all micro-batches) per parameter
        for name, param in tm.model.named_parameters():
            param.register_hook(lambda g, name=name: grads.__setitem__(name, grads.get(name, 0) + g.detach().clone()))
    items, _ = tm.encode(splits["train"])
    cfg = TrainConfig(**{"batch_size": 8, "lr": 3e-3, "log_every": 1, "eval_every": 0, **train_kwargs})
    state = train(
        tm,
        items,
        loss_fn or cross_entropy_loss(),
        cfg,
        out,
        make_accelerator(cfg, out),
        seed=0,
        evaluate=evaluate,
        on_step=on_step,
    )
    return tm, state


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_goes_down_on_a_learnable_toy_task(tokenizer_dir, splits, tmp_path, arch):
    """Eight examples seen again and again: every architecture must learn them."""
    _, state = _run(
        tokenizer_dir, {"train": splits["train"][:8]}, tmp_path, arch=arch, max_steps=40, lr=1e-2, dropout=0.0
    )
    losses = _losses(tmp_path)
    assert state.step == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert (tmp_path / "model" / "config.json").exists()


def test_every_trainable_parameter_changes(tokenizer_dir, splits, tmp_path):
    torch.manual_seed(0)
    before = {
        n: p.detach().clone()
        for n, p in load_model(tiny_model_config("bart", tokenizer_dir, dropout=0.1)).model.named_parameters()
    }
    tm, _ = _run(tokenizer_dir, splits, tmp_path, max_steps=3)
    for name, param in tm.model.named_parameters():
        assert not torch.equal(param.detach().cpu(), before[name]), name


def test_resume_after_crash_matches_uninterrupted_run(tokenizer_dir, splits, tmp_path):
    """Crash at step 7 (last checkpoint at step 6), rerun: same final weights as a run never stopped."""
    full, _ = _run(tokenizer_dir, splits, tmp_path / "full", max_steps=10, checkpoint_every=3)

    def crash(state):
        if state.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer_dir, splits, tmp_path / "crashed", max_steps=10, checkpoint_every=3, on_step=crash)
    state_file = json.loads((tmp_path / "crashed" / "checkpoint" / "trainer_state.json").read_text())
    assert state_file["step"] == 6
    resumed, state = _run(tokenizer_dir, splits, tmp_path / "crashed", max_steps=10, checkpoint_every=3)
    assert state.step == 10
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_a_checkpoint_that_holds_an_earlier_stage_s_model_is_not_resumed(tokenizer_dir, splits, tmp_path):
    """Before each stage freed the last one's model, a final fine-tuning stage's checkpoint held the distill
    stage's model and optimizer first (optimizer.bin) and its own second (optimizer_1.bin): loading it now would
    give this stage the other's weights. It stops in one line instead."""
    _run(tokenizer_dir, splits, tmp_path, max_steps=4, checkpoint_every=2)
    checkpoint = tmp_path / "checkpoint"
    shutil.copy(checkpoint / "optimizer.bin", checkpoint / "optimizer_1.bin")
    with pytest.raises(TrainingError, match="written by an earlier distilgen, which kept the previous stage's model"):
        _run(tokenizer_dir, splits, tmp_path, max_steps=4, checkpoint_every=2)
    assert (checkpoint / "optimizer_1.bin").exists()  # nothing is removed


def test_gradient_accumulation_equals_one_big_batch(tokenizer_dir, splits, tmp_path):
    """Token-normalised over the whole step: 2 x 4 examples accumulated == one batch of 8."""
    data = {"train": splits["train"][:8]}
    kwargs = {"max_steps": 1, "lr": 1e-2, "warmup_ratio": 0.0, "dropout": 0.0}
    big_grads, small_grads = {}, {}
    _run(tokenizer_dir, data, tmp_path / "big", batch_size=8, grad_accum=1, grads=big_grads, **kwargs)
    _run(tokenizer_dir, data, tmp_path / "small", batch_size=4, grad_accum=2, grads=small_grads, **kwargs)
    assert _losses(tmp_path / "big") == pytest.approx(_losses(tmp_path / "small"), rel=1e-6)
    assert big_grads.keys() == small_grads.keys() and len(big_grads) > 10
    for name, grad in big_grads.items():
        torch.testing.assert_close(small_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_non_finite_loss_is_skipped_then_stops_naming_the_step(tokenizer_dir, splits, tmp_path):
    calls = []

    def nan_after_two(tm, batch):
        calls.append(1)
        loss = cross_entropy_loss()(tm, batch)
        return loss * float("nan") if len(calls) > 2 else loss

    with pytest.raises(TrainingError, match="step 5"):
        _run(tokenizer_dir, splits, tmp_path, max_steps=20, loss_fn=nan_after_two, max_bad_steps=3)


def test_early_stopping_keeps_the_best_model(tokenizer_dir, splits, tmp_path):
    scores = iter([1.0, 3.0, 2.0, 2.5, 0.5, 9.0])
    _, state = _run(
        tokenizer_dir, splits, tmp_path, max_steps=12, eval_every=2, patience=2, evaluate=lambda tm: next(scores)
    )
    assert state.step == 8  # evals at 2, 4 (best), 6, 8: two without improvement
    assert state.best_step == 4
    saved = json.loads((tmp_path / "model" / "distilgen_state.json").read_text())
    assert saved["step"] == 4 and saved["dev_score"] == 3.0


def test_epoch_batches_cover_every_example_once_and_depend_on_the_epoch(tokenizer_dir, splits):
    tm = load_model(tiny_model_config("bart", tokenizer_dir))
    items, _ = tm.encode(splits["train"])
    first, again, second = (epoch_batches(items, 8, 0, e) for e in (0, 0, 1))
    assert sorted(i for b in first for i in b) == list(range(len(items)))
    assert first == again and first != second
    assert math.ceil(len(items) / 8) == len(first)


def test_a_small_model_learns_to_copy_from_its_source(tokenizer_dir, splits, tmp_path):
    """Target = the first two words of the source: solvable only through the encoder (cross-attention)."""
    from distilgen.config import DecodingConfig
    from distilgen.data import Example
    from distilgen.evaluate import generate

    sources = [" ".join(e.source.split()[i : i + 6]) for e in splits["train"] + splits["unlabeled"] for i in (0, 6, 12)]
    examples = [Example(str(i), s, " ".join(s.split()[:2]), (" ".join(s.split()[:2]),)) for i, s in enumerate(sources)]
    torch.manual_seed(0)
    tm = load_model(tiny_model_config("bart", tokenizer_dir, hidden_size=64, encoder_layers=1, decoder_layers=1))
    items, _ = tm.encode(examples)
    cfg = TrainConfig(max_steps=250, batch_size=16, lr=3e-3, eval_every=0, log_every=10)
    train(tm, items, cross_entropy_loss(), cfg, tmp_path, make_accelerator(cfg, tmp_path), seed=0)
    predictions = generate(tm, examples[:40], DecodingConfig(max_new_tokens=12), 64)
    correct = sum(p == e.target for p, e in zip(predictions, examples[:40], strict=True))
    assert correct >= 32, predictions[:5]


def test_denoising_pretraining_learns_to_rebuild_text_and_fine_tunes_after(tokenizer_dir, tmp_path):
    from distilgen.config import BuiltinTaskConfig, DataConfig, FinetuneConfig, ModelConfig, TrainConfig
    from distilgen.train import finetune, noise_source, text_windows

    data = DataConfig(task=BuiltinTaskConfig(train_size=16, unlabeled_size=48, dev_size=4, test_size=0))
    model = tiny_model_config("bart", tokenizer_dir, dropout=0.0)
    train_cfg = TrainConfig(max_steps=250, batch_size=16, lr=1e-2, eval_every=125, metric="loss", log_every=1)
    summary = finetune(FinetuneConfig(str(tmp_path / "pre"), data, model, train_cfg, objective="denoise"))
    assert summary["objective"] == "denoise" and summary["steps"] == 250 and summary["best_dev_loss"] is not None
    losses = _losses(tmp_path / "pre")
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5

    tm = load_model(ModelConfig(path=str(tmp_path / "pre" / "model")))
    windows = text_windows(tm, load_splits(data, ("train",))["train"][:2], 64)
    decode = lambda ids: tm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert all(decode(w.source) == decode(w.target) for w in windows)  # rebuild the window itself
    assert all(len(w.target) <= 64 + 2 for w in windows) and len(windows) >= 4  # ~150-token sources: 3 windows
    whole = text_windows(tm, load_splits(data, ("train",))["train"][:2], 64, whole_source_length=100)
    kept, affixes = 100 - len(tm.source_ids([])), len(tm.target_ids([]))  # text tokens kept of each source
    by_id = {w.id: w.target for w in windows}
    assert [w.id for w in whole] == [w.id for w in windows if int(w.id.split("@")[1]) < kept]
    cut = [w.target[:-1] == by_id[w.id][: len(w.target) - 1] for w in whole]  # windows of the kept tokens
    assert all(cut) and [len(w.target) - affixes for w in whole] == [64, kept - 64] * 2
    assert all(len(w.source) == 100 and decode(w.target) in decode(w.source) for w in whole)
    batch = tm.collate(whole)
    permuted = noise_source(tm, batch, 0.1, "permute")["source_ids"]
    assert not torch.equal(permuted, batch["source_ids"])
    assert torch.equal(permuted.sort(1).values, batch["source_ids"].sort(1).values)  # the same tokens, moved

    tuned = finetune(
        FinetuneConfig(
            str(tmp_path / "ft"),
            data,
            ModelConfig(path=str(tmp_path / "pre" / "model")),
            dataclasses.replace(train_cfg, max_steps=4, eval_every=0),
        )  # fmt: skip
    )
    assert tuned["steps"] == 4


# ---------------------------------------------------------------------------------------------
# Run directories that say what they hold
# ---------------------------------------------------------------------------------------------


def _finetune_cfg(tokenizer_dir, out, **train):
    from distilgen.config import BuiltinTaskConfig, DataConfig, FinetuneConfig

    data = DataConfig(task=BuiltinTaskConfig(train_size=16, unlabeled_size=0, dev_size=0, test_size=0))
    model = tiny_model_config("bart", tokenizer_dir, dropout=0.0)
    cfg = TrainConfig(**{"max_steps": 4, "batch_size": 8, "eval_every": 0, "log_every": 1, **train})
    return FinetuneConfig(str(out), data, model, cfg)


def _steps(out) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_a_run_that_fails_its_pre_flight_checks_does_not_lock_its_directory(tokenizer_dir, teacher_dir, tmp_path):
    from distilgen.config import ConfigError, ModelConfig
    from distilgen.train import finetune

    bad = dataclasses.replace(
        _finetune_cfg(tokenizer_dir, tmp_path / "run"), model=ModelConfig(path=str(teacher_dir), shrink="2:5")
    )
    with pytest.raises(ConfigError, match="model.shrink: cannot keep 5 of 2 layers"):  # found when the model loads
        finetune(bad)
    assert not (tmp_path / "run" / "config.yaml").exists()
    finetune(dataclasses.replace(_finetune_cfg(tokenizer_dir, tmp_path / "run"), seed=1))  # the corrected command
    assert "seed: 1" in (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="seed: 2 differs from the run already trained"):
        finetune(dataclasses.replace(_finetune_cfg(tokenizer_dir, tmp_path / "run"), seed=2))


@pytest.mark.parametrize("change", [{"max_steps": 6}, {"lr": 1e-3}])
def test_rerunning_with_other_training_settings_is_refused_and_config_yaml_stays_true(tokenizer_dir, tmp_path, change):
    from distilgen.config import ConfigError
    from distilgen.train import finetune

    finetune(_finetune_cfg(tokenizer_dir, tmp_path / "run"))
    before = (tmp_path / "run" / "config.yaml").read_text()
    (key,) = change
    with pytest.raises(ConfigError, match=f"train.{key}: .* differs from the run already trained .*new output_dir"):
        finetune(_finetune_cfg(tokenizer_dir, tmp_path / "run", **change))
    assert (tmp_path / "run" / "config.yaml").read_text() == before
    assert finetune(_finetune_cfg(tokenizer_dir, tmp_path / "run", log_every=2))["steps"] == 4  # logging may change


def test_a_run_saved_before_a_config_key_existed_still_resumes(tokenizer_dir, tmp_path):
    from distilgen.train import finetune

    finetune(_finetune_cfg(tokenizer_dir, tmp_path / "run"))
    saved = tmp_path / "run" / "config.yaml"
    saved.write_text(saved.read_text().replace("  max_bad_steps: 3\n", ""))  # as an older distilgen wrote it
    assert finetune(_finetune_cfg(tokenizer_dir, tmp_path / "run"))["steps"] == 4


def test_a_resumed_run_writes_each_step_of_its_log_once(tokenizer_dir, splits, tmp_path):
    def crash(state):
        if state.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer_dir, splits, tmp_path, max_steps=8, checkpoint_every=3, on_step=crash)
    assert _steps(tmp_path) == [1, 2, 3, 4, 5]  # the checkpoint is at step 3
    with (tmp_path / "metrics.jsonl").open("a") as log:
        log.write('{"step": 6, "ep')  # a line cut short by the crash
    _run(tokenizer_dir, splits, tmp_path, max_steps=8, checkpoint_every=3)
    assert _steps(tmp_path) == list(range(1, 9))


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_names_the_path(
    tokenizer_dir, splits, tmp_path, monkeypatch
):
    """torch's writer says only 'iostream error' on a full disk: the error names the place and the cause, the
    half-written checkpoint.tmp/ is removed and checkpoint/ stays the last good one."""
    import errno
    import shutil
    from collections import namedtuple

    from accelerate import Accelerator

    real_save = Accelerator.save_state

    def save_state(self, output_dir, **kwargs):
        if (tmp_path / "checkpoint").exists():  # the second checkpoint, at step 4
            (Path(output_dir) / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half")
            monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("Usage", "total used free")(1, 1, 0))
            raise RuntimeError("basic_ios::clear: iostream error")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(OSError, match="No space left on device") as error:
        _run(tokenizer_dir, splits, tmp_path, max_steps=6, checkpoint_every=2)
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "checkpoint.tmp")
    assert not (tmp_path / "checkpoint.tmp").exists()
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 2


@pytest.mark.parametrize("place", ["file", "inside_a_file"])
def test_an_output_dir_that_cannot_hold_a_run_is_a_config_error(tmp_path, place):
    from distilgen.config import ConfigError, writable_dir

    (tmp_path / "taken").write_text("a file")
    path = tmp_path / "taken" if place == "file" else tmp_path / "taken" / "run"
    with pytest.raises(ConfigError, match="output_dir: .*(is a file|cannot write)"):
        writable_dir(path)


def test_a_crash_while_swapping_in_a_new_copy_is_completed_on_the_next_run(tmp_path):
    from distilgen.train import _finish_swaps

    (tmp_path / "model.old").mkdir()  # killed between the renames: the only copy of the best model
    (tmp_path / "model.old" / "config.json").write_text("{}")
    (tmp_path / "checkpoint").mkdir()  # killed before the stale copy was removed
    (tmp_path / "checkpoint.old").mkdir()
    _finish_swaps(tmp_path)
    assert (tmp_path / "model" / "config.json").exists() and not (tmp_path / "model.old").exists()
    assert (tmp_path / "checkpoint").exists() and not (tmp_path / "checkpoint.old").exists()
