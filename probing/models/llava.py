"""LLaVA-1.5 (e.g. llava-hf/llava-1.5-7b-hf): no resampler at all, the contrast to the resamplers. Its
`LlavaMultiModalProjector` (linear, GELU, linear) maps every patch of the CLIP vision tower's selected layer
(the second-to-last, `vision_feature_layer=-2`, its CLS token dropped under the "default" selection strategy)
to one language-model token: 576 tokens for a 336 px image, one per 14 px patch, nothing compressed.

The family's one probe-able layer is the projector's output (a forward hook on `multi_modal_projector`); the
vision tower runs frozen, its selected layer computed as `LlavaModel.get_image_features` computes it. The
latents are as wide as the language model's embeddings (4096 for Vicuna-7B). Read from a checkpoint: the keys
under `vision_tower.` and `multi_modal_projector.` (the layout of the llava-hf repos and of `LlavaModel`'s
`save_pretrained`); the language model is never built or read.
"""

from __future__ import annotations

import torch
from transformers.models.clip.modeling_clip import CLIPVisionModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from probing.models.base import Resampler
from probing.models.registry import BackendFamily, register_family
from probing.models.tiny import TinyCheckpoint


class LlavaProjector(Resampler):
    family = "llava"
    checkpoint_prefixes = ("vision_tower.", "multi_modal_projector.")
    vision_module = "vision_tower"
    frozen_modules = ("vision_tower",)  # unfrozen mode trains the projector
    layer_owner = "projector"
    reads_text = False

    @classmethod
    def config_problem(cls, config) -> str | None:
        if config.vision_feature_select_strategy not in ("default", "full"):
            return f"vision_feature_select_strategy '{config.vision_feature_select_strategy}' is not LLaVA's"
        return None

    @classmethod
    def layers_in(cls, config) -> int:
        return 1  # the projector's output

    @classmethod
    def default_image_processor(cls, config):
        """LLaVA-1.5's processor: CLIP's (shortest edge resized to the tower's size, centre crop, CLIP mean/std)."""
        from transformers import CLIPImageProcessor

        size = config.vision_config.image_size
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def build_modules(self, config) -> None:
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)

    @property
    def num_latents(self) -> int:
        patches = (self.config.vision_config.image_size // self.config.vision_config.patch_size) ** 2
        return patches + (self.config.vision_feature_select_strategy == "full")  # "full" keeps the CLS token

    @property
    def hidden_size(self) -> int:
        return int(self.config.text_config.hidden_size)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's selected layer(s) (`vision_feature_layer`, several concatenated along the width), the CLS
        token dropped under the "default" strategy: the projector's input, as `LlavaModel.get_image_features`."""
        pixel_values = self.pixels.device_pixels(pixel_values, self.device).to(self.vision_dtype)
        hidden_states = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        layers = self.config.vision_feature_layer
        selected = [hidden_states[layer] for layer in ([layers] if isinstance(layers, int) else layers)]
        if self.config.vision_feature_select_strategy == "default":
            selected = [states[:, 1:] for states in selected]
        return torch.cat(selected, dim=-1)

    def check_layers(self, layers, option: str = "--layers", lowest: int = 0) -> None:
        """No layer 0: the projector's input is the vision tower's width, not the latents'."""
        super().check_layers(layers, option, lowest=max(lowest, 1))

    def layer_modules(self):
        return [self.multi_modal_projector]

    def run_layers(self, image_embeds, tokens):
        return self.multi_modal_projector(image_embeds)

    def keep_layers(self, layer: int) -> None:
        """One layer only: nothing above it to cut."""


def tiny_config(size: str, vocab_size: int):
    """`LlavaConfig` at tiny size (a 3-layer CLIP ViT on 32 px images in 8 px patches: 16 tokens; a 1-layer
    Llama of width 48) or real size (LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px, Vicuna-7B)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if size == "real":
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        )
        return LlavaConfig(vision_config=vision.to_dict(), text_config=LlamaConfig(vocab_size=32064).to_dict())
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4)
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=63)


def _whole_model_class():
    from transformers import LlavaModel

    return LlavaModel  # keys `vision_tower.`, `multi_modal_projector.`, `language_model.`, as on the Hub


LLAVA = register_family(
    BackendFamily(
        name="llava",
        title="LLaVA-1.5 (projector)",
        resampler=LlavaProjector,
        model_types=("llava",),
        aliases={"llava-1.5": "llava-hf/llava-1.5-7b-hf"},
        tokenizer_folder=None,  # reads no text
        tiny=TinyCheckpoint(config=tiny_config, model_class=_whole_model_class),
    )
)
