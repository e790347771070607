"""Typed recipes: nested dataclasses filled from YAML files and ``key.sub=value`` overrides.

A recipe is a dataclass whose fields are scalars, lists/tuples/dicts of scalars, ``Literal``
choices, optionals or nested dataclasses; each field documents itself with
``field(metadata={"help": ...})``. :func:`load_config` layers, in order: the dataclass defaults,
a ``base`` mapping (e.g. a preset), a YAML file (which may inherit from others through
``_base_: other.yaml``), and command-line overrides. Unknown keys are errors that name the
closest valid key; :func:`save_config` writes the resolved recipe so a run can be repeated.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from mesadepth import __version__
from mesadepth.errors import ConfigError, MissingFileError
from mesadepth.io import atomic_write_text

T = TypeVar("T")
_FLOAT_RE = re.compile(r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|nan)$", re.IGNORECASE)


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def dotted_keys(cls: type) -> list[str]:
    """Every configurable key of a recipe class, nested sections joined by dots."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        keys.append(f.name)
        if _is_dataclass_type(tp):
            keys += [f"{f.name}.{k}" for k in dotted_keys(tp)]
    return keys


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unknown(key: str, cls: type, prefix: str, source: str = "") -> ConfigError:
    valid = [prefix + k for k in dotted_keys(cls)]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = (
        f"; did you mean '{close[0]}'?"
        if close
        else f"; valid keys under '{prefix or '(top)'}': {', '.join(valid[:12])}"
    )
    where = f"{source}: " if source else ""
    return ConfigError(f"{where}unknown key '{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value against a type annotation; errors name the dotted key."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"'{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"'{key}': expected one of {list(choices)}, got {value!r}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{key}': expected a mapping (section {tp.__name__}), got {value!r}")
        return from_dict(tp, value, path=key + ".")
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ConfigError(f"'{key}': expected a list, got {value!r}")
        args = get_args(tp)
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"'{key}': expected {len(args)} items, got {len(items)}")
            return tuple(
                _coerce(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(items, args, strict=True))
            )
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{key}': expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise ConfigError(f"'{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-4" (no dot) as a string; a float field takes it as the number.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise ConfigError(f"'{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}': expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise ConfigError(f"'{key}': expected a path, got {value!r}")
    raise ConfigError(f"'{key}': unsupported field type {tp!r}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + "/".join(str(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "", source: str = "") -> T:
    """Build recipe ``cls`` from a plain mapping; missing keys keep their defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source + ': ' if source else ''}'{path.rstrip('.') or '(top)'}': expected a mapping, got {data!r}"
        )
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(path + str(key), cls, path, source)
        try:
            kwargs[key] = _coerce(value, hints[key], path + key)
        except ConfigError as exc:
            if source and not str(exc).startswith(source):
                raise ConfigError(f"{source}: {exc}") from None
            raise
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A recipe as plain YAML-safe values (tuples become lists, paths strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=[1, 2]"]`` -> ``[("a.b", 3), ("c", [1, 2])]``; values are parsed as YAML."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key=value, e.g. video.frames=60")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        out.append((key, value))
    return out


def _section_type(cls: type, dotted: str) -> tuple[type, str]:
    """Validate ``dotted`` against the schema; return the dataclass holding its last part."""
    parts = dotted.split(".")
    current: type = cls
    for depth, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(current)}
        prefix = ".".join(parts[:depth])
        if part not in names:
            raise _unknown(dotted, current, prefix + "." if prefix else "")
        if depth < len(parts) - 1:
            tp = _hints(current)[part]
            if not _is_dataclass_type(tp):
                raise ConfigError(
                    f"unknown key '{dotted}': '{'.'.join(parts[: depth + 1])}' is a value, not a section"
                )
            current = tp
    return current, parts[-1]


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[tuple[str, Any]], cls: type
) -> dict[str, Any]:
    """Set dotted keys in a plain mapping (in place and returned), validating each against ``cls``."""
    for key, value in overrides:
        _section_type(cls, key)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merged recursively; ``top`` wins; lists are replaced, not concatenated."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe file, resolving ``_base_`` inheritance (paths relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "recipe (YAML file)")
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"{path}: _base_ inheritance cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}"
        )
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    merged: dict[str, Any] = {}
    for b in [bases] if isinstance(bases, str) else list(bases):
        merged = deep_merge(merged, read_yaml(path.parent / b, (*_seen, resolved)))
    return deep_merge(merged, data)


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
) -> T:
    """Defaults <- ``base`` <- YAML file at ``path`` <- ``key=value`` overrides, as a ``cls``."""
    data: dict[str, Any] = dict(base or {})
    source = ""
    if path is not None:
        file_data = read_yaml(path)
        source = str(path)
        data = deep_merge(data, file_data)
    apply_overrides(data, parse_overrides(overrides), cls)
    return from_dict(cls, data, source=source)


def save_config(cfg: Any, path: str | os.PathLike[str], command: str | None = None) -> None:
    """Write the resolved recipe as YAML (field order kept), atomically; it loads back equal."""
    header = f"# mesadepth {__version__}"
    if command:
        header += f": {command}"
    body = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    atomic_write_text(path, header + "\n" + body)


def describe(cls: type, prefix: str = "", indent: str = "  ") -> str:
    """Help text: one line per key with its type, default and help, nested sections indented."""
    lines: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if _is_dataclass_type(tp):
            lines.append(f"{indent}{key}.*  ({tp.__name__})")
            lines.append(describe(tp, key + ".", indent + "  "))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        shown = (
            yaml.safe_dump(to_dict(default), default_flow_style=True)
            .strip()
            .removesuffix("...")
            .strip()
        )
        help_text = f.metadata.get("help", "")
        lines.append(
            f"{indent}{key} = {shown}  [{_type_name(tp)}]" + (f"  {help_text}" if help_text else "")
        )
    return "\n".join(lines)


__all__ = [
    "apply_overrides",
    "deep_merge",
    "describe",
    "dotted_keys",
    "from_dict",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "save_config",
    "to_dict",
]
