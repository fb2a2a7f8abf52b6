"""The Q-Former resampler families (BLIP-2, InstructBLIP, and any family built the same way): the shared
implementation of the `Resampler` contract on top of transformers' own modules.

A `QFormerResampler` is an `nn.Module` holding only the vision model, the Q-Former and the query tokens (and
whatever else a family reads, e.g. BLIP-2's text embeddings and ITM head), under the same attribute names as
the transformers composite model, so that checkpoint keys load into it unchanged and the language model is
never built. A family supplies `build_modules`, `qformer_hidden_states` and its class attributes.

- `encode_images(pixel_values) -> image_embeds [B, V, D]`: the ViT output the Q-Former attends to (after the
  vision model's post-LayerNorm, LAVIS's `ln_vision`).
- `query_states(image_embeds, texts, layers) -> [B, len(layers), Q, H]`: the query-token outputs at each
  requested layer (1..num_layers; 0 = the embedding output, the same for every input, only on request).
  With `image_slots`, `image_embeds` holds each image once and text i reads image `image_slots[i]`: the
  cross-attention keys and values are then computed once per image rather than once per text (RefCOCOg has
  ~3.7 texts per image; they are ~40 % of the Q-Former's work).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from probing.core.device_copies import to_device
from probing.core.errors import ProbingError
from probing.models.base import Resampler

RANDOM_VISION_INITIALIZER_RANGE = 0.02  # what `--init random` sets the ViT's initializer_range to (recorded)


class QFormerResampler(Resampler):
    layer_owner = "Q-Former"

    # ------------------------------------------------------------------ family-specific parts
    def qformer_hidden_states(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """All `num_layers + 1` Q-Former hidden states `[B, Q (+ T), H]` (queries first)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the contract's declarations
    @classmethod
    def layers_in(cls, config) -> int:
        return int(config.qformer_config.num_hidden_layers)

    @classmethod
    def text_vocab_size(cls, config) -> int:
        return int(config.qformer_config.vocab_size)

    @classmethod
    def check_tokenizer(cls, tokenizer, config, where: str) -> None:
        if tokenizer.pad_token_id != config.qformer_config.pad_token_id:
            raise ProbingError(
                f"{where}: tokenizer pad id {tokenizer.pad_token_id} != Q-Former pad id "
                f"{config.qformer_config.pad_token_id}"
            )
        # No check of len(tokenizer) against the vocabulary: a Hub tokenizer may carry added tokens (`<image>`)
        # that plain text never produces; `tokenize` checks the ids actually produced instead.

    @classmethod
    def random_init_config(cls, config) -> dict[str, Any]:
        """The ViT's `initializer_range` (1e-10 in the configs, which would make a random ViT output constant)
        is set to 0.02 and recorded."""
        config.vision_config.initializer_range = RANDOM_VISION_INITIALIZER_RANGE
        return {"vision_initializer_range": RANDOM_VISION_INITIALIZER_RANGE}

    @classmethod
    def default_image_processor(cls, config):
        """BLIP's processor (CLIP mean/std, bicubic) at the ViT's image size, with the PIL backend."""
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        size = config.vision_config.image_size
        return BlipImageProcessorPil(
            size={"height": size, "width": size}, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD
        )

    def init_random_weights(self) -> None:
        """transformers initialises the query tokens to zeros (every query would be the same): draw them."""
        with torch.no_grad():
            self.query_tokens.normal_(0.0, self.config.qformer_config.initializer_range)

    # ------------------------------------------------------------------ the contract
    @property
    def num_latents(self) -> int:
        return int(self.config.num_query_tokens)

    @property
    def hidden_size(self) -> int:
        return int(self.config.qformer_config.hidden_size)

    @property
    def latent_dtype(self) -> torch.dtype:
        return self.query_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def layer_modules(self) -> Sequence[nn.Module]:
        return list(self.qformer.encoder.layer)

    def run_layers(self, image_embeds: torch.Tensor, tokens: Mapping[str, torch.Tensor]):
        return self.qformer_hidden_states(image_embeds, tokens.get("input_ids"), tokens.get("attention_mask"))

    def keep_layers(self, layer: int) -> None:
        # The encoder loops over config.num_hidden_layers: both shrink together.
        self.qformer.encoder.layer = self.qformer.encoder.layer[:layer]
        self.qformer.config.num_hidden_layers = layer
        self.config.qformer_config.num_hidden_layers = layer

    def query_states(
        self,
        image_embeds: torch.Tensor,
        texts: Sequence[str] | Mapping[str, torch.Tensor] | None,
        layers: Sequence[int],
        image_slots: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The Q-Former returns every layer's states itself (`output_hidden_states`), so no hooks are needed;
        with `image_slots` the cross-attention keys and values are computed once per image."""
        self.check_layers(layers)
        tokens = self.text_tokens(texts)
        input_ids, attention_mask = tokens.get("input_ids"), tokens.get("attention_mask")
        if image_slots is None:
            # The BLIP-2 Q-Former casts the image embeds to its dtype itself, InstructBLIP's does not: do it here.
            image_embeds = to_device(image_embeds, self.device, self.latent_dtype)
            hidden = self.qformer_hidden_states(image_embeds, input_ids, attention_mask)
        else:
            slots = torch.as_tensor(image_slots, dtype=torch.long, device="cpu")
            rows = input_ids.shape[0] if input_ids is not None else len(slots)
            if slots.shape != (rows,):
                raise ValueError(f"image_slots: {tuple(slots.shape)} for {rows} texts")
            # gathered before the cast: the table may hold a whole shard of images
            per_text = to_device(image_embeds, self.device).index_select(0, to_device(slots, self.device))
            with self._projections_once_per_image(slots):
                hidden = self.qformer_hidden_states(per_text.to(self.latent_dtype), input_ids, attention_mask)
        queries = self.num_latents
        return torch.stack([hidden[layer][:, :queries] for layer in layers], dim=1)

    def cross_attention_projections(self) -> list[nn.Linear]:
        """The key and value projections of the image embeds, in every Q-Former layer that attends to them
        (the same module names in BLIP-2's and InstructBLIP's Q-Former)."""
        return [
            projection
            for name, module in self.qformer.named_modules()
            if name.endswith("crossattention.attention")
            for projection in (module.key, module.value)
        ]

    @contextmanager
    def _projections_once_per_image(self, slots: torch.Tensor):
        """While active, each cross-attention key/value projection reads one row per distinct image of its
        input (whose rows repeat as `slots` says) and copies the result out to every row.

        Hooks rather than a copy of transformers' attention code: the model's own forward runs, only the
        projections' inputs and outputs are re-indexed (the state-dict keys stay those of the checkpoint).
        """
        distinct, image_of_row = torch.unique(slots, return_inverse=True)
        if len(distinct) == len(slots):  # no image read twice: nothing to share
            yield
            return
        # the first row that reads each distinct image
        first_rows = torch.full((len(distinct),), len(slots), dtype=torch.long).scatter_reduce(
            0, image_of_row, torch.arange(len(slots)), reduce="amin"
        )
        first_rows, image_of_row = to_device(first_rows, self.device), to_device(image_of_row, self.device)

        def one_row_per_image(module, args):
            return (args[0].index_select(0, first_rows),)

        def every_row(module, args, output):
            return output.index_select(0, image_of_row)

        handles = []
        try:
            for projection in self.cross_attention_projections():
                handles.append(projection.register_forward_pre_hook(one_row_per_image))
                handles.append(projection.register_forward_hook(every_row))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def query_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The Q-Former mask over `[queries ; text]` (queries always attended)."""
        ones = torch.ones(
            attention_mask.shape[0], self.num_query_tokens, dtype=attention_mask.dtype, device=attention_mask.device
        )
        return torch.cat([ones, attention_mask], dim=1)

    def image_attention_mask(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)


def randomise_query_tokens(model) -> None:
    """For a tiny checkpoint (`probing.models.tiny.TinyCheckpoint.randomise`): the query tokens are
    zero-initialised by transformers' `_init_weights`: made to differ, or every query would be the same."""
    model.query_tokens.normal_(0.0, 0.5)
