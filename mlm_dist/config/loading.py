"""YAML + dotted overrides -> the typed tree of schema.py, validated by checks.py.

The coercion below is generic: it walks the dataclasses' declared types and knows no field of
ours. Every value is coerced to the type its field declares (PyYAML reads `1e-4` as a string),
and every error names the dotted key that caused it, so `optim.lr=abc` fails with
`optim.lr: expected a number, got 'abc'` before a single process starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mlm_dist.config.checks import validate
from mlm_dist.config.schema import ConfigError, RunConfig


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (optional), apply `a.b=c` overrides, coerce types, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
    for o in overrides:
        _apply_override(data, o, RunConfig)
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`cfg` with `a.b=c` overrides applied, coerced and validated as load_config does them
    (`mlm-dist eval` sets its masking and reading settings on a run's saved config this way)."""
    data = to_dict(cfg)
    for o in overrides:
        _apply_override(data, o, RunConfig)
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Building a tree of dataclasses from plain data


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type for {key}")  # not used in the tree
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    """A `cls` from the plain data `data`, found at the dotted key `prefix`: unknown keys are
    refused, missing ones take the field's default."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], key)
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], {}, key)
    return cls(**kwargs)


def _apply_override(data: dict, override: str, root: type) -> None:
    """Set the value `override` (`a.b=c`) names in `data`, the plain data of a `root` tree."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. optim.lr=1e-4")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    # Values are parsed as YAML so `[1, 2]` and `{a: 1}` work; types are coerced afterwards.
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):  # e.g. schedule.phases.1.seq_len=512
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"{dotted}: {p} is not an index of a list of {len(node)}")
            p = int(p)
        elif not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {parts[i - 1]} is not a section")
        if last:
            node[p] = value
        else:
            if isinstance(node, dict) and p not in node:
                node[p] = _default_data(root, parts[:i + 1])
            node = node[p]


def _default_data(root: type, parts: list) -> dict | list:
    """The plain-data default of a section an override descends into (lists need their items)."""
    node: Any = dataclasses.asdict(root())
    for p in parts:
        if isinstance(node, list) and str(p).isdigit() and int(p) < len(node):
            node = node[int(p)]
        elif isinstance(node, dict) and p in node:
            node = node[p]
        else:
            return {}  # unknown: _build names the key
    return node if isinstance(node, (dict, list)) else {}
