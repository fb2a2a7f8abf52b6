"""Optuna studies that survive: opening a storage, repairing a torn journal, and refusing a study that belongs
to another search.

- A search keeps its study in its own folder by default (`<search>/study.log`, Optuna's journal file storage,
  safe on a shared file system), so a killed search resumes with its finished trials; `--storage` points
  elsewhere: `journal:PATH`, `sqlite:///file.db`, `postgresql://user:pass@host/db` (the `[postgres]` extra
  installs the psycopg driver that SQLAlchemy picks for that URL).
- Workers started together on a fresh database race to create Optuna's tables: opening retries with backoff.
- A journal whose last line was cut (a full disk, a killed writer) would join that half line to the next
  record and make the study unreadable for good: the tail is repaired under the journal's own lock before
  anything is appended, and only the partial, never-acknowledged record is dropped.
- The study records what its trials train (task, mode, layer, probe, space, settings, inputs); a search that
  differs is refused, naming the field, instead of reading another search's trials as its own.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from probing.core.artifacts import first_difference, json_normalised
from probing.core.errors import ProbingError

log = logging.getLogger(__name__)

IDENTITY_ATTRIBUTE = "probing_identity"
OPEN_ATTEMPTS = 8  # about 25 s of backoff in all: Optuna's table creation takes well under a second


def redact(url: str) -> str:
    """A storage URL without its password, for manifests and messages."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':')[0]}:***@{host}"
    return url


def journal_path(url: str) -> Path | None:
    return Path(url.removeprefix("journal:").removeprefix("//")) if url.startswith("journal:") else None


def open_storage(url: str, option: str = "--storage"):
    """An Optuna storage for `url`; every failure is one line naming the option and the URL (password masked)."""
    journal = journal_path(url)
    if journal is not None:
        return _journal_storage(journal, f"{option} {url}")
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        return _rdb_storage(url, option)
    raise ProbingError(f"{option}: '{redact(url)}' is not sqlite:///..., postgresql://... or journal:PATH")


def _journal_storage(path: Path, where: str):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ProbingError(f"{where}: cannot create {path.parent} ({error.strerror})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ProbingError(f"{where}: {path.parent if not path.exists() else path} is not writable")
    if path.is_dir():
        raise ProbingError(f"{where}: {path} is a directory, not a journal file")
    try:
        backend = JournalFileBackend(str(path))
    except OSError as error:
        raise ProbingError(f"{where}: cannot open {path} ({error.strerror})") from None
    repair_journal(path, backend)
    return JournalStorage(backend)


def repair_journal(path: Path, backend=None) -> int:
    """Drop the torn records of a journal (a last line without its end, or a half line that a later append
    joined to a whole one, whose whole record is kept); returns how many were dropped. Done under the journal's
    lock, so no worker appends meanwhile."""
    from optuna.storages.journal import JournalFileSymlinkLock
    from optuna.storages.journal._file import get_lock_file

    if not path.exists() or path.stat().st_size == 0:
        return 0
    lock = getattr(backend, "_lock", None) or JournalFileSymlinkLock(str(path))
    with get_lock_file(lock):
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with its line separator
        kept, dropped = [], 1 if tail else 0
        for line in lines:
            record = _whole_record(line)
            if record is None:
                dropped += 1
                continue
            if record is not line:
                dropped += 1  # the torn head of the line is dropped, the record after it kept
            kept.append(record)
        if not dropped:
            return 0
        repaired = b"".join(record + b"\n" for record in kept)
        temporary = path.with_name(f".{path.name}.repair-{os.getpid()}")
        with open(temporary, "wb") as handle:
            handle.write(repaired)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    log.warning(
        "%s: dropped %d torn journal record(s) (cut by a full disk or a killed writer); the finished trials are kept",
        path,
        dropped,
    )
    return dropped


def _whole_record(line: bytes) -> bytes | None:
    """The line, or the whole JSON record that ends it after a torn head, or None."""
    try:
        json.loads(line)
        return line
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    start = line.rfind(b'{"op_code"')
    while start > 0:
        try:
            json.loads(line[start:])
            return line[start:]
        except (json.JSONDecodeError, UnicodeDecodeError):
            start = line.rfind(b'{"op_code"', 0, start)
    return None


def _rdb_storage(url: str, option: str):
    import optuna
    import sqlalchemy

    where = f"{option} {redact(url)}"
    try:
        sqlalchemy.engine.make_url(url).get_dialect().import_dbapi()
    except sqlalchemy.exc.ArgumentError as error:
        raise ProbingError(f"{where}: not a database URL ({error})") from None
    except ImportError as error:
        extra = " (pip install -e '.[postgres]')" if url.startswith("postgresql") else ""
        raise ProbingError(f"{where}: the database driver '{error.name}' is not installed{extra}") from None
    engine = sqlalchemy.create_engine(url)
    try:  # a server that cannot be reached is said at once, not after the backoff below
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as error:
        detail = str(getattr(error, "orig", error)).strip().splitlines()[0] if str(error) else type(error).__name__
        raise ProbingError(f"{where}: cannot connect ({detail})") from None
    finally:
        engine.dispose()
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url)
        except (
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.ProgrammingError,
            optuna.exceptions.StorageInternalError,
        ) as error:
            # another worker is creating the tables right now
            if attempt == OPEN_ATTEMPTS - 1:
                raise ProbingError(f"{where}: cannot open the study tables ({type(error).__name__})") from None
            time.sleep(min(8.0, 0.25 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")  # pragma: no cover


def load_or_create_study(storage, study_name: str, direction: str, sampler, pruner):
    """The study named `study_name`, created when absent (workers may create it at the same moment)."""
    import optuna

    for attempt in range(OPEN_ATTEMPTS):
        try:
            return optuna.create_study(
                storage=storage,
                sampler=sampler,
                pruner=pruner,
                direction=direction,
                study_name=study_name,
                load_if_exists=True,
            )
        except optuna.exceptions.DuplicatedStudyError:
            continue  # created by another worker between the look and the insert: load it
        except Exception as error:
            import sqlalchemy

            if not isinstance(error, sqlalchemy.exc.SQLAlchemyError) or attempt == OPEN_ATTEMPTS - 1:
                raise
            time.sleep(min(8.0, 0.25 * 2**attempt) * (0.5 + random.random()))
    raise ProbingError(f"study '{study_name}': cannot be created or loaded")


def claim_study(study, identity: dict[str, Any], where: str) -> None:
    """Record what the study's trials train, or refuse a search that differs from what it recorded."""
    expected = json_normalised(identity)
    recorded = study.user_attrs.get(IDENTITY_ATTRIBUTE)
    if recorded is None:
        study.set_user_attr(IDENTITY_ATTRIBUTE, expected)
        return
    differing = first_difference(expected, recorded)
    if differing is not None:
        raise ProbingError(
            f"{where}: study '{study.study_name}' belongs to a search with a different "
            f"'{differing}'; choose another --study-name or output folder"
        )


def gather_studies(paths: list[Path], storages: list[str] = ()):
    """Every study under `paths` (each search folder's `study.log`) and in `storages`, copied into one in-memory
    storage, named after their folders: what `probing dashboard` serves. A snapshot: run it again to refresh."""
    import optuna

    gathered = optuna.storages.InMemoryStorage()
    sources: list[tuple[str, Any, str]] = []
    for root in map(Path, paths):
        if not root.exists():
            raise ProbingError(f"{root}: not found")
        journals = [root] if root.is_file() else sorted(root.rglob("study.log"))
        for journal in journals:
            if any(part.startswith(".") for part in journal.relative_to(root).parts):
                continue  # a half-written output
            label = str(journal.parent.relative_to(root)) if journal.parent != root else journal.parent.name
            storage = _journal_storage(journal, "dashboard")
            studies = optuna.get_all_study_summaries(storage, include_best_trial=False)
            # a search folder's journal holds its one study: named after the folder, as its runs are
            sources += [
                (f"{label}/{s.study_name}" if len(studies) > 1 else label, storage, s.study_name) for s in studies
            ]
    for url in storages:
        storage = open_storage(url)
        sources += [
            (s.study_name, storage, s.study_name)
            for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        ]
    if not sources:
        raise ProbingError(f"no study under {', '.join(map(str, paths))}")
    for name, storage, study_name in sources:
        optuna.copy_study(from_study_name=study_name, from_storage=storage, to_storage=gathered, to_study_name=name)
    return gathered
