"""The `distilgen` command: one table maps each subcommand to its config and function.

    distilgen quickstart
    distilgen finetune configs/teacher.yaml train.lr=3e-4
    distilgen evaluate configs/evaluate.yaml
    distilgen data configs/teacher.yaml --export data/match_reports
    distilgen generate configs/generate/sample4.yaml
    distilgen distill configs/distill/joint_teaching.yaml method=logits_kd_pt
    distilgen study configs/study/match_reports.yaml
    distilgen diagnose configs/diagnose/match_reports.yaml
    distilgen pts show configs/generate/sample4.yaml

A user error (bad config, bad data file) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import inspect
import json
import logging
import os
import sys
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distilgen.config import (
    ConfigError,
    DataConfig,
    DiagnoseConfig,
    DistillConfig,
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    GenerateConfig,
    InspectConfig,
    ModelConfig,
    ServeConfig,
    StudyConfig,
    apply_overrides,
    from_dict,
    load_config,
)
from distilgen.quickstart import QuickstartConfig

STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)
"""Writes refused by the machine (a full disk, a read-only or forbidden place): one line with the path, exit 1;
what was written before (the last checkpoint, every stored PT) is left as it was."""


@dataclass
class DataCommandConfig:
    """`distilgen data`: load the splits, report their statistics, optionally export them as JSONL."""

    data: DataConfig
    model: str | None = None
    """A model (path, hub id or `pkg:` file) whose tokenizer and prompt count tokens, and how many sources and
    targets `data.max_source_length` / `max_target_length` would cut, before any training (`--model`)."""


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each dataclass field), read from the source of `cls` and
    of the dataclasses it extends."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
            ):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def config_keys(cls: type, prefix: str = "", defaults: object | None = None) -> list[str]:
    """One help line per config key (recursively), with the defaults of `defaults` when given."""
    lines = []
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        nested = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
        if nested:
            lines.append(f"  {key}: {docs.get(f.name, nested[0].__doc__.splitlines()[0])}")
            lines.extend(config_keys(nested[0], f"{key}.", default if dataclasses.is_dataclass(default) else None))
            continue
        shown = " (required)" if default is dataclasses.MISSING else f" = {default!r}"
        doc = docs.get(f.name, "")
        lines.append(f"  {key}{shown}" + (f"  -- {doc}" if doc else ""))
    return lines


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _print_summary(summary: dict) -> None:
    """A command's JSON summary, printed once however many processes `accelerate launch` started."""
    from distilgen.train import process_state

    if process_state().is_main_process:
        print(json.dumps(summary, indent=2))


def run_finetune(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    from distilgen.train import finetune

    _print_summary(finetune(cfg))
    return 0


def run_distill(cfg: DistillConfig, args: argparse.Namespace) -> int:
    from distilgen.distill import distill

    _print_summary(distill(cfg))
    return 0


def run_study(cfg: StudyConfig, args: argparse.Namespace) -> int:
    from distilgen.study import study

    study(cfg)
    return 0


def run_diagnose(cfg: DiagnoseConfig, args: argparse.Namespace) -> int:
    from distilgen.diagnose import diagnose

    result = diagnose(cfg)
    print(result["table"])
    print(f"report: {result['output_dir']}/diagnose.md, plot: {result['output_dir']}/diagnose.png")
    return 0


def run_evaluate(cfg: EvaluateConfig, args: argparse.Namespace) -> int:
    from distilgen.evaluate import evaluate

    result = evaluate(cfg)
    print(result["table"])
    print(f"report: {result['output_dir']}/report.json")
    return 0


def run_data(cfg: DataCommandConfig, args: argparse.Namespace) -> int:
    from distilgen.data import load_splits, split_stats, token_stats, write_jsonl

    splits = load_splits(cfg.data)
    model = args.model or cfg.model
    tm = None
    if model is not None:
        from distilgen.models import load_model

        tm = load_model(ModelConfig(path=model), key="model", data=cfg.data, allow_export=True)
    for name, examples in splits.items():
        stats = split_stats(examples)
        if tm is not None:
            stats |= token_stats(tm.encode, examples, cfg.data.max_source_length, cfg.data.max_target_length)
        print(f"{name}: {json.dumps(stats)}")
        if args.export:
            Path(args.export).mkdir(parents=True, exist_ok=True)
            write_jsonl(examples, Path(args.export) / f"{name}.jsonl")
    if args.export:
        print(f"wrote {', '.join(splits)} to {args.export}/")
    return 0


def run_serve(cfg: ServeConfig, args: argparse.Namespace) -> int:
    try:
        from distilgen.serve import serve
    except ImportError as err:  # the default install has no web server
        raise ConfigError("", str(err)) from None
    serve(cfg)
    return 0


def run_export(cfg: ExportConfig, args: argparse.Namespace) -> int:
    from distilgen.export import export

    _print_summary(export(cfg))
    return 0


def run_inspect(cfg: InspectConfig, args: argparse.Namespace) -> int:
    import torch

    from distilgen.cost import cost_report
    from distilgen.models import load_model
    from distilgen.students import STACKS, module_at

    tm = load_model(ModelConfig(path=cfg.model, shrink=cfg.shrink), key="")
    tm.to("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.save:
        tm.save(cfg.save)
    report = cost_report(tm.model, cfg.input_length, cfg.output_length, cfg.batch_size, cfg.latency_runs, cfg.seed)
    report["model"] = cfg.model + (f" shrunk to {cfg.shrink}" if cfg.shrink else "")
    params, flops = report["parameters"], report["flops"]
    stacks = STACKS.get(tm.model.config.model_type, {})  # a family distilgen cannot shrink has no stacks known
    report["layers"] = {name: len(module_at(tm.model, stack.path)) for name, stack in stacks.items()}
    report["vocabulary"], report["chat_template"] = len(tm.tokenizer), bool(tm.tokenizer.chat_template)
    print(f"model: {report['model']} ({report['model_type']})")
    layers = ", ".join(f"{n} {k}" for k, n in report["layers"].items()) or "not known for this family"
    print(
        f"layers: {layers}; vocabulary {report['vocabulary']} tokens; "
        f"chat template: {'yes' if report['chat_template'] else 'no'}"
    )
    print(
        f"parameters: {params['total'] / 1e6:.3f}M (embedding {params['embedding'] / 1e6:.3f}M, "
        f"encoder {params['encoder'] / 1e6:.3f}M, decoder {params['decoder'] / 1e6:.3f}M)"
    )
    print(
        f"FLOPs per input token: {flops['per_input_token'] / 1e6:.2f}M, per generated token: "
        f"{flops['per_generated_token'] / 1e6:.2f}M (input {cfg.input_length}, output {cfg.output_length} tokens)"
    )
    print(f"latency at batch 1: {report['latency_median_s'] * 1e3:.1f} ms (median of {cfg.latency_runs})")
    print(
        f"throughput at batch {cfg.batch_size}: {report['throughput']['examples_per_s']:.1f} examples/s, "
        f"{report['throughput']['tokens_per_s']:.0f} tokens/s"
    )
    if cfg.save:
        print(f"saved to {cfg.save}")
    print(json.dumps(report))
    return 0


def run_generate(cfg: GenerateConfig, args: argparse.Namespace) -> int:
    from distilgen.pt_generation import generate

    _print_summary(generate(cfg))
    return 0


def run_pts(cfg: GenerateConfig, args: argparse.Namespace) -> int:
    from distilgen.data import load_splits
    from distilgen.pseudo_targets import PTStore, describe_store

    store = PTStore(cfg.store, readonly=True)  # showing changes nothing on disk, even in a damaged store
    if not store.stats() and not (store.root / "manifest.json").exists():
        raise ConfigError("store", f"no PT store at {cfg.store}; run `distilgen generate` with this config first")
    splits = {name: examples[: cfg.limit] for name, examples in load_splits(cfg.data, cfg.splits).items()}
    print("\n".join(describe_store(store, splits, args.examples)))
    return 0


def run_quickstart(cfg: QuickstartConfig, args: argparse.Namespace) -> int:
    from distilgen.quickstart import quickstart

    quickstart(cfg)
    return 0


@dataclass
class Command:
    help: str
    run: Callable[[typing.Any, argparse.Namespace], int]
    config: type | None = None
    config_optional: bool = False
    positional: str | None = None
    """A config key given as the first positional argument instead of a YAML file (inspect MODEL)."""
    action: str | None = None
    """A word that must follow the command (`pts show`)."""
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    several_processes: bool = False
    """Whether it runs under `accelerate launch` with several processes (sharding or data-parallel training);
    the others use one device and are refused there, before they start."""


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH",
        help="model directory or hub id to evaluate (repeat to compare; the first is the reference)",
    )
    p.add_argument("--output-dir", help="where report.json, report.md and generations go (= output_dir)")


def _pts_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--examples", type=int, default=2, metavar="N", help="show the PTs of N inputs (default 2)")


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export", metavar="DIR", help="write each split as DIR/<split>.jsonl")
    p.add_argument("--model", metavar="PATH", help="count tokens with this model's tokenizer and prompt (model=)")


COMMANDS: dict[str, Command] = {
    "quickstart": Command(
        "train a teacher and a student on the built-in task and compare them (offline, CPU)",
        run_quickstart,
        QuickstartConfig,
        config_optional=True,
    ),
    "finetune": Command(
        "train a model on labeled data (a teacher, or the student baseline)",
        run_finetune,
        FinetuneConfig,
        several_processes=True,
    ),
    "distill": Command(
        "train a student from a teacher with one of the study's methods (joint_teaching, logits_kd_pt, ...)",
        run_distill,
        DistillConfig,
        several_processes=True,
    ),
    "study": Command(
        "run several methods (and seeds) on one task and report scores, gap closed, cost and a plot",
        run_study,
        StudyConfig,
        several_processes=True,
    ),
    "diagnose": Command(
        "exposure bias: the student writes the first X percent of each output, the teacher the rest; score per X",
        run_diagnose,
        DiagnoseConfig,
    ),
    "evaluate": Command(
        "score models on a split, with their cost, side by side",
        run_evaluate,
        EvaluateConfig,
        config_optional=True,
        add_arguments=_evaluate_arguments,
    ),
    "inspect": Command(
        "parameters, FLOPs, latency and throughput of a model or of a shrunk copy (E:D)",
        run_inspect,
        InspectConfig,
        positional="model",
    ),
    "export": Command(
        "convert a model for a fast inference runtime (CTranslate2, int8 on a CPU), as it will be deployed",
        run_export,
        ExportConfig,
        positional="model",
    ),
    "serve": Command(
        "an OpenAI-compatible HTTP server (completions, chat, logprobs, streaming) for a model",
        run_serve,
        ServeConfig,
        positional="model",
    ),
    "data": Command(
        "load and check the data splits, print statistics, optionally export them",
        run_data,
        DataCommandConfig,
        add_arguments=_data_arguments,
    ),
    "generate": Command(
        "teacher pseudo-targets for the labeled and unlabeled inputs, into the PT store (resumable; shards "
        "across processes under accelerate launch)",
        run_generate,
        GenerateConfig,
        several_processes=True,
    ),
    "pts": Command(
        "show what a PT store holds: counts per split and spec, lengths, diversity, examples",
        run_pts,
        GenerateConfig,
        action="show",
        add_arguments=_pts_arguments,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distilgen",
        description="Distil a large text-generation model into a small, fast student for one task.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        epilog = None
        if command.config is not None:
            epilog = "config keys (set in the YAML file or as key.sub=value overrides):\n" + "\n".join(
                config_keys(command.config)
            )
        p = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if command.action is not None:
            p.add_argument("action", choices=[command.action], help=f"`{command.action}`")
        if command.positional is not None:
            p.add_argument(command.positional, help=_field_docs(command.config).get(command.positional))
        elif command.config is not None:
            p.add_argument(
                "config",
                nargs="?" if command.config_optional else None,
                metavar="CONFIG",
                help="YAML config file" + (" (optional)" if command.config_optional else ""),
            )
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=3e-4")
        if command.add_arguments is not None:
            command.add_arguments(p)
    return parser


def _load(command: Command, args: argparse.Namespace):
    if command.config is None:
        return None
    overrides = list(args.overrides)
    if command.positional is not None:
        return from_dict(
            command.config, {command.positional: getattr(args, command.positional), **apply_overrides({}, overrides)}
        )
    config_path = getattr(args, "config", None)
    if config_path is not None and "=" in config_path and not os.path.exists(config_path):
        overrides.insert(0, config_path)  # `distilgen evaluate key=value ...` with no file
        config_path = None
    if command.config is EvaluateConfig:
        overrides += [f"models={json.dumps(args.model)}"] if args.model else []
        overrides += [f"output_dir={args.output_dir}"] if args.output_dir else []
        if config_path is None:
            data = apply_overrides({"output_dir": "runs/evaluate"}, overrides)
            data.setdefault("data", {"task": {}})  # no data named: the built-in task
            return from_dict(EvaluateConfig, data)
    return load_config(command.config, config_path, overrides)


def _quiet_libraries() -> None:
    """distilgen's own messages at INFO; the libraries' routine chatter (checkpoint saving, weight loading) hidden."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distilgen").setLevel(logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "Removed shared tensor" on every tied-weight save
    logging.getLogger("absl").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _leave_process_group() -> None:
    """Under `accelerate launch`, leave the process group together once the command is done: a gloo group left
    to the interpreter's exit can abort a process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _launched_processes() -> int:
    """How many processes `accelerate launch` (torchrun) started for this command: 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from distilgen.data import DataError
    from distilgen.generation.api import EndpointError
    from distilgen.pseudo_targets import PTStoreError
    from distilgen.sharding import launch_refusal
    from distilgen.train import TrainingError

    _quiet_libraries()
    command = COMMANDS[args.command]
    processes = _launched_processes()
    if processes > 1 and not command.several_processes:
        several = ", ".join(name for name, c in COMMANDS.items() if c.several_processes)
        print(
            f"distilgen {args.command}: error: runs in one process, on one device, but `accelerate launch` started "
            f"{processes}: run `distilgen {args.command}` without it (commands that use several processes: "
            f"{several})",
            file=sys.stderr,
        )
        return 2
    if refusal := launch_refusal():
        print(f"distilgen {args.command}: error: {refusal}", file=sys.stderr)
        return 2
    try:
        from distilgen.progress import line_seconds

        line_seconds()  # a bad setting stops here, not in the middle of the work
        cfg = _load(command, args)
        code = command.run(cfg, args)
        _leave_process_group()
        return code
    except (ConfigError, DataError, PTStoreError) as err:
        print(f"distilgen {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"distilgen {args.command}: error: {err.strerror.lower()}{where}", file=sys.stderr)
        return 1
    except TrainingError as err:
        print(f"distilgen {args.command}: training stopped: {err}", file=sys.stderr)
        return 1
    except EndpointError as err:
        print(f"distilgen {args.command}: the teacher's endpoint failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"distilgen {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
