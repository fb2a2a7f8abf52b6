"""One `Registry` type for every named, pluggable thing: tasks, heads, probes, tables, analyses, backend families,
zero-shot scorers.

The same rules everywhere:
- an unknown name is one line, `<option>: unknown <kind> '<name>'; known: a, b, c` (a `ProbingError`, exit 2);
- a name is registered once: a second, different entry under it is refused unless the caller says
  `replace=True` (registering the very same entry again, e.g. a module imported twice, is a no-op);
- entries keep their registration order (built-ins first), which is the order listings and reports use;
- installed packages can add entries through the entry-point group the registry names
  (`[project.entry-points."probing.probes.modules"] deep = "mylab.probes:DEEP"`): each entry point's object is
  registered under the entry point's name the first time the registry is read. (Whole plug-in modules that
  register several things at once use `probing.plugins` instead.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from probing.core.errors import ProbingError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(
        self,
        kind: str,
        entry_point_group: str | None = None,
        check: Callable[[str, T, dict[str, T]], None] | None = None,
        builtins: Callable[[], None] | None = None,
        origin: Callable[[T], str] | None = None,
    ):
        """`kind` names an entry in messages ("task", "probe"); `check(name, entry, others)` refuses an entry
        that does not fit, or clashes with the other entries (a `ProbingError`); `builtins()` registers the
        built-in entries on first read (for registries whose built-ins would import modules that import the
        registry); `origin(entry)` says where an entry comes from, in the duplicate message (e.g. a task's file)."""
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._check = check
        self._origin = origin
        self._builtins = builtins
        self._entries: dict[str, T] = {}
        self._entry_points_loaded = entry_point_group is None

    # ------------------------------------------------------------------ adding
    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Add `entry` under `name`; returns `entry`. Another entry under a registered name is refused unless
        `replace`."""
        if not isinstance(name, str) or not name:
            raise ProbingError(f"{self.kind} name {name!r}: expected a non-empty string")
        self._load_builtins()
        existing = self._entries.get(name)
        if existing is not None and not replace and not _same(existing, entry):
            new, old = (
                ("", "")
                if self._origin is None
                else (f" from {self._origin(entry)}", f" (from {self._origin(existing)})")
            )
            raise ProbingError(f"{self.kind} '{name}'{new} is already registered{old}; pass replace=True to replace it")
        if self._check is not None:
            self._check(name, entry, {other: value for other, value in self._entries.items() if other != name})
        self._entries[name] = entry
        return entry

    def decorator(self, name: str | None = None, *, replace: bool = False) -> Callable[[T], T]:
        """`@registry.decorator("name")`: register the decorated object (under its `__name__` by default)."""

        def add(entry: T) -> T:
            self.register(name or entry.__name__, entry, replace=replace)
            return entry

        return add

    def unregister(self, name: str) -> T:
        """Take `name` out (tests that register an entry for themselves); unknown names are refused."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    # ------------------------------------------------------------------ reading
    def get(self, name: str, option: str | None = None, hint: str = "") -> T:
        """The entry under `name`; an unknown name is one line naming `option` and the known names (+ `hint`)."""
        entries = self._read()
        if name in entries:
            return entries[name]
        raise unknown_name(self.kind, name, entries, option, hint)

    def names(self) -> list[str]:
        return list(self._read())

    def values(self) -> list[T]:
        return list(self._read().values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._read().items())

    def __contains__(self, name: object) -> bool:
        return name in self._read()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._read())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

    # ------------------------------------------------------------------ loading
    def _load_builtins(self) -> None:
        if self._builtins is not None:
            builtins, self._builtins = self._builtins, None  # once, and not again while it registers
            builtins()

    def _read(self) -> dict[str, T]:
        self._load_builtins()
        if not self._entry_points_loaded:
            self._entry_points_loaded = True
            self.load_entry_points()
        return self._entries

    def load_entry_points(self) -> list[str]:
        """Register every installed entry point of this registry's group (once per name); their names."""
        added = []
        for point in entry_points(group=self.entry_point_group) if self.entry_point_group else ():
            if point.name in self._entries:
                continue
            try:
                entry = point.load()
            except Exception as error:  # a broken plug-in is the user's to fix: say which
                raise ProbingError(
                    f"{self.kind} '{point.name}' (entry point {point.value} in {self.entry_point_group}): "
                    f"{type(error).__name__}: {error}"
                ) from None
            self.register(point.name, entry)
            added.append(point.name)
        return added


def unknown_name(kind: str, name: object, known: object, option: str | None = None, hint: str = "") -> ProbingError:
    """The one message for a name that is not among `known` (names, in order): for a registry, or a selection
    of one (e.g. the families that can write a tiny checkpoint)."""
    prefix = f"{option}: " if option else ""
    return ProbingError(f"{prefix}unknown {kind} '{name}'; known: {', '.join(known)}{hint}")


def _same(existing: object, entry: object) -> bool:
    """The same entry registered again (a module imported twice, a dataclass equal field by field)."""
    if existing is entry:
        return True
    try:
        return bool(existing == entry)
    except Exception:  # an entry whose == is not a plain truth value (tensors, arrays)
        return False
