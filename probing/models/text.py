"""What text the Q-Former reads: the example's text as given, or as LAVIS prepares it, optionally inside an
instruction template (InstructBLIP). Both choices are settings declared once here (`QFormerText`), recorded in
the identity of whatever they change (stores, unfrozen runs) and left out of it at their defaults, so outputs
made before they existed keep their identity.

LAVIS, whose checkpoints the paper probes, feeds evaluation text through its `blip_caption` processor
(`BlipCaptionProcessor.pre_caption`): lower-case; each of `.!"()*#:;~` replaced by a space; every run of two
or more whitespace characters made one space; trailing newlines and surrounding spaces stripped; at most 50
words (split on single spaces). `lavis_caption` is that function, written from its definition: LAVIS itself
cannot be installed beside transformers 5 (it pins transformers < 4.27).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from probing.core.errors import ProbingError
from probing.core.settings import setting

TEXT_FIELD = "{text}"  # where an instruction template takes the example's text
LAVIS_MAX_WORDS = 50  # BlipCaptionProcessor's default max_words, used by every BLIP-2/InstructBLIP eval config
_LAVIS_REMOVED = re.compile(r'[.!"()*#:;~]')
_WHITESPACE_RUNS = re.compile(r"\s{2,}")

TextPreprocessing = Literal["none", "lavis"]


def lavis_caption(text: str, max_words: int = LAVIS_MAX_WORDS) -> str:
    """LAVIS's `blip_caption` text processing of one text (see the module docstring)."""
    text = _WHITESPACE_RUNS.sub(" ", _LAVIS_REMOVED.sub(" ", text.lower()))
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


PREPROCESSORS = {"none": lambda text: text, "lavis": lavis_caption}


@dataclass(frozen=True, kw_only=True)
class TextPreparation:
    """How an example's text is prepared before a model reads it (also `probing zeroshot`'s setting)."""

    text_preprocessing: TextPreprocessing = setting(
        "none",
        identity=True,
        omit_default=True,
        help="none (the text as given) | lavis (LAVIS's blip_caption: lower-case, .!\"()*#:;~ removed, "
        "at most 50 words; what the paper's LAVIS checkpoints read).",
    )

    def preprocess(self, texts: Sequence[str]) -> list[str]:
        return [PREPROCESSORS[self.text_preprocessing](text) for text in texts]


@dataclass(frozen=True, kw_only=True)
class QFormerText(TextPreparation):
    """How an example's text becomes the Q-Former's text: settings of `extract`, unfrozen `train`/`search`
    (and of a config's `extract` section, which unfrozen searches follow)."""

    instruction: str | None = setting(
        None,
        identity=True,
        omit_default=True,
        help=f"InstructBLIP: the Q-Former's instruction, with {TEXT_FIELD} where the text goes "
        "(default: the bare text).",
        show_default=False,
    )

    @property
    def text_settings(self) -> QFormerText:
        return QFormerText(text_preprocessing=self.text_preprocessing, instruction=self.instruction)

    def check_text(self) -> QFormerText:
        if self.instruction is not None and TEXT_FIELD not in self.instruction:
            raise ProbingError(f"--instruction: the template has no {TEXT_FIELD} (where each example's text goes)")
        return self

    def prepare(self, texts: Sequence[str], instruction: bool = True) -> list[str]:
        """The texts as the Q-Former reads them: preprocessed, then put into the instruction (if any and
        `instruction`)."""
        texts = self.preprocess(texts)
        if self.instruction is None or not instruction:
            return texts
        return [self.instruction.replace(TEXT_FIELD, text) for text in texts]


# Zero-shot prompts (`probing zeroshot`): declared with the text settings, torch-free, for the options' help.
TEXT_FIELD = "{text}"  # where a prompt template takes the example's caption
# InstructBLIP's template for short answers ("Question: {} Short answer:", the one its authors evaluate
# short-answer VQA with), holding the caption as a yes/no question; the wording of the question follows
# InstructBLIP's instruction for VSR ("Based on the image, is this statement true ...").
DEFAULT_PROMPT = 'Question: Based on the image, is this statement true? "{text}" Short answer:'
DEFAULT_ANSWERS = ("yes", "no")
