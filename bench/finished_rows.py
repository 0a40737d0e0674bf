"""Sampling PTs with and without dropping finished rows from the batch (`decode.COMPACT_SHARE`), side by side.

    python bench/vs_trl.py            # trains the tiny teacher once: runs/vs_trl/tiny/teacher/model
    python bench/finished_rows.py [--teacher runs/vs_trl/tiny/teacher/model] [--repeats 3]

The teacher samples K PTs with their top-20 for each of the built-in task's train inputs (as `bench/vs_trl.py`'s
joint_teaching does), through the generator PT generation runs, with a dynamic KV cache (the CPU default); the two
variants take turns, and the ratio is that of the median times. Both must write the same tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import distilgen.generation.decode as decode
from distilgen.config import BuiltinTaskConfig, DataConfig, DecodingConfig, ModelConfig
from distilgen.data import load_splits
from distilgen.generation import open_generator
from distilgen.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/vs_trl/tiny/teacher/model")
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    task = BuiltinTaskConfig(train_size=args.inputs, unlabeled_size=0, dev_size=0, test_size=0)
    data = DataConfig(task=task, max_source_length=320, max_target_length=args.max_new_tokens)
    tm = load_model(ModelConfig(path=args.teacher), data=data)
    sources = [e.source for e in load_splits(data, ("train",))["train"]]
    generator = open_generator("hf", tm, batch_size=args.batch_size, max_source_length=320, static_cache="off")
    settings = dataclasses.replace(
        DecodingConfig(max_new_tokens=args.max_new_tokens).settings(), kind="sample", num_return=args.samples, seed=0
    )
    variants = {"finished rows kept": 0, f"dropped (COMPACT_SHARE {decode.COMPACT_SHARE})": decode.COMPACT_SHARE}
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    for _ in range(args.repeats):
        for name, share in variants.items():
            decode.COMPACT_SHARE = share
            start = time.perf_counter()
            out = generator.generate(sources, settings, topk=20)
            times[name].append(time.perf_counter() - start)
            outputs[name] = [[(g.token_ids, g.topk_ids) for g in row] for row in out]
    lengths = [g.new_tokens for row in out for g in row]
    print(f"{len(sources)} inputs x {args.samples} samples, {sum(lengths) / len(lengths):.1f} new tokens on average, "
          f"up to {max(lengths)}; batches of {args.batch_size} rows")  # fmt: skip
    for name, seconds in times.items():
        print(f"{name}: median {statistics.median(seconds):.2f} s ({', '.join(f'{s:.2f}' for s in seconds)})")
    kept, dropped = (statistics.median(times[name]) for name in variants)
    same = len({repr(o) for o in outputs.values()}) == 1
    print(f"dropping finished rows: {kept / dropped:.2f}x; the same PTs and top-k ids: {same}")


if __name__ == "__main__":
    main()
