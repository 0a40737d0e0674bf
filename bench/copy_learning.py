"""How many steps a model built from scratch needs to learn to copy windows of task text.

    python bench/copy_learning.py --width 64 --steps 1500 --lr 3e-3 --window 32
    python bench/copy_learning.py --width 192 --steps 300 --lr 1e-3 --window 32 --arch bart

Copying invented names is what the built-in task's teachers fail at (BENCHMARKS.md, issue 2). This trains
a model on (window -> the same window) pairs cut from task sources (optionally with tokens dropped from
the source, the `denoise` objective of `distilgen finetune`), then reports the share of 40 held-out windows
it copies exactly with greedy decoding.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from distilgen.config import BuiltinTaskConfig, DataConfig, DecodingConfig, ModelConfig, TrainConfig
from distilgen.data import load_splits
from distilgen.generation.hf import HFGenerator
from distilgen.models import Encoded, load_model
from distilgen.train import cross_entropy_loss, denoising_loss, make_accelerator, text_windows, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="bart", choices=["bart", "t5"])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3, help="encoder and decoder layers each")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--drop", type=float, default=0.0, help="share of source tokens dropped (0: plain copy)")
    parser.add_argument("--vocab-size", type=int, default=2000)
    args = parser.parse_args()

    data = DataConfig(task=BuiltinTaskConfig(train_size=2000, unlabeled_size=2000, dev_size=20, test_size=0))
    splits = load_splits(data, ("train", "unlabeled", "dev"))
    torch.manual_seed(0)
    model_cfg = ModelConfig(
        arch=args.arch, hidden_size=args.width, encoder_layers=args.layers, decoder_layers=args.layers,
        num_heads=4, ffn_size=4 * args.width, max_positions=384, dropout=0.0, vocab_size=args.vocab_size,
    )  # fmt: skip
    tm = load_model(model_cfg, texts=lambda: (e.source for e in splits["train"] + splits["unlabeled"]))
    items = text_windows(tm, splits["train"] + splits["unlabeled"], args.window)
    held_out = text_windows(tm, splits["dev"], args.window)[:40]
    cfg = TrainConfig(max_steps=args.steps, batch_size=32, lr=args.lr, eval_every=0, log_every=50)
    out = Path(tempfile.mkdtemp(prefix="copy-bench-"))
    loss = denoising_loss(args.drop, "drop") if args.drop > 0 else cross_entropy_loss()
    start = time.perf_counter()
    train(tm, items, loss, cfg, out, make_accelerator(cfg, out), seed=0)
    seconds = time.perf_counter() - start
    tm.model.eval()
    batch = {k: v.to(tm.device) for k, v in tm.collate([Encoded("", w.source, []) for w in held_out]).items()}
    new_ids = HFGenerator(tm).run(batch, DecodingConfig(max_new_tokens=args.window + 4).settings())
    predictions = [tm.tokenizer.decode(tokens).strip() for tokens in tm.output_tokens(new_ids)]
    references = [tm.tokenizer.decode(w.target, skip_special_tokens=True).strip() for w in held_out]
    exact = sum(p == r for p, r in zip(predictions, references, strict=True)) / len(held_out)
    print(
        f"{args.arch} {args.width}-d {args.layers}+{args.layers}, lr {args.lr}, {args.steps} steps, window "
        f"{args.window}, drop {args.drop}: {exact:.0%} of held-out windows copied exactly ({seconds:.0f} s)"
    )
    print(f"  prediction: {predictions[0]}\n  reference:  {references[0]}")


if __name__ == "__main__":
    main()
