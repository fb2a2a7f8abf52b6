"""The backend contract: a `Resampler` is what every stage sees of a model family, and nothing more.

A family implements this narrow protocol (the Q-Former families share `probing.models.qformer`) and registers
itself once (`probing.models.registry`); no code outside a family's file reaches into its modules.

- `num_layers`, `num_query_tokens`, `hidden_size`: the probed states are `[Q, H]` per layer 1..num_layers
  (layer 0, the embedding output, only on request);
- `reads_text`: whether the queries read the example's text (BLIP-2's ITM path, InstructBLIP's instruction);
  a family that reads none stores one row per image, not one per example;
- `text`: how an example's text becomes the Q-Former's (`probing.models.text.QFormerText`, set with
  `set_text`); `tokenize` and the truncation counts apply it, so every path into the Q-Former reads the same;
- `tokenize(texts)`, `encode_images(pixels)`, `query_states(image_embeds, tokens, layers, image_slots)`;
- `truncated(layer)`: a copy for unfrozen training, without the layers above `layer` (they cannot influence
  the probe), sharing the frozen vision model and holding fresh copies of everything trained;
- `trainable_parameters()`: what unfrozen probing trains; `weights_identity()`: what manifests record;
- `compile_vision()`, `set_dtypes(...)`, `pixels` (host/device pixel split), `image_processor`, `identity`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from probing.errors import ProbingError
from probing.models.text import QFormerText


class Resampler(nn.Module):
    family: ClassVar[str]
    reads_text: ClassVar[bool] = True
    max_text_tokens: ClassVar[int] = 0  # text families: the tokenizer's truncation length
    truncation_side: ClassVar[str] = "right"
    reads_instruction: ClassVar[bool] = False  # the Q-Former's text may be an instruction around the example's

    text: QFormerText = QFormerText()  # the example's text as given, until `set_text`

    identity: dict[str, Any]  # source, revision, init, weights hash: what `weights_identity` draws from
    image_processor: Any
    pixels: Any  # a `PixelPipeline`: uint8 on the host, normalised on the device

    @classmethod
    def layers_in(cls, config: Any) -> int:
        """The number of probe-able layers of a checkpoint's config (read before any weight)."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    @property
    def num_query_tokens(self) -> int:
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def vision_dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def qformer_dtype(self) -> torch.dtype:
        """The dtype of the trained part (the resampler proper)."""
        raise NotImplementedError

    def set_dtypes(self, vision_dtype: torch.dtype, qformer_dtype: torch.dtype) -> Resampler:
        raise NotImplementedError

    def compile_vision(self) -> None:
        """Compile the vision model in place (torch.compile); state-dict keys unchanged."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Text ids and mask, padded to the longest; `{}` for a family that reads no text."""
        raise NotImplementedError

    def set_text(self, text: QFormerText) -> Resampler:
        """Read every text from now on as `text` says (preprocessing, instruction); refused where it cannot."""
        text.check_text()
        if text.instruction is not None and not self.reads_instruction:
            raise ProbingError(
                f"--instruction: the {self.family} Q-Former reads the text itself, never an instruction "
                "(InstructBLIP only)"
            )
        self.text = text.text_settings
        return self

    def count_truncated(self, texts: Sequence[str]) -> int:
        """How many of `texts` are longer than `max_text_tokens` (0 for a family that reads no text)."""
        return 0

    def count_words_cut(self, texts: Sequence[str], words: Sequence[str]) -> int:
        """How many of `texts` lose some of their `words` (one string per text, e.g. the cell an RCM caption
        claims) to the truncation at `max_text_tokens` (0 for a family that reads no text)."""
        return 0

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def query_states(
        self,
        image_embeds: torch.Tensor,
        texts: Sequence[str] | Mapping[str, torch.Tensor] | None,
        layers: Sequence[int],
        image_slots: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`[B, len(layers), Q, H]`; with `image_slots`, `image_embeds` holds each image once and row i reads
        image `image_slots[i]`."""
        raise NotImplementedError

    def truncated(self, layer: int) -> Resampler:
        raise NotImplementedError

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        raise NotImplementedError

    def weights_identity(self) -> dict[str, Any]:
        raise NotImplementedError
