"""Typed configuration: dataclasses built from YAML deltas plus dotted command-line overrides.

Every component owns a ``@dataclass`` config and validates it in ``__post_init__``. This module only knows how to
turn nested dicts into those dataclasses strictly (unknown key or wrong type -> ``ValueError`` naming the dotted key
and listing the valid ones), how to apply ``a.b=c`` overrides, and how to write the resolved config back out.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

__all__ = [
    "Range",
    "check_ranges",
    "from_dict",
    "to_dict",
    "load_config",
    "parse_overrides",
    "apply_overrides",
    "save_config",
    "field_docs",
    "broadcast_size",
]


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric config field, declared with the field: ``keep_last: Annotated[int, Range(ge=1)] = 2``.

    :func:`check_ranges` (called first in each config's ``__post_init__``) enforces them; a list or tuple field has
    each item checked, and None (an optional field left unset) passes.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, x: float) -> bool:
        return (
            (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )

    def __str__(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        return f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}"


@functools.cache
def _ranges(cls: type) -> tuple[tuple[str, Range], ...]:
    hints = get_type_hints(cls, include_extras=True)
    return tuple(
        (f.name, m)
        for f in dataclasses.fields(cls)
        for m in getattr(hints[f.name], "__metadata__", ())
        if isinstance(m, Range)
    )


def check_ranges(cfg: Any) -> None:
    """``ValueError`` naming the first field of dataclass ``cfg`` outside its declared :class:`Range`."""
    for name, bounds in _ranges(type(cfg)):  # type: ignore[arg-type]  # classes hash by identity
        value = getattr(cfg, name)
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(x is not None and not bounds.holds(x) for x in items):
            raise ValueError(f"{name}: must be {bounds}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only lossless cases (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and value not in get_args(tp):
            # YAML 1.1 reads yes/no/on/off as booleans; map them back when the choices are those words
            words = ("yes", "true", "on") if value else ("no", "false", "off")
            value = next((w for w in words if w in get_args(tp)), value)
        if value not in get_args(tp):
            raise ValueError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping for section '{key}', got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (tuple, list):
        args = get_args(tp)
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        if not isinstance(value, (list, tuple)):
            if fixed:
                raise ValueError(f"{key}: expected a list, got {value!r}")
            # One value where a list of any length fits is a one-item list (`roi_size: 96`); the component's
            # __post_init__ says what one item means (one size for every spatial dim: see broadcast_size).
            inner = args[0] if args else Any
            try:
                return origin([_coerce(value, inner, key)])
            except ValueError:
                raise ValueError(f"{key}: expected a list (or a single {_type_name(inner)}), got {value!r}") from None
        if fixed:
            if len(args) != len(value):
                raise ValueError(f"{key}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; users write it that way
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"{key}: {value!r} is not a valid {_type_name(tp)}")


def broadcast_size(value: Any, dims: int) -> Any:
    """One size for every spatial dim, as timm and MONAI take it: ``96`` or ``[96]`` -> ``(96,) * dims``.

    Other sequences come back as tuples and anything else unchanged, for the caller's check to name. timm's
    ``to_ntuple`` keeps a 1-tuple as it is, which is why this exists.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * dims
    if isinstance(value, (list, tuple)):
        return tuple(value) * dims if len(value) == 1 else tuple(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:  # cls: a dataclass
    """Build dataclass ``cls`` from ``data``; every key must be a field, every value must fit its annotation."""
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    removed = getattr(cls, "removed_keys", {})  # keys a component dropped, with the reason (ClassVar)
    for key in unknown:
        if key in removed:
            raise ValueError(f"config key '{prefix}{key}' was removed ({removed[key]}): delete it from the config")
    if unknown:
        raise ValueError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys under "
            f"'{prefix.rstrip('.') or '<top>'}': {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        # Components name their own field; add the section so the user can find it in a nested config.
        raise ValueError(f"{prefix}{msg}" if prefix and not msg.startswith(prefix) else msg) from None


def to_dict(cfg: Any) -> Any:
    """Plain-YAML form of a (nested) config: tuples become lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "model.img_size=[64,64,64]"]`` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override '{item}' has an empty key part")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override '{item}' conflicts with an earlier override of '{p}'")
        node[parts[-1]] = value
    return out


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``."""
    out = dict(base)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = apply_overrides(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls`` <- YAML deltas at ``path`` <- dotted ``overrides``, validated once at the end."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        with open(path) as f:
            loaded = yaml.safe_load(f)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {path}: top level must be a mapping")
        data = loaded or {}
    data = apply_overrides(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config as YAML atomically (temporary name, then rename)."""
    from medmae.io import atomic_write_bytes

    payload = to_dict(cfg)
    if extra:
        payload = {**payload, **extra}
    atomic_write_bytes(path, yaml.safe_dump(payload, sort_keys=False).encode())


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> type string, for ``--help`` listings of valid keys."""
    hints = typing.get_type_hints(cls)
    return {f.name: _type_name(hints[f.name]) for f in dataclasses.fields(cls)}
