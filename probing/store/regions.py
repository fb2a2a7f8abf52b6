"""Reading a feature store's safetensors files region by region, each region's BLAKE3 checked as it is read.

A store written since BLAKE3 records, per file, the digest of its header (the 8-byte length and the JSON,
`HEADER_REGION`) and of each tensor's bytes. Opening a store checks the headers only (small); `read_tensor` reads a
tensor's bytes once, with `readinto`, straight into the caller's result (or into a staging buffer when the result's
dtype, device or the host's byte order differ from the file's), and hashes the very bytes it read: while the
reading thread reads chunk k+1, a hashing thread hashes chunk k (blake3 and `readinto` release the GIL). A region's
chunks are hashed in order (a BLAKE3 state is sequential) by whichever thread holds its lock: a hashing thread, or
the reader when the threads fall behind and once it has read everything. `check` then compares every digest with
the manifest before the caller returns anything. A region verified in this process is remembered (`_VERIFIED`)
while its file is unchanged, and not hashed again. `--no-verify` reads the same way without hashing.

Why BLAKE3 rather than SHA-256 (which stores written before it record, over the whole file, and which are verified
as before): on the 2-core machine of docs/performance.md SHA-256 hashes 1.1 GB/s a core and a page-cached read runs
at about 6 GB/s, so no overlap could hide it; BLAKE3 hashes 5.5 GB/s on one thread (AVX-512) and is cryptographic,
like SHA-256, with a command-line tool (`b3sum`) to check a region by hand. Per-region digests rather than one per
file, so that loading one layer reads and checks only that layer's bytes.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import torch

from probing.core.artifacts import (
    HEADER_REGION,
    SafetensorsHeader,
    TensorRegion,
    header_length,
    parse_safetensors_header,
)
from probing.core.errors import ProbingError

# Bytes read, then handed to the hashing thread, at a time: measured on two cores, 1 MB gave a verified load 1.3x
# the unverified one, 512 kB and 4 MB up to 1.5x (a 4 MB chunk is no longer in the CPU's cache when hashed).
CHUNK = 1 << 20
LAG = 2  # chunks read but not hashed yet past which the reader hashes its latest chunk itself, still in its cache

DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}

FileState = tuple[int, int, int, int, int]

# What this process has verified: (file state, region, BLAKE3) for a region of a store written since BLAKE3,
# (file state, "", SHA-256) for a whole file of an older store. A file state is (device, inode, size, mtime,
# ctime): a file rewritten since is hashed again; one renamed keeps its bytes, and its state. A layer sweep opens a
# store once per layer and hashes each region once.
_VERIFIED: set[tuple[FileState, str, str]] = set()
WHOLE_FILE = ""


def forget_verified() -> None:
    """Forget what this process has verified and the headers it has read: as a fresh process (benchmarks)."""
    _VERIFIED.clear()
    _HEADERS.clear()


def file_state(path: Path | int) -> FileState:
    """The state of a file (a path, or an open file's descriptor: no second lookup), as `_VERIFIED` keys it."""
    status = os.stat(path)
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def hash_threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


def damaged(path: Path, reason: str) -> ProbingError:
    return ProbingError(f"{path}: shard damaged ({reason}); rerun the same `probing extract` to recompute it")


def stored_dtype(path: Path, name: str, region: TensorRegion) -> torch.dtype:
    """The torch dtype of a tensor's bytes in a file."""
    stored = DTYPES.get(region.dtype)
    if stored is None:
        raise ProbingError(f"{path}: tensor '{name}' has dtype {region.dtype}, which a feature store never holds")
    return stored


def read_header(path: Path) -> tuple[SafetensorsHeader, bytes, FileState]:
    """A file's parsed header, its bytes (to hash) and the file's state (its size third); a ProbingError naming the
    file when it does not parse."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(8)
            data += handle.read(header_length(data) - 8)
            state = file_state(handle.fileno())
        return parse_safetensors_header(data), data, state
    except (ValueError, UnicodeDecodeError) as error:
        raise damaged(path, f"its header does not parse: {error}") from None


# Headers read in this process, by path: (file state, header, the header's BLAKE3). A layer sweep loads each file
# once per layer; a header read again costs more than a layer's share of the hashing (opening, parsing its JSON).
_HEADERS: dict[str, tuple[FileState, SafetensorsHeader, str]] = {}


def known_header(path: Path) -> tuple[SafetensorsHeader, str, int]:
    """A file's header, its BLAKE3 and the file's size, read again only when the file changed (its state)."""
    known = _HEADERS.get(str(path))
    if known is None or known[0] != file_state(path):
        header, data, state = read_header(path)
        if len(_HEADERS) > 65536:  # a long-lived process that opened very many stores: start afresh
            _HEADERS.clear()
        known = _HEADERS[str(path)] = (state, header, blake3.blake3(data).hexdigest())
    return known[1], known[2], known[0][2]


def checked_header(path: Path, recorded: Mapping[str, str]) -> SafetensorsHeader:
    """The header of a file whose regions' BLAKE3 the manifest records (`recorded`), checked cheaply: its digest,
    the tensors it lists (those the manifest has digests for) and the file's size (the header's); the tensors'
    bytes are checked as they are read."""
    header, digest, size = known_header(path)
    if digest != recorded.get(HEADER_REGION) or set(header.regions()) != set(recorded):
        raise damaged(path, "its BLAKE3 differs from the manifest's")
    if size != header.size:
        raise damaged(path, f"it holds {size} bytes, its header declares {header.size}")
    return header


def file_digests(path: Path) -> dict[str, str] | None:
    """The BLAKE3 of a file's header and of each of its tensors' regions, the file read once in chunks into one
    reused buffer; None when its header does not parse or its size is not the header's (the full check of a
    store: resuming or reusing one in `probing extract`)."""
    try:
        header, data, state = read_header(path)
    except ProbingError:
        return None
    if state[2] != header.size:
        return None
    digests = {HEADER_REGION: blake3.blake3(data).hexdigest()}
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(header.length)
        for name, region in sorted(header.tensors.items(), key=lambda item: item[1].start):
            digest, left = blake3.blake3(), region.end - region.start
            while left:
                read = handle.readinto(view[: min(CHUNK, left)])
                if not read:
                    return None  # shortened while being read
                digest.update(view[:read])
                left -= read
            digests[name] = digest.hexdigest()
    return digests


_POOL: ThreadPoolExecutor | None = None
_POOL_PID = 0


def _hashing_pool() -> ThreadPoolExecutor:
    """One hashing thread per core but the reader's (at least one, at most 7), kept for the process: starting
    threads for each load costs more than a layer's hashing on a busy machine. Made again in a forked child
    (threads do not survive a fork). On two cores a second hashing thread made a verified load slower (1.6x the
    unverified one against 1.3x): three busy threads on two cores."""
    global _POOL, _POOL_PID
    if _POOL is None or _POOL_PID != os.getpid():
        _POOL = ThreadPoolExecutor(max_workers=max(1, hash_threads() - 1), thread_name_prefix="blake3")
        _POOL_PID = os.getpid()
    return _POOL


class _Hashing:
    """One region's BLAKE3, fed chunk by chunk as they are read: the chunks are hashed in order (a BLAKE3 state is
    sequential) by whichever thread holds the lock, a hashing thread or the reader, which helps once it has read
    everything instead of waiting (on a busy machine a hashing thread may wait long for a core)."""

    def __init__(self, path: Path, name: str, state: FileState, expected: str):
        self.path, self.name, self.state, self.expected = path, name, state, expected
        self.digest = blake3.blake3()
        self.chunks: deque[memoryview] = deque()
        self.lock = threading.Lock()

    def drain(self, wait: bool = False) -> None:
        """Hash the chunks queued. `wait` true: return when all are hashed, a chunk another thread is hashing
        included (it holds the lock until it is done); false: return at once when another thread holds the lock
        (that thread also takes the chunks queued meanwhile: after letting go it looks again)."""
        while True:
            if not self.lock.acquire(blocking=wait):
                return
            try:
                while self.chunks:
                    self.digest.update(self.chunks.popleft())  # releases the GIL
            finally:
                self.lock.release()
            if not self.chunks:
                return


class RegionReader:
    """Reads tensors' regions into memory, hashing what it reads in threads when given the digests to expect.

    Use as a context manager; `check()` before using what was read. Each chunk read is queued on its region's
    `_Hashing` and a hashing thread asked to drain it, while the reader reads the next chunk."""

    def __init__(self) -> None:
        self._pending: list[_Hashing] = []

    def __enter__(self) -> RegionReader:
        return self

    def __exit__(self, *_) -> None:
        for hashing in self._pending:  # after an error: nothing left to hash (a chunk being hashed finishes)
            hashing.chunks.clear()

    def read_tensor(self, path: Path, name: str, region: TensorRegion, target: torch.Tensor, expected: str | None):
        """Read tensor `name` (its `region` of file `path`) into `target` (a contiguous tensor of its shape, any dtype
        or device), hashing the bytes read when `expected` (its BLAKE3 from the manifest) is given."""
        stored = stored_dtype(path, name, region)
        direct = target.device.type == "cpu" and target.dtype == stored and sys.byteorder == "little"
        buffer = target if direct else torch.empty(region.end - region.start, dtype=torch.uint8)
        self._read(path, name, region, memoryview(buffer.reshape(-1).view(torch.uint8).numpy()), expected)
        if not direct:
            if sys.byteorder != "little" and stored.itemsize > 1:  # safetensors' bytes are little-endian
                buffer = buffer.view(-1, stored.itemsize).flip(1).contiguous()
            target.copy_(buffer.view(stored).reshape(region.shape))

    def _read(self, path: Path, name: str, region: TensorRegion, view: memoryview, expected: str | None) -> None:
        with open(path, "rb", buffering=0) as handle:
            hashing = None
            if expected is not None:
                state = file_state(handle.fileno())  # before reading: a later change is seen by the next load
                if (state, name, expected) not in _VERIFIED:
                    hashing = _Hashing(path, name, state, expected)
                    self._pending.append(hashing)
            handle.seek(region.start)
            position = 0
            while position < len(view):
                read = handle.readinto(view[position : position + CHUNK])
                if not read:
                    raise damaged(path, "it is shorter than its header declares")
                if hashing is not None:
                    hashing.chunks.append(view[position : position + read])
                    if sum(len(queued.chunks) for queued in self._pending) > LAG:
                        hashing.drain()  # the hashing threads are behind: hash here (balances the two cores)
                    else:
                        _hashing_pool().submit(hashing.drain)
                position += read

    def check(self) -> None:
        """Hash what the threads have not (the latest regions first: the threads work from the earliest), then
        compare every digest with the manifest's: a ProbingError naming the first file that differs. The regions
        that match are remembered as verified."""
        pending, self._pending = self._pending, []
        for hashing in reversed(pending):
            hashing.drain(wait=False)
        for hashing in pending:
            hashing.drain(wait=True)
            if hashing.digest.hexdigest() != hashing.expected:
                raise damaged(hashing.path, "its BLAKE3 differs from the manifest's")
            _VERIFIED.add((hashing.state, hashing.name, hashing.expected))
