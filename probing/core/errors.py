"""The one exception type for user mistakes.

Anything the user can fix (a missing file, a malformed line, a field with the wrong value, a store made
for another request) raises `ProbingError` with a message that names the file, line or field. The CLI
prints it as one line and exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import reprlib


class ProbingError(Exception):
    """A user error: bad input, missing file, mismatched artifact. Printed as one line by the CLI."""


class ClaimedElsewhere(ProbingError):
    """The output folder is claimed by another worker for another request: it is theirs, so a refused command
    must leave it as it is (`probing.core.artifacts.removed_when_refused` cleans up only what is its own)."""


def shown(value: object) -> str:
    """A value as an error message shows it: its repr, bounded in length and depth (reprlib), so a huge or deeply
    nested value from a hostile file never makes a huge line or recurses past Python's limit."""
    return _BOUNDED.repr(value)


class _BoundedRepr(reprlib.Repr):
    def repr_int(self, value: int, level: int) -> str:
        if value.bit_length() > 64:  # repr itself refuses integers of more than 4,300 digits
            return f"<an integer of {value.bit_length()} bits>"
        return super().repr_int(value, level)


_BOUNDED = _BoundedRepr()
