"""The settings of a zero-shot run, declared apart from it (it needs torch and transformers) so that
`probing zeroshot --help`, configs and manifests read them without either."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from probing.core.settings import comma_separated, setting
from probing.core.shared_settings import ImagePipeline, ModelLabel
from probing.data.types import DataOptions
from probing.models.source import DtypeName, ModelSource
from probing.models.text import DEFAULT_ANSWERS, DEFAULT_PROMPT, TEXT_FIELD, TextPreparation


@dataclass(frozen=True, kw_only=True)
class ZeroShotSettings(ImagePipeline, ModelLabel, TextPreparation):
    """How a zero-shot run asks and decides: the options of `probing zeroshot` and a config experiment's
    `zeroshot` section. Texts are prepared (`TextPreparation`) before they reach the prompt or the ITM path."""

    prompt: str | None = setting(
        None,
        identity=True,
        help=f"InstructBLIP: the instruction, with {TEXT_FIELD} where the caption goes (default: {DEFAULT_PROMPT}).",
        show_default=False,
    )
    answers: tuple[str, ...] | None = setting(
        None,
        identity=True,
        parse=comma_separated(str, 2, "answers"),
        help="InstructBLIP: the positive and the negative answer whose log-probabilities are compared "
        f"(default {','.join(DEFAULT_ANSWERS)}).",
    )
    llm_dtype: DtypeName | None = setting(
        None,
        identity=True,
        help="InstructBLIP: the language model's dtype (default bfloat16 on GPU, float32 on CPU); the ViT and "
        "Q-Former stay float32.",
    )
    threshold_from: Literal["val"] | None = setting(
        None,
        identity=True,
        help="Decide at the threshold most accurate on this split (recorded) instead of at even odds.",
    )
    splits: tuple[str, ...] | None = setting(
        None,
        identity=True,
        cli="--split",
        parse=comma_separated(str, what="splits"),
        help="Comma-separated splits to score (default: val and the task's evaluated splits, e.g. val,test).",
    )
    batch_size: int = setting(16, identity=True, low=1, help="Examples per forward pass.")


@dataclass(frozen=True, kw_only=True)
class ZeroShotRequest(ModelSource, ZeroShotSettings):
    """One model answering one task's splits into one run folder."""

    data: DataOptions
    out: Path

    @property
    def source(self) -> ModelSource:
        return ModelSource(**{f.name: getattr(self, f.name) for f in fields(ModelSource)})
