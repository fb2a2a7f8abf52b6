"""Resampler backends: BLIP-2 (first-stage ITM) and InstructBLIP Q-Formers, loaded without the LLM."""

from probing.models.base import Resampler
from probing.models.loading import FAMILY_CLASSES, REGISTRY, load_resampler, qformer_layers

__all__ = ["FAMILY_CLASSES", "REGISTRY", "Resampler", "load_resampler", "qformer_layers"]
