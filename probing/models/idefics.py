"""IDEFICS (v1; HuggingFaceM4/idefics-9b, idefics-80b): `IdeficsPerceiverResampler`. The CLIP ViT-H/14's last
layer (257 tokens at 224 px) is read by 64 learned latents in each of the Perceiver's 6 blocks (a cross-attention
over `[image tokens ; latents]`, then an MLP, each with a residual); its forward returns only the last block's
latents, through a final LayerNorm. The latents never read text.

Probed: the latents after each block (after the MLP's residual). transformers writes the residual sum inside
the resampler's loop, not in a module, so the family reads it with a forward hook on each block's MLP: its
input plus its output is that sum, computed by the same addition (`query_states`). Layer 0 is the learned
latents themselves. The latents are as wide as the vision model (1280).

Checkpoint keys sit under `model.` (`IdeficsForVisionText2Text`, the Hub layout), added and stripped as for
IDEFICS2; the LLaMA language model and its gated cross-attention layers are never built or read. Pixels: the
checkpoint's `IdeficsImageProcessor` (a square bicubic resize, CLIP mean/std), or BLIP's equivalent when the
checkpoint has no processor file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler
from transformers.models.idefics.vision import IdeficsVisionTransformer

from probing.core.device_copies import to_device
from probing.models.base import Resampler
from probing.models.idefics2 import CHECKPOINT_ROOT, _add_checkpoint_root, _strip_checkpoint_root
from probing.models.registry import BackendFamily, register_family
from probing.models.tiny import TinyCheckpoint


class IdeficsResampler(Resampler):
    family = "idefics"
    checkpoint_prefixes = (f"{CHECKPOINT_ROOT}vision_model.", f"{CHECKPOINT_ROOT}perceiver_resampler.")
    vision_module = "vision_model"
    frozen_modules = ("vision_model",)  # unfrozen mode trains the Perceiver
    layer_owner = "Perceiver"
    reads_text = False

    @classmethod
    def config_problem(cls, config) -> str | None:
        if not config.use_resampler:
            return "the IDEFICS checkpoint has no Perceiver resampler (use_resampler is false)"
        return None

    @classmethod
    def layers_in(cls, config) -> int:
        return int(config.perceiver_config.resampler_depth)

    @classmethod
    def default_image_processor(cls, config):
        """IDEFICS's pixels (square bicubic resize, CLIP mean/std) through BLIP's processor with the PIL backend."""
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        size = config.vision_config.image_size
        return BlipImageProcessorPil(
            size={"height": size, "width": size}, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD
        )

    def __init__(self, config, tokenizer, image_processor, identity):
        # IdeficsModel sets this on its vision config (the vision transformer is not a PreTrainedModel).
        config.vision_config._attn_implementation = config._attn_implementation or "eager"
        super().__init__(config, tokenizer, image_processor, identity)
        self.register_state_dict_post_hook(_add_checkpoint_root)
        self.register_load_state_dict_pre_hook(_strip_checkpoint_root)

    def build_modules(self, config) -> None:
        self.vision_model = IdeficsVisionTransformer(config.vision_config)
        perceiver = config.perceiver_config
        self.perceiver_resampler = IdeficsPerceiverResampler(
            config,
            config.vision_config.embed_dim,
            perceiver.resampler_depth,
            perceiver.resampler_n_heads,
            perceiver.resampler_head_dim,
            perceiver.resampler_n_latents,
        )

    @property
    def num_latents(self) -> int:
        return int(self.config.perceiver_config.resampler_n_latents)

    @property
    def hidden_size(self) -> int:
        return int(self.config.vision_config.embed_dim)

    def layer_modules(self):
        return [mlp for _, mlp in self.perceiver_resampler.blocks]

    def run_layers(self, image_embeds, tokens):
        return self.perceiver_resampler(image_embeds)

    def keep_layers(self, layer: int) -> None:
        self.perceiver_resampler.blocks = self.perceiver_resampler.blocks[:layer]

    def query_states(
        self,
        image_embeds: torch.Tensor,
        texts: Sequence[str] | Mapping[str, torch.Tensor] | None,
        layers: Sequence[int],
        image_slots: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`[B, len(layers), num_latents, H]`: each block's latents, `ff(latents) + latents` as the resampler's
        loop adds them, read by a hook on the block's MLP (its input and output)."""
        self.check_layers(layers)
        if image_slots is not None:
            slots = to_device(torch.as_tensor(image_slots, dtype=torch.long, device="cpu"), self.device)
            image_embeds = to_device(image_embeds, self.device).index_select(0, slots)
        image_embeds = to_device(image_embeds, self.device, self.latent_dtype)
        captured: dict[int, torch.Tensor] = {}
        if 0 in layers:
            captured[0] = self.perceiver_resampler.latents.repeat(image_embeds.shape[0], 1, 1)

        def reader(layer: int):
            return lambda module, args, output: captured.__setitem__(layer, output + args[0])

        modules = self.layer_modules()
        handles = [modules[layer - 1].register_forward_hook(reader(layer)) for layer in set(layers) if layer > 0]
        try:
            self.run_layers(image_embeds, {})
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack([captured[layer] for layer in layers], dim=1)


def tiny_config(size: str, vocab_size: int):
    """`IdeficsConfig` at tiny size (a 2-layer ViT of width 24 on 32 px images in 8 px patches; a 2-block
    Perceiver with 5 latents; a 2-layer LLaMA) or real size (idefics-9b's: ViT-H/14 at 224 px, 6 blocks,
    64 latents)."""
    from transformers import IdeficsConfig

    if size == "real":
        return IdeficsConfig(
            use_resampler=True,
            vision_config=dict(embed_dim=1280, image_size=224, num_hidden_layers=32, num_attention_heads=16),
            perceiver_config=dict(use_resampler=True),
        )
    return IdeficsConfig(
        vocab_size=64,
        additional_vocab_size=2,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        cross_layer_interval=1,
        use_resampler=True,
        vision_config=dict(
            embed_dim=24,
            image_size=32,
            patch_size=8,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
        ),
        perceiver_config=dict(
            use_resampler=True, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8, resampler_n_latents=5
        ),
    )


def _whole_model_class():
    from transformers import IdeficsForVisionText2Text

    return IdeficsForVisionText2Text  # keys under `model.`, as on the Hub


IDEFICS = register_family(
    BackendFamily(
        name="idefics",
        title="IDEFICS",
        resampler=IdeficsResampler,
        model_types=("idefics",),
        aliases={"idefics": "HuggingFaceM4/idefics-9b"},
        tokenizer_folder=None,  # reads no text
        tiny=TinyCheckpoint(config=tiny_config, model_class=_whole_model_class),
    )
)
