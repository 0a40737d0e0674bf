"""Evaluation: generate on a split, score it, measure what each model costs, compare side by side.

    distilgen evaluate configs/evaluate.yaml
    distilgen evaluate --model runs/quickstart/teacher/model --model runs/quickstart/student/model \\
        data.task.name=match_reports

Writes `report.json`, `report.md` (the side-by-side table) and one `generations/*.jsonl` per model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distilgen.config import (
    CostConfig,
    DataConfig,
    DecodingConfig,
    EvaluateConfig,
    ModelConfig,
    save_config,
    writable_dir,
)
from distilgen.cost import count_parameters, measure_sample_latency, measure_throughput, peak_memory, size_on_disk
from distilgen.data import Example, scored_split
from distilgen.metrics import compute_metrics, perplexity
from distilgen.models import TextModel, load_model, target_nll

log = logging.getLogger(__name__)


def generate(
    tm: TextModel,
    examples: Sequence[Example],
    decoding: DecodingConfig,
    max_source_length: int,
    desc: str = "generate",
    seed: int = 0,
) -> list[str]:
    """One output per example, in input order, through the model's generator (the loop PT generation runs;
    batches formed longest-first to waste little padding). A sample is seeded by `seed` and the example's text."""
    generator = tm.generator(max_source_length, decoding.batch_size)
    many = len(examples) >= 2 * decoding.batch_size
    outputs = generator.generate([e.source for e in examples], decoding.settings(seed), desc=desc if many else None)
    return [written[0].text for written in outputs]


@torch.no_grad()
def gold_perplexity(tm: TextModel, examples: Sequence[Example], data: DataConfig, batch_size: int) -> float:
    """Perplexity of the first reference of each example under the model (teacher-forced)."""
    encoded, _ = tm.encode(examples, data.max_source_length, data.max_target_length)
    was_training = tm.model.training
    tm.model.eval()
    nll, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(tm.device) for k, v in tm.collate(encoded[start : start + batch_size]).items()}
        batch_nll, batch_tokens = target_nll(tm, batch)
        nll, tokens = nll + batch_nll.item(), tokens + int(batch_tokens.item())
    tm.model.train(was_training)
    return perplexity(nll, tokens)


def measure_cost(
    tm: TextModel,
    examples: Sequence[Example],
    decoding: DecodingConfig,
    cost: CostConfig,
    data: DataConfig,
    path: str | None = None,
) -> dict[str, Any]:
    """Parameters, size on disk, latency at batch 1 over the first `cost.latency_examples` inputs, throughput at
    batch N, and peak memory on a GPU: timed through the model's generator, the loop distilgen itself runs
    (tokenizing and detokenizing included). On a CPU no peak memory is reported: the process's resident set
    only grows, so a later model's figure would say nothing about it."""
    result: dict[str, Any] = {"parameters": count_parameters(tm.model)}
    if path is not None and Path(path).is_dir():
        result["size_on_disk_mb"] = size_on_disk(path)["weights"] / 2**20
    sources = [e.source for e in examples]
    generator = tm.generator(data.max_source_length, cost.throughput_batch)
    settings = decoding.settings()

    def run(chunk: list[str]) -> int:
        return sum(g.new_tokens for written in generator.generate(chunk, settings) for g in written)

    sample = sources[: cost.latency_examples]
    result.update(measure_sample_latency(lambda source: run([source]), sample, cost.latency_runs))
    items = sources[: cost.throughput_examples]
    if tm.device.type == "cuda":
        result["throughput"], peak = peak_memory(
            lambda: measure_throughput(run, items, cost.throughput_batch), tm.device
        )
        result["peak_memory_mb"] = peak / 2**20
    else:
        result["throughput"] = measure_throughput(run, items, cost.throughput_batch)
    return result


def evaluate_model(
    tm: TextModel,
    examples: Sequence[Example],
    metrics: Sequence[str],
    decoding: DecodingConfig,
    data: DataConfig,
    cost: CostConfig | None = None,
    path: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Scores (and cost, when `cost.enabled`) of one model on labeled examples, plus its predictions."""
    predictions = generate(tm, examples, decoding, data.max_source_length, desc="evaluate")
    references = [list(e.references) for e in examples]
    text_metrics = [m for m in metrics if m != "perplexity"]
    scores = compute_metrics(text_metrics, predictions, references) if text_metrics else {}
    if "perplexity" in metrics and tm.runtime is None:  # an export gives text, not the gold targets' probabilities
        scores["perplexity"] = gold_perplexity(tm, examples, data, decoding.batch_size)
    result: dict[str, Any] = {"scores": scores}
    if cost is not None and cost.enabled:
        result["cost"] = measure_cost(tm, examples, decoding, cost, data, path)
    return result, predictions


DISTILL_STAGES = ("distill", "finetune")
"""Stage directories of a `distilgen distill` run (its models live in RUN/<stage>/model)."""


def model_label(path: str) -> str:
    """A short name for tables: `runs/qs/teacher/model` -> `teacher`, `runs/qs/jt/finetune/model` -> `jt`."""
    p = Path(path)
    if p.name != "model" or not p.parent.name:
        return p.name or path
    run = p.parent
    return run.parent.name if run.name in DISTILL_STAGES and (run.parent / "summary.json").exists() else run.name


TABLE_SCORES = [("bleu", "BLEU"), ("rouge", "ROUGE"), ("chrf", "chrF"), ("exact_match", "EM"), ("perplexity", "PPL")]


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """Side-by-side table; speed-up is relative to the first model (the reference, e.g. the teacher)."""
    score_cols = [(k, name) for k, name in TABLE_SCORES if any(k in r["scores"] for r in results)]
    has_cost = all("cost" in r for r in results)
    header = ["model", *(name for _, name in score_cols)]
    if has_cost:
        header += ["params (M)", "latency (ms)", "ms/token", "speed-up", "throughput (ex/s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base_latency = results[0]["cost"]["latency_s"] if has_cost else None
    for r in results:
        row = [r["name"], *(f"{r['scores'][k]:.2f}" if k in r["scores"] else "-" for k, _ in score_cols)]
        if has_cost:
            c = r["cost"]
            latency = c["latency_s"]
            row += [
                f"{c['parameters']['total'] / 1e6:.2f}",
                f"{latency * 1e3:.1f}",
                f"{c['latency_per_token_ms']:.2f}",
                f"{base_latency / latency:.2f}x",
                f"{c['throughput']['examples_per_s']:.1f}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: list[dict[str, Any]], output_dir: Path, meta: dict[str, Any]) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    report = {**meta, "models": [{k: v for k, v in r.items() if k != "predictions"} for r in results]}
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    (output_dir / "report.md").write_text(f"# Evaluation on {meta.get('split', '?')}\n\n{table}")
    return table


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """`distilgen evaluate`: score every model in `cfg.models` on one split and compare them."""
    output_dir = writable_dir(cfg.output_dir)
    save_config(cfg, output_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    examples = scored_split(cfg.data, cfg.split, cfg.limit)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    (output_dir / "generations").mkdir(exist_ok=True)
    for index, path in enumerate(cfg.models):
        tm = load_model(ModelConfig(path=path), key=f"models[{index}]", data=cfg.data, allow_export=True)
        tm.to(device)
        result, predictions = evaluate_model(tm, examples, cfg.metrics, cfg.decoding, cfg.data, cfg.cost, path)
        name = model_label(path)
        results.append({"name": name, "path": path, **result})
        with (output_dir / "generations" / f"{index}-{name}.jsonl").open("w") as f:
            for example, prediction in zip(examples, predictions, strict=True):
                f.write(
                    json.dumps(
                        {
                            "id": example.id,
                            "source": example.source,
                            "prediction": prediction,
                            "references": list(example.references),
                        }
                    )
                    + "\n"
                )
    table = write_report(results, output_dir, {"split": cfg.split, "examples": len(examples)})
    return {"table": table, "models": results, "output_dir": str(output_dir)}
