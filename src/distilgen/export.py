"""`distilgen export`: a model as it will be deployed, converted for a fast inference runtime (CTranslate2).

    distilgen export runs/study/seed0/seq_kd/distill/model output_dir=runs/deploy/seq_kd quantization=int8
    distilgen evaluate ... models=[runs/study/seed0/seq_kd/distill/model, runs/deploy/seq_kd]   # side by side

The output directory holds CTranslate2's model (`ctranslate2/`), the tokenizer, the `transformers` config and the
prompt the model reads sources through (so distilgen loads it like any model: `evaluate`, `serve`, `cost`), and a
manifest (`export.json`: format, quantization, the source model and the sha256 of its weights, the vocabulary kept,
versions). CTranslate2's own converters do the work, for BART, T5, GPT-2 and the Llama family (Llama, Qwen2/3,
Mistral); BART of transformers 5 lacks `normalize_before`, added to a staging copy of its config. With
`trim_vocabulary` the staged copy's vocabulary is first cut to the task's tokens (`vocabulary.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from distilgen.checkpoints import model_dir
from distilgen.config import ConfigError, DataConfig, ExportConfig, ModelConfig, SplitLimits, from_dict
from distilgen.config.base import read_yaml
from distilgen.data import load_splits
from distilgen.generation.ct2 import MANIFEST, RUNTIME_DIR, is_export
from distilgen.generation.decode import generation_rules
from distilgen.models import PROMPT_FILE, TextModel, load_model
from distilgen.vocabulary import task_token_ids, trim_embeddings, trim_tokenizer

log = logging.getLogger(__name__)

CT2_FAMILIES = ("bart", "t5", "gpt2", "llama", "qwen2", "qwen3", "mistral")
"""Model types whose CTranslate2 export writes the PyTorch model's greedy outputs (tests/test_export.py). Gemma 2
and 3 convert but write other text (the converter ignores `query_pre_attn_scalar`); Phi-3 does not convert."""


def weights_sha256(directory: Path) -> str:
    """sha256 over a saved model's weight files, in name order: the weights exported, as distilgen saves them (for a
    model distilgen trained, its own files' hash)."""
    digest = hashlib.sha256()
    for file in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Convert `cfg.model` into `cfg.output_dir` (written whole, then renamed into place)."""
    try:
        import ctranslate2
    except ImportError:
        raise ConfigError("format", "ctranslate2 is not installed: pip install 'distilgen[export]'") from None
    from distilgen import __version__

    out = Path(cfg.output_dir)
    if out.exists() and not cfg.overwrite:
        raise ConfigError("output_dir", f"{out} exists: choose another directory, or set overwrite=true")
    if out.exists() and not is_export(out):
        raise ConfigError("output_dir", f"{out} exists and is not an export: overwrite replaces only an export")
    data = task_data(cfg.trim_vocabulary) if cfg.trim_vocabulary is not None else None
    tm = load_model(ModelConfig(path=cfg.model), key="model", data=data)
    family = tm.model.config.model_type
    if family not in CT2_FAMILIES:
        raise ConfigError("model", f"a {family} model: CTranslate2 export covers {', '.join(CT2_FAMILIES)}")
    rules = generation_rules(tm.model)
    if rules:
        log.warning("%s: its generation config adds %s, which the export does not apply", cfg.model, rules)
    source_dir = Path(model_dir(ModelConfig(path=cfg.model)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staging, result = Path(tmp) / "staging", Path(tmp) / "export"
        tm.save(staging)  # a plain checkpoint whatever the source (a GGUF file, a hub id, a directory)
        source_sha256 = weights_sha256(staging)
        trimmed, tokenizer = None, tm.tokenizer
        if data is not None:
            trimmed, tokenizer = _trim_vocabulary(tm, data, staging)
            trimmed["from"] = str(Path(cfg.trim_vocabulary).resolve())
        if family == "bart":  # transformers 5's BartConfig has no normalize_before, which the converter reads
            config = json.loads((staging / "config.json").read_text())
            config.setdefault("normalize_before", False)
            (staging / "config.json").write_text(json.dumps(config))
        converter = ctranslate2.converters.TransformersConverter(str(staging))
        converter.convert(str(result / RUNTIME_DIR), quantization=cfg.quantization)
        tokenizer.save_pretrained(result)
        tm.model.config.save_pretrained(result)
        if (source_dir / PROMPT_FILE).is_file():  # the prompt it was trained to read: the deployer's to send
            shutil.copy(source_dir / PROMPT_FILE, result / PROMPT_FILE)
        info = {
            "format": "ctranslate2",
            "quantization": cfg.quantization,
            "family": family,
            "source": str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model,
            "weights_sha256": source_sha256,
            "vocabulary": trimmed or {"kept": tm.model.config.get_text_config(decoder=True).vocab_size},
            "generation_rules_not_applied": sorted(rules),
            "distilgen_version": __version__,
            "ctranslate2_version": ctranslate2.__version__,
        }
        (result / MANIFEST).write_text(json.dumps(info, indent=2))
        if out.exists():  # an older export: set aside, then replaced, so a crash leaves one of the two whole
            out.rename(Path(tmp) / "old")
        result.rename(out)
    log.info("exported %s to %s (%s, %s)", cfg.model, out, family, cfg.quantization)
    return {"output_dir": str(out), **info}


def task_data(config_path: str) -> DataConfig:
    """The `data` section of a distilgen YAML config (a distill or finetune config names the model's task)."""
    section = read_yaml(config_path).get("data")
    if not isinstance(section, dict):
        raise ConfigError("trim_vocabulary", f"{config_path} has no `data` section to take the task's tokens from")
    try:
        return from_dict(DataConfig, section, "data")
    except ConfigError as err:
        raise ConfigError("trim_vocabulary", f"{config_path}: {err}") from None


def _trim_vocabulary(tm: TextModel, data: DataConfig, staging: Path) -> tuple[dict[str, Any], Any]:
    """Cut the staged model and tokenizer to the task's tokens (`vocabulary.py`); what was kept, for the manifest,
    and the trimmed tokenizer."""
    from transformers import AutoTokenizer

    spec_file = staging / "tokenizer.json"
    if not spec_file.is_file():
        raise ConfigError("trim_vocabulary", "the model's tokenizer has no tokenizer.json (a fast tokenizer's file)")
    # every example, beyond the training's `limits`: each rare word a split holds is one a deployed input may hold
    splits = load_splits(dataclasses.replace(data, limits=SplitLimits()), ("train", "unlabeled", "dev"))
    examples = [example for split in splits.values() for example in split]
    if not examples:
        raise ConfigError("trim_vocabulary", "the config's data has no train, unlabeled or dev examples")
    vocab_size = tm.model.get_input_embeddings().weight.shape[0]
    keep = task_token_ids(tm, examples, data.max_source_length, data.max_target_length)
    spec, old_ids = trim_tokenizer(json.loads(spec_file.read_text(encoding="utf-8")), keep)
    spec_file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    trim_embeddings(tm.model, old_ids)
    tm.model.save_pretrained(staging)
    tokenizer = AutoTokenizer.from_pretrained(staging)
    if len(tokenizer) != len(old_ids):  # the tokenizer's other files named tokens by their old ids
        message = f"the trimmed tokenizer has {len(tokenizer)} tokens, not the {len(old_ids)} kept: not trimmable"
        raise ConfigError("trim_vocabulary", message)
    log.info("vocabulary trimmed to %d of %d tokens (%d examples)", len(old_ids), vocab_size, len(examples))
    return {"kept": len(old_ids), "of": vocab_size, "examples": len(examples)}, tokenizer
