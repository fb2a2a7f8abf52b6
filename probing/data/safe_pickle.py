"""Loading REFER's `refs(umd).p` without letting the file run code.

A pickle can name any importable callable (`os.system`, `subprocess.Popen` ...) and have the unpickler call
it. REFER's pickles hold only lists, dicts, strings and numbers, which pickle encodes with opcodes that
need no lookup of a global, so an unpickler that refuses every global lookup (except the set types) loads
the real files and refuses a crafted one before anything runs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from probing.core.errors import ProbingError

# Globals a plain-data pickle may legitimately reference (Python 2 and 3 spellings of the set types).
_ALLOWED_GLOBALS = frozenset(
    {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("__builtin__", "set"),
        ("__builtin__", "frozenset"),
    }
)


class _Refused(pickle.UnpicklingError):
    """The stream asked for something a plain-data pickle never needs."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _Refused(f"refers to {module}.{name}, which a plain-data pickle never needs")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("uses persistent ids, which a plain-data pickle never needs")


def load_plain_pickle(path: Path) -> Any:
    """Unpickle a file that may contain only containers and scalars; anything else is a ProbingError.

    Python 2 `str` objects (REFER's pickles were written by cPickle) are decoded as UTF-8.
    """
    path = Path(path)
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise ProbingError(f"{path}: file not found") from None
    except OSError as error:
        raise ProbingError(f"{path}: cannot read ({error.strerror})") from None
    try:
        return _PlainDataUnpickler(io.BytesIO(payload), encoding="utf-8").load()
    except _Refused as error:
        raise ProbingError(f"{path}: refused: the pickle {error}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        AttributeError,
        UnicodeDecodeError,
    ) as error:
        # Truncated or corrupt streams surface as any of these, depending on where the bytes stop.
        raise ProbingError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None
