"""The config machinery: `ConfigError`, checks, building a dataclass from a mapping, YAML, overrides.

cfg = load_config(FinetuneConfig, "configs/finetune/teacher.yaml", ["train.lr=3e-4"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user error in a config: `key` is the dotted path of the offending value."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error, for a config placed under `prefix` ("" : at the top)."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def check(condition: bool, key: str, message: str) -> None:
    """Raise a `ConfigError` for `key` unless `condition` holds (used in `__post_init__`)."""
    if not condition:
        raise ConfigError(key, message)


_MISSING_PATHS: ContextVar[list[ConfigError] | None] = ContextVar("missing paths", default=None)
"""While `load_config` builds a config: where `check_path` puts the paths it finds missing."""
_WHERE: ContextVar[str] = ContextVar("config prefix", default="")
"""The dotted key of the config `from_dict` is building (for the keys of deferred errors)."""


def check_path(condition: bool, key: str, message: str) -> None:
    """`check` for a file or directory that must exist. While `load_config` builds a whole config it is checked
    last: every key's value is validated first, so a misspelled key is reported even when a path is missing too."""
    if condition:
        return
    missing = _MISSING_PATHS.get()
    if missing is None:
        raise ConfigError(key, message)
    missing.append(ConfigError(key, message).under(_WHERE.get()))


@contextlib.contextmanager
def paths_checked_last(missing: list[ConfigError]) -> Iterator[list[ConfigError]]:
    """Within it, `check_path` puts the paths it finds missing in `missing` instead of raising."""
    token = _MISSING_PATHS.set(missing)
    try:
        yield missing
    finally:
        _MISSING_PATHS.reset(token)


def writable_dir(path: str | os.PathLike, key: str = "output_dir") -> Path:
    """Create directory `path` (parents too) and check that files can be written in it, before any work starts:
    a `ConfigError` naming `key` when it is a file, or the place is read-only."""
    path = Path(path)
    check(not path.exists() or path.is_dir(), key, f"{path} is a file; name a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(key, f"cannot write in {path} ({err.strerror.lower()})") from None
    return path


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the type hint `tp` (with the few coercions YAML needs)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        check(value in typing.get_args(tp), key, f"expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is dict:  # free-form mappings, validated by the code that reads them (e.g. study runs)
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return value
    if origin is list:
        check(isinstance(value, list | tuple), key, f"expected a list, got {value!r}")
        return [_convert(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        check(isinstance(value, int | float) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        check(math.isfinite(value), key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")  # an internal bug, not a user error


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"{prefix}." if prefix else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"{where}{key}", f"unknown key; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            if f.default_factory is not dataclasses.MISSING and isinstance(value, dict):
                default = f.default_factory()
                if dataclasses.is_dataclass(default):  # a partial mapping overrides the default's fields
                    value = _merge(dataclasses.asdict(default), value)
            kwargs[name] = _convert(value, hints[name], f"{where}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}{name}", "required key is missing")
    where_token = _WHERE.set(prefix)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) from None
    finally:
        _WHERE.reset(where_token)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


class _YamlLoader(yaml.SafeLoader):
    """YAML with 1.2-style scalars: `3e-4` is a float and `6:2` a string (YAML 1.1 reads a string and 362); only
    true and false are booleans, so `static_cache: off` and `dedupe: off` stay the words they are."""


_INT, _FLOAT, _BOOL = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT, _BOOL)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YamlLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(0|[1-9][0-9_]*)$"), list("-+0123456789"))
_YamlLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides are written key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            if node.get(key) is None:
                node[key] = {}
            if not isinstance(node[key], dict):
                raise ConfigError(dotted, f"'{key}' is not a mapping, cannot set a sub-key")
            node = node[key]
        try:
            node[keys[-1]] = parse_yaml(raw)
        except yaml.YAMLError as err:
            raise ConfigError(dotted, f"cannot parse value {raw!r}: {err.problem}") from None
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError("", f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping of keys")
    return data


def load_config(
    cls: type, path: str | os.PathLike | None, overrides: list[str] = (), missing_paths: list | None = None
) -> Any:
    """Read YAML (optional), apply dotted overrides, then build and validate `cls`, checking that files and
    directories exist last (see `check_path`). With a `missing_paths` list, those errors go there instead."""
    data = read_yaml(path) if path is not None else {}
    found: list[ConfigError] = []
    with paths_checked_last(found):
        cfg = from_dict(cls, apply_overrides(data, list(overrides)))
    if missing_paths is not None:
        missing_paths.extend(found)
    elif found:
        raise found[0]
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML, atomically (a crash leaves the old file or the new one)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
