"""Device names: the one place a `--device` (or a config's `device`) is checked and turned into a torch device.

A name is checked before any work, so `--device tpu0` or `--device cuda` on a machine without a GPU is one line
naming the option, not a traceback from deep inside a model load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from probing.core.errors import ProbingError

if TYPE_CHECKING:
    import torch

CHOICES = "cpu, cuda or cuda:N"


def check_device(name: str | None, where: str = "--device", present: bool = True) -> None:
    """Refuse a device name torch does not know or this code does not run on; with `present`, also one this
    machine does not have (no CUDA GPU, or fewer GPUs than cuda:N needs)."""
    import torch

    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ProbingError(f"{where}: unknown device {name!r} (choose {CHOICES})") from None
    if device.type == "cpu":
        return
    if device.type == "mps":
        if present and not torch.backends.mps.is_available():
            raise ProbingError(f"{where}: {name}: there is no Apple GPU (MPS) on this machine")
        return
    if device.type != "cuda":
        raise ProbingError(f"{where}: unknown device {name!r} (choose {CHOICES})")
    if not present:
        return
    if not torch.cuda.is_available():
        raise ProbingError(f"{where}: {name}: there is no CUDA GPU on this machine")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ProbingError(f"{where}: {name}: this machine has {count} CUDA GPU(s) (cuda:0 .. cuda:{count - 1})")


def resolve_device(name: str | None, where: str = "--device") -> torch.device:
    """The torch device of a checked name; None: the first CUDA GPU when there is one, else the CPU."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name, where)
    return torch.device(name)
