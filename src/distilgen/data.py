"""Data: every split, whatever its format, becomes a list of `Example`s with stable ids.

A split is a `.jsonl`, `.json`, `.csv` or `.parquet` file, a directory written by
`datasets.save_to_disk` (`dir`, or `dir@split` for a DatasetDict), a hub dataset
`hub:owner/name@split`, or comes from a built-in task (`data.task`). A bad record is a `DataError`
naming the file and the place: the line of a `.jsonl` or `.csv` record (and of bad bytes or malformed
JSON in a `.json` file), or the row of a `.json` list, a parquet file or a dataset. Both count from 1:
row 1 is `ds[0]`. Text files are UTF-8, with or without a byte-order mark.

    splits = load_splits(cfg.data)  # {"train": [Example, ...], "dev": [...], ...}
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distilgen.config import ConfigError, DataConfig
from distilgen.tasks import generate_split

log = logging.getLogger(__name__)

SPLITS = ("train", "unlabeled", "dev", "test")
FORMATS = ".jsonl, .json, .csv, .parquet, a datasets.save_to_disk directory (dir or dir@split) or hub:owner/name@split"


@dataclass(frozen=True)
class Example:
    """One record of a split, the same shape whatever the format it came from."""

    id: str
    """Stable across runs: the `id_field` value, or a hash of the source."""
    source: str
    """The model input, template already applied."""
    target: str | None
    """The first reference, the one training uses; None for unlabeled data."""
    references: tuple[str, ...]
    """Every reference (metrics score against all of them); () for unlabeled data."""


class DataError(ValueError):
    """A user error in a data file: one line naming the file, the place and the fix."""


def load_splits(cfg: DataConfig, names: Sequence[str] = SPLITS) -> dict[str, list[Example]]:
    """The configured splits among `names` (all from `cfg.task` when set), each cut to `cfg.limits`; `unlabeled`
    loses its targets."""
    splits = {}
    for name in names:
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}'; expected one of {SPLITS}")
        labeled = name != "unlabeled"
        if cfg.task is not None:
            if getattr(cfg.task, f"{name}_size") > 0:
                splits[name] = [_task_example(record, cfg, labeled) for record in generate_split(cfg.task, name)]
        elif getattr(cfg, name) is not None:
            splits[name] = load_split(getattr(cfg, name), cfg, labeled)
        if name in splits:
            splits[name] = splits[name][: getattr(cfg.limits, name)]
    return splits


def scored_split(cfg: DataConfig, name: str, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of the labeled split `name` (dev or test) that a command scores; a `ConfigError`
    naming the key to set when there are none."""
    examples = load_splits(cfg, (name,)).get(name, [])[:limit]
    if not examples:
        key, fix = (f"task.{name}_size", "set it above 0") if cfg.task is not None else (name, "name a labeled file")
        raise ConfigError(f"data.{key}", f"no {name} examples to score; {fix}")
    return examples


def _task_example(record: dict, cfg: DataConfig, labeled: bool) -> Example:
    source = cfg.template.replace("{source}", record["source"])
    if not labeled:
        return Example(record["id"], source, None, ())
    return Example(record["id"], source, record["targets"][0], tuple(record["targets"]))


def load_split(spec: str, cfg: DataConfig, labeled: bool) -> list[Example]:
    """Read one split (`spec` as in `DataConfig`); `labeled=False` ignores targets entirely."""
    name, records = _read(spec, cfg.hub_config)
    examples = []
    seen_ids: dict[str, str] = {}  # id -> where it first appeared
    seen_sources: dict[str, int] = {}  # source -> times seen so far
    dropped = 0
    for where, record in records:
        where = f"{name} {where}"
        source, references = _fields(record, where, cfg, labeled)
        if cfg.dedupe == "source" and source in seen_sources:
            dropped += 1
            continue
        if cfg.id_field is not None:
            if record.get(cfg.id_field) is None:
                raise DataError(f"{where}: missing id field '{cfg.id_field}' (set data.id_field, or leave it empty)")
            id_ = str(record[cfg.id_field])
            if id_ in seen_ids and cfg.dedupe == "id":
                dropped += 1
                continue
            if id_ in seen_ids:
                raise DataError(
                    f"{where}: duplicate id '{id_}' (first at {seen_ids[id_]}); ids must be unique, or set "
                    "data.dedupe to keep the first record of each id (or source)"
                )
            seen_ids[id_] = where
            seen_sources[source] = 1
        else:
            # Hash of the raw source: stable across runs, files and templates; repeats get -1, -2, ...
            id_ = hashlib.sha256(source.encode()).hexdigest()[:16]
            count = seen_sources.get(source, 0)
            seen_sources[source] = count + 1
            id_ = f"{id_}-{count}" if count else id_
        target = references[0] if references else None
        examples.append(Example(id_, cfg.template.replace("{source}", source), target, references))
    if not examples:
        raise DataError(f"{name}: no records (an empty split; remove it from the config or add data)")
    if dropped:
        log.warning("%s: data.dedupe=%s dropped %d repeated records, kept %d", name, cfg.dedupe, dropped, len(examples))
    return examples


def _fields(record: Any, where: str, cfg: DataConfig, labeled: bool) -> tuple[str, tuple[str, ...]]:
    """The stripped source and references of one record, or a `DataError` saying what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with a '{cfg.source_field}' field, got {type(record).__name__}")
    fields = ", ".join(map(str, record)) or "none"
    source = record.get(cfg.source_field)
    if source is None:
        raise DataError(
            f"{where}: {_absent(record, cfg.source_field)} source field '{cfg.source_field}' (fields: {fields}); "
            "set data.source_field to the input column"
        )
    if not isinstance(source, str):
        raise DataError(f"{where}: source '{cfg.source_field}' must be a string, got {type(source).__name__}")
    if not source.strip():
        raise DataError(f"{where}: empty source '{cfg.source_field}'; remove the record or fill it in")
    if not labeled:
        return source.strip(), ()
    target = record.get(cfg.target_field)
    if target is None:
        raise DataError(
            f"{where}: {_absent(record, cfg.target_field)} target field '{cfg.target_field}' (fields: {fields}); "
            "set data.target_field, or use the file as `unlabeled`"
        )
    references = [target] if isinstance(target, str) else target
    if not isinstance(references, list | tuple) or not all(isinstance(r, str) for r in references):
        raise DataError(
            f"{where}: target '{cfg.target_field}' must be a string or a list of strings, got {target!r:.60}"
        )
    references = tuple(r.strip() for r in references)
    if not references or not all(references):
        raise DataError(f"{where}: empty target '{cfg.target_field}'; every labeled record needs a reference")
    return source.strip(), references


def _absent(record: dict, field: str) -> str:
    """How a field that reads as None is absent: a null value (JSON null, an empty parquet cell) or no such field."""
    return "null" if field in record else "missing"


# ---------------------------------------------------------------------------------------------
# Readers: spec -> (display name, iterator of (place, record))
# ---------------------------------------------------------------------------------------------


def _read(spec: str, hub_config: str | None) -> tuple[str, Iterable[tuple[str, Any]]]:
    if spec.startswith("hub:"):
        name, _, split = spec.removeprefix("hub:").partition("@")
        if not name or not split:
            raise DataError(f"{spec}: name the dataset and its split, e.g. hub:owner/name@train")
        import datasets  # imported here: slow to import, and only hub and save_to_disk data need it

        try:
            data = datasets.load_dataset(name, hub_config, split=split)
        except OSError as err:
            # Offline or unreachable: ConnectionError; no such dataset, or a gated or private one:
            # DatasetNotFoundError (a FileNotFoundError); other HTTP failures: HfHubHTTPError. All are OSErrors.
            raise DataError(
                f"{spec}: the dataset could not be loaded ({err}); check the name, your access and the network"
            ) from None
        return spec, _rows(data)
    # Like `DataConfig`: a path that exists wins, so only a missing one is read as `dir@split`.
    path, split = (spec, None) if os.path.exists(spec) else (spec.partition("@")[0], spec.partition("@")[2] or None)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        return spec, _rows(_load_from_disk(path, split))
    if split is not None:
        raise DataError(f"{spec}: '@{split}' only selects a split of a datasets directory; {path} is a file")
    suffix = Path(path).suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use {FORMATS}")
    return path, readers[suffix](path)


def _read_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: malformed JSON ({err.msg} at column {err.colno})") from None


def _read_json(path: str) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(_utf8(Path(path).read_bytes(), path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a list of objects or {{"data": [...]}}, got {type(data).__name__}')
    yield from _rows(data)


def _read_csv(path: str) -> Iterator[tuple[str, Any]]:
    # Lines keep their line ends, as csv wants (a quoted field may span lines); `line_num` is the record's last line.
    reader = csv.reader(_lines(path))
    try:
        header = next(reader, [])
        for row in filter(None, reader):  # blank lines hold no record
            if len(row) != len(header):
                raise DataError(
                    f"{path} line {reader.line_num}: {len(row)} fields while the header has {len(header)}; "
                    "give one value per column, and quote values that contain a comma"
                )
            yield f"line {reader.line_num}", dict(zip(header, row, strict=True))
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({err})") from None


def _lines(path: str) -> Iterator[str]:
    """The lines of a UTF-8 file, read lazily and decoded one at a time so that bad bytes are reported at their line."""
    with open(path, "rb") as f:
        # A binary file splits only at \n: split at \r too, as text mode does (old Mac files end lines with \r alone).
        lines = (line for chunk in f for line in chunk.splitlines(keepends=True))
        for number, line in enumerate(lines, start=1):
            yield _utf8(line, path, number)


def _utf8(raw: bytes, path: str, first_line: int = 1) -> str:
    """Bytes of `path` that start at line `first_line`, as text. A byte-order mark opening the file is dropped
    (Windows editors write one); bad bytes are a `DataError` at their line."""
    if first_line == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        raise DataError(f"{path} line {line}: not UTF-8 text ({err.reason}); re-save the file as UTF-8") from None


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot read parquet ({err})") from None
    return _rows(table.to_pylist())  # list columns come back as lists: several references


def _load_from_disk(path: str, split: str | None) -> Iterable[dict]:
    import datasets

    try:
        data = datasets.load_from_disk(path)
    except FileNotFoundError:  # the directory exists: it lacks the files save_to_disk writes
        raise DataError(
            f"{path}: a directory, but not a dataset saved with `datasets.save_to_disk`; use {FORMATS}"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: choose a split with {path}@SPLIT, one of: {', '.join(data)}")
        return data[split]
    if split is not None:
        raise DataError(f"{path}: holds a single dataset, not splits; drop '@{split}'")
    return data


def _rows(records: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    return ((f"row {number}", record) for number, record in enumerate(records, start=1))


# ---------------------------------------------------------------------------------------------
# Export and statistics
# ---------------------------------------------------------------------------------------------


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike) -> None:
    """Write examples as JSONL (`target` is a list when there are several references), e.g. to export a task.

    Sources are written as loaded, with the template applied: read the file back with the default template.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            record: dict[str, Any] = {"id": example.id, "source": example.source}
            if example.references:
                record["target"] = list(example.references) if len(example.references) > 1 else example.target
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def token_stats(
    encode, examples: Sequence[Example], max_source_length: int, max_target_length: int
) -> dict[str, float]:
    """Lengths in tokens of a split as a model reads it (`encode` is its `TextModel.encode`: prompt and special
    tokens included), and how many sources and targets the configured maximum lengths would cut."""
    whole, _ = encode(examples, 1 << 30, 1 << 30)
    _, cut = encode(examples, max_source_length, max_target_length)
    sources = [len(e.source) for e in whole]
    targets = [len(e.target) for e in whole if e.target] or [0]
    return {
        "source_tokens_mean": sum(sources) / len(sources),
        "source_tokens_max": max(sources),
        "target_tokens_mean": sum(targets) / len(targets),
        "target_tokens_max": max(targets),
        "sources_cut": cut.sources_truncated,
        "targets_cut": cut.targets_truncated,
    }


def split_stats(examples: Sequence[Example]) -> dict[str, float]:
    """Size and lengths (in words) of a split, as `distilgen data` prints them."""
    labeled = [e for e in examples if e.target is not None]
    source_words = [len(e.source.split()) for e in examples] or [0]
    target_words = [len(e.target.split()) for e in labeled] or [0]
    return {
        "examples": len(examples),
        "labeled": len(labeled),
        "source_words_mean": sum(source_words) / len(source_words),
        "source_words_max": max(source_words),
        "target_words_mean": sum(target_words) / len(target_words),
        "target_words_max": max(target_words),
        "references_mean": sum(len(e.references) for e in labeled) / max(len(labeled), 1),
    }
