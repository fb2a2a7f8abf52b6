"""The one exception type for user mistakes.

Anything the user can fix (a missing file, a malformed line, a field with the wrong value, a store made
for another request) raises `ProbingError` with a message that names the file, line or field. The CLI
prints it as one line and exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ProbingError(Exception):
    """A user error: bad input, missing file, mismatched artifact. Printed as one line by the CLI."""
