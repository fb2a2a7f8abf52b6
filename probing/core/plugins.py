"""Plug-ins: Python files or modules that register tasks, backends, probes or tables with no edit to the package.

A plug-in is imported before any command runs; importing it calls `register_task`, `register_family`,
`register_probe` or `register_table`. Two ways to name plug-ins:
- the environment variable `PROBING_PLUGINS`: module names or `.py` files, separated by commas
  (`PROBING_PLUGINS=my_tasks.py,mylab.probes probing tasks`);
- an installed package's entry points in the group `probing.plugins` (`[project.entry-points."probing.plugins"]`
  in its pyproject.toml), for plug-ins that travel as packages.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from importlib.metadata import entry_points
from pathlib import Path

from probing.core.errors import ProbingError

ENVIRONMENT_VARIABLE = "PROBING_PLUGINS"
ENTRY_POINT_GROUP = "probing.plugins"
_LOADED: set[str] = set()


def load_plugins() -> list[str]:
    """Import every plug-in named by the environment and the installed entry points (each once); their names."""
    names = [name.strip() for name in os.environ.get(ENVIRONMENT_VARIABLE, "").split(",") if name.strip()]
    loaded = []
    for name in names:
        if name not in _LOADED:
            _import(name)
            _LOADED.add(name)
            loaded.append(name)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.value not in _LOADED:
            try:
                entry.load()
            except Exception as error:  # a broken plug-in is the user's to fix: say which
                raise ProbingError(
                    f"plug-in {entry.value} (entry point {entry.name}): {type(error).__name__}: {error}"
                ) from None
            _LOADED.add(entry.value)
            loaded.append(entry.value)
    return loaded


def _import(name: str) -> None:
    try:
        if name.endswith(".py"):
            path = Path(name).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"{path}: file not found")
            spec = importlib.util.spec_from_file_location(f"probing_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            importlib.import_module(name)
    except ProbingError as error:
        raise ProbingError(f"{ENVIRONMENT_VARIABLE}: {name}: {error}") from None
    except Exception as error:
        raise ProbingError(
            f"{ENVIRONMENT_VARIABLE}: cannot import '{name}' ({type(error).__name__}: {error})"
        ) from None
