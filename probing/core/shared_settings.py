"""Settings that several stages share, declared once: each stage's settings derive from these classes instead of
declaring a field of the same name, help and range again (`probing.core.settings` explains declarations).

- `Placement`: the device a stage computes on (extraction, zero-shot answers, probe training);
- `ImagePipeline`: a stage that decodes images in worker processes and shows a progress bar (extraction,
  zero-shot answers);
- `ModelLabel`: how reports name the model of the runs a stage writes (probe runs, searches, online codes,
  zero-shot runs).
"""

from __future__ import annotations

from dataclasses import dataclass

from probing.core.devices import check_device
from probing.core.settings import setting


@dataclass(frozen=True, kw_only=True)
class Placement:
    device: str | None = setting(
        None,
        config=False,  # a config's `device` applies to all its stages at once
        valid=check_device,
        help="cpu, cuda, cuda:1 ... (default: a GPU when there is one, under `accelerate launch` each process's "
        "own; else the CPU).",
    )


@dataclass(frozen=True, kw_only=True)
class ImagePipeline(Placement):
    workers: int | None = setting(None, low=0, help="Image decoding processes (default: cores - 2, 1..16).")
    progress: bool = setting(True, cli=False, config=False, help="A progress bar on a terminal.")


@dataclass(frozen=True, kw_only=True)
class ModelLabel:
    label: str | None = setting(
        None, help="How reports name the model (default: its family's title, '(random)' added for random weights)."
    )
