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

import copy
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from probing.device_copies import to_device
from probing.errors import ProbingError
from probing.models.base import Resampler
from probing.models.pixels import PixelPipeline


class QFormerResampler(Resampler):
    checkpoint_prefixes: ClassVar[tuple[str, ...]]  # keys read from a checkpoint; the LLM is not among them
    frozen_modules: ClassVar[tuple[str, ...]] = ("vision_model",)  # never trained, in no mode

    def __init__(self, config, tokenizer, image_processor, identity: Mapping[str, Any]):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.tokenizer.truncation_side = self.truncation_side
        self.image_processor = image_processor
        self.pixels = PixelPipeline(image_processor)  # uint8 to the device where that is exact
        self.identity = dict(identity)
        self.build_modules(config)

    # ------------------------------------------------------------------ family-specific parts
    @classmethod
    def config_problem(cls, config) -> str | None:
        """Why this family cannot run `config` (None: it can), decided before any weight is read."""
        return None

    def build_modules(self, config) -> None:
        raise NotImplementedError

    def qformer_hidden_states(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """All `num_layers + 1` Q-Former hidden states `[B, Q (+ T), H]` (queries first)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the contract
    @property
    def num_query_tokens(self) -> int:
        return int(self.config.num_query_tokens)

    @property
    def hidden_size(self) -> int:
        return int(self.config.qformer_config.hidden_size)

    @classmethod
    def layers_in(cls, config) -> int:
        return int(config.qformer_config.num_hidden_layers)

    @property
    def num_layers(self) -> int:
        return self.layers_in(self.config)

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision_model.parameters()).dtype

    @property
    def qformer_dtype(self) -> torch.dtype:
        return self.query_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def set_dtypes(self, vision_dtype: torch.dtype, qformer_dtype: torch.dtype) -> QFormerResampler:
        """ViT in `vision_dtype` (bf16 on GPU is the fast path); everything else in `qformer_dtype`."""
        for name, child in self.named_children():
            child.to(vision_dtype if name == "vision_model" else qformer_dtype)
        self.query_tokens.data = self.query_tokens.data.to(qformer_dtype)
        return self

    def compile_vision(self) -> None:
        self.vision_model.compile()  # compiled on its first batch; state-dict keys unchanged

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Q-Former text ids and mask: padded to the longest, truncated at the family's length and side."""
        if not self.reads_text:
            return {}
        texts = self.text.prepare(texts)
        encoded = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        input_ids = encoded["input_ids"]
        # The tokenizer may know more tokens than the Q-Former's embedding has rows (a Hub tokenizer with an
        # added `<image>` token): harmless until a text produces one, an index error deep in the model then.
        vocab_size = int(self.config.qformer_config.vocab_size)
        if input_ids.numel() and int(input_ids.max()) >= vocab_size:
            row = int((input_ids >= vocab_size).any(dim=1).nonzero()[0])
            token = int(input_ids[row].max())
            raise ProbingError(
                f"text {texts[row][:40]!r}: token id {token} is outside the Q-Former vocabulary "
                f"({vocab_size} ids); the tokenizer does not fit the model"
            )
        return {"input_ids": input_ids, "attention_mask": encoded["attention_mask"]}

    def count_truncated(self, texts: Sequence[str]) -> int:
        if not self.reads_text:
            return 0
        lengths = [len(ids) for ids in self._token_ids(texts, truncate=False)]
        return sum(length > self.max_text_tokens for length in lengths)

    def count_words_cut(self, texts: Sequence[str], words: Sequence[str]) -> int:
        """A text loses its words when their tokens occur fewer times in its truncated ids than in its whole
        ids (whichever side the family truncates)."""
        if not self.reads_text:
            return 0
        whole = self._token_ids(texts, truncate=False)
        kept = self._token_ids(texts, truncate=True)
        wanted = self.tokenizer(self.text.prepare(words, instruction=False), add_special_tokens=False)["input_ids"]
        return sum(
            _occurrences(part, full) > _occurrences(part, cut)
            for part, full, cut in zip(wanted, whole, kept, strict=True)
        )

    def _token_ids(self, texts: Sequence[str], truncate: bool) -> list[list[int]]:
        return self.tokenizer(
            self.text.prepare(texts),
            truncation=truncate,
            max_length=self.max_text_tokens if truncate else None,
            return_token_type_ids=False,
        )["input_ids"]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT outputs of `preprocess` output, or of stacked `pixels.host_pixels` output (uint8 normalised on
        the device)."""
        pixel_values = self.pixels.device_pixels(pixel_values, self.device).to(self.vision_dtype)
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> pixel values with the checkpoint's own image processor."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def query_states(
        self,
        image_embeds: torch.Tensor,
        texts: Sequence[str] | Mapping[str, torch.Tensor] | None,
        layers: Sequence[int],
        image_slots: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        for layer in layers:
            if not 0 <= layer <= self.num_layers:
                raise ProbingError(f"--layers: layer {layer} does not exist (the Q-Former has 1..{self.num_layers})")
        input_ids = attention_mask = None
        if self.reads_text:
            tokens = texts if isinstance(texts, Mapping) else self.tokenize(texts)
            input_ids = to_device(tokens["input_ids"], self.device)
            attention_mask = to_device(tokens["attention_mask"], self.device)
        if image_slots is None:
            # The BLIP-2 Q-Former casts the image embeds to its dtype itself, InstructBLIP's does not: do it here.
            image_embeds = to_device(image_embeds, self.device, self.qformer_dtype)
            hidden = self.qformer_hidden_states(image_embeds, input_ids, attention_mask)
        else:
            slots = torch.as_tensor(image_slots, dtype=torch.long, device="cpu")
            rows = input_ids.shape[0] if input_ids is not None else len(slots)
            if slots.shape != (rows,):
                raise ValueError(f"image_slots: {tuple(slots.shape)} for {rows} texts")
            # gathered before the cast: the table may hold a whole shard of images
            per_text = to_device(image_embeds, self.device).index_select(0, to_device(slots, self.device))
            with self._projections_once_per_image(slots):
                hidden = self.qformer_hidden_states(per_text.to(self.qformer_dtype), input_ids, attention_mask)
        queries = self.num_query_tokens
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

    def truncated(self, layer: int) -> QFormerResampler:
        """A copy without the Q-Former layers above `layer`: the frozen modules are shared, everything trained
        is copied, so every trial starts from the same weights while the checkpoint is read once."""
        if not 1 <= layer <= self.num_layers:
            raise ProbingError(f"--layer: layer {layer} does not exist (the Q-Former has 1..{self.num_layers})")
        clone = copy.copy(self)  # a shallow copy shares the module dictionaries: give it its own
        clone._modules = {
            name: child if name in self.frozen_modules else copy.deepcopy(child)
            for name, child in self._modules.items()
        }
        clone._parameters = {name: copy.deepcopy(parameter) for name, parameter in self._parameters.items()}
        clone._buffers = dict(self._buffers)
        clone.config = copy.deepcopy(self.config)
        clone.identity = dict(self.identity)
        # The encoder loops over config.num_hidden_layers: both shrink together.
        clone.qformer.encoder.layer = clone.qformer.encoder.layer[:layer]
        clone.qformer.config.num_hidden_layers = layer
        clone.config.qformer_config.num_hidden_layers = layer
        return clone

    def weights_identity(self) -> dict[str, Any]:
        """What defines the weights, for manifests: their hash when read from a checkpoint, or the seed and
        config hash of a random init."""
        identity = {"family": self.family, "init": self.identity["init"]}
        if self.identity["init"] == "random":
            config_json = self.config.to_json_string(use_diff=False)
            identity |= {
                "init_seed": self.identity["init_seed"],
                "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
            }
        else:
            identity["weights_sha256"] = self.identity["weights_sha256"]
        return identity

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        frozen = tuple(f"{name}." for name in self.frozen_modules)
        for name, parameter in self.named_parameters():
            if not name.startswith(frozen):
                yield name, parameter

    def train(self, mode: bool = True) -> QFormerResampler:
        """Q-Former dropout follows `mode`; the frozen modules always stay in eval."""
        super().train(mode)
        for name in self.frozen_modules:
            getattr(self, name).eval()
        return self


def _occurrences(part: list[int], ids: list[int]) -> int:
    """How many times `part` occurs in `ids` as a contiguous run (0 for an empty `part`)."""
    if not part:
        return 0
    return sum(ids[start : start + len(part)] == part for start in range(len(ids) - len(part) + 1))
