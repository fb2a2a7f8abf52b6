"""The annotation database: one SQLite file holding the study (its identity and items), the annotators with
their sequences, and the answers.

Nothing is lost: the file is in WAL mode with `synchronous=FULL`, every answer is its own transaction,
committed before the page is told it was stored, and `UNIQUE(annotator, item)` makes a second answer to the
same item (a second browser tab, a double click, a retried request) a no-op that is reported, never counted.
Killing the server therefore loses at most an answer whose request had not yet committed, and the page,
never told it was stored, still shows that item.

A restarted server opens the same file: the study's identity must match (else the file is refused, naming
the differing field), and annotators resume at their first unanswered item. SQLite, not a hand-written
journal: it gives atomic commits, uniqueness and concurrent readers for free.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from probing.baselines.annotate.study import Study, sequence_of
from probing.core.artifacts import first_difference, json_normalised
from probing.core.errors import ProbingError

SCHEMA = """
CREATE TABLE study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    item INTEGER PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('intro', 'shared', 'own')),
    slot INTEGER,
    example_id INTEGER NOT NULL,
    label INTEGER NOT NULL CHECK (label IN (0, 1)),
    category TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    image TEXT NOT NULL
);
CREATE TABLE annotators (annotator INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, joined TEXT NOT NULL);
CREATE TABLE sequence (
    annotator INTEGER NOT NULL REFERENCES annotators (annotator),
    position INTEGER NOT NULL,
    item INTEGER NOT NULL REFERENCES items (item),
    PRIMARY KEY (annotator, position),
    UNIQUE (annotator, item)
);
CREATE TABLE answers (
    annotator INTEGER NOT NULL REFERENCES annotators (annotator),
    item INTEGER NOT NULL REFERENCES items (item),
    answer INTEGER NOT NULL CHECK (answer IN (0, 1)),
    cells TEXT NOT NULL,
    incorrect INTEGER NOT NULL CHECK (incorrect IN (0, 1)),
    seconds REAL,
    answered TEXT NOT NULL,
    UNIQUE (annotator, item)
);
"""


class UnknownAnnotator(LookupError):
    """No annotator of that name has started."""


class NotAssigned(LookupError):
    """The item is not in that annotator's sequence (or not in the study)."""


class NotNext(ValueError):
    """The item is this annotator's, unanswered, but not the next in their sequence."""


class StudyFull(RuntimeError):
    """Every annotator place of the study is taken."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class AnnotationStore:
    """One study's database. Each call opens its own connection, so the server's worker threads never share
    one; SQLite serialises the writers (`BEGIN IMMEDIATE`)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # ------------------------------------------------------------------ opening

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            connection.execute("PRAGMA synchronous = FULL")  # a committed answer survives a power cut too
            connection.execute("PRAGMA foreign_keys = ON")
            yield connection
        except sqlite3.DatabaseError as error:
            if "not a database" in str(error) or "no such table" in str(error):
                raise ProbingError(f"--db {self.path}: not an annotation database ({error})") from None
            raise
        finally:
            connection.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    @classmethod
    def open(cls, path: Path) -> AnnotationStore:
        """An existing study's database (for scoring and export)."""
        store = cls(path)
        if not store.path.is_file():
            raise ProbingError(f"--db {path}: not found")
        store.value("identity")  # refuses a file that is not ours
        return store

    @classmethod
    def create_or_resume(cls, path: Path, study: Study) -> AnnotationStore:
        """The study's database: created with its items, or reopened when it holds the same study (its image
        paths refreshed, so the data may have moved); another study's database is refused."""
        store = cls(path)
        if store.path.exists() and store.path.stat().st_size and store._tables():
            store._resume(study)
            return store
        store.path.parent.mkdir(parents=True, exist_ok=True)
        with store._connection() as connection:
            connection.execute("PRAGMA journal_mode = WAL")  # readers never block the writer; kept in the file
        with store._transaction() as connection:
            for statement in SCHEMA.split(";"):  # one by one: executescript would commit the transaction
                if statement.strip():
                    connection.execute(statement)
            connection.executemany(
                "INSERT INTO study (key, value) VALUES (?, ?)",
                [("identity", json.dumps(study.identity)), ("description", json.dumps(study.description))],
            )
            connection.executemany(
                "INSERT INTO items (item, role, slot, example_id, label, category, text, metadata, image) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        item.item,
                        item.role,
                        item.slot,
                        item.example.example_id,
                        item.example.label,
                        item.example.category,
                        item.example.text,
                        json.dumps(dict(item.example.metadata)),
                        str(Path(item.example.image_path).resolve()),
                    )
                    for item in study.items
                ],
            )
        return store

    def _resume(self, study: Study) -> None:
        try:
            stored = self.value("identity")
        except ProbingError:
            raise ProbingError(f"--db {self.path}: exists and is not an annotation database") from None
        differing = first_difference(json_normalised(study.identity), stored)
        if differing is not None:
            raise ProbingError(
                f"--db {self.path}: holds a study made with a different '{differing}' "
                f"({stored.get(differing)!r}); give the same options or another --db"
            )
        with self._transaction() as connection:
            rows = connection.execute("SELECT item, role, slot, example_id, label FROM items ORDER BY item").fetchall()
            expected = [(i.item, i.role, i.slot, i.example.example_id, i.example.label) for i in study.items]
            if [tuple(row) for row in rows] != expected:
                raise ProbingError(
                    f"--db {self.path}: its items were drawn differently from this study's; use another --db"
                )
            connection.executemany(
                "UPDATE items SET image = ? WHERE item = ?",
                [(str(Path(i.example.image_path).resolve()), i.item) for i in study.items],
            )

    def _tables(self) -> list[str]:
        with self._connection() as connection:
            return [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]

    def value(self, key: str) -> Any:
        """A value of the study table (identity, description)."""
        with self._connection() as connection:
            row = connection.execute("SELECT value FROM study WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise ProbingError(f"--db {self.path}: not an annotation database (no study {key})")
        return json.loads(row[0])

    # ------------------------------------------------------------------ annotators and answers

    def register(self, name: str) -> int:
        """The annotator number of `name`, registering a new annotator with their sequence."""
        identity = self.value("identity")
        with self._transaction() as connection:
            row = connection.execute("SELECT annotator FROM annotators WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return row[0]
            annotator = connection.execute("SELECT COUNT(*) FROM annotators").fetchone()[0]
            if identity.get("annotators") is not None and annotator >= identity["annotators"]:
                raise StudyFull(f"all {identity['annotators']} annotator places of this study are taken")
            roles = connection.execute("SELECT item, role, slot FROM items ORDER BY item").fetchall()
            connection.execute(
                "INSERT INTO annotators (annotator, name, joined) VALUES (?, ?, ?)", (annotator, name, _now())
            )
            connection.executemany(
                "INSERT INTO sequence (annotator, position, item) VALUES (?, ?, ?)",
                [
                    (annotator, position, item)
                    for position, item in enumerate(sequence_of(roles, annotator, identity["seed"]))
                ],
            )
        return annotator

    def annotator(self, name: str) -> int:
        with self._connection() as connection:
            row = connection.execute("SELECT annotator FROM annotators WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownAnnotator(f"no annotator '{name}' has started")
        return row[0]

    def progress(self, annotator: int) -> dict[str, Any]:
        """Where an annotator stands: answered and total counts, practice count, the next item (or None)."""
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT s.item, i.role, a.item IS NOT NULL FROM sequence s JOIN items i ON i.item = s.item "
                "LEFT JOIN answers a ON a.annotator = s.annotator AND a.item = s.item "
                "WHERE s.annotator = ? ORDER BY s.position",
                (annotator,),
            ).fetchall()
        upcoming = next((item for item, _, done in rows if not done), None)
        return {
            "answered": sum(done for _, _, done in rows),
            "total": len(rows),
            "practice": sum(role == "intro" for _, role, _ in rows),
            "next": upcoming,
        }

    def item(self, item: int) -> dict[str, Any] | None:
        """One item's stored row, or None."""
        with self._connection() as connection:
            connection.row_factory = sqlite3.Row
            row = connection.execute("SELECT * FROM items WHERE item = ?", (item,)).fetchone()
        if row is None:
            return None
        return {**dict(row), "metadata": json.loads(row["metadata"])}

    def record(
        self, annotator: int, item: int, answer: bool, cells: list[int], incorrect: bool, seconds: float | None
    ) -> bool:
        """Store one answer in its own transaction; False when this annotator had already answered the item.
        Answers come in sequence order (the order is part of the design), so only the next item is taken."""
        with self._transaction() as connection:
            assigned = connection.execute(
                "SELECT 1 FROM sequence WHERE annotator = ? AND item = ?", (annotator, item)
            ).fetchone()
            if assigned is None:
                raise NotAssigned(f"item {item} is not in this annotator's list")
            upcoming = connection.execute(
                "SELECT s.item FROM sequence s LEFT JOIN answers a ON a.annotator = s.annotator AND a.item = s.item "
                "WHERE s.annotator = ? AND a.item IS NULL ORDER BY s.position LIMIT 1",
                (annotator,),
            ).fetchone()
            answered = connection.execute(
                "SELECT 1 FROM answers WHERE annotator = ? AND item = ?", (annotator, item)
            ).fetchone()
            if answered is None and (upcoming is None or upcoming[0] != item):
                raise NotNext(f"item {item} is not this annotator's next item")
            cursor = connection.execute(
                "INSERT INTO answers (annotator, item, answer, cells, incorrect, seconds, answered) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (annotator, item) DO NOTHING",
                (annotator, item, int(answer), json.dumps(cells), int(incorrect), seconds, _now()),
            )
            return cursor.rowcount == 1

    def answers(self) -> list[dict[str, Any]]:
        """Every answer with its annotator and item, in annotator then sequence order."""
        with self._connection() as connection:
            connection.row_factory = sqlite3.Row
            rows = connection.execute(
                "SELECT a.annotator, n.name, s.position, a.item, i.role, i.example_id, i.label, i.category, "
                "i.text, i.metadata, a.answer, a.cells, a.incorrect, a.seconds, a.answered "
                "FROM answers a JOIN annotators n ON n.annotator = a.annotator JOIN items i ON i.item = a.item "
                "JOIN sequence s ON s.annotator = a.annotator AND s.item = a.item "
                "ORDER BY a.annotator, s.position"
            ).fetchall()
        return [
            {
                **dict(row),
                "answer": bool(row["answer"]),
                "incorrect": bool(row["incorrect"]),
                "cells": json.loads(row["cells"]),
                "metadata": json.loads(row["metadata"]),
            }
            for row in rows
        ]

    def annotators(self) -> list[dict[str, Any]]:
        """Every annotator with how many items they were given and answered."""
        with self._connection() as connection:
            connection.row_factory = sqlite3.Row
            rows = connection.execute(
                "SELECT n.annotator, n.name, n.joined, "
                "(SELECT COUNT(*) FROM sequence s WHERE s.annotator = n.annotator) AS given, "
                "(SELECT COUNT(*) FROM answers a WHERE a.annotator = n.annotator) AS answered "
                "FROM annotators n ORDER BY n.annotator"
            ).fetchall()
        return [dict(row) for row in rows]

    def items(self) -> list[dict[str, Any]]:
        with self._connection() as connection:
            connection.row_factory = sqlite3.Row
            rows = connection.execute("SELECT * FROM items ORDER BY item").fetchall()
        return [{**dict(row), "metadata": json.loads(row["metadata"])} for row in rows]
