"""PT generation throughput: distilgen's `generate_pts` against a plain `model.generate` loop, side by side.

    python bench/pt_generation.py --teacher runs/bench/teacher/model                 # CPU
    python bench/pt_generation.py --teacher runs/bench/teacher/model --device cuda --inputs 4096

Both decode the same inputs with the same teacher, batch size (sequences per `generate` call) and decoding
spec. The plain loop is what one writes by hand: inputs in file order, `tokenizer(..., padding=True)`,
`model.generate(..., num_return_sequences=K)`, decode; in the dtype given by --plain-dtype (default: the one
distilgen uses, so the ratio measures the loop, not the dtype). distilgen's time includes planning, per-PT
seeds and writing the store (the teacher fingerprint is taken before the clock starts).

Each side decodes the inputs in a cold pass (on a GPU it pays one-off costs: kernel selection, and for
distilgen's static cache the compile of the decoder step per source-length bucket), then in --warm-passes
warm passes (the steady state of a long job), the two sides in turn; the warm ratio is that of the median
times, and each pass's ratio is printed too.

Inputs have realistic length variance: built-in task reports joined and cut at a length drawn uniformly
between --min-length and --max-source-length tokens, in random order. The store's size per million PT
tokens is reported without and with the teacher's top-k log-probs (--topk).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import tempfile
import time

import torch

from distilgen.config import BuiltinTaskConfig, DecodingSpec, TeacherConfig
from distilgen.pseudo_targets import PTStore, get_spec
from distilgen.pt_generation import generate_pts
from distilgen.tasks import generate_split
from distilgen.teachers import load_teacher
from distilgen.teachers.hf import teacher_fingerprint


def make_inputs(tokenizer, count: int, min_length: int, max_length: int, seed: int) -> list[str]:
    """`count` distinct sources whose token lengths spread uniformly over [min_length, max_length]."""
    rng = random.Random(seed)
    reports = [r["source"] for r in generate_split(BuiltinTaskConfig(unlabeled_size=count), "unlabeled")]
    inputs = []
    for i in range(count):
        text = " ".join(reports[(i + j) % count] for j in range(4))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: rng.randint(min_length, max_length)]
        inputs.append(tokenizer.decode(ids))
    return inputs


def plain_loop(tm, spec: DecodingSpec, inputs: list[str], batch_size: int, max_length: int) -> float:
    """Seconds for a hand-written loop over `inputs` in file order; batches of `batch_size` sequences."""
    per_input = spec.num_per_input
    kwargs = spec.settings().generate_kwargs()
    pad_left = not tm.is_encoder_decoder
    tm.tokenizer.padding_side = "left" if pad_left else "right"
    step = max(1, batch_size // per_input)
    start = time.perf_counter()
    for begin in range(0, len(inputs), step):
        batch = tm.tokenizer(
            inputs[begin : begin + step], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(tm.device)
        with torch.no_grad():
            out = tm.model.generate(**batch, **kwargs, pad_token_id=tm.tokenizer.pad_token_id)
        tm.tokenizer.batch_decode(out, skip_special_tokens=True)
    _sync(tm.device)
    return time.perf_counter() - start


def distilgen_run(tm, spec, inputs, batch_size, max_length, topk, static_cache) -> tuple[float, PTStore, int]:
    store = PTStore(tempfile.mkdtemp(prefix="pt-bench-"))
    fp = teacher_fingerprint(tm, max_length)
    start = time.perf_counter()
    report = generate_pts(
        tm.generator(max_length, batch_size, static_cache), store, fp, spec, inputs, batch_size=batch_size,
        topk=topk, progress=False,
    )  # fmt: skip
    _sync(tm.device)
    return time.perf_counter() - start, store, report.tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a trained teacher directory (e.g. runs/bench/teacher/model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--plain-dtype", default="same", choices=["same", "fp32"])
    parser.add_argument("--spec", action="append", help="built-in spec(s) to compare (default: greedy and sample)")
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--min-length", type=int, default=16)
    parser.add_argument("--max-source-length", type=int, default=320)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--static-cache", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-passes", type=int, default=1, help="warm passes of each side, in turn")
    args = parser.parse_args()

    device = torch.device(args.device)
    tm = load_teacher(TeacherConfig(path=args.teacher), args.precision, device)
    plain = load_teacher(
        TeacherConfig(path=args.teacher), "fp32" if args.plain_dtype == "fp32" else args.precision, device
    )
    inputs = make_inputs(tm.tokenizer, args.inputs, args.min_length, args.max_source_length, args.seed)
    lengths = sorted(len(tm.tokenizer(x)["input_ids"]) for x in inputs)
    print(
        f"teacher {args.teacher} on {device} ({next(tm.model.parameters()).dtype}); {len(inputs)} inputs of "
        f"{lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}); batch {args.batch_size} sequences"
    )
    results = []
    for name in args.spec or ["greedy", "sample"]:
        spec = dataclasses.replace(get_spec(name), max_new_tokens=args.max_new_tokens)
        sequences = len(inputs) * spec.num_per_input

        def ours(topk: int, spec: DecodingSpec = spec) -> tuple[float, PTStore, int]:
            return distilgen_run(tm, spec, inputs, args.batch_size, args.max_source_length, topk, args.static_cache)

        plain_cold = plain_loop(plain, spec, inputs, args.batch_size, args.max_source_length)
        ours_cold = ours(0)[0]
        warm = [
            (plain_loop(plain, spec, inputs, args.batch_size, args.max_source_length), ours(0))
            for _ in range(args.warm_passes)
        ]
        plain_s, ours_s = statistics.median(p for p, _ in warm), statistics.median(o[0] for _, o in warm)
        _, store, tokens = warm[-1][1]
        topk_s, topk_store, _ = ours(args.topk)
        (plain_stats,), (topk_stats,) = store.stats(), topk_store.stats()
        row = {
            "spec": name,
            "sequences": sequences,
            "plain_seq_s": round(sequences / plain_s, 1),
            "distilgen_seq_s": round(sequences / ours_s, 1),
            "ratio": round(plain_s / ours_s, 2),
            "ratio_per_pass": [round(p / o[0], 2) for p, o in warm],
            "plain_cold_seq_s": round(sequences / plain_cold, 1),
            "distilgen_cold_seq_s": round(sequences / ours_cold, 1),
            "ratio_cold": round(plain_cold / ours_cold, 2),
            "distilgen_topk_seq_s": round(sequences / topk_s, 1),
            "pt_tokens": tokens,
            "store_mb_per_million_tokens": round(plain_stats.bytes_per_million_tokens / 1e6, 2),
            f"store_mb_per_million_tokens_top{args.topk}": round(topk_stats.bytes_per_million_tokens / 1e6, 2),
        }
        results.append(row)
        print(
            f"{name}: plain loop {row['plain_seq_s']} seq/s, distilgen {row['distilgen_seq_s']} seq/s "
            f"(ratio {row['ratio']}x, per warm pass {row['ratio_per_pass']}; "
            f"cold pass {row['plain_cold_seq_s']} vs {row['distilgen_cold_seq_s']} seq/s, "
            f"{row['ratio_cold']}x; with top-{args.topk} capture {row['distilgen_topk_seq_s']} seq/s); store "
            f"{row['store_mb_per_million_tokens']} MB per million PT tokens, "
            f"{row[f'store_mb_per_million_tokens_top{args.topk}']} MB with top-{args.topk} log-probs"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
