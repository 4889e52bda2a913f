"""Typed dataclass trees from YAML: the config's machinery, apart from its fields.

A field's annotation is its type (``int``, ``float``, ``bool``, ``str``, ``Literal``, ``Optional``, ``list``, or a
:class:`Table` naming a table of names elsewhere); :func:`merge` checks a mapping against a tree key by key and
value by value, so an unknown key or a wrong type is one error naming the dotted path. YAML is read safely, with no
aliases and no duplicate keys; values in error messages are cut to :data:`MAX_SHOWN_CHARS`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class Table:
    """Marks a config field whose values are the keys of a table elsewhere, ``"module:NAME"`` (PRESETS, REWARDS,
    TEMPLATES, ENGINES, the loss variants). The table is the one source of the names: adding an entry there is the
    whole change. It is read when a value is checked or the docs are written, so config.py imports nothing above
    it at import time."""

    ref: str

    def names(self) -> tuple[str, ...]:
        module, attr = self.ref.split(":")
        return tuple(getattr(importlib.import_module(module), attr))


def table_of(tp) -> Optional[Table]:
    if typing.get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, Table)), None)
    return None


def check_tables(section, path: str) -> None:
    """Every table-named field of a section names an entry of its table (set in code as well as from YAML)."""
    for name, tp in type_hints(type(section)).items():
        value = getattr(section, name)
        for t in (tp, *typing.get_args(tp)):
            table = table_of(t)
            if table is not None and value is not None and value not in table.names():
                raise ConfigError(f"{path}.{name}: expected {type_name(t)}, got {value!r}")


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    table = table_of(tp)
    if table is not None:
        return " | ".join(repr(n) for n in table.names())
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


#: How much of a value an error message shows (a value can be huge: never formatted whole).
MAX_SHOWN_CHARS = 80
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 2, 4, 4, MAX_SHOWN_CHARS, 40


def show_value(value: Any) -> str:
    """``repr(value)`` for an error message, cut to :data:`MAX_SHOWN_CHARS` without formatting the whole value."""
    text = _SHOW.repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS - 3] + "..."


class _ConfigLoader(yaml.SafeLoader):
    """YAML for configs: safe_load, plus no aliases (a few hundred bytes of nested aliases expand to gigabytes:
    the "billion laughs") and no duplicate keys (YAML would keep the last one silently)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor}: YAML aliases are not allowed in "
                                              f"configs (write the value out)", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor below says so
                continue
            if first is None:
                seen[key] = key_node.start_mark.line + 1
            else:  # also on one line: {num_steps: 5, num_steps: 10}
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {show_value(key)} (first at "
                                                        f"line {first})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def coerce(value: Any, tp, path: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)

    def bad() -> ConfigError:  # formatted only when raised, and cut: a value may be huge
        return ConfigError(f"{where}{path}: expected {type_name(tp)}, got {show_value(value)} "
                           f"({type(value).__name__})")

    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, path, where)
            except ConfigError:
                continue
        raise bad()
    table = table_of(tp)
    if table is not None:
        if isinstance(value, str) and value in table.names():
            return value
        raise bad()
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad()
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (inner,) = typing.get_args(tp)
        return [coerce(v, inner, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        out = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out = float(value)
            except OverflowError:  # an int beyond the float range
                pass
        elif isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-6` (no dot) as a string; accept any float literal.
            try:
                out = float(value)
            except ValueError:
                pass
        if out is None:
            raise bad()
        if not math.isfinite(out):  # .inf / .nan / 1e999: never a meaningful setting
            raise ConfigError(f"{where}{path}: expected a finite number, got {show_value(value)}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise bad()


def type_hints(cls) -> dict:
    return typing.get_type_hints(cls, include_extras=True)


def merge(obj, data: dict, prefix: str, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.') or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}unknown key '{path}'{hint}")
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur):
            merge(cur, value, f"{path}.", where)
        else:
            setattr(obj, key, coerce(value, hints[key], path, where))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML "
                          f"({getattr(e, 'problem', None) or e.__class__.__name__})") from None
    return key.strip().split("."), value
