"""Resampler backends: each family registers itself (`registry`) and implements the `Resampler` contract
(`base`); the Q-Former families (BLIP-2 first stage, InstructBLIP) share `qformer`. Models are loaded from a
`ModelSource` without their language model."""

# The built-in families register themselves on import.
import probing.models.blip2  # noqa: F401
import probing.models.instructblip  # noqa: F401
from probing.models.base import Resampler
from probing.models.loading import ModelSource, load_resampler, qformer_layers
from probing.models.registry import BackendFamily, families, family_named, register_family

__all__ = [
    "BackendFamily",
    "ModelSource",
    "Resampler",
    "families",
    "family_named",
    "load_resampler",
    "qformer_layers",
    "register_family",
]
