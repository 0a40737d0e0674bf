"""Peak memory and time of chunked `logits_kd` against a naive full-vocabulary KL, forward + backward.

    python bench/logits_kd_memory.py                   # CPU default: V=32000, 1024 positions, fp32
    python bench/logits_kd_memory.py --device cuda     # GPU default: V=32000, 4096 positions
    python bench/logits_kd_memory.py --dtype bfloat16 --positions 2048 --chunk-size 128

Both compute forward KL per token, reduce with `masked_sum / num_tokens` and backpropagate to the
student logits. "naive" is the textbook version: fp32 log-softmax of both (B, T, V) tensors and
`F.kl_div`, every intermediate kept by autograd. Each implementation runs in its own subprocess, so
their peaks cannot mix, and reports the peak growth over its inputs (the two logits tensors):

- CUDA: `torch.cuda.max_memory_allocated()` minus the allocated bytes once the inputs exist.
- CPU: torch's CPU allocations are invisible to tracemalloc, so the peak resident set size
  (`getrusage(RUSAGE_SELF).ru_maxrss`, the kernel's high-water mark) minus the resident set once
  the inputs exist. The subprocess runs with MALLOC_MMAP_THRESHOLD_=65536, so glibc serves every
  large buffer with mmap and unmaps it on free: resident memory then follows live tensors instead
  of the heap's high-water mark (with glibc's default, freed chunk buffers linger and the peak
  creeps up run after run). A tiny warm-up first loads what autograd loads lazily.

Time is the fastest of `--repeats` forward + backward runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from distilgen.objectives import logits_kd, masked_sum

IMPLEMENTATIONS = ("naive", "chunked")


def naive_forward_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) KL(teacher || student) over the full (B, T, V) tensors at once."""
    student_logp = F.log_softmax(student.float(), dim=-1)  # (B, T, V) fp32
    teacher_logp = F.log_softmax(teacher.float(), dim=-1)  # (B, T, V) fp32
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)  # (B, T)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(args: argparse.Namespace) -> dict:
    """Run one implementation in this process; return its peak memory growth, time and loss."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator(device).manual_seed(0)
    shape = (args.positions // args.seq_len, args.seq_len, args.vocab)
    student = torch.randn(shape, generator=generator, device=device, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    mask = torch.ones(shape[:2], dtype=torch.long, device=device)
    cuda = device.type == "cuda"
    tiny = torch.randn(2, 3, 5, device=device, requires_grad=True)
    for run in (naive_forward_kl, logits_kd):  # warm-up: lazy initialisation is not the loss's memory
        run(tiny, tiny.detach(), mask[:2, :3]).sum().backward()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        if peak_rss_bytes() > base + 16 * 2**20:
            raise RuntimeError("the process peaked above its current size before measuring; the CPU figure would hide")

    times = []
    for _ in range(args.repeats):
        student.grad = None
        start = time.perf_counter()
        if args.impl == "naive":
            per_token = naive_forward_kl(student, teacher, mask)
        else:
            per_token = logits_kd(student, teacher, mask, chunk_size=args.chunk_size)
        loss = masked_sum(per_token, mask) / mask.sum().clamp_min(1)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del per_token

    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base
    return {"impl": args.impl, "peak_bytes": peak, "seconds": min(times), "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--positions", type=int, help="B * T (default: 4096 on CUDA, 1024 on CPU)")
    parser.add_argument("--seq-len", type=int, default=256, help="T; B = positions / T")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the logits")
    parser.add_argument("--chunk-size", type=int, default=128, help="positions per chunk in logits_kd")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, help="internal: measure one implementation and print JSON")
    args = parser.parse_args()
    args.positions = args.positions or (4096 if args.device.startswith("cuda") else 1024)
    if args.positions % args.seq_len:
        parser.error(f"--positions {args.positions} is not a multiple of --seq-len {args.seq_len}")

    if args.impl:
        print(json.dumps(measure(args)))
        return

    method = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss growth (peak RSS)"
    print(
        f"device={args.device} V={args.vocab} positions={args.positions} (B={args.positions // args.seq_len}, "
        f"T={args.seq_len}) dtype={args.dtype} chunk_size={args.chunk_size} repeats={args.repeats}"
    )
    print(f"peak = growth over the inputs, by {method}; one subprocess per implementation; forward + backward")
    results = {}
    for impl in IMPLEMENTATIONS:
        command = [sys.executable, __file__, "--impl", impl] + sys.argv[1:]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        results[impl] = json.loads(out.strip().splitlines()[-1])
        peak_mib, ms = results[impl]["peak_bytes"] / 2**20, results[impl]["seconds"] * 1e3
        print(f"{impl:>8}: peak {peak_mib:8.1f} MiB   time {ms:8.1f} ms   loss {results[impl]['loss']:.6f}")
    naive, chunked = results["naive"], results["chunked"]
    print(
        f"ratio naive / chunked: peak {naive['peak_bytes'] / chunked['peak_bytes']:.2f}x, "
        f"time {naive['seconds'] / chunked['seconds']:.2f}x; "
        f"losses differ by {abs(naive['loss'] - chunked['loss']):.2e}"
    )


if __name__ == "__main__":
    main()
