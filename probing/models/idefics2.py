"""IDEFICS2 (HuggingFaceM4/idefics2-8b): the connector's `Idefics2PerceiverResampler`. The SigLIP vision model's
patches (4900 for a 980 px image) are projected to the language model's width (`modality_projection`, an MLP),
then 64 learned latents attend over `[patches ; latents]` in each of the Perceiver's 3 layers; its forward
returns only the last layer's latents, through a final RMSNorm. The latents never read text.

Probed: the latents after each Perceiver layer, read by forward hooks on `connector.perceiver_resampler.layers`
(the final norm is not applied to them, as BLIP-2's layers are probed before any projection); layer 0 is the
learned latents themselves, the same for every image.

Checkpoint keys: the Hub repo's (`Idefics2ForConditionalGeneration`) sit under `model.` (`model.vision_model.`,
`model.connector.`, `model.text_model.`); the resampler holds `vision_model` and `connector` at its top level (the
contract names its frozen modules there) and adds/strips `model.` in its state dict, so those keys load unchanged.
The Mistral language model is never built or read.

Pixels: a square resize to the vision model's size (980 px; IDEFICS2's mean/std 0.5 and bilinear resampling),
not the Hub processor's aspect-preserving resize padded to the batch's largest image: every image then has the
same patches, all valid, and no patch mask is needed. Image splitting (`do_image_splitting`) is off, as in the
Hub processor's default.
"""

from __future__ import annotations

import torch
from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector, Idefics2VisionTransformer

from probing.models.base import Resampler
from probing.models.registry import BackendFamily, register_family
from probing.models.tiny import TinyCheckpoint

CHECKPOINT_ROOT = "model."  # where `Idefics2ForConditionalGeneration` keeps the vision model and connector


class Idefics2Resampler(Resampler):
    family = "idefics2"
    checkpoint_prefixes = (f"{CHECKPOINT_ROOT}vision_model.", f"{CHECKPOINT_ROOT}connector.")
    vision_module = "vision_model"
    frozen_modules = ("vision_model",)  # unfrozen mode trains the connector: projection and Perceiver
    layer_owner = "Perceiver"
    reads_text = False

    @classmethod
    def layers_in(cls, config) -> int:
        return int(config.perceiver_config.resampler_depth)

    @classmethod
    def default_image_processor(cls, config):
        """A square resize to the vision model's size with IDEFICS2's mean/std and resampling (module docstring)."""
        from PIL.Image import Resampling
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        size = config.vision_config.image_size
        return BlipImageProcessorPil(
            size={"height": size, "width": size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            resample=Resampling.BILINEAR,
        )

    def __init__(self, config, tokenizer, image_processor, identity):
        if type(image_processor).__name__.startswith("Idefics2ImageProcessor"):
            image_processor = self.default_image_processor(config)  # the Hub's pads: see the module docstring
        super().__init__(config, tokenizer, image_processor, identity)
        self.register_state_dict_post_hook(_add_checkpoint_root)
        self.register_load_state_dict_pre_hook(_strip_checkpoint_root)

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


def _add_checkpoint_root(module, state_dict, prefix, local_metadata) -> None:
    if prefix:  # only the resampler's own (top-level) state dict
        return
    for key in list(state_dict):
        state_dict[CHECKPOINT_ROOT + key] = state_dict.pop(key)


def _strip_checkpoint_root(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    if prefix:
        return
    for key in [key for key in state_dict if key.startswith(CHECKPOINT_ROOT)]:
        state_dict[key.removeprefix(CHECKPOINT_ROOT)] = state_dict.pop(key)


def tiny_config(size: str, vocab_size: int):
    """`Idefics2Config` at tiny size (a 2-layer ViT on 32 px images in 8 px patches; a 3-layer Perceiver with 5
    latents of width 16; a 1-layer Mistral) or real size (idefics2-8b's: SigLIP at 980 px, 64 latents of 4096)."""
    from transformers import Idefics2Config

    if size == "real":
        return Idefics2Config(
            vision_config=dict(
                hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=980
            ),
            perceiver_config=dict(hidden_size=4096),
            text_config=dict(model_type="mistral", vocab_size=32003),
        )
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
        image_token_id=63,
    )


def _whole_model_class():
    from transformers import Idefics2ForConditionalGeneration

    return Idefics2ForConditionalGeneration  # keys under `model.`, as on the Hub


IDEFICS2 = register_family(
    BackendFamily(
        name="idefics2",
        title="IDEFICS2",
        resampler=Idefics2Resampler,
        model_types=("idefics2",),
        aliases={"idefics2": "HuggingFaceM4/idefics2-8b"},
        tokenizer_folder=None,  # reads no text
        tiny=TinyCheckpoint(config=tiny_config, model_class=_whole_model_class),
    )
)
