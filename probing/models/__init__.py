"""Resampler backends: each family registers itself (`registry`) and implements the `Resampler` contract
(`base`); the Q-Former families (BLIP-2 first stage, InstructBLIP) share `qformer`. Models are loaded from a
`ModelSource` without their language model."""

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
