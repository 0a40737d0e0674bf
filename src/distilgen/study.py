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
from distilgen.evaluate import DISTILL_STAGES, evaluate_model
from distilgen.metrics import compute_metrics, gap_closed, reported_scores
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
    """Scores (and cost) of the model at `path`, computed once and kept in `cache` (a study reruns cheaply); a
    cache from before latency was timed over a sample of inputs is measured again."""
    if cache.exists():
        cached = json.loads(cache.read_text())
        if not (with_cost and cfg.cost.enabled) or "latency_s" in cached.get("cost", {}):
            return cached
    tm = load_model(ModelConfig(path=path), data=cfg.data, allow_export=True)
    tm.to("cuda" if torch.cuda.is_available() else "cpu")
    result, _ = evaluate_model(tm, examples, cfg.metrics, cfg.decoding, cfg.data, cfg.cost if with_cost else None, path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def _evaluate_endpoint(cfg: StudyConfig, examples, cache: Path) -> dict[str, Any]:
    """Scores of an api teacher, its answers asked through its generator (no cost: an endpoint's latency is not
    this machine's); kept in `cache`."""
    if cache.exists():
        return json.loads(cache.read_text())
    from distilgen.teachers import load_teacher

    teacher = load_teacher(cfg.teacher, "auto", torch.device("cpu"), cfg.data)
    generator = teacher.generator(cfg.data.max_source_length, cfg.decoding.batch_size)
    outputs = generator.generate([e.source for e in examples], cfg.decoding.settings())
    answers = [o[0].text if o else "" for o in outputs]  # an input the endpoint refused scores as an empty answer
    scores = compute_metrics(cfg.metrics, answers, [list(e.references) for e in examples])
    result = {"scores": scores, "teacher_api": generator.usage.summary()}
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
    if not cfg.teacher.local:  # the teacher's report answers are asked with `decoding`: what an endpoint can do
        from distilgen.generation.api import check_settings

        check_settings(cfg.decoding.settings(), 0)
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
    summaries: dict[tuple[str, int], dict[str, Any]] = {}
    for i, (name, seed, run_cfg) in enumerate(runs):
        state.print(f"[{i + 1}/{len(runs)}] {name}, seed {seed}")
        key = f"{name}/seed{seed}"
        finished_before = (Path(run_cfg.output_dir) / "summary.json").exists()
        start = time.perf_counter()
        summaries[(name, seed)] = distill(run_cfg)
        if not finished_before and state.is_main_process:  # a resumed run records the time of its last part only
            times[key] = round(time.perf_counter() - start, 1)
            times_file.write_text(json.dumps(times, indent=2))
        state.print(f"    {run_line(summaries[(name, seed)], run_cfg.train.metric)}")

    if state.is_main_process:
        _report(cfg, examples, summaries, times)
    state.wait_for_everyone()
    return json.loads((out / "report.json").read_text())


def run_steps(summary: dict[str, Any]) -> int:
    """Optimizer steps a finished run took, over its stages (the method's, then the final fine-tuning)."""
    return sum(summary[stage]["steps"] for stage in DISTILL_STAGES if stage in summary)


def run_line(summary: dict[str, Any], metric: str) -> str:
    """One line per finished run: each stage's best dev score and where it was reached, and the total steps."""
    parts = []
    for stage in DISTILL_STAGES:
        if stage in summary:
            best, at = summary[stage].get(f"best_dev_{metric}"), summary[stage]["best_step"]
            score = "no dev score" if best is None else f"best dev {metric} {best:.2f} at step {at}"
            parts.append(f"{stage}: {score} of {summary[stage]['steps']}")
    return "; ".join(parts) + f" ({run_steps(summary)} steps)"


def _report(
    cfg: StudyConfig, examples: list, summaries: dict[tuple[str, int], dict[str, Any]], times: dict[str, float]
) -> None:
    """Evaluate the teacher and every final model on `examples`; write and print the report."""
    out = Path(cfg.output_dir)
    print(f"evaluating {len(summaries) + 1} models on {len(examples)} {cfg.split} examples")
    if cfg.teacher.local:
        teacher = _evaluate_cached(cfg.teacher.path, out / "eval" / "teacher.json", examples, cfg, with_cost=True)
    else:
        teacher = _evaluate_endpoint(cfg, examples, out / "eval" / "teacher.json")
    results = {
        (name, seed): _evaluate_cached(
            summary["model"], out / "eval" / f"{name}-seed{seed}.json", examples, cfg, with_cost=seed == cfg.seeds[0]
        )
        for (name, seed), summary in summaries.items()
    }
    steps = {f"{name}/seed{seed}": run_steps(summary) for (name, seed), summary in summaries.items()}
    report = summarize(cfg, teacher, results, times, steps)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    text = f"# Study on {cfg.split} ({len(examples)} examples, seeds {cfg.seeds})\n\n{markdown(report)}"
    (out / "report.md").write_text(text)
    if report["teacher"].get("cost"):
        plot(report, cfg.metrics[0], out / "study.png")
    print(text)
    print(f"report: {out}/report.md, plot: {out}/study.png")


NOISE_FACTOR = 2.0
"""A teacher-student gap under this many seed-to-seed standard deviations is reported as noise."""


def gap_noise(teacher: float, students: list[float], spread: float | None, higher_is_better: bool) -> dict[str, Any]:
    """The gap the methods close on one metric (teacher against the fine-tuned student, mean over seeds), the
    seed-to-seed spread, and whether the gap stands out of it (None with one seed, where the spread is unknown, and
    where the teacher is no better: there is no gap). `gap` is the teacher's advantage, positive when it is better
    (lower perplexity)."""
    gap = (teacher - statistics.fmean(students)) * (1 if higher_is_better else -1)
    meaningful = None if spread is None or gap <= 0 else gap > NOISE_FACTOR * spread
    return {"gap": gap, "spread": spread, "meaningful": meaningful}


def pooled_spread(runs: list[list[float]]) -> float | None:
    """The seed-to-seed standard deviation, pooled over the runs (each a list of per-seed scores); None with one
    seed."""
    variances = [statistics.variance(values) for values in runs if len(values) > 1]
    return statistics.fmean(variances) ** 0.5 if variances else None


def summarize(
    cfg: StudyConfig,
    teacher: dict[str, Any],
    results: dict[tuple[str, int], dict[str, Any]],
    times: dict[str, float],
    steps: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Per run: mean and std over seeds of every score (each metric's parts too: ROUGE-1/2/L) and of its gap
    closed, the steps and time it trained; cost of seed 0's model. Per score: the gap and its noise."""
    steps = steps or {}
    names = list(dict.fromkeys(name for name, _ in results))
    keys = reported_scores(cfg.metrics)
    rows = []
    for name in names:
        row: dict[str, Any] = {"name": name, "seeds": cfg.seeds}
        for key in keys:
            row[key] = _mean_std([results[(name, s)]["scores"][key] for s in cfg.seeds])
            if "finetune" in names:
                gaps = [
                    gap_closed(
                        results[(name, s)]["scores"][key],
                        results[("finetune", s)]["scores"][key],
                        teacher["scores"][key],
                        higher_is_better=key != "perplexity",
                    )
                    for s in cfg.seeds
                ]
                row[f"{key}_gap_closed"] = None if None in gaps else _mean_std(gaps)
        row["cost"] = results[(name, cfg.seeds[0])].get("cost")
        # a run trained outside the study (or before its times were kept) has no time: none rather than a guess
        run_times = [times.get(f"{name}/seed{s}") for s in cfg.seeds]
        row["train_seconds"] = None if None in run_times else _mean_std(run_times)
        counts = [steps.get(f"{name}/seed{s}") for s in cfg.seeds]
        row["steps"] = None if None in counts else _mean_std(counts)
        rows.append(row)
    gaps = {}
    if "finetune" in names:
        for key in keys:
            spread = pooled_spread([[results[(n, s)]["scores"][key] for s in cfg.seeds] for n in names])
            finetune = [results[("finetune", s)]["scores"][key] for s in cfg.seeds]
            gaps[key] = gap_noise(teacher["scores"][key], finetune, spread, key != "perplexity")
    return {"split": cfg.split, "scores": keys, "teacher": teacher, "runs": rows, "gaps": gaps}


def _fmt(value: tuple[float, float] | None, percent: bool = False) -> str:
    """`mean ± std` (std only over several seeds): scores with 2 decimals, a gap closed as a percentage with 1."""
    if value is None:
        return "-"
    mean, std = value
    scale, digits = (100, 1) if percent else (1, 2)
    text = f"{mean * scale:.{digits}f}" + ("%" if percent else "")
    return text + (f" ± {std * scale:.{digits}f}" if std else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(report: dict[str, Any]) -> str:
    """The study report: scores, gap closed per score with the noise it stands in, and cost; the teacher first."""
    keys, teacher, gaps = report["scores"], report["teacher"], report["gaps"]
    lines = ["## Scores", ""]
    rows = [["teacher", *(f"{teacher['scores'][k]:.2f}" for k in keys), "-", "-"]]
    for row in report["runs"]:
        train = row["train_seconds"]
        steps = "-" if row["steps"] is None else f"{row['steps'][0]:.0f}"
        rows.append([row["name"], *(_fmt(row[k]) for k in keys), steps, "-" if train is None else f"{train[0]:.0f}"])
    lines += _table(["model", *keys, "steps", "train (s)"], rows)
    if gaps:
        lines += [
            "",
            "## Gap closed",
            "",
            "(KD - S) / (T - S): S is the `finetune` run of the same seed, T the teacher.",
            "",
        ]
        rows = []
        for row in report["runs"]:
            cells = [row["name"]]
            for k in keys:
                cells.append("noise" if gaps[k]["meaningful"] is False else _fmt(row.get(f"{k}_gap_closed"), True))
            rows.append(cells)
        lines += _table(["model", *keys], rows)
        lines += ["", *(_gap_note(k, gaps[k], len(report["runs"][0]["seeds"])) for k in keys)]
    if report["teacher"].get("cost"):
        lines += ["", "## Cost", ""] + _cost_lines(report)
    return "\n".join(lines) + "\n"


def _gap_note(key: str, gap: dict[str, Any], seeds: int) -> str:
    """One line per score: how big the gap is against the noise, and what that makes of its gap closed."""
    text = f"- {key}: the teacher's advantage over the fine-tuned student {gap['gap']:.2f}"
    if gap["gap"] <= 0:
        return text + ": the teacher is no better, so there is no gap to close (-)."
    if gap["spread"] is None:
        return (
            text
            + f"; {seeds} seed: the seed-to-seed spread is unknown, run more seeds to tell a gap closed from noise."
        )
    text += f", seed-to-seed spread (std) {gap['spread']:.2f}"
    if gap["meaningful"]:
        return text + "."
    return text + f": the gap is within {NOISE_FACTOR:g} spreads, so its gap closed is not meaningful (noise)."


def _cost_lines(report: dict[str, Any]) -> list[str]:
    models = [("teacher", report["teacher"]["cost"])] + [(row["name"], row["cost"]) for row in report["runs"]]
    base = report["teacher"]["cost"]
    sample = base.get("latency_examples", 0)
    rows = []
    for name, cost in models:
        if cost is None:
            rows.append([name, *["-"] * 6])
            continue
        rows.append(
            [
                name,
                f"{cost['parameters']['total'] / 1e6:.2f}",
                f"{cost['latency_s'] * 1e3:.1f}",
                f"{cost['latency_per_token_ms']:.2f}",
                f"{cost['output_tokens_mean']:.1f}",
                f"{base['latency_s'] / cost['latency_s']:.2f}x",
                f"{cost['throughput']['examples_per_s']:.1f}",
            ]
        )
    header = ["model", "params (M)", "latency (ms)", "ms/token", "tokens out", "speed-up", "throughput (ex/s)"]
    note = (
        f"Latency: batch 1, the mean over the first {sample} {report['split']} inputs of each one's median time, with "
        "the outputs the model writes (tokens out: their mean length); speed-up against the teacher's."
    )
    return [note, "", *_table(header, rows)]


def plot(report: dict[str, Any], metric: str, path: Path) -> None:
    """Quality against latency at batch 1, one point per model (the teacher and every run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [("teacher", report["teacher"]["cost"], report["teacher"]["scores"][metric])]
    points += [(row["name"], row["cost"], row[metric][0]) for row in report["runs"] if row["cost"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, cost, score in points:
        latency = cost["latency_s"] * 1e3
        ax.scatter(latency, score, color="tab:red" if name == "teacher" else "tab:blue")
        ax.annotate(name, (latency, score), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("latency at batch 1 (ms)")
    ax.set_ylabel(f"{metric} ({report['split']})")
    ax.set_title("quality vs latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
