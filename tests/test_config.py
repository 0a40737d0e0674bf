from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from distilgen.cli import COMMANDS
from distilgen.config import (
    ConfigError,
    DataConfig,
    DecodingConfig,
    EvaluateConfig,
    FinetuneConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    paths_checked_last,
)

ROOT = Path(__file__).resolve().parents[1]
BASE = {"output_dir": "runs/x", "data": {"task": {"train_size": 10}}, "model": {"arch": "bart"}}


def _error(data, cls=FinetuneConfig) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data)
    return info.value


def test_defaults_fill_what_the_yaml_leaves_out():
    cfg = from_dict(FinetuneConfig, BASE)
    assert cfg.train == TrainConfig() and cfg.decoding == DecodingConfig()
    assert cfg.data.task.train_size == 10 and cfg.data.task.test_size == 500


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("train.lrr=1", "train.lrr", "unknown key"),
        ("train.lr=-1", "train.lr", "must be > 0"),
        ("train.lr=fast", "train.lr", "expected a number"),
        ("train.batch_size=2.5", "train.batch_size", "expected an integer"),
        ("data.max_source_length=0", "data.max_source_length", "must be > 0"),
        ("data.task.name=nope", "data.task.name", "match_reports"),
        ("model.arch=lstm", "model.arch", "'bart'"),
        ("train.precision=fp8", "train.precision", "'bf16'"),
        ("train.metric=accuracy", "train.metric", "bleu"),
        ("decoding.top_p=1.5", "decoding.top_p", "(0, 1]"),
        ("model.num_heads=3", "model.num_heads", "divide hidden_size"),
        ("train.lr=.inf", "train.lr", "finite"),
        ("train.max_grad_norm=.inf", "train.max_grad_norm", "finite"),
        ("decoding.temperature=.nan", "decoding.temperature", "finite"),
    ],
)
def test_a_bad_value_names_its_dotted_key_and_the_fix(override, key, words):
    err = _error(apply_overrides(yaml.safe_load(yaml.safe_dump(BASE)), [override]))
    assert err.key == key
    assert words in err.message
    assert "\n" not in str(err)


def test_a_missing_data_file_is_reported_before_anything_loads(tmp_path):
    err = _error({**BASE, "data": {"train": str(tmp_path / "nope.jsonl")}})
    assert err.key == "data.train" and "nope.jsonl" in err.message


def test_a_missing_required_key_is_named():
    assert _error({"data": BASE["data"], "model": BASE["model"]}).key == "output_dir"


def test_overrides_set_nested_keys_with_yaml_typed_values():
    data = apply_overrides({}, ["train.lr=3e-4", "train.trackers=[tensorboard]", "model.path=null"])
    assert data["train"]["trackers"] == ["tensorboard"] and data["model"] == {"path": None}
    assert from_dict(TrainConfig, data["train"]).lr == 3e-4  # YAML reads `3e-4` as a string; the number is kept


def test_on_and_off_are_words_and_only_true_and_false_are_booleans():
    data = apply_overrides({}, ["pts.static_cache=off", "data.dedupe=off", "train.x=True", "y=no"])
    assert data == {"pts": {"static_cache": "off"}, "data": {"dedupe": "off"}, "train": {"x": True}, "y": "no"}
    assert from_dict(DataConfig, {"task": {}, **data["data"]}).dedupe == "off"


def test_a_partial_nested_mapping_keeps_the_other_defaults():
    from distilgen.quickstart import QuickstartConfig

    cfg = from_dict(QuickstartConfig, {"teacher": {"hidden_size": 64}})
    assert cfg.teacher.hidden_size == 64 and cfg.teacher.arch == "bart"
    assert cfg.teacher.encoder_layers == QuickstartConfig().teacher.encoder_layers


def test_invalid_yaml_is_a_config_error_with_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("output_dir: x\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml line"):
        load_config(FinetuneConfig, path)


def test_evaluate_accepts_perplexity_and_rejects_unknown_metrics():
    base = {"output_dir": "x", "data": BASE["data"], "models": ["m"]}
    assert "perplexity" in from_dict(EvaluateConfig, base).metrics
    assert _error({**base, "metrics": ["bleu", "meteor"]}, EvaluateConfig).key == "metrics"


@pytest.mark.parametrize(
    "path", sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "accelerate"), ids=lambda p: p.stem
)
def test_every_shipped_config_validates(path, monkeypatch):
    """configs/<command>/*.yaml holds the configs of `distilgen <command>` (configs/accelerate/, accelerate's
    launch configs: tests/test_sharding.py)."""
    monkeypatch.chdir(ROOT)
    command = path.relative_to(ROOT / "configs").parts[0]
    assert command in COMMANDS, f"{path}: put it under configs/<command>/, one of {', '.join(COMMANDS)}"
    missing = []  # every key is validated; files and directories are checked last, and listed here
    cfg = load_config(COMMANDS[command].config, path, missing_paths=missing)
    if command in ("distill", "study"):  # what depends on the method, checked when the command starts
        from distilgen.distill import check_method

        with paths_checked_last(missing):
            runs = [cfg] if command == "distill" else [run for _, _, run in cfg.run_configs()]
        for run in runs:
            check_method(run)
    for err in missing:  # only models that another shipped config trains (configs/finetune/teacher.yaml)
        assert "not found: runs/" in err.message, err


def test_a_misspelled_key_is_found_before_a_missing_file(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "distill" / "joint_teaching.yaml").read_text())
    config["student_pts"] = {**config.get("student_pts", {}), "alpah": 7}
    (tmp_path / "jt.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"student_pts.alpah: unknown key"):
        load_config(COMMANDS["distill"].config, tmp_path / "jt.yaml")  # its teacher (runs/...) is not there
    config["student_pts"].pop("alpah")
    config["train"] = {**config.get("train", {}), "max_steps": -5}
    (tmp_path / "jt.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"train.max_steps: must be > 0"):
        load_config(COMMANDS["distill"].config, tmp_path / "jt.yaml")
    config["train"].pop("max_steps")
    (tmp_path / "jt.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"teacher.path: directory not found: runs/"):
        load_config(COMMANDS["distill"].config, tmp_path / "jt.yaml")


def test_the_quickstart_yaml_spells_out_the_quickstart_defaults(monkeypatch):
    from distilgen.quickstart import QuickstartConfig

    monkeypatch.chdir(ROOT)
    assert load_config(QuickstartConfig, "configs/quickstart/default.yaml") == QuickstartConfig()


def test_a_layer_count_is_a_shrink_spec():
    from distilgen.config import InspectConfig, ModelConfig

    assert from_dict(InspectConfig, {"model": "gpt2", "shrink": 4}).shrink == "4"
    assert ModelConfig(path="gpt2", shrink=4).shrink == "4"


def _imports(package: Path) -> dict[str, set[str]]:
    """distilgen module -> the distilgen modules it imports anywhere in its source (top level or in a function)."""
    graph = {}
    for path in package.rglob("*.py"):
        name = ("distilgen." + ".".join(path.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distilgen"):
                graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name.startswith("distilgen")}
    return graph


def test_validating_a_config_imports_nothing_that_imports_config():
    """Configs check names against registries that import no config (tasks, metrics, objectives, teachers); what
    depends on a method's code is checked when the command starts (`distill.check_method`)."""
    graph = _imports(ROOT / "src" / "distilgen")
    package = {module for module in graph if module == "distilgen.config" or module.startswith("distilgen.config.")}
    reached, todo = set(), sorted(package)
    while todo:
        for module in graph[todo.pop()] - reached - package:
            reached.add(module)
            todo.append(module)
    assert not any(graph[module] & package for module in reached)  # no circle through config
    assert reached == {"distilgen.metrics", "distilgen.objectives", "distilgen.registry", "distilgen.tasks",
                       "distilgen.teachers"}  # fmt: skip
    files = ("base.py", "sources.py", "decoding.py", "training.py", "commands.py", "deploy.py")
    assert all(len((ROOT / "src" / "distilgen" / "config" / f).read_text().splitlines()) <= 400 for f in files)
