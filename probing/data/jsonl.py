"""JSON-lines files (VSR splits, RCM splits): one object per line, errors naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from probing.core.errors import ProbingError


def read_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(0-based line index, object) for each non-blank line; blank lines keep their index (ids = lines)."""
    path = Path(path)
    try:
        handle = open(path, "rb")  # bytes, decoded line by line: a decoding error can then name its line
    except FileNotFoundError:
        raise ProbingError(f"{path}: file not found") from None
    with handle:
        for line_index, raw in enumerate(handle):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ProbingError(f"{path}: line {line_index + 1}: not UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ProbingError(f"{path}: line {line_index + 1}: not valid JSON ({error.msg})") from None
            except ValueError as error:  # an integer of thousands of digits: Python refuses to convert it
                raise ProbingError(
                    f"{path}: line {line_index + 1}: not valid JSON ({str(error).split(':')[0]})"
                ) from None
            except RecursionError:
                raise ProbingError(f"{path}: line {line_index + 1}: not valid JSON (nested too deeply)") from None
            if not isinstance(row, dict):
                raise ProbingError(f"{path}: line {line_index + 1}: expected a JSON object")
            yield line_index, row
