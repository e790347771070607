"""Typed recipes: nested dataclasses filled from YAML files and ``key.sub=value`` overrides.

A recipe is a dataclass whose fields are scalars (``bool``, ``int``, ``float``, ``str``,
``Path``), ``Literal`` choices, ``list``/``tuple``/``dict`` of those, optionals (``X | None``)
or nested recipe dataclasses (sections). Each field documents itself with
``field(metadata={"help": ...})``, which :func:`describe` turns into ``--help`` text.

:func:`load_config` layers, lowest first: the dataclass defaults, a ``base`` mapping (e.g. a
size preset), a YAML file (which may inherit from others through ``_base_: other.yaml``) and
command-line overrides. Every layer is checked against the schema on its own, so an error
names the file or override it came from; an unknown key names the closest valid dotted key.
:func:`save_config` writes the resolved recipe, which :func:`load_config` reads back equal.

Coercion is strict where a silent conversion could hide a mistake: ``bool`` takes only
``true``/``false``, ``int`` takes only integers. It is lenient where YAML itself is the cause:
a ``float`` field takes integers and float-looking strings such as ``1e-4`` (YAML 1.1 reads a
mantissa without a dot as a string), and a ``str`` field takes integers and dates (``2024``,
``2024-01-01``) because YAML reads those unquoted words as numbers or dates.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import functools
import os
import re
import shlex
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from mesadepth import __version__
from mesadepth.errors import ConfigError, MissingFileError
from mesadepth.io import atomic_write_text

T = TypeVar("T")
PathLike = str | os.PathLike[str]

_NONE = type(None)
# What YAML 1.1 leaves as a string but a person means as a float: 1e-4, -2E+3, .5e1, inf, nan.
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.I)
_BASE_KEY = "_base_"


# --------------------------------------------------------------------------------------------
# The schema: which keys exist and what type each holds.


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # Resolved once per class: with ``from __future__ import annotations`` every annotation
    # is a string, and resolving it for every key of every load would be wasted work.
    return get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The settable fields; ``init=False`` fields are derived, so no recipe may set them."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _is_recipe(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _strip_none(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; any other type -> ``(type, False)``."""
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not _NONE]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _section(tp: Any) -> type | None:
    """The recipe dataclass a field holds (also through ``| None``), or None for a value."""
    inner, _ = _strip_none(tp)
    return inner if _is_recipe(inner) else None


def _dict_value_type(tp: Any) -> Any | None:
    """The value type of a ``dict[...]`` field (also through ``| None``), or None if not a dict."""
    inner, _ = _strip_none(tp)
    if inner is dict:
        return Any
    if get_origin(inner) is dict:
        args = get_args(inner)
        return args[1] if args else Any
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _keys(cls: type, prefix: str) -> list[str]:
    keys: list[str] = []
    for name in _fields(cls):
        key = _join(prefix, name)
        keys.append(key)
        sub = _section(_hints(cls)[name])
        if sub is not None:
            keys += _keys(sub, key)
    return keys


def dotted_keys(cls: type) -> list[str]:
    """Every settable key of recipe ``cls``, in field order; a section precedes its keys.

    >>> dotted_keys(Recipe)  # doctest: +SKIP
    ['name', 'epochs', 'optim', 'optim.lr', 'optim.betas']
    """
    return _keys(cls, "")


def _unknown(key: str, cls: type, prefix: str) -> ConfigError:
    """The error for ``key``, unknown in section ``cls`` at ``prefix``, with the closest key."""
    valid = _keys(cls, prefix)
    rel = key[len(prefix) + 1 :] if prefix else key
    leaf = key.rsplit(".", 1)[-1]
    # Same name, other section (``lr`` for ``optim.lr``): difflib ranks that poorly, a person
    # who forgot or misspelled the section means exactly that key.
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        best = max(same_leaf, key=lambda k: difflib.SequenceMatcher(None, key, k).ratio())
        return ConfigError(f"unknown key '{key}'; did you mean '{best}'?")
    for cand in difflib.get_close_matches(key, valid, n=5, cutoff=0.6):
        # The shared section prefix inflates the score ('optim.warmup' vs 'optim.lr' is 0.7),
        # so the part below the section must resemble the candidate's on its own too.
        cand_rel = cand[len(prefix) + 1 :] if prefix else cand
        if difflib.SequenceMatcher(None, rel, cand_rel).ratio() >= 0.4:
            return ConfigError(f"unknown key '{key}'; did you mean '{cand}'?")
    here = ", ".join(_join(prefix, name) for name in _fields(cls))
    where = f"under '{prefix}'" if prefix else "at the top level"
    return ConfigError(f"unknown key '{key}'; valid keys {where}: {here}")


# --------------------------------------------------------------------------------------------
# Values: check and convert one value against one annotation.


def _type_name(tp: Any) -> str:
    """A short, readable name for an annotation: ``list[int]``, ``float | null``, ``a|b``."""
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in get_args(tp))
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in get_args(tp))
        return f"{origin.__name__}[{args}]" if args else origin.__name__
    if tp is _NONE:
        return "null"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(key: str, expected: str, value: Any, hint: str = "") -> ConfigError:
    return ConfigError(f"'{key}': expected {expected}, got {_short(value)}{hint}")


def _coerce(value: Any, tp: Any, key: str, *, loose: bool = True) -> Any:
    """``value`` checked against annotation ``tp`` and converted; errors name ``key``.

    ``loose=False`` refuses the conversions that change a value's kind (int -> str), so that
    a union such as ``int | str`` keeps ``3`` an int before the ``str`` option may take it.
    """
    if tp is Any or tp is object:
        return value
    origin = get_origin(tp)
    if _is_union(tp):
        options = [a for a in get_args(tp) if a is not _NONE]
        if value is None:
            if _NONE in get_args(tp):
                return None
            raise _bad(key, _type_name(tp), value)
        if len(options) == 1:
            option = options[0]
            try:
                return _coerce(value, option, key, loose=loose)
            except ConfigError:
                # A section's or a list's own message ("unknown key 'optim.x'") says more.
                if _is_recipe(option) or (get_origin(option) or option) in (list, tuple, dict):
                    raise
                if get_origin(option) is Literal:
                    raise _bad(key, f"one of {list(get_args(option))} or null", value) from None
                raise _bad(key, f"{_type_name(option)} or null", value) from None
        for allow in (False, True) if loose else (False,):
            for option in options:
                try:
                    return _coerce(value, option, key, loose=allow)
                except ConfigError:
                    pass
        raise _bad(key, _type_name(tp), value)
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            # Compare types too: True == 1 and 1 == 1.0 in Python, but not in a recipe.
            if type(choice) is type(value) and choice == value:
                return choice
        raise _bad(key, f"one of {list(choices)}", value)
    if _is_recipe(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _bad(key, f"a mapping of {tp.__name__} keys", value)
        return from_dict(tp, value, path=key)
    if origin in (list, tuple) or tp in (list, tuple):
        container = origin or tp
        # Only YAML sequences: a string or a mapping is iterable too, but never meant as a list.
        if not isinstance(value, (list, tuple)):
            raise _bad(key, _type_name(tp), value)
        args = get_args(tp)
        if container is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _bad(key, f"{_type_name(tp)} ({len(args)} items)", value)
            items = [
                _coerce(v, a, f"{key}[{i}]", loose=loose)
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{key}[{i}]", loose=loose) for i, v in enumerate(value)]
        return tuple(items) if container is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _bad(key, _type_name(tp), value)
        kt, vt = get_args(tp) or (Any, Any)
        return {
            _coerce(k, kt, f"{key} (a key)", loose=loose): _coerce(
                v, vt, _join(key, str(k)), loose=loose
            )
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(key, "bool (true or false)", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad(key, "int", value)
    if tp is float:
        if isinstance(value, float):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
        raise _bad(key, "float", value)
    if tp is str:
        if isinstance(value, str):
            return value
        if loose and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if loose and type(value) is datetime.date:
            return value.isoformat()  # YAML reads 2024-01-01 as a date; isoformat gives it back
        raise _bad(key, "str", value, f" (quote it to keep it text: {key}='...')")
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
        raise _bad(key, "a path (str)", value)
    # A recipe class with a field type this module cannot read is a bug in that class.
    raise TypeError(f"'{key}': unsupported recipe field type {tp!r}")


def _validate(cls: type, data: Any, prefix: str) -> None:
    """Check keys and values of a partial mapping against ``cls``; build nothing.

    A file or override layer may leave out required keys that another layer sets, so this
    checks what is there without constructing the dataclass.
    """
    if not isinstance(data, Mapping):
        raise _bad(prefix or "(top level)", f"a mapping of {cls.__name__} keys", data)
    fields = _fields(cls)
    for raw, value in data.items():
        key = _join(prefix, str(raw))
        if raw not in fields:
            raise _unknown(key, cls, prefix)
        tp = _hints(cls)[raw]
        sub = _section(tp)
        if sub is not None and isinstance(value, Mapping):
            _validate(sub, value, key)
        else:
            _coerce(value, tp, key)


# --------------------------------------------------------------------------------------------
# Dataclass <-> plain data.


def _field_default(f: dataclasses.Field[Any]) -> Any:
    """The value a field takes when no layer sets it (``MISSING`` for a required field)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _build(cls: type[T], data: Any, prefix: str, defaults: Any = None) -> T:
    """``cls`` from mapping ``data``; keys it leaves out come from ``defaults`` if given.

    A section given as a mapping is a partial update of the section's default *instance*,
    so ``field(default_factory=lambda: Optim(lr=0.1))`` keeps ``lr=0.1`` when a recipe sets
    only ``optim.schedule``.
    """
    if not isinstance(data, Mapping):
        raise _bad(prefix or "(top level)", f"a mapping of {cls.__name__} keys", data)
    fields = _fields(cls)
    kwargs: dict[str, Any] = {}
    for raw, value in data.items():
        key = _join(prefix, str(raw))
        if raw not in fields:
            raise _unknown(key, cls, prefix)
        tp = _hints(cls)[raw]
        sub = _section(tp)
        if sub is not None and isinstance(value, Mapping):
            under = getattr(defaults, raw) if defaults is not None else _field_default(fields[raw])
            kwargs[raw] = _build(sub, value, key, under if isinstance(under, sub) else None)
        else:
            kwargs[raw] = _coerce(value, tp, key)
    if defaults is not None:
        for name in fields.keys() - kwargs.keys():
            kwargs[name] = copy.deepcopy(getattr(defaults, name))
    missing = [
        _join(prefix, name)
        for name, f in fields.items()
        if name not in kwargs and _field_default(f) is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    return cls(**kwargs)


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "", source: str = "") -> T:
    """Build recipe ``cls`` from a plain (nested) mapping; missing keys keep their defaults.

    ``path`` is the dotted position of ``data`` in a larger recipe (``"optim"``), used only in
    messages; ``source`` (a file name) prefixes every error message.
    """
    if not _is_recipe(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    try:
        return _build(cls, data, path.rstrip("."))
    except ConfigError as exc:
        if not source:
            raise
        raise ConfigError(f"{source}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """A recipe (or any value in one) as plain YAML-safe data, in field order.

    Tuples become lists and paths strings; ``init=False`` fields are left out because no
    recipe may set them.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {name: to_dict(getattr(obj, name)) for name in _fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


# --------------------------------------------------------------------------------------------
# Overrides: ``key.sub=value`` from the command line.


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=[1, 2]", "d=null"]`` -> ``[("a.b", 3), ("c", [1, 2]), ("d", None)]``.

    The value is read as YAML, so numbers, ``true``/``false``, ``null``, ``[lists]`` and
    ``{mappings}`` keep their types; an empty value (``name=``) is the empty string.
    """
    if isinstance(items, str):
        raise TypeError("parse_overrides takes a list of 'key=value' strings, not one string")
    out: list[tuple[str, Any]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or "" in key.split(".") or any(c.isspace() for c in key):
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({problem}); quote it: {key}='...'"
            ) from None
        out.append((key, value))
    return out


def _key_types(cls: type, key: str) -> list[Any]:
    """The annotation at each step of dotted ``key``; unknown keys raise with the closest one.

    Below a ``dict[str, X]`` field any key is allowed and has type ``X``.
    """
    parts = key.split(".")
    types_: list[Any] = []
    current: Any = cls
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        section = _section(current) if depth else cls
        if section is not None:
            if part not in _fields(section):
                raise _unknown(key, section, prefix)
            current = _hints(section)[part]
        elif (value_type := _dict_value_type(current)) is not None:
            current = value_type
        else:
            raise ConfigError(
                f"unknown key '{key}': '{prefix}' holds a value of type "
                f"{_type_name(current)}, not a section"
            )
        types_.append(current)
    return types_


def _default_at(cls: type, parts: list[str]) -> Any:
    """The recipe's default value at a dotted path (``MISSING`` where there is none)."""
    value = _field_default(_fields(cls)[parts[0]])
    for part in parts[1:]:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = getattr(value, part)
        elif isinstance(value, Mapping):
            value = value.get(part, dataclasses.MISSING)
        else:
            return dataclasses.MISSING
    return value


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[tuple[str, Any]], cls: type
) -> dict[str, Any]:
    """Set parsed overrides into plain ``data`` (changed in place and returned).

    Each key and value is checked against ``cls`` first. A mapping given for a section is
    merged into what the section holds (other keys keep their recipe values); any other
    value replaces. Nested mappings on the way are copied before they change, so a ``base``
    shared by the caller (a preset table) is never modified.
    """
    for key, value in overrides:
        path_types = _key_types(cls, key)
        tp = path_types[-1]
        sub = _section(tp)
        if sub is not None and isinstance(value, Mapping):
            _validate(sub, value, key)
        else:
            _coerce(value, tp, key)
        parts = key.split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None and _dict_value_type(path_types[depth]) is not None:
                # One entry of a dict field: start from the recipe's dict, or setting
                # ``weights.photo`` would silently drop every other default entry.
                default = _default_at(cls, parts[: depth + 1])
                child = default if isinstance(default, Mapping) else {}
            if dataclasses.is_dataclass(child) and not isinstance(child, type):
                child = to_dict(child)
            node[part] = dict(child) if isinstance(child, Mapping) else {}
            node = node[part]
        leaf = parts[-1]
        old = node.get(leaf)
        if sub is not None and isinstance(value, Mapping) and isinstance(old, Mapping):
            node[leaf] = deep_merge(old, value)
        else:
            node[leaf] = copy.deepcopy(value)
    return data


# --------------------------------------------------------------------------------------------
# Files.


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, mappings merged recursively; lists are replaced, never joined.

    Returns new dicts all the way down where the two meet; neither input is modified.
    """
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last silently)."""


def _construct_mapping(loader: _RecipeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` may legitimately be overridden by a later explicit key
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        except TypeError:
            pass  # an unhashable (complex) key: SafeLoader reports it itself
    return loader.construct_mapping(node, deep=True)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_one(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(
            path, "recipe (YAML file)", "check the path, or a _base_ entry naming it"
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: expected a UTF-8 text (YAML) file: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where} invalid YAML: {problem}") from None
    if data is None:  # an empty file (or only comments) is an empty recipe
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of keys (key: value lines) at the top level, "
            f"got a {type(data).__name__}"
        )
    return data


def read_yaml(
    path: PathLike, cls: type | None = None, *, _chain: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """A recipe file as a plain mapping, with its ``_base_`` files merged underneath.

    ``_base_`` is a path or a list of paths relative to the file; later bases win over
    earlier ones and the file wins over all. With ``cls`` each file's own keys are checked
    against that recipe, so an error names the file that holds the mistake.
    """
    path = Path(path).expanduser()
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise ConfigError(f"{path}: _base_ inheritance cycle: {cycle}")
    data = _read_one(path)
    bases = data.pop(_BASE_KEY, None)
    if cls is not None:
        try:
            _validate(cls, data, "")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(
            f"{path}: {_BASE_KEY} must be a file name or a list of file names, got {bases!r}"
        )
    merged: dict[str, Any] = {}
    for name in bases:
        base_path = Path(name).expanduser()
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        merged = deep_merge(merged, read_yaml(base_path, cls, _chain=(*_chain, resolved)))
    return deep_merge(merged, data)


def load_config(
    cls: type[T],
    path: PathLike | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
) -> T:
    """Recipe ``cls``: its defaults <- ``base`` <- the YAML file at ``path`` <- ``overrides``.

    ``overrides`` are ``key.sub=value`` strings (see :func:`parse_overrides`). Raises
    :class:`ConfigError` naming the file or override at fault, and
    :class:`~mesadepth.errors.MissingFileError` for a recipe file that does not exist.
    """
    data: dict[str, Any] = {}
    if base:
        data = copy.deepcopy(dict(base))  # the caller's table (a preset) must stay as it is
        try:
            _validate(cls, data, "")
        except ConfigError as exc:
            raise ConfigError(f"base values: {exc}") from None
    if path is not None:
        data = deep_merge(data, read_yaml(path, cls))
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        try:
            apply_overrides(data, parse_overrides([item]), cls)
        except ConfigError as exc:
            msg = str(exc)
            raise ConfigError(
                msg if msg.startswith("override ") else f"override {item!r}: {msg}"
            ) from None
    return from_dict(cls, data, source=str(path) if path is not None else "")


def save_config(cfg: Any, path: PathLike, *, command: str | Sequence[str] | None = None) -> None:
    """Write the resolved recipe ``cfg`` as YAML, atomically, keys in field order.

    The first line is a comment naming the mesadepth version and, if given, the command
    (a string as is, an argv list shell-quoted) so the run can be repeated;
    ``load_config(type(cfg), path)`` reads back an equal recipe.
    """
    header = f"# mesadepth {__version__}"
    if command:
        text = command if isinstance(command, str) else shlex.join(command)
        header += " | command: " + " ".join(text.splitlines())  # one comment line, always
    body = yaml.safe_dump(
        to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    atomic_write_text(path, header + "\n" + body)


# --------------------------------------------------------------------------------------------
# Help.


def _inline(value: Any) -> str:
    """A value as it would be written in a recipe or an override: ``[2, 2]``, ``null``."""
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()  # safe_dump ends a bare scalar with '...'


def _describe(cls: type, prefix: str, indent: str, lines: list[str]) -> None:
    for name, f in _fields(cls).items():
        key = _join(prefix, name)
        tp = _hints(cls)[name]
        help_text = f.metadata.get("help", "")
        value = _field_default(f)
        default = "(required)" if value is dataclasses.MISSING else _inline(value)
        sub = _section(tp)
        if sub is not None:
            _, optional = _strip_none(tp)
            kind = f"section {sub.__name__}" + (", or null" if optional else "")
            off = " (null by default; set any key to enable)" if default == "null" else ""
            lines.append(
                f"{indent}{key}.*  [{kind}]{off}" + (f"  {help_text}" if help_text else "")
            )
            _describe(sub, key, indent + "  ", lines)
            continue
        lines.append(
            f"{indent}{key} = {default}  [{_type_name(tp)}]"
            + (f"  {help_text}" if help_text else "")
        )


def describe(cls: type) -> str:
    """Help text: every dotted key with its default, type and help, sections indented.

    One line per key, e.g. ``  optim.lr = 0.001  [float]  peak learning rate``, for the
    epilog of a command's ``--help``.
    """
    lines: list[str] = []
    _describe(cls, "", "  ", lines)
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
