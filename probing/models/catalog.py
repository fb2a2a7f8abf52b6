"""What `probing models` prints: every registered family at the size of its published checkpoint, built on the
meta device from the real config its tiny-checkpoint declaration gives (no weights, no download), so the latent
shape, layer count and parameter counts are those of the architecture, read rather than typed in."""

from __future__ import annotations

from typing import Any

import torch

from probing.models.registry import BackendFamily, families


def _real_resampler(family: BackendFamily):
    config = family.tiny.config("real", 30524)  # a BERT vocabulary with [DEC] (text families' tokenizer)
    processor = family.resampler.default_image_processor(config)
    with torch.device("meta"):
        return family.resampler(config, None, processor, {"init": "random", "init_seed": 0})


def describe_family(family: BackendFamily) -> dict[str, Any]:
    """Name, title, Hub aliases, whether the latents read text, and (families with a real-size config) the
    layers, latent count and width, flattened probe input, and parameters of the vision and trained parts."""
    described: dict[str, Any] = {
        "name": family.name,
        "title": family.title,
        "aliases": dict(family.aliases),
        "model_types": list(family.model_types),
        "reads_text": family.reads_text,
        "layer_owner": family.resampler.layer_owner,
    }
    if family.tiny is None:
        return described
    resampler = _real_resampler(family)
    vision = sum(p.numel() for p in getattr(resampler, resampler.vision_module).parameters())
    trained = sum(p.numel() for _, p in resampler.trainable_parameters())
    return described | {
        "layers": resampler.num_layers,
        "latents": resampler.num_latents,
        "width": resampler.hidden_size,
        "probe_inputs": resampler.num_latents * resampler.hidden_size,
        "vision_parameters": vision,
        "resampler_parameters": trained,
        "all_parameters": sum(p.numel() for p in resampler.parameters()),
    }


def describe_families() -> list[dict[str, Any]]:
    return [describe_family(family) for family in families()]
