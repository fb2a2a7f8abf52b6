"""Epoch checkpoints of a training run, so that a killed unfrozen trial resumes at its last epoch.

A checkpoint folder holds one `epoch-<e>/` at a time (tensors in safetensors, the rest in a small JSON file)
and `latest.json` naming it. A new epoch is written beside the old one, fsync'ed, renamed into place, and only
then does `latest.json` (written atomically) point at it and the old one go; a write that fails half-way (a
full disk) leaves the previous checkpoint readable and training goes on. Nothing is read back with pickle:
safetensors for tensors, JSON for the rest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from probing.core.artifacts import PARTIAL_MARK, save_safetensors, write_json
from probing.core.errors import ProbingError

log = logging.getLogger(__name__)

LATEST = "latest.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"


class TrialCheckpoint:
    """The checkpoints of one trial in `folder`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def latest(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, state) of the last complete checkpoint, or None."""
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        try:
            name = json.loads(pointer.read_text(encoding="utf-8"))["folder"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ProbingError(f"{pointer}: not a checkpoint pointer") from None
        folder = (self.folder / name).resolve()
        if folder.parent != self.folder.resolve():  # an entry must stay inside its checkpoint folder
            raise ProbingError(f"{pointer}: names {name!r}, outside its folder")
        try:
            tensors = load_file(folder / TENSORS)
            state = json.loads((folder / STATE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, Exception) as error:  # safetensors raises its own error type
            raise ProbingError(f"{folder}: unreadable checkpoint ({type(error).__name__})") from None
        return tensors, state

    def save(self, epoch: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> bool:
        """Write epoch `epoch`'s checkpoint; False (with a warning) when it could not be written whole."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch:04d}"
        staging = self.folder / f".{name}{PARTIAL_MARK}{os.getpid()}"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            save_safetensors(staging / TENSORS, {k: v.detach().cpu() for k, v in tensors.items()})
            text = json.dumps(state, sort_keys=True)
            with open(staging / STATE, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            with open(staging / TENSORS, "rb") as handle:
                os.fsync(handle.fileno())
            target = self.folder / name
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            previous = self._pointed()
            write_json(self.folder / LATEST, {"folder": name, "epoch": epoch})
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            log.warning(
                "%s: checkpoint of epoch %d not written (%s); the previous one stays",
                self.folder,
                epoch,
                error.strerror or error,
            )
            return False
        if previous is not None and previous != name:
            shutil.rmtree(self.folder / previous, ignore_errors=True)
        return True

    def _pointed(self) -> str | None:
        try:
            return json.loads((self.folder / LATEST).read_text(encoding="utf-8"))["folder"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state split into tensors (by parameter index and name) and JSON (its groups)."""
    state = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{key}": value
        for index, values in state["state"].items()
        for key, value in values.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    values: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            values.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({"state": values, "param_groups": state["param_groups"]})
