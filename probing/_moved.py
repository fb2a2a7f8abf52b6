"""Where the modules of the flat layout (up to version 0.1) went, and the aliases that keep old imports working.

The package was reorganised into one subpackage per stage (see docs/architecture.md). A script that still
imports an old path, e.g. `from probing.features import FeatureStore`, keeps working for one release: the
old name is an alias of the new module (the same module object, so `isinstance` checks and monkeypatching agree)
and importing it warns with a `DeprecationWarning` that names the new path. Three old modules became
packages of the same name (`probing.probes`, `probing.report`, `probing.cli`); their old top-level names are
served by each package's `__getattr__` through `old_name_of_package` below.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module (under `probing.`) -> its new home; written once, read by the alias finder and by the docs' table.
MOVED: dict[str, str] = {
    "errors": "core.errors",
    "settings": "core.settings",
    "artifacts": "core.artifacts",
    "locks": "core.locks",
    "yaml_files": "core.yaml_files",
    "records": "core.records",
    "plugins": "core.plugins",
    "devices": "core.devices",
    "device_copies": "core.device_copies",
    "checkpoints": "probes.checkpoints",
    "registry": "core.registry",
    "heads": "tasks.heads",
    "controls": "tasks.controls",
    "metrics": "tasks.metrics",
    "losses": "tasks.losses",
    "search_space": "tasks.search_space",
    "features": "store.features",
    "extract": "store.extract",
    "probes": "probes.modules",
    "probe_data": "probes.data",
    "train": "probes.train",
    "trainers": "probes.trainers",
    "unfrozen": "probes.unfrozen",
    "logreg": "probes.logreg",
    "probe_run": "probes.run",
    "analysis": "report.analysis",
    "plots": "report.plots",
    "report": "report.tables",
    "zeroshot": "baselines.zeroshot",
    "annotate": "baselines.annotate",
    "search": "studies.search",
    "studies": "studies.storages",
    "mdl": "studies.mdl",
    "config": "runs.config",
    "pipeline": "runs.pipeline",
    "demo": "runs.demo",
    "latex": "report.latex",
    "docs_blocks": "report.docs_blocks",
    "cli": "cli.app",
}

# an old module that is now a package of the same name -> the module inside it that holds the old names
BECAME_PACKAGE: dict[str, str] = {old: new for old, new in MOVED.items() if new.split(".")[0] == old}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec):
        return importlib.import_module(self.new_name)

    def exec_module(self, module) -> None:  # the module was executed under its new name already
        pass


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers an import of an old module path with the module at its new path (and a DeprecationWarning)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, rest = fullname.partition(".")
        if prefix != "probing" or not rest:
            return None
        old, _, below = rest.partition(".")
        new = MOVED.get(old)
        if new is None or old in BECAME_PACKAGE:
            return None
        new_name = f"probing.{new}" + (f".{below}" if below else "")
        if importlib.util.find_spec(new_name) is None:
            return None
        warnings.warn(
            f"'{fullname}' moved to '{new_name}'; the old path works until the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new_name))


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def old_name_of_package(package: str, name: str):
    """`probing.report.table1`-style access to a name of the old flat module that the package replaced."""
    old = package.rpartition(".")[2]
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module(f"probing.{MOVED[old]}")
    try:
        value = getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module '{package}' has no attribute '{name}'") from None
    warnings.warn(
        f"'{package}.{name}' moved to 'probing.{MOVED[old]}.{name}'; the old path works until the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return value
