"""Which weights a resampler is built from (`ModelSource`): declared apart from loading, which needs torch and
transformers, so that the commands' options (`probing extract --help`) and configs read it without them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from probing.core.errors import ProbingError
from probing.core.settings import check, setting

DtypeName = Literal["float16", "bfloat16", "float32"]  # the dtypes a setting may name (`probing.models.DTYPES`)


@dataclass(frozen=True)
class ModelSource:
    """Which weights a resampler is built from: the settings shared by `extract`, unfrozen `train` and
    `search`, and a config's `models` entries."""

    model: str | None = setting(
        None, help="blip2 | blip2-coco | instructblip, a Hub id, a local checkpoint folder, or a LAVIS .pth file"
    )
    revision: str | None = setting(None, help="Hub branch, tag or commit.")
    init: Literal["pretrained", "random"] = setting(
        "pretrained", help="pretrained | random (same architecture, seeded random weights: the control baseline)"
    )
    init_seed: int = setting(0, low=0, help="Seed of --init random.")
    family: str | None = setting(
        None,
        help="The backend family, where a checkpoint could be read by several "
        "(and for a LAVIS .pth whose keys do not tell).",
    )
    base: str | None = setting(
        None,
        help="For a LAVIS .pth: where the config, tokenizer and image processor "
        "come from (default: the family's checkpoint).",
    )
    fill_from_base: bool = setting(
        False,
        identity=True,
        omit_default=True,
        help="For a LAVIS .pth that lacks some tensors (a trimmed file without the ViT): take them from --base "
        "(named in a log line) instead of refusing.",
    )

    def required(self, option: str = "--model") -> ModelSource:
        if self.model is None:
            raise ProbingError(f"{option} is required")
        return check(self)
