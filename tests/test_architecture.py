"""docs/architecture.md's rooms table is the import rule of the package: every module is in one room, and a
module imports only from its own room and the rooms above it (lazy imports included), bar the exceptions the
page lists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "architecture.md"


def section(title: str) -> str:
    text = PAGE.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def rooms() -> dict[str, tuple[int, str]]:
    """Top-level module or subpackage name -> (order, room), from the rooms table."""
    placed: dict[str, tuple[int, str]] = {}
    for line in section("## Rooms and what each may import").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            for module in re.findall(r"`([\w_]+)`", cells[2]):
                assert module not in placed, f"{module} is in two rooms"
                placed[module] = (int(cells[0]), cells[1])
    return placed


def exceptions() -> set[tuple[str, str]]:
    found = set()
    for line in section("## Rooms and what each may import").split("Known exceptions")[1].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            found |= {(cells[0].strip("`"), imported) for imported in re.findall(r"`([\w_]+)`", cells[1])}
    return found


def top_level(module: str) -> str:
    """`probing.models.base` -> `models`; `probing` itself -> ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_imports() -> list[tuple[str, str, str]]:
    """(importing file, its top-level module, the imported top-level module) for every probing import."""
    found = []
    for path in sorted((ROOT / "probing").rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name == "probing" or name.startswith("probing."):
                    found.append((str(path.relative_to(ROOT)), top_level(module), top_level(name)))
    return found


def test_every_module_of_the_package_has_a_room():
    placed = rooms()
    modules = {path.stem for path in (ROOT / "probing").glob("*.py") if path.stem != "__init__"}
    modules |= {path.parent.name for path in (ROOT / "probing").glob("*/__init__.py")}
    assert sorted(modules - set(placed)) == [], "modules missing from docs/architecture.md's rooms table"
    assert sorted(set(placed) - modules) == [], "rooms table names modules that do not exist"
    assert [order for order, _ in sorted(set(placed.values()))] == list(range(len(set(placed.values()))))


def test_imports_run_along_the_flow():
    placed, allowed = rooms(), exceptions()
    against = [
        f"{path}: {module} ({placed[module][1]}) imports {imported} ({placed[imported][1]})"
        for path, module, imported in package_imports()
        if module
        and imported
        and module != imported
        and placed[imported][0] > placed[module][0]
        and (module, imported) not in allowed
    ]
    assert against == []
    # every listed exception still exists (a fixed one is taken off the page)
    present = {(module, imported) for _, module, imported in package_imports()}
    assert allowed <= present and allowed


def test_the_moved_modules_table_is_the_alias_table():
    from probing._moved import MOVED

    text = PAGE.read_text()
    for old, new in MOVED.items():
        assert f"| `probing.{old}` | `probing.{new}` |" in text, old


def test_an_old_module_path_is_the_new_module_with_a_deprecation_warning():
    import importlib
    import sys
    import warnings

    sys.modules.pop("probing.features", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("probing.features")
    new = importlib.import_module("probing.store.features")
    assert old is new and old.FeatureStore is new.FeatureStore
    assert any(
        issubclass(w.category, DeprecationWarning)
        and "'probing.features' moved to 'probing.store.features'" in str(w.message)
        for w in caught
    )


def test_an_old_module_that_became_a_package_still_answers_its_names():
    import warnings

    import probing.report
    from probing.report.tables import write_report

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert probing.report.write_report is write_report
    assert any(
        "'probing.report.write_report' moved to 'probing.report.tables.write_report'" in str(w.message) for w in caught
    )


# Functions allowed over the limit, each named so that any other function that grows past it fails the test (none
# now: list one here only while it is being split on its own branch, and take it off when it is).
LONG_FUNCTIONS_ALLOWED: dict[str, set[str]] = {}
MAX_FUNCTION_LINES = 80


def function_lengths(path: Path) -> dict[str, int]:
    """Qualified name (`Class.method`, `outer.inner`) -> lines from `def` to the end of the body."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lengths[name] = child.end_lineno - child.lineno + 1
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text()), "")
    return lengths


def test_no_function_over_80_lines():
    """A function is a step a reader can name: over 80 lines, it is several steps that want names of their own."""
    too_long, allowed_seen = [], set()
    for path in sorted((ROOT / "probing").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        allowed = LONG_FUNCTIONS_ALLOWED.get(relative, set())
        for name, lines in function_lengths(path).items():
            if lines > MAX_FUNCTION_LINES:
                if name in allowed:
                    allowed_seen.add((relative, name))
                else:
                    too_long.append(f"{relative}: {name} has {lines} lines")
    assert too_long == [], f"over {MAX_FUNCTION_LINES} lines (split into named steps): " + "; ".join(too_long)
    # an allowed function that was split (or renamed) is taken off the list
    listed = {(path, name) for path, names in LONG_FUNCTIONS_ALLOWED.items() for name in names}
    assert sorted(listed - allowed_seen) == [], "in LONG_FUNCTIONS_ALLOWED but within the limit (or gone)"


# Settings that share a name but are different settings, each declared once for its own meaning.
SAME_NAME_OTHER_SETTING = {
    "batch_size": "images per extraction pass, examples per zero-shot pass, examples per training step",
    "seed": "a probe's initialisation, a search's sampler, an annotation study's draw",
    "lr": "a trial's value and the search space's range",
    "epochs": "a trial's value and the search space's choices",
    "giou_scale": "a trial's value and the search space's choices",
    "l1_scale": "a trial's value and the search space's choices",
    "logreg_c": "a trial's value and the search space's range",
    "features": "optional for a probe run (unfrozen needs none), required for an online code",
    "workers": "in-process by default for unfrozen training, cores - 2 for extraction and zero-shot answers",
    "label": "how reports name a run's model, and the default a feature store keeps for the runs made from it",
    "task": "any task (TaskChoice) or a binary task of an annotation study; the others are internal copies",
}


def declaring_classes() -> dict[str, set[str]]:
    """For each setting name, the settings dataclasses of the package that declare it themselves (inherited
    fields are their base's declaration)."""
    import dataclasses
    import importlib
    import inspect
    import pkgutil

    import probing
    from probing.core.settings import info_of

    found: dict[str, set[str]] = {}
    for module_info in pkgutil.walk_packages(probing.__path__, "probing."):
        if module_info.name.endswith("__main__") or module_info.name.split(".")[1] == "_moved":
            continue
        module = importlib.import_module(module_info.name)
        for value in vars(module).values():
            if not (isinstance(value, type) and dataclasses.is_dataclass(value)) or value.__module__ != module.__name__:
                continue
            own = inspect.get_annotations(value)
            for field in dataclasses.fields(value):
                if field.name in own and info_of(field) is not None:
                    found.setdefault(field.name, set()).add(f"{value.__module__}.{value.__qualname__}")
    return found


def test_each_setting_is_declared_by_one_class():
    repeated = {name: classes for name, classes in declaring_classes().items() if len(classes) > 1}
    unexplained = {name: sorted(classes) for name, classes in repeated.items() if name not in SAME_NAME_OTHER_SETTING}
    assert unexplained == {}, "declare the setting once (probing/core/shared_settings.py) and derive from it"
    assert declaring_classes()["layer"] == {"probing.probes.settings.ProbeTarget"}
    assert declaring_classes()["device"] == {"probing.core.shared_settings.Placement"}


def test_train_search_and_mdl_take_layer_and_task_from_one_declaration(capsys):
    from conftest import run_cli

    from probing.cli.app import built_command
    from probing.probes.settings import ProbeTarget, TrainRequest
    from probing.studies.settings import MdlRequest, SearchRequest

    assert all(issubclass(request, ProbeTarget) for request in (TrainRequest, SearchRequest, MdlRequest))
    helps = {}
    for name in ("train", "search", "mdl"):
        options = {p.name: p for p in built_command(name).params}
        helps[name] = (options["layer"].help, options["task"].help)
    assert len(set(helps.values())) == 1, helps
    # the declared range is checked by every command: a negative layer is refused naming the option
    for name in ("train", "search", "mdl"):
        code, _, err = run_cli(capsys, name, "--task", "vsr", "--layer", "-1", "--features", "f", "--out", "o")
        assert code == 2 and "--layer: must be >= 0, got -1" in err, (name, err)
