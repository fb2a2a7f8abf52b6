"""Claims on output folders shared by several workers (processes, GPUs, machines on one shared file system).

A `FolderLock` is a file created next to the folder with `O_CREAT | O_EXCL` (atomic on local file systems and
NFSv3+), holding who took it; its modification time is its heartbeat, refreshed by a thread while the claim
is held. A claim whose heartbeat stopped for `grace` intervals, or whose process is gone from this machine, is
taken over: renamed aside (one worker wins the rename) and created again. Written by hand because the kept
locking libraries (filelock, fcntl) hold a lock only while a file descriptor lives on one machine and know
nothing of a worker that died on another machine of the cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from probing.core.artifacts import first_difference, json_normalised, pid_alive
from probing.core.errors import ClaimedElsewhere

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"


class FolderLock:
    """An exclusive claim on `folder` (the file `<folder>.lock`), kept alive by a heartbeat."""

    def __init__(self, folder: Path, heartbeat: float = 10.0, grace: int = 4, request: Mapping | None = None):
        """`request`: what the holder writes (a store's or run's identity), recorded in the claim so that a
        worker with another request is refused at once instead of waiting for a folder it cannot use."""
        self.folder = Path(folder)
        self.request = json_normalised(dict(request)) if request is not None else None
        self.path = self.folder.with_name(self.folder.name + LOCK_SUFFIX)
        self.heartbeat, self.grace = heartbeat, grace
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._thread is not None

    def owner(self) -> dict | None:
        """Who holds the claim (host, pid, token), or None when nobody does."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return {}  # being written right now: taken

    def stale(self) -> bool:
        """The holder stopped beating (or its process is gone from this machine)."""
        try:
            beaten = self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        owner = self.owner() or {}
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            if not pid_alive(owner["pid"]):
                return True
        interval = owner.get("heartbeat", self.heartbeat)
        return time.time() - beaten > self.grace * float(interval)

    def try_acquire(self) -> bool:
        """Take the claim if it is free or stale; True when this worker holds it."""
        if self.held:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self.stale():
                    return False
                aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
                with contextlib.suppress(FileNotFoundError):  # another worker took it over first
                    os.rename(self.path, aside)
                    log.warning("%s: the worker holding it stopped; taking over", self.folder)
                    aside.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(
                    {
                        "host": socket.gethostname(),
                        "pid": os.getpid(),
                        "token": self.token,
                        "heartbeat": self.heartbeat,
                        "since": time.time(),
                        **({"request": self.request} if self.request is not None else {}),
                    },
                    handle,
                )
                handle.flush()
                os.fsync(handle.fileno())
            self._start()
            return True
        return False

    def acquire(self, poll: float = 1.0, timeout: float | None = None) -> bool:
        """Wait until the claim is ours (True), or until `timeout` seconds have passed (False)."""
        started = time.monotonic()
        while not self.try_acquire():
            if timeout is not None and time.monotonic() - started > timeout:
                return False
            time.sleep(poll)
        return True

    def _start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat {self.path.name}")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            owner = self.owner()
            if owner is not None and owner != {} and owner.get("token") != self.token:
                log.warning("%s: the claim was taken over by another worker", self.folder)
                return
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        owner = self.owner()
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def one_writer(folder: Path, heartbeat: float = 10.0) -> Iterator[FolderLock]:
    """Hold the claim on `folder` for a block (waiting for another worker's claim to end or go stale)."""
    lock = FolderLock(folder, heartbeat)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def claim(folder: Path, request: Mapping, what: str, heartbeat: float = 10.0, poll: float = 1.0) -> FolderLock:
    """The claim on `folder` for `request` (release it when done). Another worker's claim for the same request
    is waited for (the caller then finds its finished output and reuses it); one for a different request is a
    ProbingError naming the first differing field, at once: the two could never share the folder."""
    lock = FolderLock(folder, heartbeat, request=request)
    waiting = False
    while not lock.try_acquire():
        owner = lock.owner() or {}
        theirs = owner.get("request")
        if isinstance(theirs, Mapping):
            differing = first_difference(lock.request, theirs)
            if differing is not None:
                raise ClaimedElsewhere(
                    f"{folder}: another worker (host {owner.get('host')}, pid {owner.get('pid')}) is writing a "
                    f"{what} there with a different '{differing}'; choose another output folder"
                )
        if not waiting:
            log.info("%s: another worker is writing this %s; waiting", folder, what)
            waiting = True
        time.sleep(poll)
    return lock
