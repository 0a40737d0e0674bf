"""`distilgen serve` under load: latency (p50, p99) and throughput with C concurrent clients against one request
at a time, side by side in one run, on loopback. Bounded: `--requests` per phase and `--seconds` at most.

    python bench/serve_load.py MODEL --prompts runs/data/manpages/test.jsonl --requests 64 --concurrency 8

MODEL is anything `distilgen serve` loads. Prompts are the `source` fields of a JSONL file (their first
`--words` words, with `--template`), or built-in sentences. Requests are greedy completions of `--max-tokens`
tokens. The server batches concurrent requests (`max_batch_size`, `max_wait_ms`); this measures what that buys.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def phase(
    url: str, name: str, prompts: list[str], concurrency: int, max_tokens: int, deadline: float, chat: bool
) -> dict:
    """Send every prompt once with `concurrency` clients; per-request latency and the phase's throughput."""

    def one(prompt: str) -> tuple[float, int]:
        start = time.perf_counter()
        body = {"model": name, "max_tokens": max_tokens, "temperature": 0}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        answer = httpx.post(f"{url}/v1/{'chat/' if chat else ''}completions", json=body, timeout=300)
        answer.raise_for_status()
        return time.perf_counter() - start, answer.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    results = []
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for latency, tokens in pool.map(one, prompts):
            results.append((latency, tokens))
            if time.perf_counter() > deadline:
                break
    seconds = time.perf_counter() - start
    latencies = [r[0] for r in results]
    return {
        "requests": len(results),
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * _percentile(latencies, 0.99),
        "requests_per_s": len(results) / seconds,
        "tokens_per_s": sum(r[1] for r in results) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--prompts", help="a JSONL file whose `source` fields are the prompts")
    parser.add_argument("--template", default="{source}")
    parser.add_argument(
        "--words",
        type=int,
        default=120,
        help="keep this many words of each source (the server "
        "refuses a prompt longer than the model's positions; it never cuts)",
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--chat", action="store_true", help="chat completions (an instruct model's chat template)")
    parser.add_argument("--seconds", type=float, default=600, help="stop a phase after this long")
    parser.add_argument("--max-batch-size", type=int, default=16)
    args = parser.parse_args()

    if args.prompts:
        lines = Path(args.prompts).read_text().splitlines()[: args.requests]
        sources = [" ".join(json.loads(line)["source"].split()[: args.words]) for line in lines]
        prompts = [args.template.replace("{source}", source) for source in sources]
    else:
        prompts = [f"Report {i}: Riverton beat Oakdale {i % 5}-{i % 3} at home." for i in range(args.requests)]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "distilgen.cli", "serve", args.model, f"port={port}", "name=bench",
         "max_prompt_tokens=4096", f"max_batch_size={args.max_batch_size}"],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        phase(url, "bench", prompts[:2], 1, args.max_tokens, time.perf_counter() + 60, args.chat)  # warm-up
        sequential = phase(url, "bench", prompts, 1, args.max_tokens, time.perf_counter() + args.seconds, args.chat)
        loaded = phase(
            url, "bench", prompts, args.concurrency, args.max_tokens, time.perf_counter() + args.seconds, args.chat
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{'':>22} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'tok/s':>7}")
    for label, r in (("one at a time", sequential), (f"{args.concurrency} concurrent", loaded)):
        print(f"{label:>22} {r['requests']:>8} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['requests_per_s']:>7.2f} {r['tokens_per_s']:>7.1f}")  # fmt: skip
    print(
        f"throughput ratio (concurrent / one at a time): {loaded['requests_per_s'] / sequential['requests_per_s']:.2f}x"
    )
    print(json.dumps({"sequential": sequential, "concurrent": loaded}))


if __name__ == "__main__":
    main()
