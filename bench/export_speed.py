"""Deployed students: PyTorch eager against CTranslate2 float32 and int8 exports, on this machine, in one run.

    distilgen quickstart      # the built-in task's Joint-Teaching student: runs/quickstart/joint_teaching
    python bench/export_speed.py [--student RUN_OR_MODEL] [--smollm2 RUN_OR_MODEL] [--out runs/export_bench]

Each student is exported four times (`distilgen export`: float32 and int8, each also with the vocabulary trimmed to
its task's tokens when the run's config.yaml names the task) and the five versions are scored on their task's test
split with their latency at batch 1 (each of 32 inputs alone, median of 3 passes) and throughput at batch 32,
through the generator each runs in distilgen (tokenizing and detokenizing included), and how many of its outputs
are the PyTorch model's, word for word. The built-in task's student is scored on 200 test reports; the SmolLM2
student (a 4-layer cut of SmolLM2-135M-Instruct distilled on the man pages, BENCHMARKS.md) on 100 test pages.
Ratios are against PyTorch eager.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distilgen.config import (
    BuiltinTaskConfig,
    CostConfig,
    DataConfig,
    DecodingConfig,
    ExportConfig,
    ModelConfig,
    PromptConfig,
    SplitLimits,
)
from distilgen.data import scored_split
from distilgen.evaluate import evaluate_model
from distilgen.export import export
from distilgen.models import load_model

MANPAGES = DataConfig(
    test="runs/data/manpages/test.jsonl",
    limits=SplitLimits(test=100),
    template="Write the one-line summary of this man page, as in its NAME section (a short lowercase phrase).\n\n"
    "{source}",
    prompt=PromptConfig(chat="auto", first_line=True),
    max_source_length=256,
    max_target_length=32,
)
BUILTIN = DataConfig(task=BuiltinTaskConfig(train_size=1000, unlabeled_size=4000, dev_size=100, test_size=200))


def measure(name: str, run: str, data: DataConfig, out: Path, max_new_tokens: int) -> list[dict]:
    """The student of `run` as PyTorch eager and CTranslate2 float32 and int8, each also with its vocabulary trimmed
    to the task (`trim_vocabulary`: the run's own config.yaml names the task's data)."""
    rows, model, reference = [], final_model(run), []
    versions = {"pytorch": model}
    exports = {"ct2 float32": {"quantization": "float32"}, "ct2 int8": {"quantization": "int8"}}
    if (Path(run) / "config.yaml").is_file():
        for quantization in ("float32", "int8"):  # float32: what the trim alone changes
            exports[f"ct2 {quantization}, trimmed vocabulary"] = {
                "quantization": quantization, "trim_vocabulary": f"{run}/config.yaml"
            }  # fmt: skip
    for version, options in exports.items():
        target = out / f"{name.split()[0]}_{options['quantization']}{'_trim' if 'trim_vocabulary' in options else ''}"
        export(ExportConfig(model=model, output_dir=str(target), overwrite=True, **options))
        versions[version] = str(target)
    examples = scored_split(data, "test")
    decoding = DecodingConfig(max_new_tokens=max_new_tokens, batch_size=32)
    cost = CostConfig(latency_examples=32, latency_runs=3, throughput_batch=32, throughput_examples=128)
    for version, path in versions.items():
        tm = load_model(ModelConfig(path=path), data=data, allow_export=True)
        result, predictions = evaluate_model(tm, examples, ["bleu", "rouge"], decoding, data, cost, path)
        reference = reference if version != "pytorch" else predictions
        same = sum(a == b for a, b in zip(predictions, reference, strict=True))
        rows.append({"student": name, "version": version, **result, "same_outputs": same, "of": len(predictions)})
        print(json.dumps(rows[-1]["scores"]), version, flush=True)
    return rows


def final_model(path: str) -> str:
    """A distill run's final model (its summary.json names it), or `path` itself."""
    summary = Path(path) / "summary.json"
    return json.loads(summary.read_text())["model"] if summary.is_file() else path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="runs/quickstart/joint_teaching")
    parser.add_argument("--smollm2", default="runs/manpages/study_smollm2/seed0/seq_kd")
    parser.add_argument("--out", default="runs/export_bench")
    args = parser.parse_args()
    out = Path(args.out)
    rows = measure("built-in task student", args.student, BUILTIN, out, 48)
    if Path(args.smollm2).is_dir():
        rows += measure("SmolLM2 4-layer student", args.smollm2, MANPAGES, out, 24)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    header = (
        "student | version | BLEU | ROUGE-L | = PyTorch | size (MB) | latency b=1 (ms) | speed-up | b=32 (ex/s) | x"
    )
    print(f"\n| {header} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base: dict[str, dict] = {}
    for r in rows:
        c = r["cost"]
        ref = base.setdefault(r["student"], c)
        through = c["throughput"]["examples_per_s"]
        print(
            f"| {r['student']} | {r['version']} | {r['scores']['bleu']:.2f} | {r['scores']['rougeL']:.2f} | "
            f"{r['same_outputs']}/{r['of']} | "
            f"{c['size_on_disk_mb']:.1f} | {c['latency_s'] * 1e3:.1f} | {ref['latency_s'] / c['latency_s']:.2f}x | "
            f"{through:.1f} | {through / ref['throughput']['examples_per_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
