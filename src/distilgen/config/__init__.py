"""Typed configs: one dataclass per concern, loaded from YAML, overridden by `key.sub=value`.

Every value is checked before any model or data is touched: an unknown key, a wrong type, a
missing file or an impossible value raises `ConfigError` with the dotted key and a fix, which the
CLI prints as one line with exit code 2. Files and directories are checked after every other key.

    cfg = load_config(FinetuneConfig, "configs/finetune/teacher.yaml", ["train.lr=3e-4"])

| file | holds |
|---|---|
| `base.py` | `ConfigError`, checks, `from_dict`, YAML and dotted overrides, `load_config` / `save_config` |
| `sources.py` | what a run reads: `DataConfig` (and the built-in task), `ModelConfig`, `TeacherConfig`, `ApiConfig` |
| `decoding.py` | how a model writes: `GenerationSettings` (what generators read), the configs and specs |
| `training.py` | `TrainConfig`, the KD objectives' settings, PTs and student PTs, cost, denoising |
| `commands.py` | one config per command: finetune, distill, generate, study, evaluate, diagnose, inspect |
| `deploy.py` | the commands that put a model to use: `serve`, `export` |

This package imports nothing of the pipeline (a test walks the import graph): names are checked against
registries that import no config (tasks, metrics, objectives, teachers).
"""

from distilgen.config.base import (
    ConfigError,
    apply_overrides,
    check,
    check_path,
    from_dict,
    load_config,
    parse_yaml,
    paths_checked_last,
    read_yaml,
    save_config,
    to_dict,
    writable_dir,
)
from distilgen.config.commands import (
    DiagnoseConfig,
    DistillConfig,
    EvaluateConfig,
    FinetuneConfig,
    GenerateConfig,
    InspectConfig,
    StudyConfig,
    StudyVariant,
)
from distilgen.config.decoding import (
    SPECS,
    DecodingConfig,
    DecodingSpec,
    GenerationSettings,
    get_spec,
    register_spec,
)
from distilgen.config.deploy import ExportConfig, ServeConfig
from distilgen.config.sources import (
    DECODER_ONLY_FAMILIES,
    PACKAGE_SCHEME,
    TASK_TOKENIZER,
    ApiConfig,
    BuiltinTaskConfig,
    DataConfig,
    ModelConfig,
    PromptConfig,
    SplitLimits,
    TeacherConfig,
    package_file,
)
from distilgen.config.training import (
    AttentionKDConfig,
    CostConfig,
    DenoiseConfig,
    KDConfig,
    NoiseConfig,
    Precision,
    PTConfig,
    StaticCache,
    StudentPTConfig,
    TrainConfig,
)

__all__ = [
    "DECODER_ONLY_FAMILIES",
    "PACKAGE_SCHEME",
    "TASK_TOKENIZER",
    "SPECS",
    "AttentionKDConfig",
    "BuiltinTaskConfig",
    "ConfigError",
    "CostConfig",
    "DataConfig",
    "DecodingConfig",
    "DecodingSpec",
    "GenerationSettings",
    "DenoiseConfig",
    "DiagnoseConfig",
    "DistillConfig",
    "EvaluateConfig",
    "ExportConfig",
    "FinetuneConfig",
    "GenerateConfig",
    "InspectConfig",
    "ServeConfig",
    "ApiConfig",
    "KDConfig",
    "ModelConfig",
    "PromptConfig",
    "SplitLimits",
    "NoiseConfig",
    "PTConfig",
    "Precision",
    "StaticCache",
    "StudentPTConfig",
    "StudyConfig",
    "StudyVariant",
    "TeacherConfig",
    "package_file",
    "TrainConfig",
    "apply_overrides",
    "check",
    "check_path",
    "from_dict",
    "get_spec",
    "load_config",
    "parse_yaml",
    "paths_checked_last",
    "read_yaml",
    "register_spec",
    "save_config",
    "to_dict",
    "writable_dir",
]
