from __future__ import annotations

import dataclasses
import json
import math

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
