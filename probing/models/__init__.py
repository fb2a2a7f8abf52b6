"""Resampler backends: each family is one file that implements the `Resampler` contract (`base`) and registers
itself (`registry`); the Q-Former families (BLIP-2 first stage, InstructBLIP) share `qformer`. Models are
loaded from a `ModelSource` without their language model (`loading`)."""

# The built-in families register themselves on import.
import probing.models.blip2  # noqa: F401
import probing.models.instructblip  # noqa: F401
from probing.models.base import DTYPES, Resampler
from probing.models.loading import ModelSource, load_resampler, qformer_layers, resampler_layers
from probing.models.registry import BackendFamily, families, family_named, register_family

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

# The families beyond the paper's two register after them (listings keep BLIP-2 and InstructBLIP first).
import probing.models.idefics  # noqa: E402, F401
import probing.models.idefics2  # noqa: E402, F401
import probing.models.instructblip_video  # noqa: E402, F401
import probing.models.kosmos2  # noqa: E402, F401
import probing.models.llava  # noqa: E402, F401
