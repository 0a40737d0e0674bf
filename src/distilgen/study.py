"""The study: several distillation methods on one task, side by side, as in the paper's tables.

    distilgen study configs/study/match_reports.yaml

Every run shares the teacher, the student's initialisation (per seed) and the PT store, so PTs are
generated once for all the methods that use them. Runs are resumable (`distill` is): rerunning the command
skips what is finished. The report gives, per run and averaged over seeds, the test scores, the fraction
of the teacher-student gap closed, (KD - S) / (T - S) with S the `finetune` run of the same seed, the cost
of the model and the training time, plus a plot of quality against latency.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from distilgen.config import ConfigError, ModelConfig, StudyConfig, save_config, writable_dir
from distilgen.data import scored_split
from distilgen.evaluate import evaluate_model
from distilgen.metrics import gap_closed
from distilgen.models import load_model

log = logging.getLogger(__name__)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _study_error(cfg: StudyConfig, run: str, err: ConfigError) -> ConfigError:
    """A run's config error, keyed where the study sets that value: the run's method, the study's teacher, the
    variant's own settings, or `common`."""
    variant = next((v for v in cfg.variants if v.name == run), None)
    if err.key == "method":
        return ConfigError(f"variants.{run}.method" if variant else "methods", err.message)
    if err.key.startswith("teacher."):
        return err
    return err.under(f"variants.{run}.set" if variant and err.key.split(".")[0] in variant.set else "common")


def _evaluate_cached(path: str, cache: Path, examples, cfg: StudyConfig, with_cost: bool) -> dict[str, Any]:
    """Scores (and cost) of the model at `path`, computed once and kept in `cache` (a study reruns cheaply)."""
    if cache.exists():
        return json.loads(cache.read_text())
    tm = load_model(ModelConfig(path=path), data=cfg.data)
    tm.model.to("cuda" if torch.cuda.is_available() else "cpu")
    result, _ = evaluate_model(tm, examples, cfg.metrics, cfg.decoding, cfg.data, cfg.cost if with_cost else None, path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def study(cfg: StudyConfig) -> dict[str, Any]:
    """Train every run (resuming), evaluate every model, write report.json, report.md and study.png.

    Under `accelerate launch` every process takes part in each run's training; the main process alone then
    evaluates and writes the report, which every process returns."""
    from distilgen.distill import check_method, distill
    from distilgen.train import process_state

    runs = cfg.run_configs()
    for name, _, run_cfg in runs:  # every run's method, before anything loads
        try:
            check_method(run_cfg)
        except ConfigError as err:
            raise _study_error(cfg, name, err) from None
    state = process_state()
    examples = scored_split(cfg.data, cfg.split)
    out = Path(cfg.output_dir)
    times_file = out / "train_seconds.json"
    if state.is_main_process:
        writable_dir(out)
        save_config(cfg, out / "study.yaml")
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    finals: dict[tuple[str, int], str] = {}
    for i, (name, seed, run_cfg) in enumerate(runs):
        state.print(f"[{i + 1}/{len(runs)}] {name}, seed {seed}")
        key = f"{name}/seed{seed}"
        finished_before = (Path(run_cfg.output_dir) / "summary.json").exists()
        start = time.perf_counter()
        finals[(name, seed)] = distill(run_cfg)["model"]
        if not finished_before and state.is_main_process:  # a resumed run records the time of its last part only
            times[key] = round(time.perf_counter() - start, 1)
            times_file.write_text(json.dumps(times, indent=2))

    if state.is_main_process:
        _report(cfg, examples, finals, times)
    state.wait_for_everyone()
    return json.loads((out / "report.json").read_text())


def _report(cfg: StudyConfig, examples: list, finals: dict[tuple[str, int], str], times: dict[str, float]) -> None:
    """Evaluate the teacher and every final model on `examples`; write and print the report."""
    out = Path(cfg.output_dir)
    print(f"evaluating {len(finals) + 1} models on {len(examples)} {cfg.split} examples")
    teacher = _evaluate_cached(cfg.teacher.path, out / "eval" / "teacher.json", examples, cfg, with_cost=True)
    results = {
        (name, seed): _evaluate_cached(
            path, out / "eval" / f"{name}-seed{seed}.json", examples, cfg, with_cost=seed == cfg.seeds[0]
        )
        for (name, seed), path in finals.items()
    }
    report = summarize(cfg, teacher, results, times)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = markdown(report, cfg.metrics)
    (out / "report.md").write_text(f"# Study on {cfg.split} ({len(examples)} examples, seeds {cfg.seeds})\n\n{table}")
    plot(report, cfg.metrics[0], out / "study.png")
    print(table)
    print(f"report: {out}/report.md, plot: {out}/study.png")


def summarize(
    cfg: StudyConfig, teacher: dict[str, Any], results: dict[tuple[str, int], dict[str, Any]], times: dict[str, float]
) -> dict[str, Any]:
    """Per run: mean and std over seeds of each metric and of its gap closed; cost of seed 0's model."""
    names = list(dict.fromkeys(name for name, _ in results))
    rows = []
    for name in names:
        row: dict[str, Any] = {"name": name, "seeds": cfg.seeds}
        for metric in cfg.metrics:
            values = [results[(name, s)]["scores"][metric] for s in cfg.seeds]
            row[metric] = _mean_std(values)
            if "finetune" in names:
                gaps = [
                    gap_closed(
                        results[(name, s)]["scores"][metric],
                        results[("finetune", s)]["scores"][metric],
                        teacher["scores"][metric],
                        higher_is_better=metric != "perplexity",
                    )
                    for s in cfg.seeds
                ]
                row[f"{metric}_gap_closed"] = None if None in gaps else _mean_std(gaps)
        row["cost"] = results[(name, cfg.seeds[0])].get("cost")
        # a run trained outside the study (or before its times were kept) has no time: none rather than a guess
        run_times = [times.get(f"{name}/seed{s}") for s in cfg.seeds]
        row["train_seconds"] = None if None in run_times else _mean_std(run_times)
        rows.append(row)
    return {"split": cfg.split, "teacher": teacher, "runs": rows}


def _fmt(value: tuple[float, float] | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    mean, std = value
    scale = 100 if percent else 1
    text = f"{mean * scale:.1f}" + ("%" if percent else "")
    return text + (f" ± {std * scale:.1f}" if std else "")


def markdown(report: dict[str, Any], metrics: list[str]) -> str:
    """The study table: scores, gap closed per metric, cost and training time; the teacher first."""
    header = ["model", *metrics, *(f"gap closed ({m})" for m in metrics[:1])]
    header += ["params (M)", "latency (ms)", "speed-up", "throughput (ex/s)", "train (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    teacher = report["teacher"]
    t_cost = teacher["cost"]
    base_latency = t_cost["latency_median_s"]

    def cost_cells(cost: dict[str, Any] | None) -> list[str]:
        if cost is None:
            return ["-"] * 4
        return [
            f"{cost['parameters']['total'] / 1e6:.2f}",
            f"{cost['latency_median_s'] * 1e3:.1f}",
            f"{base_latency / cost['latency_median_s']:.2f}x",
            f"{cost['throughput']['examples_per_s']:.1f}",
        ]

    lines.append(
        "| teacher | "
        + " | ".join(f"{teacher['scores'][m]:.2f}" for m in metrics)
        + " | 100% | "
        + " | ".join(cost_cells(t_cost))
        + " | - |"
    )
    for row in report["runs"]:
        cells = [row["name"], *(_fmt(row[m]) for m in metrics), _fmt(row.get(f"{metrics[0]}_gap_closed"), True)]
        train = row["train_seconds"]
        cells += [*cost_cells(row["cost"]), "-" if train is None else f"{train[0]:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], metric: str, path: Path) -> None:
    """Quality against latency at batch 1, one point per model (the teacher and every run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [("teacher", report["teacher"]["cost"], report["teacher"]["scores"][metric])]
    points += [(row["name"], row["cost"], row[metric][0]) for row in report["runs"] if row["cost"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, cost, score in points:
        latency = cost["latency_median_s"] * 1e3
        ax.scatter(latency, score, color="tab:red" if name == "teacher" else "tab:blue")
        ax.annotate(name, (latency, score), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("latency at batch 1 (ms)")
    ax.set_ylabel(f"{metric} ({report['split']})")
    ax.set_title("quality vs latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
