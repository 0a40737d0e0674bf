"""`distilgen export`: a model as it will be deployed, converted for a fast inference runtime (CTranslate2).

    distilgen export runs/study/seed0/seq_kd/distill/model output_dir=runs/deploy/seq_kd quantization=int8
    distilgen evaluate ... models=[runs/study/seed0/seq_kd/distill/model, runs/deploy/seq_kd]   # side by side

The output directory holds CTranslate2's model (`ctranslate2/`), the tokenizer, the `transformers` config and the
prompt the model reads sources through (so distilgen loads it like any model: `evaluate`, `serve`, `cost`), and a
manifest (`export.json`: format, quantization, the source model and the sha256 of its weights, versions).
CTranslate2's own converters do the work, for BART, T5, GPT-2 and the Llama family (Llama, Qwen2/3, Mistral,
Gemma 2/3); BART of transformers 5 lacks `normalize_before`, added to a staging copy of its config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from distilgen.config import ConfigError, ExportConfig, ModelConfig
from distilgen.generation.ct2 import MANIFEST, RUNTIME_DIR
from distilgen.models import PROMPT_FILE, load_model

log = logging.getLogger(__name__)

CT2_FAMILIES = ("bart", "t5", "gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3")
"""Model types CTranslate2 converts and distilgen has checked (greedy outputs equal the PyTorch model's)."""


def weights_sha256(directory: Path) -> str:
    """sha256 over a saved model's weight files, in name order: which weights an export came from."""
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

    tm = load_model(ModelConfig(path=cfg.model), key="model")
    family = tm.model.config.model_type
    if family not in CT2_FAMILIES:
        raise ConfigError("model", f"a {family} model: CTranslate2 export covers {', '.join(CT2_FAMILIES)}")
    out = Path(cfg.output_dir)
    if out.exists() and not cfg.overwrite:
        raise ConfigError("output_dir", f"{out} exists: choose another directory, or set overwrite=true")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staging, result = Path(tmp) / "staging", Path(tmp) / "export"
        tm.save(staging)  # a plain checkpoint whatever the source (a GGUF file, a hub id, a directory)
        if family == "bart":  # transformers 5's BartConfig has no normalize_before, which the converter reads
            config = json.loads((staging / "config.json").read_text())
            config.setdefault("normalize_before", False)
            (staging / "config.json").write_text(json.dumps(config))
        converter = ctranslate2.converters.TransformersConverter(str(staging))
        converter.convert(str(result / RUNTIME_DIR), quantization=cfg.quantization)
        tm.tokenizer.save_pretrained(result)
        tm.model.config.save_pretrained(result)
        if (staging / PROMPT_FILE).is_file():
            shutil.copy(staging / PROMPT_FILE, result / PROMPT_FILE)
        info = {
            "format": "ctranslate2",
            "quantization": cfg.quantization,
            "family": family,
            "source": cfg.model,
            "source_weights_sha256": weights_sha256(staging),
            "distilgen_version": __version__,
            "ctranslate2_version": ctranslate2.__version__,
        }
        (result / MANIFEST).write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        result.rename(out)
    log.info("exported %s to %s (%s, %s)", cfg.model, out, family, cfg.quantization)
    return {"output_dir": str(out), **info}
