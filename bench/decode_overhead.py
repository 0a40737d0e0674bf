"""Per-token cost of decoding around the model: `generate`'s loop against distilgen's `decode`.

    python bench/decode_overhead.py --teacher runs/bench/teacher/model                 # CPU: op counts
    python bench/decode_overhead.py --teacher runs/bench/teacher/model --device cuda   # GPU: and launches

A small model on a GPU is bound by kernel launches: with a static cache its decoder step is one compiled
CUDA graph, and what the loop runs around it each token (preparing inputs, processors, stopping checks, the
sampler) is what is left. One batch is decoded with a static cache by each variant, until every row has
ended or --tokens; each reports, per decoding step, the wall time (after --warmup untimed calls) and what
`torch.profiler` sees: on a GPU the kernel and graph launches, on a CPU the ops run outside the model's
forward (ops nested neither in another op nor in the forward; on a GPU each would be about one launch;
not counted where the step is compiled). Variants: greedy in `generate`'s loop and in `decode`; seeded
sampling (top-p) in `decode`, with the decoder step and sampler eager, and compiled (the default on a GPU;
on a CPU inductor's CPU code stands in for it).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from pt_generation import make_inputs
from torch.profiler import ProfilerActivity

from distilgen.config import GenerationSettings, TeacherConfig
from distilgen.data import Example
from distilgen.generation.decode import SOURCE_BUCKET, decode
from distilgen.models import Encoded
from distilgen.teachers import load_teacher


def top_level_ops(profile, outside: str) -> int:
    """Ops (`aten::*`) nested neither in another op nor in a `record_function(outside)` range."""
    count = 0
    for event in profile.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not (parent.name.startswith("aten::") or parent.name == outside):
            parent = parent.cpu_parent
        count += parent is None
    return count


def launches(profile) -> int:
    """CUDA kernel and graph launches the host made."""
    return sum("LaunchKernel" in e.name or "GraphLaunch" in e.name for e in profile.events())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a model directory (e.g. runs/bench/teacher/model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--source-length", type=int, default=160)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = torch.device(args.device)
    tm = load_teacher(TeacherConfig(path=args.teacher), "auto", device)
    texts = make_inputs(tm.tokenizer, args.rows, args.source_length, args.source_length, seed=0)
    examples = [Example(str(i), text, None, ()) for i, text in enumerate(texts)]
    items = [Encoded("", e.source, []) for e in tm.encode(examples, args.source_length, targets=False)[0]]
    batch = {k: v.to(device) for k, v in tm.collate(items, source_multiple=SOURCE_BUCKET).items()}
    greedy = GenerationSettings("greedy", max_new_tokens=args.tokens)
    sample = GenerationSettings("sample", top_p=args.top_p, max_new_tokens=args.tokens)
    generate_kwargs = {"do_sample": False, "max_new_tokens": args.tokens, "cache_implementation": "static"}
    generate_kwargs.update(pad_token_id=tm.tokenizer.pad_token_id, eos_token_id=tm.tokenizer.eos_token_id)
    seeds = list(range(args.rows))
    variants = {  # name: (decoding call, whether the decoder step is compiled)
        "generate, greedy": (lambda: tm.layout.generate(tm.model, batch, **generate_kwargs), device.type == "cuda"),
        "decode, greedy": (lambda: decode(tm, batch, greedy, static=True), device.type == "cuda"),
        "decode, seeded sample, eager": (lambda: decode(tm, batch, sample, seeds, static=True, compile=False), False),
        "decode, seeded sample, compiled": (lambda: decode(tm, batch, sample, seeds, static=True, compile=True), True),
    }
    forward = tm.model.forward

    def marked_forward(*a, **k):
        with torch.profiler.record_function("model.forward"):
            return forward(*a, **k)

    def run(call) -> int:
        """Decoding steps taken (the output's width)."""
        with torch.no_grad():
            steps = call().shape[1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps

    print(f"{args.teacher} on {device}: {args.rows} rows of {batch['source_ids'].shape[1]} source tokens")
    rows = []
    for name, (call, compiled) in variants.items():
        for _ in range(args.warmup):
            run(call)
        start = time.perf_counter()
        steps = sum(run(call) for _ in range(args.repeats))
        row = {"variant": name, "steps": steps // args.repeats}
        row["ms_per_step"] = round((time.perf_counter() - start) / steps * 1000, 3)
        if device.type == "cuda":
            with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profile:
                steps = run(call)
            row["launches_per_step"] = round(launches(profile) / steps, 1)
        elif not compiled:
            tm.model.forward = marked_forward
            with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as profile:
                steps = run(call)
            tm.model.forward = forward
            row["ops_per_step_outside_forward"] = round(top_level_ops(profile, "model.forward") / steps, 1)
        rows.append(row)
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
