"""The one `Registry` type: its rules (unknown names, duplicates, order, entry points), and every registry of
the package built on it."""

import sys
from dataclasses import dataclass

import pytest

from probing.core.errors import ProbingError
from probing.core.registry import Registry, unknown_name


@dataclass(frozen=True)
class Entry:
    name: str
    value: int = 0


def test_unknown_names_are_one_line_naming_the_option_and_the_known_names():
    registry = Registry("widget")
    registry.register("a", Entry("a"))
    registry.register("b", Entry("b"))
    with pytest.raises(ProbingError) as caught:
        registry.get("c", "--widget")
    assert str(caught.value) == "--widget: unknown widget 'c'; known: a, b"
    with pytest.raises(ProbingError) as caught:
        registry.get("c", hint="; or a file")
    assert str(caught.value) == "unknown widget 'c'; known: a, b; or a file"
    assert (
        str(unknown_name("widget", "c", ["a"], "config field 'w'")) == "config field 'w': unknown widget 'c'; known: a"
    )


def test_a_duplicate_name_is_refused_unless_replaced_and_the_same_entry_again_is_a_no_op():
    registry = Registry("widget")
    first = registry.register("a", Entry("a", 1))
    assert registry.register("a", Entry("a", 1)) == first  # equal: a module imported twice
    with pytest.raises(ProbingError) as caught:
        registry.register("a", Entry("a", 2))
    assert str(caught.value) == "widget 'a' is already registered; pass replace=True to replace it"
    assert registry.get("a") == Entry("a", 1)
    registry.register("a", Entry("a", 2), replace=True)
    assert registry.get("a") == Entry("a", 2) and registry["a"] == Entry("a", 2)


def test_duplicates_say_where_each_entry_comes_from():
    registry = Registry("task", origin=lambda entry: f"file{entry.value}")
    registry.register("a", Entry("a", 1))
    with pytest.raises(ProbingError, match=r"^task 'a' from file2 is already registered \(from file1\); pass "):
        registry.register("a", Entry("a", 2))


def test_order_membership_removal_and_the_check_hook():
    def positive(name, entry, others):
        if entry.value < 0:
            raise ProbingError(f"widget '{name}': negative")
        if any(other.value == entry.value for other in others.values()):
            raise ProbingError(f"widget '{name}': value {entry.value} taken")

    registry = Registry("widget", check=positive)
    for name, value in (("z", 1), ("a", 2), ("m", 3)):
        registry.register(name, Entry(name, value))
    assert registry.names() == ["z", "a", "m"] == list(registry) and len(registry) == 3
    assert [entry.value for entry in registry.values()] == [1, 2, 3] and "a" in registry and "q" not in registry
    with pytest.raises(ProbingError, match="^widget 'n': negative$"):
        registry.register("n", Entry("n", -1))
    with pytest.raises(ProbingError, match="^widget 'n': value 2 taken$"):
        registry.register("n", Entry("n", 2))
    assert registry.unregister("a") == Entry("a", 2) and registry.names() == ["z", "m"]
    with pytest.raises(ProbingError, match="^unknown widget 'a'; known: z, m$"):
        registry.unregister("a")
    with pytest.raises(ProbingError, match="non-empty string"):
        registry.register("", Entry(""))


def test_decorator_and_builtins_registered_on_first_read():
    calls = []

    def builtins():
        calls.append(1)
        registry.register("builtin", Entry("builtin"))

    registry = Registry("widget", builtins=builtins)
    assert calls == []

    @registry.decorator()
    def made():
        return 1

    assert calls == [1] and registry.names() == ["builtin", "made"] and registry.get("made") is made
    registry.names()
    assert calls == [1]


def test_entry_points_add_entries(tmp_path, monkeypatch):
    """An installed distribution's entry points in the registry's group are registered under their names."""
    (tmp_path / "widget_plugin.py").write_text(
        "from dataclasses import dataclass\n@dataclass(frozen=True)\nclass W:\n    name: str\nEXTRA = W('extra')\n"
    )
    dist = tmp_path / "widget_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: widget-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[probing.test-widgets]\nextra = widget_plugin:EXTRA\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("widget", "probing.test-widgets")
    registry.register("own", Entry("own"))
    assert registry.names() == ["own", "extra"] and registry.get("extra").name == "extra"
    assert sys.modules["widget_plugin"].EXTRA is registry.get("extra")

    broken = tmp_path / "broken_plugin-1.0.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (broken / "entry_points.txt").write_text("[probing.test-broken]\nbad = no_such_module_here:X\n")
    with pytest.raises(ProbingError, match=r"^widget 'bad' \(entry point no_such_module_here:X in probing.test-"):
        Registry("widget", "probing.test-broken").names()


def test_every_registry_of_the_package_is_a_registry():
    from probing.models.answering import _SCORERS
    from probing.models.registry import _FAMILIES
    from probing.probes.modules import PROBES
    from probing.report.analysis import ANALYSES
    from probing.report.tables import TABLES
    from probing.tasks import TASKS
    from probing.tasks.heads import HEADS

    registries = {
        "task": TASKS,
        "head": HEADS,
        "probe": PROBES,
        "table": TABLES,
        "analysis": ANALYSES,
        "family": _FAMILIES,
        "zero-shot method": _SCORERS,
    }
    for kind, registry in registries.items():
        assert isinstance(registry, Registry) and registry.kind == kind and len(registry) > 0
    assert TASKS.names()[:3] == ["refcocog", "vsr", "rcm"] and HEADS.names() == ["box", "binary"]
    assert PROBES.names() == ["linear", "swiglu2", "swiglu4", "logreg"]
    assert _FAMILIES.names()[:2] == ["blip2", "instructblip"] and "table1" in TABLES and "kendall" in ANALYSES


@pytest.mark.parametrize(
    "lookup,message",
    [
        (lambda: __import__("probing.tasks").tasks.get_task("coco"), "--task: unknown task 'coco'; known: refcocog, "),
        (
            lambda: __import__("probing.probes.modules").probes.modules.probe_kind("deep"),
            "--probe: unknown probe 'deep'; known: linear,",
        ),
        (
            lambda: __import__("probing.models").models.family_named("perceiver"),
            "--family: unknown family 'perceiver'; known: blip2, instructblip",
        ),
        (
            lambda: __import__("probing.models.tiny").models.tiny.write_checkpoint("unused", "perceiver"),
            "unknown model family with a tiny checkpoint 'perceiver'; known: blip2, instructblip",
        ),
    ],
)
def test_the_package_registries_refuse_unknown_names_in_the_one_form(lookup, message):
    with pytest.raises(ProbingError) as caught:
        lookup()
    assert str(caught.value).startswith(message)


def test_the_package_registries_refuse_duplicates():
    from probing.probes.modules import ProbeKind, register_probe
    from probing.report.analysis import Analysis, register_analysis
    from probing.report.tables import register_table
    from probing.tasks.heads import HEADS, BinaryHead, register_head

    with pytest.raises(ProbingError, match="^probe 'linear' is already registered"):
        register_probe(ProbeKind("linear", "another linear", layers=2))
    with pytest.raises(ProbingError, match="^table 'table1' is already registered"):
        register_table("table1")(lambda runs, options: None)
    with pytest.raises(ProbingError, match="^analysis 'kendall' is already registered"):
        register_analysis(Analysis("kendall", lambda run: False, lambda run: {}))
    register_head(BinaryHead())  # the same head again: a no-op
    with pytest.raises(ProbingError, match="^head 'box' is already registered"):
        HEADS.register("box", BinaryHead())


def test_tables_stand_in_their_declared_places():
    from probing.report.tables import TABLES, builders_in_place, register_table, table_names

    assert table_names()[:3] == ["table1", "roc_auc", "table3"]  # the paper's first, whatever the registration
    names = [builder.name for builder in builders_in_place()]
    assert names.index("rigor") < names.index("families") < names.index("per_layer") < names.index("categories")
    register_table("first_of_all", place=0)(lambda runs, options: None)
    register_table("a_plugins")(lambda runs, options: None)  # no place: after every built-in table
    try:
        names = [builder.name for builder in builders_in_place()]
        assert names[0] == "first_of_all" and names[-1] == "a_plugins"
    finally:
        TABLES.unregister("first_of_all")
        TABLES.unregister("a_plugins")
