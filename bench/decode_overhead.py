"""Per-token cost of decoding around the model: greedy, the eager seeded sampler and the compiled one.

    python bench/decode_overhead.py --teacher runs/bench/teacher/model                 # CPU: op counts
    python bench/decode_overhead.py --teacher runs/bench/teacher/model --device cuda   # GPU: and timings

A small model on a GPU is bound by kernel launches: with a static cache its decoder step is one compiled
CUDA graph, and what `generate` runs around it each token (preparing inputs, stopping checks, the sampler)
is what is left. For one batch decoded to exactly --tokens tokens with a static cache, each variant reports,
per token, the wall time (after --warmup untimed calls) and what `torch.profiler` sees: on a GPU the kernel
and graph launches, on a CPU the ops run outside `model.forward` (ops nested neither in another op nor in
the forward; on a GPU each would be about one launch). Variants: greedy (`generate`'s argmax), seeded
sampling as distilgen samples PTs with the eager `gumbel_choice`, and with the compiled one (the default
on a GPU).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from pt_generation import make_inputs
from torch.profiler import ProfilerActivity

from distilgen.config import DecodingSpec, ModelConfig
from distilgen.data import Example
from distilgen.models import Encoded
from distilgen.pt_generation import SOURCE_BUCKET, load_teacher, seeded_generate_kwargs


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
    tm = load_teacher(ModelConfig(path=args.teacher), "auto", device)
    texts = make_inputs(tm.tokenizer, args.rows, args.source_length, args.source_length, seed=0)
    examples = [Example(str(i), text, None, ()) for i, text in enumerate(texts)]
    items = [Encoded("", e.source, []) for e in tm.encode(examples, args.source_length, targets=False)[0]]
    batch = {k: v.to(device) for k, v in tm.collate(items, source_multiple=SOURCE_BUCKET).items()}
    spec = DecodingSpec("bench", "sample", top_p=args.top_p, max_new_tokens=args.tokens)
    variants = {
        "greedy": lambda: {"do_sample": False, "max_new_tokens": args.tokens},
        "seeded, eager": lambda: seeded_generate_kwargs(spec, range(args.rows)),
        "seeded, compiled": lambda: seeded_generate_kwargs(spec, range(args.rows), compile=True),
    }
    forward = tm.model.forward

    def marked_forward(*a, **k):
        with torch.profiler.record_function("model.forward"):
            return forward(*a, **k)

    def decode(make_kwargs) -> torch.Tensor:
        kwargs = make_kwargs() | {"min_new_tokens": args.tokens, "cache_implementation": "static"}
        kwargs.update(pad_token_id=tm.tokenizer.pad_token_id, eos_token_id=tm.tokenizer.eos_token_id)
        with torch.no_grad():
            out = tm.layout.generate(tm.model, batch, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    print(f"{args.teacher} on {device}: {args.rows} rows of {batch['source_ids'].shape[1]} source tokens")
    rows = []
    for name, make_kwargs in variants.items():
        for _ in range(args.warmup):
            decode(make_kwargs)
        start = time.perf_counter()
        for _ in range(args.repeats):
            decode(make_kwargs)
        ms = (time.perf_counter() - start) / args.repeats / args.tokens * 1000
        row = {"variant": name, "ms_per_token": round(ms, 3)}
        if device.type == "cuda":  # the forward is compiled: count launches, and leave it as it is
            with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profile:
                decode(make_kwargs)
            row["launches_per_token"] = round(launches(profile) / args.tokens, 1)
        else:
            tm.model.forward = marked_forward
            with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as profile:
                decode(make_kwargs)
            tm.model.forward = forward
            row["ops_per_token_outside_forward"] = round(top_level_ops(profile, "model.forward") / args.tokens, 1)
        rows.append(row)
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
