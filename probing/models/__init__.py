"""Resampler backends: each family is one file that implements the `Resampler` contract (`base`) and registers
itself (`registry`); the Q-Former families (BLIP-2 first stage, InstructBLIP) share `qformer`. Models are
loaded from a `ModelSource` (`source`) without their language model (`loading`).

Nothing heavy is imported with the package: `ModelSource` and the registry need neither torch nor transformers
(so that `probing CMD --help` and config checks stay instant); the names below are imported on first use, and
the built-in families register the first time the registry is read (`registry.BUILTIN_FAMILY_MODULES`).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers and readers
    from probing.models.base import DTYPES, Resampler
    from probing.models.loading import load_resampler, qformer_layers, resampler_layers
    from probing.models.registry import BackendFamily, families, family_named, register_family
    from probing.models.source import ModelSource

_HOMES = {
    "DTYPES": "probing.models.base",
    "Resampler": "probing.models.base",
    "ModelSource": "probing.models.source",
    "load_resampler": "probing.models.loading",
    "qformer_layers": "probing.models.loading",
    "resampler_layers": "probing.models.loading",
    "BackendFamily": "probing.models.registry",
    "families": "probing.models.registry",
    "family_named": "probing.models.registry",
    "register_family": "probing.models.registry",
}

__all__ = [
    "DTYPES",
    "BackendFamily",
    "ModelSource",
    "Resampler",
    "families",
    "family_named",
    "load_resampler",
    "qformer_layers",
    "register_family",
    "resampler_layers",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'probing.models' has no attribute {name!r}")
