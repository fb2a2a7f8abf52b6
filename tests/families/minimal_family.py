"""A third backend family, defined outside the package: a Perceiver resampler (IDEFICS2's connector, built from
transformers' own `Idefics2VisionTransformer` and `Idefics2Connector`), in this one file plus one
`register_family` call. It is minimal on purpose: it reads no text, its checkpoint is a whole `Idefics2Model`
(vision model, connector and a tiny Mistral language model that is never read) written by `write_checkpoint`,
and its pixels come from a BLIP image processor saved beside it (IDEFICS2's own processor splits images into
crops, which this family does not need to prove the contract).

What the contract asks of it, and nothing more: the modules under the checkpoint's names, the layer modules
(the Perceiver's layers: its forward returns only the final, normed latents, so the layers are read by the
contract's forward hooks), how to run them, the latent count and width, and how to cut the layers above one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector, Idefics2VisionTransformer

from probing.models.base import Resampler
from probing.models.registry import BackendFamily

FAMILY_NAME = "minimal-perceiver"


class MinimalPerceiverResampler(Resampler):
    family = FAMILY_NAME
    checkpoint_prefixes = ("vision_model.", "connector.")  # the language model (`text_model.`) is never read
    vision_module = "vision_model"
    frozen_modules = ("vision_model",)  # unfrozen mode trains the connector: projection and Perceiver
    layer_owner = "Perceiver"
    reads_text = False

    @classmethod
    def layers_in(cls, config) -> int:
        return int(config.perceiver_config.resampler_depth)

    def build_modules(self, config) -> None:
        self.vision_model = Idefics2VisionTransformer(config.vision_config)
        self.connector = Idefics2Connector(config)

    @property
    def num_latents(self) -> int:
        return int(self.config.perceiver_config.resampler_n_latents)

    @property
    def hidden_size(self) -> int:
        return int(self.config.perceiver_config.hidden_size)

    def layer_modules(self):
        return list(self.connector.perceiver_resampler.layers)

    def run_layers(self, image_embeds, tokens):
        mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        return self.connector(image_embeds, attention_mask=mask)

    def keep_layers(self, layer: int) -> None:
        self.connector.perceiver_resampler.layers = self.connector.perceiver_resampler.layers[:layer]


MINIMAL_FAMILY = BackendFamily(
    name=FAMILY_NAME,
    title="Minimal Perceiver",
    resampler=MinimalPerceiverResampler,
    model_types=("idefics2",),
    tokenizer_folder=None,  # reads no text
)


def tiny_config():
    """An `Idefics2Config` small enough for a test: a 2-layer ViT on 32 px images, a 3-layer Perceiver with 5
    latents of width 16, a 1-layer Mistral."""
    from transformers import Idefics2Config

    return Idefics2Config(
        vision_config=dict(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        perceiver_config=dict(
            hidden_size=16,
            resampler_n_latents=5,
            resampler_depth=3,
            resampler_n_heads=2,
            resampler_head_dim=8,
            num_key_value_heads=1,
        ),
        text_config=dict(
            model_type="mistral",
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
    )


def write_checkpoint(out: Path, seed: int = 0) -> Path:
    """A whole `Idefics2Model` with seeded random weights and a BLIP image processor, saved to `out`."""
    from transformers import BlipImageProcessor, Idefics2Model

    torch.manual_seed(seed)
    Idefics2Model(tiny_config()).eval().save_pretrained(out)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return Path(out)
