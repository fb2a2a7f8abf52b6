"""Reading only the tensors we need from a Hugging Face checkpoint: a Hub repo or a local folder.

Shard-selective loading: the shard index maps each key to its file; we
keep the keys under the wanted prefixes, open only the shards that hold them (downloading only those from
the Hub) and read tensors one by one with `safe_open`. A shard that holds only language-model weights is
never opened, so it may be absent; shards that mix modules are read by key.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import torch

from probing.core.errors import ProbingError, shown

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class CheckpointSource:
    """A checkpoint folder, local or on the Hub (`revision` = branch, tag or commit; offline mode respected).

    `file(name)` returns a local path, downloading from the Hub when needed; hub errors become one-line
    ProbingErrors naming the repo and file.
    """

    def __init__(self, spec: str, revision: str | None = None):
        self.spec = spec
        self.revision = revision
        path = Path(spec).expanduser()
        self.local_dir: Path | None = path.resolve() if path.is_dir() else None
        if self.local_dir is None and (path.exists() or spec.startswith((".", "/", "~"))):
            raise ProbingError(f"--model: {spec}: not a checkpoint folder")
        if self.local_dir is None:
            from huggingface_hub.errors import HFValidationError
            from huggingface_hub.utils import validate_repo_id

            # A mistyped relative path (`sub/dir/ckpt`) or a name with spaces is no Hub id: huggingface_hub
            # would refuse it with a traceback at the first download.
            try:
                validate_repo_id(spec)
            except HFValidationError:
                raise ProbingError(
                    f"--model: '{spec}' is neither a local folder{self._resolved} nor a valid Hub id"
                ) from None
        self.commit: str | None = None  # the Hub commit the files came from, once one was downloaded

    @property
    def _resolved(self) -> str:
        """Where `spec` would be as a local folder (a relative path is taken from the current folder), for the
        messages that say it is not one."""
        return f" ({Path(self.spec).resolve()} does not exist)"

    @property
    def name_or_path(self) -> str:
        return str(self.local_dir) if self.local_dir is not None else self.spec

    def file(self, name: str, required: bool = True) -> Path | None:
        if self.local_dir is not None:
            path = self.local_dir / name
            if path.is_file():
                return path
            if required:
                raise ProbingError(f"{path}: file not found")
            return None
        return self._download(name, required)

    def _download(self, name: str, required: bool) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            path = Path(hf_hub_download(self.spec, name, revision=self.revision))
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: it must come first
            if not required:
                return None
            raise ProbingError(
                f"{self.spec}: no local folder{self._resolved}, and '{name}' is not in the Hugging Face cache and "
                "cannot be downloaded (offline or no network); download it first or pass a local folder"
            ) from None
        except EntryNotFoundError:
            if required:
                raise ProbingError(f"{self.spec}: the repository has no file '{name}'") from None
            return None
        except RevisionNotFoundError:
            raise ProbingError(f"{self.spec}: revision '{self.revision}' not found") from None
        except GatedRepoError:
            raise ProbingError(f"{self.spec}: gated repository; log in with `huggingface-cli login`") from None
        except RepositoryNotFoundError:
            raise ProbingError(
                f"--model: '{self.spec}' is neither a local folder{self._resolved} nor a Hub repository"
            ) from None
        except OSError as error:  # network failures surface as OSError subclasses
            raise ProbingError(f"{self.spec}: cannot download '{name}' ({error})") from None
        if "snapshots" in path.parts:  # .../snapshots/<commit>/<name>: the immutable identity of the files
            self.commit = path.parts[path.parts.index("snapshots") + 1]
        return path

    def weight_map(self) -> tuple[dict[str, str], str]:
        """Key -> file name for every tensor in the checkpoint, and the format ('safetensors' or 'bin')."""
        for index_name, kind in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            index = self.file(index_name, required=False)
            if index is not None:
                return _checked_weight_map(index), kind
        single = self.file(SAFE_SINGLE, required=False)
        if single is not None:
            from safetensors import safe_open

            with safe_open(single, framework="pt") as handle:
                return {key: SAFE_SINGLE for key in handle.keys()}, "safetensors"
        single = self.file(BIN_SINGLE, required=False)
        if single is not None:
            state = torch.load(single, map_location="cpu", mmap=True, weights_only=True)
            return {key: BIN_SINGLE for key in state}, "bin"
        raise ProbingError(f"{self.name_or_path}: no model weights ({SAFE_INDEX}, {SAFE_SINGLE} or {BIN_SINGLE})")

    def read_tensors(self, prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
        """Every tensor whose key starts with one of `prefixes` (`*.position_ids` buffers dropped); whole keys
        are prefixes too, to read just those tensors."""
        prefixes = tuple(prefixes)
        weight_map, kind = self.weight_map()
        wanted: dict[str, list[str]] = defaultdict(list)
        for key, file_name in weight_map.items():
            if key.startswith(prefixes) and not key.endswith(".position_ids"):
                wanted[file_name].append(key)
        if not wanted:
            shown = ", ".join(prefixes[:3]) + (f" (and {len(prefixes) - 3} more)" if len(prefixes) > 3 else "")
            raise ProbingError(f"{self.name_or_path}: no tensors under {shown}")
        tensors: dict[str, torch.Tensor] = {}
        for file_name in sorted(wanted):
            path = self.file(file_name)
            if kind == "safetensors":
                from safetensors import SafetensorError, safe_open

                try:
                    with safe_open(path, framework="pt") as handle:
                        for key in wanted[file_name]:
                            tensors[key] = handle.get_tensor(key)
                except SafetensorError as error:
                    raise ProbingError(f"{path}: unreadable safetensors shard ({error})") from None
            else:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                for key in wanted[file_name]:
                    tensors[key] = state[key].clone()
        return tensors


def _checked_weight_map(index: Path) -> dict[str, str]:
    """An index's `weight_map` (tensor key -> shard file), each file inside the checkpoint's folder: a name
    with `..`, an absolute path, a backslash or NUL is refused, so no file outside the checkpoint is opened."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ProbingError(f"{index}: not a shard index ({type(error).__name__}: {shown(str(error))})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ProbingError(f"{index}: not a shard index ({type(error).__name__})") from None
    if not isinstance(weight_map, dict):
        raise ProbingError(f"{index}: field 'weight_map' is not a mapping")
    for key, file_name in weight_map.items():
        if (
            not isinstance(file_name, str)
            or not file_name
            or "\\" in file_name
            or "\0" in file_name
            or PurePosixPath(file_name).is_absolute()
            or ".." in PurePosixPath(file_name).parts
        ):
            raise ProbingError(
                f"{index}: weight_map[{shown(key)}]: {shown(file_name)} is not a file name inside the checkpoint"
            )
    return weight_map


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and bytes of a state dict: the identity of local weights."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.view(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()
