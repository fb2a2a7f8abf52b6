"""Writing stage outputs safely: whole directories appear at once, manifests say what produced them.

Every stage writes a directory with a `manifest.json`. The directory is built under a hidden sibling name
and renamed into place only when complete, so an interrupted run never leaves a half-written output that a
later run could mistake for a finished one. A later run that finds the output compares manifests: the same
request is reused, a different one is refused with the first differing field named.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import stat
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from probing.core.errors import ClaimedElsewhere, ProbingError, shown

MANIFEST_NAME = "manifest.json"
PARTIAL_MARK = ".partial-"  # temporary names: .<name>.partial-<pid>


MAX_NAME_LENGTH = 128


def check_folder_name(name: str, where: str, kind: str = "") -> str:
    """A name from a config that becomes one folder of a workspace (config name, experiment name, model label):
    refused unless it is a single plain path component, so nothing is written outside the workspace."""
    problem = None
    if not name:
        problem = "is empty"
    elif name in (".", ".."):
        problem = "is not a folder name"
    elif any(c in name for c in "/\\\0"):
        problem = "contains a path separator or NUL (a name, not a path)"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"is longer than {MAX_NAME_LENGTH} characters ({len(name)})"
    if problem is not None:
        raise ProbingError(f"{where}: {kind + ' ' if kind else ''}{shown(name)} {problem}")
    return name


def check_output(
    path: Path | str,
    kinds: tuple[str, ...] = (),
    option: str = "--out",
    file: bool = False,
    inputs: tuple[Path | str, ...] = (),
) -> Path:
    """The one check every output path of a command goes through, before anything is read or written: refuse a
    path this tool did not make, so that no command can overwrite what is not its own.

    Refused: an empty path, the current folder or one above it, a symbolic link (never followed: a write would land
    wherever it points), anything that is not a regular file or folder (a device, FIFO or socket), a path under a
    file, an input of the command (or a folder holding one, or inside one) and, for a folder output (`file`
    false), an existing file or a folder whose manifest says another command made it (its `kind` not in `kinds`;
    `kinds` empty: any folder with a manifest). For a file output an existing folder is refused. Returns the path.
    """
    text = str(path)
    if not text.strip():
        raise ProbingError(f"{option}: is empty (give a {'file' if file else 'folder'} path)")
    path = Path(path)
    where = f"{option} {text}"
    resolved = path.resolve()
    if not file and (resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents):
        raise ProbingError(f"{where}: is the current folder or one above it (give a new folder)")
    try:
        status = path.lstat()
    except (FileNotFoundError, NotADirectoryError):  # absent, or under a file: the ancestor check below says which
        status = None
    except OSError as error:
        raise ProbingError(f"{where}: cannot be read ({error.strerror})") from None
    if status is not None:
        if stat.S_ISLNK(status.st_mode):
            raise ProbingError(f"{where}: is a symbolic link; the tool never writes through one (give a real path)")
        if not (stat.S_ISREG(status.st_mode) or stat.S_ISDIR(status.st_mode)):
            raise ProbingError(f"{where}: is not a regular file or folder (a device, FIFO or socket); not ours")
        if file and stat.S_ISDIR(status.st_mode):
            raise ProbingError(f"{where}: is a folder (give a file)")
        if not file and stat.S_ISREG(status.st_mode):
            raise ProbingError(f"{where}: an existing file, not a folder")
    else:
        ancestor = path.absolute().parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ProbingError(f"{where}: {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ProbingError(f"{where}: cannot write in {ancestor} (permission denied)")
    for given in inputs:
        source = Path(given).resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise ProbingError(f"{where}: is an input of this command ({given}) or holds one; give another path")
    if not file and status is not None:
        manifest = path / MANIFEST_NAME
        if manifest.is_file():
            try:
                made = json.loads(manifest.read_text(encoding="utf-8")).get("kind")
            except (OSError, ValueError, AttributeError):
                made = None  # a damaged manifest: the stage's own checks name what is wrong with it
            if not kinds or (made is not None and made not in kinds):
                shown_kind = f"a {made}" if isinstance(made, str) else "an output"
                raise ProbingError(f"{where}: holds {shown_kind} of another command (its {MANIFEST_NAME}); not ours")
    return path


@contextlib.contextmanager
def removed_when_refused(path: Path, remove: bool = True) -> Iterator[None]:
    """Delete `path` and the folders above it that the block created (or empty `path` again, when it was an empty
    folder), when the block raises a ProbingError: a refused command leaves nothing behind, so that the corrected
    command starts afresh. Other failures (an interruption, a full disk) keep it: what was written is whole and
    the next run resumes it. `remove` false (a process other than the main one): only the main process deletes."""
    path = Path(path).absolute()
    top = path
    while not top.parent.exists() and top.parent != top.parent.parent:
        top = top.parent
    created = not os.path.lexists(top)
    was_empty = path.is_dir() and not path.is_symlink() and not any(path.iterdir())  # made by hand for us
    try:
        yield
    except ClaimedElsewhere:
        raise  # another worker's folder: never ours to clean, even if it did not exist when this block began
    except ProbingError:
        if _finished_elsewhere(path):
            raise  # another worker finished a store here after this block began: it stays
        if was_empty and remove:
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        if created and remove:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            for folder in [path, *path.parents][: len(path.parts) - len(top.parts) + 1]:
                try:
                    folder.rmdir()  # only an empty one: another writer's files stay
                except OSError:
                    break
        raise


def _finished_elsewhere(path: Path) -> bool:
    """Does `path` hold a finished output (its manifest says complete)? A refused block never finished one, so such
    a folder is a concurrent worker's, made between this block's start and its refusal."""
    try:
        return json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8")).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def code_version() -> str:
    """The installed package version, recorded in every manifest."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("probing")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def file_key(path: Path) -> tuple[str, int, int]:
    """(resolved path, mtime in ns, size): changes whenever the file is rewritten; a cache key for reads."""
    path = Path(path).resolve()
    status = path.stat()
    return (str(path), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=64)
def _sha256_of(key: tuple[str, int, int]) -> str:
    digest = hashlib.sha256()
    with open(key[0], "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks; cached per (path, mtime, size) because the same
    annotation file is hashed once per split and per stage."""
    return _sha256_of(file_key(path))


def write_bytes(path: Path, data: bytes) -> None:
    """Write bytes through a temporary file, fsync and an atomic rename; the file gets the process's umask
    (`open` creates it 0666 & ~umask: readable by the group on a shared disk where the umask says so)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        _discard(temporary)  # a full disk or an interruption leaves no half-written file behind
        raise


def _discard(temporary: Path) -> None:
    with contextlib.suppress(OSError):
        temporary.unlink()


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors serialisation of `tensors`, made in memory so that its writer chooses how the bytes reach
    the disk: `safetensors.torch.save_file` creates its files 0600 whatever the umask, and a store is meant to be
    readable by the group on a shared disk. `safetensors.torch.save` is the same serialiser (the same bytes)."""
    from safetensors.torch import save

    return save({name: tensor.contiguous() for name, tensor in tensors.items()}, metadata=dict(metadata or {}))


def save_safetensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> str:
    """Write tensors as one safetensors file (atomically, with the umask's mode); returns the bytes' SHA-256."""
    data = safetensors_bytes(tensors, metadata)
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


_WRITE_CHUNK = 1 << 22  # bytes hashed then written at a time: still in the CPU's cache for the write


@functools.lru_cache(maxsize=64)
def _safetensors_layout(names_and_dtypes: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, str], ...]:
    """(name, dtype code) in the order safetensors writes tensors, asked of safetensors itself with empty tensors
    of the same names and dtypes: its order depends on those alone (dtype, then name), not on sizes."""
    import torch

    data = safetensors_bytes({name: torch.empty(0, dtype=dtype) for name, dtype in names_and_dtypes})
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return tuple((name, entry["dtype"]) for name, entry in header.items() if name != "__metadata__")


HEADER_REGION = "__header__"  # the name a safetensors file's header (its 8-byte length and JSON) is hashed under
# Bytes per element of each safetensors dtype code: a header's regions are checked against their shapes with it.
SAFETENSORS_ITEM_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100_000_000  # safetensors' own limit on a header's length


@dataclasses.dataclass(frozen=True)
class TensorRegion:
    """Where one tensor's bytes lie in a safetensors file: `start` and `end` count from the file's first byte."""

    dtype: str  # the safetensors code (F16, I64 ...)
    shape: tuple[int, ...]
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed safetensors header: `length` bytes (the 8-byte length and the JSON) come before the tensors."""

    length: int
    tensors: dict[str, TensorRegion]
    metadata: dict[str, str]

    @property
    def size(self) -> int:
        """The file's size in bytes, as the header declares it."""
        return max((region.end for region in self.tensors.values()), default=self.length)

    def regions(self) -> dict[str, tuple[int, int]]:
        """(start, end) of every region a digest is kept for: the header, then each tensor."""
        return {HEADER_REGION: (0, self.length), **{n: (r.start, r.end) for n, r in self.tensors.items()}}


def header_length(prefix: bytes) -> int:
    """The bytes of a safetensors header, from the file's first 8 (its JSON's length, little-endian) on."""
    if len(prefix) < 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > _MAX_HEADER:
        raise ValueError(f"declares a header of {length} bytes")
    return 8 + length


def parse_safetensors_header(data: bytes) -> SafetensorsHeader:
    """The header at the start of `data` (at least `header_length(data)` bytes), its tensors' byte regions checked:
    each region's size is its shape's, and the regions tile the data section from its start with no gap, so that
    the header's region and the tensors' regions together are the whole file. Parsed by hand because no safetensors
    API gives the byte offsets (`safe_open` reads tensors, never says where they lie), and a verified read must
    read each region itself. Raises ValueError when it does not parse."""
    length = header_length(data)
    if len(data) < length:
        raise ValueError("shorter than its header")
    parsed = json.loads(data[8:length])
    if not isinstance(parsed, dict):
        raise ValueError("header is not a JSON object")
    try:
        metadata = dict(parsed.pop("__metadata__", None) or {})
        tensors = dict(_tensor_regions(parsed, length))
    except (KeyError, TypeError, AttributeError) as error:  # a field missing or of the wrong type
        raise ValueError(f"header field {error} is damaged") from None
    return SafetensorsHeader(length, tensors, metadata)


def _tensor_regions(parsed: dict[str, Any], length: int) -> Iterator[tuple[str, TensorRegion]]:
    position = length
    for name, entry in sorted(parsed.items(), key=lambda item: list(item[1]["data_offsets"])):
        dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        count = 1
        for dimension in shape:
            if not isinstance(dimension, int) or dimension < 0:
                raise ValueError(f"tensor '{name}' has shape {list(shape)}")
            count *= dimension
        if start + length != position or end - start != count * SAFETENSORS_ITEM_SIZES[dtype]:
            raise ValueError(f"tensor '{name}' has byte offsets {[start, end]} that do not follow its shape")
        yield name, TensorRegion(dtype, shape, length + start, length + end)
        position = length + end


def region_digests(data: bytes | memoryview) -> dict[str, str]:
    """The BLAKE3 of the header and of each tensor's region of a whole safetensors file in memory."""
    import blake3

    data = memoryview(data)
    regions = parse_safetensors_header(bytes(data[: header_length(bytes(data[:8]))])).regions()
    return {name: blake3.blake3(data[start:end]).hexdigest() for name, (start, end) in regions.items()}


def _safetensors_parts(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> list[tuple[str, memoryview]]:
    """The bytes of `safetensors.torch.save(tensors, metadata)` as (name, bytes) pairs: the header (HEADER_REGION),
    then a view of each tensor's memory in the file's order, without copying the tensors into one buffer first
    (`save` does: one more pass over the shard, into freshly allocated memory). Written by hand because safetensors
    has no streaming writer from a process's own memory; the layout (the order and dtype codes come from
    safetensors, above) is the format's: an 8-byte little-endian header length, the JSON header padded with spaces
    to 8 bytes, then the tensors' bytes. `tests/test_store_growth.py` checks that the bytes equal `save`'s."""
    import torch

    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    layout = _safetensors_layout(tuple((name, tensors[name].dtype) for name in sorted(tensors)))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    parts, offset = [], 0
    for name, code in layout:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
        parts.append((name, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if size else memoryview(b"")))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return [(HEADER_REGION, memoryview(struct.pack("<Q", len(text)) + text)), *parts]


def write_safetensors(
    path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str], digest_beside: Path | None = None
) -> dict[str, str]:
    """Write `tensors` as one safetensors file (the bytes of `safetensors.torch.save`) and return the BLAKE3 of its
    header and of each tensor's bytes (`region_digests`), computed from the bytes in memory as they are written,
    never read back: through a temporary name, one fsync, a rename, the file with the umask's mode.
    `digest_beside`: a file that gets the digests as JSON before the rename (not fsynced: the caller decides what a
    lost one means)."""
    import blake3

    path = Path(path)
    if sys.byteorder != "little":  # the views below are the host's bytes; safetensors is little-endian
        data = safetensors_bytes(tensors, metadata)
        digests = region_digests(data)
        if digest_beside is not None:
            write_bytes(digest_beside, json.dumps(digests, sort_keys=True).encode())
        write_bytes(path, data)
        return digests
    temporary = path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")
    digests = {}
    try:
        with open(temporary, "wb") as handle:
            for name, part in _safetensors_parts(tensors, metadata):
                digest = blake3.blake3()
                for start in range(0, len(part), _WRITE_CHUNK):
                    chunk = part[start : start + _WRITE_CHUNK]
                    digest.update(chunk)  # blake3 and write both release the GIL on large buffers
                    handle.write(chunk)
                digests[name] = digest.hexdigest()
            handle.flush()
            os.fsync(handle.fileno())
        if digest_beside is not None:
            Path(digest_beside).write_text(json.dumps(digests, sort_keys=True), encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        _discard(temporary)  # a full disk or an interruption leaves no half-written file behind
        raise
    return digests


def match_umask(folder: Path) -> None:
    """Give the files under `folder` that a library created 0600 (safetensors does) the umask's mode."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and an atomic rename: readers see the old file or the new one."""
    path = Path(path)
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"  # serialise first: a bad value writes nothing
    temporary = path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        _discard(temporary)
        raise


def relabel_json(path: Path, label: str | None) -> None:
    """Give a finished output the report label `label` (the `label` key of its JSON file, rewritten atomically)
    when one is given and differs. A label is how reports name the model, not part of what was computed, so an
    output reused under a new label (a feature store's manifest, a run's metrics) takes it instead of being
    computed again; no label given keeps the stored one."""
    if label is None:
        return
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    if payload.get("label") != label:
        write_json(path, payload | {"label": label})


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a finished output directory, or None where there is none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ProbingError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None


def json_normalised(payload: Any) -> Any:
    """`payload` as it reads back from JSON (tuples become lists ...), so that a fresh request compares equal
    to the manifest it was saved as."""
    return json.loads(json.dumps(payload))


def first_difference(expected: Mapping[str, Any], found: Mapping[str, Any], prefix: str = "") -> str | None:
    """The dotted name of the first field whose value differs, or None when all agree.

    Fields are visited in the order `expected` lists them (identities put the telling fields first, e.g.
    the model's init before its config hash), then fields only `found` has.
    """
    for key in [*expected, *(key for key in found if key not in expected)]:
        name = f"{prefix}{key}"
        if key not in found or key not in expected:
            return name
        left, right = expected[key], found[key]
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            inner = first_difference(left, right, prefix=f"{name}.")
            if inner is not None:
                return inner
        elif left != right:
            return name
    return None


def existing_output_matches(directory: Path, identity: Mapping[str, Any], what: str) -> bool:
    """True when `directory` already holds a finished output made for the same request.

    `identity` holds the manifest fields that define the request (inputs' hashes, seed, version ...).
    Absent or empty directory: False (build it). A finished output for another request: ProbingError naming
    the first differing field, because silently overwriting or mixing results is worse than stopping.
    A non-empty directory without a manifest is refused too: it is not ours to overwrite.
    """
    directory = Path(directory)
    if not directory.exists():
        return False
    if not directory.is_dir():
        raise ProbingError(f"{directory}: exists and is not a directory")
    manifest = read_manifest(directory)
    if manifest is None:
        if any(directory.iterdir()):
            raise ProbingError(f"{directory}: not empty and has no {MANIFEST_NAME}; choose another output directory")
        return False
    found = {key: manifest.get(key) for key in identity}
    differing = first_difference(json_normalised(dict(identity)), found)
    if differing is None:
        return True
    raise ProbingError(
        f"{directory}: holds a {what} made with a different '{differing}'; choose another output directory or remove it"
    )


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_stale_partials(folder: Path, pattern: str) -> None:
    """Delete the temporary files or folders matching `pattern` in `folder` whose writer (the pid after
    PARTIAL_MARK) is gone: left by killed runs. Those of live processes, this one included, are kept."""
    for leftover in Path(folder).glob(pattern):
        suffix = leftover.name.rsplit(PARTIAL_MARK, 1)[-1]
        if PARTIAL_MARK not in leftover.name or not suffix.isdigit() or pid_alive(int(suffix)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of `target`; on success rename it to `target`, on failure delete it.

    The caller writes everything, manifest last, into the yielded directory. `target` must be absent or an
    empty directory (checked by `existing_output_matches` before any work is done).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_partials(target.parent, f".{target.name}{PARTIAL_MARK}*")
    staging = target.with_name(f".{target.name}{PARTIAL_MARK}{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        try:
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            os.replace(staging, target)
        except OSError:
            # Another process finished the same output between our check and now: its result is whole, ours
            # is dropped (we cannot tell here whether it answers the same request; a rerun checks that).
            if target.is_dir() and any(target.iterdir()):
                raise ProbingError(f"{target}: written by another process meanwhile; run again to reuse it") from None
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
