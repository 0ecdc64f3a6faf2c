"""Model registry: each registered factory returns its defaults; ``create_model`` applies overrides and builds.

Overrides are validated by the model's config dataclass, so ``create_model("unetr_vit_base_patch16_3d", depht=4)``
fails naming ``depht`` and listing the valid keys.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from medmae.config import broadcast_size, from_dict


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model_cls: type[nn.Module]
    config_cls: type
    defaults: Callable[[], dict[str, Any]]

    def config(self, _prefix: str = "", **overrides: Any) -> Any:
        """Validated config; ``_prefix`` (e.g. ``"model."``) is how error messages name the keys.

        ``img_size=96`` (or ``[96]``) is a cube, or a square for a 2D flavour: the flavour's default says how many
        spatial dims, which the config alone cannot know.
        """
        defaults = self.defaults()
        values = {**defaults, **overrides}
        if "img_size" in overrides:
            dims = len(defaults.get("img_size") or getattr(self.config_cls, "img_size"))  # noqa: B009
            values["img_size"] = broadcast_size(overrides["img_size"], dims)
        return from_dict(self.config_cls, values, prefix=_prefix)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(model_cls: type[nn.Module], config_cls: type) -> Callable:
    """Decorator: the function returns the flavour's config values; it becomes a factory taking overrides."""

    def wrap(fn: Callable[[], dict[str, Any]]) -> Callable[..., nn.Module]:
        entry = ModelEntry(fn.__name__, model_cls, config_cls, fn)
        if entry.name in _REGISTRY:
            raise ValueError(f"model '{entry.name}' is registered twice")
        _REGISTRY[entry.name] = entry

        def factory(**overrides: Any) -> nn.Module:
            return create_model(entry.name, **overrides)

        factory.__name__ = fn.__name__
        factory.__doc__ = fn.__doc__
        return factory

    return wrap


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; registered models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def model_config(name: str, **overrides: Any) -> Any:
    """The validated config that ``create_model(name, **overrides)`` would build from."""
    return get_entry(name).config(**overrides)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; overrides such as ``img_size``, ``in_chans``, ``num_classes``, ``mask_ratio``."""
    entry = get_entry(name)
    return entry.model_cls(entry.config(**overrides))


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def config_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
