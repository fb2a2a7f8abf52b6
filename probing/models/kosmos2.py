"""Kosmos-2 (microsoft/kosmos-2-patch14-224): `Kosmos2ImageToTextProjection`, a one-layer resampler. The CLIP
vision model's last layer (all 257 tokens, through its post-layernorm and L2-normalised, as
`Kosmos2Model.get_image_features` does) is projected to the language model's width, and 64 learned latent
queries attend once over `[projected image tokens ; latent queries]`; the 64 outputs are the image tokens the
language model reads. The latents never read text.

The family's one probe-able layer is that projection's output (a forward hook on `image_to_text_projection`).
Read from a checkpoint: the keys under `vision_model.` and `image_to_text_projection.` (the Hub repo's layout,
that of `Kosmos2Model`); the language model (`text_model.`) is never built or read.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2ImageToTextProjection, Kosmos2VisionModel

from probing.models.base import Resampler
from probing.models.registry import BackendFamily, register_family
from probing.models.tiny import TinyCheckpoint


class Kosmos2Resampler(Resampler):
    family = "kosmos2"
    checkpoint_prefixes = ("vision_model.", "image_to_text_projection.")
    vision_module = "vision_model"
    frozen_modules = ("vision_model",)  # unfrozen mode trains the projection and its latent queries
    layer_owner = "image-to-text projection"
    reads_text = False

    @classmethod
    def layers_in(cls, config) -> int:
        return 1  # the projection's output: one cross-attention of the latent queries

    @classmethod
    def default_image_processor(cls, config):
        """Kosmos-2's processor: CLIP's, resized to the square input without cropping, CLIP mean/std, bicubic."""
        from transformers import CLIPImageProcessor

        size = config.vision_config.image_size
        return CLIPImageProcessor(
            size={"height": size, "width": size}, do_center_crop=False, crop_size={"height": size, "width": size}
        )

    def build_modules(self, config) -> None:
        self.vision_model = Kosmos2VisionModel(config.vision_config)
        self.image_to_text_projection = Kosmos2ImageToTextProjection(config)

    @property
    def num_latents(self) -> int:
        return int(self.config.latent_query_num)

    @property
    def hidden_size(self) -> int:
        return int(self.config.text_config.embed_dim)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision model's last layer through its post-layernorm, L2-normalised per token: the projection's
        input, as `Kosmos2Model.get_image_features` computes it."""
        pixel_values = self.pixels.device_pixels(pixel_values, self.device).to(self.vision_dtype)
        states = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return nn.functional.normalize(self.vision_model.model.post_layernorm(states), dim=-1)

    def check_layers(self, layers, option: str = "--layers", lowest: int = 0) -> None:
        """No layer 0: the projection's input is the vision model's tokens, not the latents."""
        super().check_layers(layers, option, lowest=max(lowest, 1))

    def layer_modules(self):
        return [self.image_to_text_projection]

    def run_layers(self, image_embeds, tokens):
        return self.image_to_text_projection(image_embeds)

    def keep_layers(self, layer: int) -> None:
        """One layer only: nothing above it to cut."""


def tiny_config(size: str, vocab_size: int):
    """`Kosmos2Config` at tiny size (a 2-layer ViT on 32 px images in 8 px patches: 17 tokens; 6 latent queries
    of width 16; a 1-layer text decoder) or real size (the Hub model's: ViT-L/14 at 224 px, 64 latents of 2048)."""
    from transformers import Kosmos2Config

    if size == "real":
        return Kosmos2Config()
    return Kosmos2Config(
        vision_config=dict(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(vocab_size=64, embed_dim=16, layers=1, ffn_dim=32, attention_heads=2),
        latent_query_num=6,
    )


def _whole_model_class():
    from transformers import Kosmos2Model

    return Kosmos2Model  # keys `vision_model.`, `image_to_text_projection.`, `text_model.`, as on the Hub


KOSMOS2 = register_family(
    BackendFamily(
        name="kosmos2",
        title="Kosmos-2",
        resampler=Kosmos2Resampler,
        model_types=("kosmos-2",),
        aliases={"kosmos2": "microsoft/kosmos-2-patch14-224"},
        tokenizer_folder=None,  # reads no text
        tiny=TinyCheckpoint(config=tiny_config, model_class=_whole_model_class),
    )
)
