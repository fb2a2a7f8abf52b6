"""The resampler contract: what every stage sees of a model family, and what a family author writes.

A family is ONE file: a `Resampler` subclass plus one `register_family(BackendFamily(...))` call
(`probing.models.registry`); nothing outside that file reaches into its modules. Loading
(`probing.models.loading`), extraction, unfrozen training and the manifests work from the declarations below.

What a family declares (class attributes and class methods, read before any weight is):
- `family`: its registered name, recorded in manifests.
- `checkpoint_prefixes`: the state-dict keys read from a checkpoint (the language model is never among them;
  the resampler holds its modules under the same attribute names as the transformers composite model, so
  checkpoint keys load unchanged).
- `vision_module`: the attribute of the frozen image encoder (runs in the vision dtype, compiled by
  `compile_vision`); `frozen_modules`: the attributes never trained, in no mode; every other parameter is
  trained in unfrozen mode (`trainable_parameters`).
- `reads_text`, `max_text_tokens`, `truncation_side`, `reads_instruction`: whether and how the latents read the
  example's text (a family that reads none stores one row per image, not one per example).
- `layer_owner`: how error messages name the part whose layers are probed ("Q-Former", "Perceiver").
- `config_problem(config)`: why this family cannot run a checkpoint's config (None: it can); several families
  may read one model type and the one that can is chosen.
- `layers_in(config)`: the number of probe-able layers; `text_vocab_size(config)` (text families) and
  `check_tokenizer(tokenizer, config, where)`: the text side's checks.
- `random_init_config(config)`: what `--init random` changes in the config (returned for the identity);
  `default_image_processor(config)`: the processor of a checkpoint without `preprocessor_config.json`.

What a family implements (instance side):
- `build_modules(config)`: create its modules (under the checkpoint's attribute names);
  `init_random_weights()`: whatever `--init random` must draw beyond the modules' own init (e.g. query tokens
  that transformers initialises to zeros).
- `num_latents`, `hidden_size`: the latents handed to the LLM are `[num_latents, hidden_size]`.
- `layer_modules()`: its layer modules, layer 1..num_layers in order; `run_layers(image_embeds, tokens)`: the
  family's own forward from the image embeddings (and text) through those layers. The default
  `query_states` reads each requested layer with forward hooks on `layer_modules()` (layer 0: the first layer's
  input), so a family whose module returns only its final latents (a Perceiver) needs nothing more;
  `latents_of(output)` picks the latents out of a layer's output (default: its first element, first
  `num_latents` rows). A family with a cheaper way to read every layer may override `query_states`.
- `keep_layers(layer)`: cut the layers above `layer` on a copy (`truncated` makes the copy).
- `encode_images(pixel_values)` has a default for a vision module with a `last_hidden_state` output.

Provided here for every family: tokenizing and truncation counts (`tokenize`, `count_truncated`,
`count_words_cut`, through `text`, a `QFormerText`), `preprocess`, `set_dtypes`, `compile_vision`, `truncated`,
`trainable_parameters`, `weights_identity` (what manifests record), `train` (frozen modules stay in eval).
`qformer_dtype` is kept as an alias of `latent_dtype`, `num_query_tokens` of `num_latents`.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from probing.core.device_copies import to_device
from probing.core.errors import ProbingError
from probing.models.pixels import PixelPipeline
from probing.models.text import QFormerText

# One home for the dtype names the CLI and configs accept (`--dtype`, `--vision-dtype`, ...).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Resampler(nn.Module):
    # ------------------------------------------------------------------ declared by a family
    family: ClassVar[str]
    checkpoint_prefixes: ClassVar[tuple[str, ...]] = ()  # keys read from a checkpoint; the LLM is not among them
    vision_module: ClassVar[str] = "vision_model"  # the frozen image encoder
    frozen_modules: ClassVar[tuple[str, ...]] = ("vision_model",)  # never trained, in no mode
    layer_owner: ClassVar[str] = "resampler"  # how messages name the part whose layers are probed
    reads_text: ClassVar[bool] = True
    max_text_tokens: ClassVar[int] = 0  # text families: the tokenizer's truncation length
    truncation_side: ClassVar[str] = "right"
    reads_instruction: ClassVar[bool] = False  # the resampler's text may be an instruction around the example's

    text: QFormerText = QFormerText()  # the example's text as given, until `set_text`

    identity: dict[str, Any]  # source, revision, init, weights hash: what `weights_identity` draws from
    image_processor: Any
    pixels: Any  # a `PixelPipeline`: uint8 on the host, normalised on the device

    @classmethod
    def config_problem(cls, config: Any) -> str | None:
        """Why this family cannot run `config` (None: it can), decided before any weight is read."""
        return None

    @classmethod
    def layers_in(cls, config: Any) -> int:
        """The number of probe-able layers of a checkpoint's config (read before any weight)."""
        raise NotImplementedError

    @classmethod
    def text_vocab_size(cls, config: Any) -> int:
        """How many token ids the resampler's text embedding has (text families)."""
        raise NotImplementedError

    @classmethod
    def check_tokenizer(cls, tokenizer: Any, config: Any, where: str) -> None:
        """Refuse a tokenizer that does not fit the config (text families); nothing by default."""

    @classmethod
    def random_init_config(cls, config: Any) -> dict[str, Any]:
        """Change `config` in place for `--init random`; returns what the identity records of the change."""
        return {}

    @classmethod
    def default_image_processor(cls, config: Any) -> Any:
        """The image processor of a checkpoint that has no preprocessor_config.json."""
        raise ProbingError(f"the {cls.family} checkpoint has no preprocessor_config.json")

    # ------------------------------------------------------------------ implemented by a family
    def __init__(self, config: Any, tokenizer: Any, image_processor: Any, identity: Mapping[str, Any]):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.tokenizer.truncation_side = self.truncation_side
        self.image_processor = image_processor
        self.pixels = PixelPipeline(image_processor)  # uint8 to the device where that is exact
        self.identity = dict(identity)
        self.build_modules(config)

    def build_modules(self, config: Any) -> None:
        raise NotImplementedError

    def init_random_weights(self) -> None:
        """Draw what `--init random` needs beyond the modules' own init (called seeded, on the CPU)."""

    @property
    def num_latents(self) -> int:
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    def layer_modules(self) -> Sequence[nn.Module]:
        """The modules whose outputs are layers 1..num_layers, in order."""
        raise NotImplementedError

    def run_layers(self, image_embeds: torch.Tensor, tokens: Mapping[str, torch.Tensor]) -> Any:
        """Run the family's own forward from `image_embeds` (already in `latent_dtype`, on the device) and the
        tokenized text (`{}` for a family that reads none); the result is not used (hooks read the layers)."""
        raise NotImplementedError

    def latents_of(self, output: Any) -> torch.Tensor:
        """`[B, num_latents, H]` out of one layer module's output (or the first layer's input, for layer 0)."""
        states = output[0] if isinstance(output, tuple | list) else output
        return states[:, : self.num_latents]

    def keep_layers(self, layer: int) -> None:
        """Drop the layers above `layer` (called on a copy, by `truncated`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ provided for every family
    @property
    def num_query_tokens(self) -> int:
        """Alias of `num_latents` (the Q-Former's name for them)."""
        return self.num_latents

    @property
    def num_layers(self) -> int:
        return self.layers_in(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(getattr(self, self.vision_module).parameters()).dtype

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype of the trained part (the resampler proper)."""
        return next(parameter for _, parameter in self.trainable_parameters()).dtype

    @property
    def qformer_dtype(self) -> torch.dtype:
        """Alias of `latent_dtype`."""
        return self.latent_dtype

    def set_dtypes(self, vision_dtype: torch.dtype, latent_dtype: torch.dtype) -> Resampler:
        """The vision module in `vision_dtype` (bf16 on GPU is the fast path); everything else in `latent_dtype`."""
        for name, child in self.named_children():
            child.to(vision_dtype if name == self.vision_module else latent_dtype)
        for parameter in self._parameters.values():  # parameters held directly (e.g. query tokens)
            parameter.data = parameter.data.to(latent_dtype)
        return self

    def compile_vision(self) -> None:
        """Compile the vision module in place (torch.compile); state-dict keys unchanged."""
        getattr(self, self.vision_module).compile()  # compiled on its first batch

    def set_text(self, text: QFormerText) -> Resampler:
        """Read every text from now on as `text` says (preprocessing, instruction); refused where it cannot."""
        text.check_text()
        if text.instruction is not None and not self.reads_instruction:
            raise ProbingError(
                f"--instruction: the {self.family} {self.layer_owner} reads the text itself, never an instruction "
                "(InstructBLIP only)"
            )
        self.text = text.text_settings
        return self

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Text ids and mask, padded to the longest, truncated at the family's length and side; `{}` for a
        family that reads no text."""
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
        # The tokenizer may know more tokens than the text embedding has rows (a Hub tokenizer with an added
        # `<image>` token): harmless until a text produces one, an index error deep in the model then.
        vocab_size = int(self.text_vocab_size(self.config))
        if input_ids.numel() and int(input_ids.max()) >= vocab_size:
            row = int((input_ids >= vocab_size).any(dim=1).nonzero()[0])
            token = int(input_ids[row].max())
            raise ProbingError(
                f"text {texts[row][:40]!r}: token id {token} is outside the {self.layer_owner} vocabulary "
                f"({vocab_size} ids); the tokenizer does not fit the model"
            )
        return {"input_ids": input_ids, "attention_mask": encoded["attention_mask"]}

    def count_truncated(self, texts: Sequence[str]) -> int:
        """How many of `texts` are longer than `max_text_tokens` (0 for a family that reads no text)."""
        if not self.reads_text:
            return 0
        lengths = [len(ids) for ids in self._token_ids(texts, truncate=False)]
        return sum(length > self.max_text_tokens for length in lengths)

    def count_words_cut(self, texts: Sequence[str], words: Sequence[str]) -> int:
        """How many of `texts` lose some of their `words` (one string per text, e.g. the cell an RCM caption
        claims) to the truncation at `max_text_tokens` (0 for a family that reads no text). A text loses its
        words when their tokens occur fewer times in its truncated ids than in its whole ids (whichever side
        the family truncates)."""
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

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> pixel values with the checkpoint's own image processor."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision-module outputs of `preprocess` output, or of stacked `pixels.host_pixels` output (uint8
        normalised on the device)."""
        pixel_values = self.pixels.device_pixels(pixel_values, self.device).to(self.vision_dtype)
        return getattr(self, self.vision_module)(pixel_values=pixel_values).last_hidden_state

    def check_layers(self, layers: Sequence[int], option: str = "--layers", lowest: int = 0) -> None:
        for layer in layers:
            if not lowest <= layer <= self.num_layers:
                raise ProbingError(
                    f"{option}: layer {layer} does not exist (the {self.layer_owner} has 1..{self.num_layers})"
                )

    def text_tokens(self, texts: Sequence[str] | Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Tokenized text (or the tokens given) on the device; `{}` for a family that reads no text."""
        if not self.reads_text:
            return {}
        tokens = texts if isinstance(texts, Mapping) else self.tokenize(texts)
        return {name: to_device(tokens[name], self.device) for name in ("input_ids", "attention_mask")}

    def query_states(
        self,
        image_embeds: torch.Tensor,
        texts: Sequence[str] | Mapping[str, torch.Tensor] | None,
        layers: Sequence[int],
        image_slots: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`[B, len(layers), num_latents, H]`; with `image_slots`, `image_embeds` holds each image once and row i
        reads image `image_slots[i]`. Read with forward hooks on `layer_modules()` around `run_layers`."""
        self.check_layers(layers)
        tokens = self.text_tokens(texts)
        if image_slots is not None:
            slots = to_device(torch.as_tensor(image_slots, dtype=torch.long, device="cpu"), self.device)
            image_embeds = to_device(image_embeds, self.device).index_select(0, slots)
        image_embeds = to_device(image_embeds, self.device, self.latent_dtype)
        modules = list(self.layer_modules())
        captured: dict[int, torch.Tensor] = {}

        def reader(layer: int):
            return lambda module, args, output: captured.__setitem__(layer, self.latents_of(output))

        handles = [modules[layer - 1].register_forward_hook(reader(layer)) for layer in set(layers) if layer > 0]
        if 0 in layers:  # the first layer's input: the latents before any layer

            def first_input(module, args, kwargs):
                captured[0] = self.latents_of(args[0] if args else next(iter(kwargs.values())))

            handles.append(modules[0].register_forward_pre_hook(first_input, with_kwargs=True))
        try:
            self.run_layers(image_embeds, tokens)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack([captured[layer] for layer in layers], dim=1)

    def truncated(self, layer: int) -> Resampler:
        """A copy without the layers above `layer` (they cannot influence a probe of `layer`): the frozen
        modules are shared, everything trained is copied, so every trial starts from the same weights while the
        checkpoint is read once."""
        self.check_layers([layer], "--layer", lowest=1)
        clone = copy.copy(self)  # a shallow copy shares the module dictionaries: give it its own
        clone._modules = {
            name: child if name in self.frozen_modules else copy.deepcopy(child)
            for name, child in self._modules.items()
        }
        clone._parameters = {name: copy.deepcopy(parameter) for name, parameter in self._parameters.items()}
        clone._buffers = dict(self._buffers)
        clone.config = copy.deepcopy(self.config)
        clone.identity = dict(self.identity)
        clone.keep_layers(layer)
        return clone

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """What unfrozen probing trains: every parameter outside `frozen_modules`."""
        frozen = tuple(f"{name}." for name in self.frozen_modules)
        for name, parameter in self.named_parameters():
            if not name.startswith(frozen):
                yield name, parameter

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

    def train(self, mode: bool = True) -> Resampler:
        """Dropout follows `mode`; the frozen modules always stay in eval."""
        super().train(mode)
        for name in self.frozen_modules:
            getattr(self, name).eval()
        return self


def _occurrences(part: list[int], ids: list[int]) -> int:
    """How many times `part` occurs in `ids` as a contiguous run (0 for an empty `part`)."""
    if not part:
        return 0
    return sum(ids[start : start + len(part)] == part for start in range(len(ids) - len(part) + 1))
