"""Zero-shot answers of whole models: is this caption true of the image? No probe is trained; the model answers.

Two methods, each registered for the backend family it runs (`register_zero_shot`), each turning a batch of
(image, caption) pairs into one log-odds of "true" per pair:

- `PromptScorer` (InstructBLIP, the paper's Appendix C): the WHOLE `InstructBlipForConditionalGeneration`,
  language model included, is asked the caption as a yes/no question, and the answer is read from the
  language model's next-token distribution: the log-probability of the positive answer minus that of the
  negative one (each summed over its tokens when it has several), as the paper ranked the two answers'
  logits. The language model's input is built exactly as transformers builds it for `generate`: the
  instruction tokenized by the LLM's own tokenizer (its BOS first), padded on the left, preceded by
  `num_query_tokens` image placeholders (`config.image_token_index`, the `InstructBlipProcessor` layout),
  with `generate`'s position ids (counted over the attended tokens). The Q-Former reads the same
  instruction, padded on the right and truncated on the left at 128 tokens (LAVIS's `max_txt_len`), so that
  an example's answer does not depend on the other examples of its batch.
- `MatchScorer` (BLIP-2 first stage): the image-text matching head's match probability, through the
  resampler (`Blip2Resampler.itm_logits`, the model's own `use_image_text_matching_head=True` computation:
  queries and caption attend jointly, the head's two logits averaged over the queries); the log-odds of a
  match is `logit_match - logit_no_match`, whose sigmoid is the softmax probability of class 1.

Both see each image once per batch: `encode_images` runs the ViT on a batch's distinct images and `score`
reads them by slot. Only `PromptScorer.load` reads a language model's weights.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from probing.core.artifacts import sha256_file
from probing.core.errors import ProbingError
from probing.core.records import ITM_HEAD, ZERO_SHOT_PROMPT
from probing.core.registry import Registry
from probing.models.base import DTYPES
from probing.models.checkpoint import CheckpointSource
from probing.models.loading import (
    LLM_TOKENIZER_FILES,
    ModelSource,
    load_image_processor,
    load_resampler,
    load_tokenizer,
)
from probing.models.pixels import PixelPipeline
from probing.models.registry import BackendFamily
from probing.models.text import DEFAULT_ANSWERS, DEFAULT_PROMPT, TEXT_FIELD  # noqa: F401 (their home was here)

log = logging.getLogger(__name__)

QFORMER_MAX_TOKENS = 128  # LAVIS's max_txt_len for InstructBLIP's Q-Former instruction (left truncation)


@dataclass
class Scores:
    """A batch's answers: `logits` `[B]` (float32, CPU), the log-odds of "true"; `fields` per example, the raw
    scores a prediction record keeps beside it."""

    logits: torch.Tensor
    fields: list[dict[str, Any]]


def checkpoint_identity(checkpoint: CheckpointSource, family: BackendFamily) -> dict[str, Any]:
    """What defines a whole model's weights, known before they are loaded: the SHA-256 of every weight file
    of the checkpoint (fetched when it is on the Hub). Every file must be there: a checkpoint stripped of its
    language model is refused in one line, naming the first missing file."""
    weight_map, kind = checkpoint.weight_map()
    digest = hashlib.sha256()
    for name in sorted(set(weight_map.values())):
        digest.update(f"{name}|{sha256_file(checkpoint.file(name))}|".encode())
    return {
        "family": family.name,
        "init": "pretrained",
        "source": checkpoint.name_or_path,
        "revision": checkpoint.commit or checkpoint.revision,
        "format": kind,
        "files_sha256": digest.hexdigest(),
    }


def generate_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids `generate` gives a left-padded batch: counted over the attended tokens, 0 on padding
    (`GenerationMixin._prepare_position_ids_for_generation`, a private method, hence this one line)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


class ZeroShotScorer:
    """The contract of a zero-shot method: construction reads the tokenizers and checks the settings (cheap);
    `load` reads the weights; then `encode_images` once per batch of distinct images and `score` per batch
    of examples."""

    mode: ClassVar[str]  # what the run folder records as its mode
    options: ClassVar[tuple[str, ...]] = ()  # the zero-shot settings it reads; others given are refused

    @classmethod
    def resolved(cls, settings: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        """`settings` (prompt, answers, llm_dtype) with this method's defaults filled in; a setting that it
        does not read is refused when given, and left out."""
        for name in ("prompt", "answers", "llm_dtype"):
            if name not in cls.options and settings.get(name) is not None:
                option = "--" + name.replace("_", "-")
                raise ProbingError(f"{option}: the {cls.mode} method reads no {name.replace('_', ' ')}")
        return {name: settings.get(name) for name in ("prompt", "answers", "llm_dtype")}

    pixels: PixelPipeline

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def load(self) -> None:
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, image_embeds: torch.Tensor, image_slots: torch.Tensor, texts: Sequence[str]) -> Scores:
        raise NotImplementedError


def _instructblip_class():
    from transformers import InstructBlipForConditionalGeneration

    class InstructBlipWithFp32Resampler(InstructBlipForConditionalGeneration):
        """The same model, its resampler (ViT, Q-Former, queries, projection) kept in float32 whatever the
        language model's dtype (`_keep_in_fp32_modules_strict` upcasts those modules as they load), as
        `probing extract` runs the Q-Former; the LLM's input is cast to its dtype by the model itself."""

        _keep_in_fp32_modules_strict = ["vision_model", "qformer", "query_tokens", "language_projection"]

    return InstructBlipWithFp32Resampler


class PromptScorer(ZeroShotScorer):
    """InstructBLIP asked through its language model (see the module docstring)."""

    mode = ZERO_SHOT_PROMPT
    options = ("prompt", "answers", "llm_dtype")

    @classmethod
    def resolved(cls, settings: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        prompt = settings.get("prompt") or DEFAULT_PROMPT
        if TEXT_FIELD not in prompt:
            raise ProbingError(f"--prompt: the template has no {TEXT_FIELD} (where each example's caption goes)")
        answers = tuple(settings.get("answers") or DEFAULT_ANSWERS)
        if len(answers) != 2 or len({a.strip() for a in answers}) != 2 or not all(a.strip() for a in answers):
            raise ProbingError(f"--answers: give the positive and the negative answer, e.g. yes,no (got {answers})")
        dtype = settings.get("llm_dtype") or ("bfloat16" if device.type == "cuda" else "float32")
        return {"prompt": prompt, "answers": answers, "llm_dtype": dtype}

    def __init__(
        self,
        checkpoint: CheckpointSource,
        config: Any,
        family: BackendFamily,
        settings: Mapping[str, Any],
        source: ModelSource,
        device: torch.device,
    ):
        self.checkpoint, self.config, self.device = checkpoint, config, device
        self.template, self.answers, self.dtype_name = settings["prompt"], settings["answers"], settings["llm_dtype"]
        if getattr(config, "image_token_index", None) is None:
            raise ProbingError(
                f"{checkpoint.name_or_path}: its config has no image_token_index, the placeholder id that says where "
                "the queries go in the language model's input (transformers needs it to run the model)"
            )
        self.tokenizer = load_tokenizer(checkpoint, "", LLM_TOKENIZER_FILES, "language model's tokenizer")
        self.tokenizer.padding_side = "left"  # the next token of every row at the last position
        if self.tokenizer.pad_token_id is None:  # Llama's own tokenizer has none; the mask hides it anyway
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        self.qformer_tokenizer = load_tokenizer(checkpoint, family.tokenizer_folder or "")
        self.qformer_tokenizer.truncation_side = "left"
        self.answer_tokens = [self._answer_tokens(answer) for answer in self.answers]
        if self.answer_tokens[0] == self.answer_tokens[1]:
            raise ProbingError(f"--answers: {self.answers[0]!r} and {self.answers[1]!r} tokenize to the same tokens")
        self.image_processor = load_image_processor(checkpoint, config, family.resampler)
        self.pixels = PixelPipeline(self.image_processor)
        self.model = None

    def _answer_tokens(self, answer: str) -> list[int]:
        """An answer's tokens as the model would generate them after the prompt: tokenized alone, without
        special tokens (as LAVIS tokenizes its candidate answers)."""
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ProbingError(f"--answers: {answer!r} tokenizes to nothing")
        unknown = self.tokenizer.unk_token_id
        if unknown is not None and unknown in ids:
            raise ProbingError(f"--answers: {answer!r} has a token the language model's tokenizer does not know")
        return list(ids)

    def identity(self) -> dict[str, Any]:
        return {
            "answer_tokens": self.answer_tokens,
            "llm_input": "InstructBlipProcessor layout: image placeholders, the LLM tokenizer's own BOS, left padding",
            "qformer_text": {"max_tokens": QFORMER_MAX_TOKENS, "truncation_side": "left", "padding_side": "right"},
        }

    def load(self) -> None:
        from transformers.utils import logging as hf_logging

        if self.device.type == "cuda":
            # accelerate places the modules: on one GPU if it fits, else across GPUs and the host
            device_map = "auto" if self.device.index is None else {"": self.device}
        else:
            device_map = {"": self.device}
        hf_logging.disable_progress_bar()
        try:
            self.model = (
                _instructblip_class()
                .from_pretrained(
                    self.checkpoint.file("config.json").parent,  # the files hashed for the run's identity
                    dtype=DTYPES[self.dtype_name],
                    device_map=device_map,
                )
                .eval()
            )
        finally:
            hf_logging.enable_progress_bar()

    @property
    def vision_device(self) -> torch.device:
        return next(self.model.vision_model.parameters()).device

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        pixel_values = self.pixels.device_pixels(pixels, self.vision_device).to(next(vision.parameters()).dtype)
        return vision(pixel_values=pixel_values).last_hidden_state

    def prompts(self, texts: Sequence[str]) -> list[str]:
        # str.replace and not str.format: a caption or a template may hold other braces
        return [self.template.replace(TEXT_FIELD, text) for text in texts]

    def llm_inputs(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The LLM's `input_ids` and `attention_mask` as `InstructBlipProcessor` builds them for `generate`."""
        text = self.tokenizer(list(prompts), padding="longest", return_tensors="pt", return_token_type_ids=False)
        rows, queries = text["input_ids"].shape[0], int(self.config.num_query_tokens)
        image_tokens = torch.full((rows, queries), int(self.config.image_token_index), dtype=torch.long)
        ones = torch.ones((rows, queries), dtype=text["attention_mask"].dtype)
        return {
            "input_ids": torch.cat([image_tokens, text["input_ids"]], dim=1),
            "attention_mask": torch.cat([ones, text["attention_mask"]], dim=1),
        }

    def image_features(self, image_embeds: torch.Tensor, prompts: Sequence[str]):
        """The model's `get_image_features` after its ViT (whose output is computed once per image): the
        Q-Former reads the instruction beside the queries, the projection maps the queries to the LLM."""
        from transformers.models.instructblip.modeling_instructblip import BaseModelOutputWithVisionQformerOutputs

        model = self.model
        # Padded on the right, as LAVIS and `probing extract` do: the Q-Former counts positions from the first
        # token, so left padding (what InstructBlipProcessor applies to both tokenizers when the LLM's pads on the
        # left) would make an example's answer depend on the longest instruction of its batch.
        text = self.qformer_tokenizer(
            list(prompts),
            padding="longest",
            padding_side="right",
            truncation=True,
            max_length=QFORMER_MAX_TOKENS,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        device = model.query_tokens.device
        image_embeds = image_embeds.to(device)
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=device)
        qformer_outputs = model.qformer(
            input_ids=text["input_ids"].to(device),
            attention_mask=torch.cat([query_mask, text["attention_mask"].to(device)], dim=1),
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device),
            return_dict=True,
        )
        query_output = qformer_outputs[0][:, : queries.shape[1], :]
        return BaseModelOutputWithVisionQformerOutputs(
            pooler_output=model.language_projection(query_output), qformer_outputs=qformer_outputs
        )

    def next_token_logprobs(self, inputs: dict[str, torch.Tensor], features, continuation: Sequence[int]):
        """Log-probabilities `[B, len(continuation) + 1, V]` of the token after the prompt and after each token
        of `continuation` (appended to every row), from the model's own forward."""
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if continuation:
            extra = torch.tensor(list(continuation), dtype=torch.long).expand(input_ids.shape[0], -1)
            input_ids = torch.cat([input_ids, extra], dim=1)
            mask = torch.cat([mask, torch.ones_like(extra, dtype=mask.dtype)], dim=1)
        device = self.model.get_input_embeddings().weight.device
        output = self.model(
            pixel_values=None,
            qformer_input_ids=None,
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=generate_position_ids(mask).to(device),
            mm_encoder_outputs={"image": features},
            logits_to_keep=len(continuation) + 1,
            use_cache=False,
        )
        return output.logits.float().log_softmax(dim=-1)

    def answer_logprobs(self, image_embeds: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """`[B, 2]`: each answer's log-probability after the prompt, summed over its tokens."""
        prompts = self.prompts(texts)
        features = self.image_features(image_embeds, prompts)
        inputs = self.llm_inputs(prompts)
        by_continuation: dict[tuple[int, ...], torch.Tensor] = {}  # one forward serves every one-token answer
        columns = []
        for tokens in self.answer_tokens:
            continuation = tuple(tokens[:-1])
            if continuation not in by_continuation:
                by_continuation[continuation] = self.next_token_logprobs(inputs, features, continuation)
            logprobs = by_continuation[continuation]
            index = torch.tensor(tokens, device=logprobs.device).expand(logprobs.shape[0], -1)
            columns.append(logprobs.gather(-1, index.unsqueeze(-1)).squeeze(-1).sum(dim=-1))
        return torch.stack(columns, dim=1).cpu()

    def score(self, image_embeds: torch.Tensor, image_slots: torch.Tensor, texts: Sequence[str]) -> Scores:
        per_text = image_embeds.index_select(0, image_slots.to(image_embeds.device))
        logprobs = self.answer_logprobs(per_text, texts)
        positive, negative = self.answers
        fields = [{"answer_logprobs": {positive: float(p), negative: float(n)}} for p, n in logprobs.tolist()]
        return Scores(logits=logprobs[:, 0] - logprobs[:, 1], fields=fields)


class MatchScorer(ZeroShotScorer):
    """BLIP-2's image-text matching head (see the module docstring)."""

    mode = ITM_HEAD

    def __init__(
        self,
        checkpoint: CheckpointSource,
        config: Any,
        family: BackendFamily,
        settings: Mapping[str, Any],
        source: ModelSource,
        device: torch.device,
    ):
        self.source, self.device, self.family = source, device, family
        self.resampler = None

    def identity(self) -> dict[str, Any]:
        resampler_class = self.family.resampler
        text = {"max_tokens": resampler_class.max_text_tokens, "truncation_side": resampler_class.truncation_side}
        return {"text": text, "dtype": "float32"}

    def load(self) -> None:
        self.resampler = load_resampler(self.source, device=self.device)
        self.pixels = self.resampler.pixels

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.resampler.encode_images(pixels)

    def score(self, image_embeds: torch.Tensor, image_slots: torch.Tensor, texts: Sequence[str]) -> Scores:
        resampler = self.resampler
        last = resampler.query_states(image_embeds, list(texts), [resampler.num_layers], image_slots=image_slots)
        logits = resampler.itm_logits(last[:, 0]).float().cpu()
        probabilities = logits.softmax(dim=-1)[:, 1]
        return Scores(
            logits=logits[:, 1] - logits[:, 0], fields=[{"match_probability": float(p)} for p in probabilities]
        )


# The zero-shot method of each backend family, by family name (entry-point group `probing.baselines.zeroshot`).
_SCORERS: Registry[type[ZeroShotScorer]] = Registry("zero-shot method", "probing.baselines.zeroshot")


def register_zero_shot(family: str, scorer: type[ZeroShotScorer], *, replace: bool = False) -> type[ZeroShotScorer]:
    """The zero-shot method of a backend family (one per family; a plug-in family registers its own)."""
    return _SCORERS.register(family, scorer, replace=replace)


def zero_shot_scorer(family: BackendFamily, where: str) -> type[ZeroShotScorer]:
    if family.name not in _SCORERS:
        known = ", ".join(f"{name} ({scorer.mode})" for name, scorer in _SCORERS.items())
        raise ProbingError(f"--model {where}: a {family.name} model has no zero-shot method (known: {known})")
    return _SCORERS[family.name]


register_zero_shot("instructblip", PromptScorer)
register_zero_shot("blip2", MatchScorer)
