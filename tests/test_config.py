"""Experiment configs and `probing run`: validation that names the field, stages reused on a second run."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from probing.core.errors import ProbingError
from probing.runs.config import Config, from_dict, load_config, to_dict
from probing.runs.demo import demo_config

ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIGS = ["table1", "table2", "table3", "table5", "figure2a", "figure2b", "figure4", "figure5", "controls"]


@pytest.mark.parametrize("name", [*PAPER_CONFIGS, "demo"])
def test_every_shipped_config_is_valid(name):
    config = load_config(ROOT / "experiments" / f"{name}.yaml", check_paths=False)
    assert config.name == name
    assert from_dict(Config, to_dict(config)) == config  # round trip through the YAML form


def test_paper_configs_share_one_workspace_and_the_main_experiment():
    configs = {name: load_config(ROOT / "experiments" / f"{name}.yaml", check_paths=False) for name in PAPER_CONFIGS}
    assert {c.workspace for c in configs.values()} == {Path("reports/paper")}
    table1 = configs["table1"]
    main_experiment = table1.experiments[0]
    assert (main_experiment.tasks, main_experiment.modes, main_experiment.layers, main_experiment.probes) == (
        ["refcocog", "vsr", "rcm"],
        ["frozen", "unfrozen"],
        "last",
        ["linear"],
    )
    assert main_experiment.search.trials >= 10 and table1.report.compare_paper
    for name in ("table2", "table5", "figure2b", "figure5"):  # reuse Table 1's runs: same experiment settings
        other = configs[name].experiments[0]
        assert (
            other.name == "main"
            and other.search == main_experiment.search
            and set(other.tasks) < set(main_experiment.tasks)
        )
    assert configs["table3"].experiments[0].probes == ["linear", "swiglu2", "swiglu4"]
    assert configs["figure4"].experiments[0].layers == "all" and configs["figure2a"].experiments[0].tasks == ["vsr"]


@pytest.mark.parametrize("name,model", [("figure2b", "BLIP-2"), ("figure5", "InstructBLIP")])
def test_category_figure_configs_are_the_papers(name, model):
    """Figure 2(b) is BLIP-2's RefCOCOg per COCO supercategory, Figure 5 InstructBLIP's; frozen and unfrozen."""
    config = load_config(ROOT / "experiments" / f"{name}.yaml", check_paths=False)
    (experiment,) = config.experiments
    assert (experiment.tasks, experiment.models, experiment.modes) == (["refcocog"], [model], ["frozen", "unfrozen"])
    assert config.report.tables == ["categories_refcocog"]
    header = (ROOT / "experiments" / f"{name}.yaml").read_text().split("\nname:")[0]
    assert "supercategory" in header and model in header and "frozen vs unfrozen" in header


def test_the_demo_config_is_the_packaged_one():
    assert load_config(ROOT / "experiments" / "demo.yaml", check_paths=False) == demo_config()


@pytest.mark.parametrize(
    "change,message",
    [
        ({"experimentz": []}, "config field 'experimentz': unknown field (allowed: name, workspace, models, "),
        ({"name": 3}, "config field 'name': expected a string, got 3"),
        (
            {"experiments": [{"name": "x", "tasks": ["refcocog", "coco"], "models": ["m"]}]},
            # the built-in tasks first (YAML tasks that other tests registered in this process may follow)
            "config field 'experiments[0].tasks[1]': unknown task 'coco'; known: refcocog, vsr, rcm, refcocog-google, "
            "refcoco, refcoco+, vsr-zeroshot",
        ),
        (
            {"experiments": [{"name": "x", "tasks": ["vsr"], "models": ["other"]}]},
            "config field 'experiments[0].models[0]': no model 'other' in 'models'",
        ),
        (
            {"experiments": [{"name": "x", "tasks": ["vsr"], "models": ["m"], "layers": "first"}]},
            "config field 'experiments[0].layers': expected a list of an integer or 'last' | 'all', got 'first'",
        ),
        (
            {"experiments": [{"name": "x", "tasks": ["vsr"], "models": ["m"], "search": {"trials": "ten"}}]},
            "config field 'experiments[0].search.trials': expected an integer, got 'ten'",
        ),
        ({"models": {"m": {"model": "blip2", "tiny": "blip2"}}}, "config field 'models.m': give exactly one of"),
        (
            {"models": {"m": {"tiny": "perceiver"}}},
            "config field 'models.m.tiny': unknown model family with a tiny checkpoint 'perceiver'; known: blip2, ",
        ),
        ({"data": {"images": "nowhere", "vsr": "nowhere"}}, "config field 'data.images': nowhere: not found"),
        ({"data": {"images": "."}}, "config field 'data.vsr': missing (needed by the experiments' tasks)"),
        (
            {"experiments": [{"name": "x", "tasks": ["vsr"], "models": ["m"], "search": {"seed": -1}}]},
            "config field 'experiments[0].search.seed': must be >= 0, got -1",
        ),
        (
            {"experiments": [{"name": "x", "tasks": ["vsr"], "models": ["m"], "search": {"final_seeds": [0, 0]}}]},
            "config field 'experiments[0].search.final_seeds': seed 0 is given twice (each seed once)",
        ),
        (
            {"experiments": [{"name": "x", "tasks": ["vsr"], "models": ["m"], "layers": [2, 2]}]},
            "config field 'experiments[0].layers': an entry is repeated",
        ),
        (
            {"experiments": [{"name": "x", "tasks": ["vsr"], "models": ["m"], "modes": []}]},
            "config field 'experiments[0].modes': empty",
        ),
        ({"extract": {"workers": -1}}, "config field 'extract.workers': must be >= 0, got -1"),
        ({"extract": {"shard_size": 0}}, "config field 'extract.shard_size': must be >= 1, got 0"),
        (
            {"extract": {"qformer_dtype": "fp8"}},
            "config field 'extract.qformer_dtype': expected 'float16' | 'bfloat16' | 'float32', got 'fp8'",
        ),
        ({"train": {"patience": {"rcm": 0}}}, "config field 'train.patience.rcm': must be >= 1, got 0"),
        (
            {
                "experiments": [
                    {"name": "x", "tasks": ["vsr"], "models": ["m"], "search": {"space": {"vsr": {"lr": [0.1, 0.01]}}}}
                ]
            },
            "config field 'experiments[0].search.space.vsr': search space: lr bounds must satisfy 0 < low <= high",
        ),
    ],
)
def test_config_errors_name_the_field(capsys, tmp_path, change, message):
    config = {
        "name": "t",
        "workspace": str(tmp_path / "w"),
        "models": {"m": {"model": "blip2"}},
        "experiments": [{"name": "x", "tasks": ["vsr"], "models": ["m"]}],
        "data": {"images": ".", "vsr": "."},
    }
    config |= change
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = run_cli(capsys, "run", path)
    assert code == 2 and err.startswith(f"error: {path}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


def test_yaml_syntax_error_names_the_line(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodels: {a: [1, 2}\n")
    code, _, err = run_cli(capsys, "run", path)
    assert code == 2 and err.startswith(f"error: {path}: line 2: not valid YAML")
    with pytest.raises(ProbingError, match="file not found"):
        load_config(tmp_path / "absent.yaml")


def test_run_twice_recomputes_nothing_and_gives_identical_results(capsys, tmp_path, tiny_checkpoints):
    config = {
        "name": "small",
        "workspace": str(tmp_path / "w"),
        "models": {"BLIP-2 (tiny)": {"model": str(tiny_checkpoints["blip2"])}},
        "data": {"demo": {"refcocog_images": 160, "vsr_images": 60}},
        "experiments": [
            {
                "name": "frozen",
                "tasks": ["vsr", "rcm"],
                "models": ["BLIP-2 (tiny)"],
                "layers": [2, 4],
                "search": {
                    "trials": 3,
                    "batch": 3,
                    "final_seeds": [0, 1],
                    "space": {"vsr": {"lr": [0.001, 0.01], "epochs": [3]}, "rcm": {"epochs": [3]}},
                },
            },
            {
                "name": "unfrozen",
                "tasks": ["vsr"],
                "models": ["BLIP-2 (tiny)"],
                "modes": ["unfrozen"],
                "search": {"trials": 1, "batch": 1, "space": {"vsr": {"epochs": [2]}}},
            },
        ],
        "train": {"unfrozen_batch_size": 32},
        "extract": {"qformer_dtype": "bfloat16"},
        "report": {"out": str(tmp_path / "report")},
        "device": "cpu",
    }
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = run_cli(capsys, "run", path)
    assert code == 0, err
    assert "searches: 5 built, 0 reused" in out and "features: 6 built, 0 reused" in out
    stores = list((tmp_path / "w" / "features").rglob("manifest.json"))
    assert len(stores) == 6 and all(json.loads(p.read_text())["request"]["qformer_dtype"] == "bfloat16" for p in stores)
    tables = {p.name: p.read_bytes() for p in (tmp_path / "report" / "tables").iterdir()}
    assert {"table1.md", "table1.csv", "table2.md", "table4.md", "table5.md", "per_layer.md"} <= set(tables)
    table4 = (tmp_path / "report" / "tables" / "table4.md").read_text().splitlines()
    assert table4[2] == "| task | hyper-parameter | BLIP-2 (tiny) frozen | BLIP-2 (tiny) unfrozen |"  # paper's layout
    searches = (tmp_path / "report" / "tables" / "searches.md").read_text().splitlines()
    assert searches[2] == (
        "| model | mode | task | layer | probe | lr | epochs | GIoU scale | L1 scale | trials | pruned | val (%) "
        "| test (%) |"
    )
    rows = [line for line in searches[4:] if line.startswith("| BLIP-2 (tiny)")]
    assert len(rows) == 5  # one per search: vsr and rcm at layers 2 and 4 frozen, vsr unfrozen
    assert all(row.split(" | ")[6] == "3" for row in rows if "| frozen |" in row)  # epochs from the space
    assert all(row.split(" | ")[9] in ("3", "1") for row in rows)  # trials complete
    assert all(row.split(" | ")[10] == "0" for row in rows)  # none pruned: frozen (auto: none), unfrozen (1 trial)
    manifests = {p: p.stat().st_mtime_ns for p in (tmp_path / "w").rglob("manifest.json")}
    code, out, err = run_cli(capsys, "run", path)
    assert code == 0, err
    assert "searches: 0 built, 5 reused" in out and "features: 0 built, 6 reused" in out
    assert "built" in out and " 1 built" not in out and " 2 built" not in out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "w").rglob("manifest.json")} == manifests
    assert {p.name: p.read_bytes() for p in (tmp_path / "report" / "tables").iterdir()} == tables


def test_configs_sharing_a_workspace_reuse_features_and_runs(tmp_path, tiny_checkpoints, capsys):
    """Table 1 (frozen + unfrozen) then Table 3 (frozen only) on one workspace: the second extracts nothing
    and reuses the frozen search, although its own store layout would hold no ViT outputs."""
    base = {
        "workspace": str(tmp_path / "w"),
        "device": "cpu",
        "models": {"BLIP-2 (tiny)": {"model": str(tiny_checkpoints["blip2"])}},
        "data": {"demo": {"refcocog_images": 160, "vsr_images": 60}},
        "train": {"unfrozen_batch_size": 32},
    }
    search = {"trials": 2, "batch": 2, "space": {"vsr": {"lr": [0.001, 0.01], "epochs": [2]}}}
    first = base | {
        "name": "first",
        "experiments": [
            {
                "name": "main",
                "tasks": ["vsr"],
                "models": ["BLIP-2 (tiny)"],
                "modes": ["frozen", "unfrozen"],
                "search": search,
            }
        ],
    }
    second = base | {
        "name": "second",
        "experiments": [
            {"name": "main", "tasks": ["vsr"], "models": ["BLIP-2 (tiny)"], "modes": ["frozen"], "search": search}
        ],
    }
    for name, config in (("first", first), ("second", second)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    code, out, err = run_cli(capsys, "run", tmp_path / "first.yaml")
    assert code == 0, err
    assert "searches: 2 built" in out
    code, out, err = run_cli(capsys, "run", tmp_path / "second.yaml")
    assert code == 0, err
    assert "features: 0 built, 3 reused" in out and "searches: 0 built, 1 reused" in out
    assert [p.name for p in (tmp_path / "w" / "features" / "BLIP-2 (tiny)" / "vsr").iterdir()] == ["store-vision"]


def test_a_config_asking_for_more_layers_grows_the_workspace_store(tmp_path, tiny_checkpoints, capsys):
    """Table 1's last layer, then a per-layer figure on the same workspace: the second run adds the layers the
    store lacks to the same store (its dry run says so), and the first run's layer stays byte for byte."""
    import hashlib

    from probing.store.features import FeatureStore

    base = {
        "workspace": str(tmp_path / "w"),
        "device": "cpu",
        "models": {"BLIP-2 (tiny)": {"model": str(tiny_checkpoints["blip2"])}},
        "data": {"demo": {"refcocog_images": 20, "vsr_images": 60}},
    }
    search = {"trials": 1, "batch": 1, "space": {"vsr": {"lr": [0.001, 0.01], "epochs": [2]}}}
    experiment = {"name": "main", "tasks": ["vsr"], "models": ["BLIP-2 (tiny)"], "modes": ["frozen"], "search": search}
    configs = {
        "last": base | {"name": "last", "experiments": [experiment | {"layers": "last"}]},
        "per-layer": base | {"name": "per-layer", "experiments": [experiment | {"name": "layers", "layers": [2, 4]}]},
    }
    for name, config in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    code, out, err = run_cli(capsys, "run", tmp_path / "last.yaml")
    assert code == 0, err
    assert "features: 3 built, 0 reused" in out
    root = tmp_path / "w" / "features" / "BLIP-2 (tiny)" / "vsr"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.safetensors")}
    assert [p.name for p in root.iterdir()] == ["store"] and before
    code, out, err = run_cli(capsys, "run", tmp_path / "per-layer.yaml", "--dry-run")
    assert code == 0, err
    assert out.count("(grows by layers [2])") == 3 and "features" in out
    code, out, err = run_cli(capsys, "run", tmp_path / "per-layer.yaml")
    assert code == 0, err
    assert [p.name for p in root.iterdir()] == ["store"]  # one store, grown
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before  # layer 4 untouched
    for split in ("train", "val", "test"):
        assert FeatureStore(root / "store" / split).layers == [2, 4]
    code, out, err = run_cli(capsys, "run", tmp_path / "last.yaml")
    assert code == 0, err
    assert "features: 0 built, 3 reused" in out and "searches: 0 built, 1 reused" in out


# ---------------------------------------------------------------- include:, --set, --limit, --dry-run


def test_paper_configs_include_one_data_section():
    expected = yaml.safe_load((ROOT / "experiments" / "data.yaml").read_text())["data"]
    for name in [*PAPER_CONFIGS, "appendix_c", "rigor"]:
        text = (ROOT / "experiments" / f"{name}.yaml").read_text()
        assert "\ndata:" not in text and "\ninclude: data.yaml" in text, name
        data = load_config(ROOT / "experiments" / f"{name}.yaml", check_paths=False).data
        assert {key: str(getattr(data, key)) for key in expected} == expected, name


def small_config(tmp_path) -> dict:
    return {
        "name": "t",
        "workspace": str(tmp_path / "w"),
        "models": {"m": {"model": "blip2"}},
        "experiments": [{"name": "x", "tasks": ["vsr"], "models": ["m"]}],
    }


def test_an_include_is_read_relative_to_its_file_and_merged_key_by_key(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data.yaml").write_text("data: {images: data/coco, vsr: data/vsr}\ndevice: cpu\n")
    (tmp_path / "configs").mkdir()
    config = small_config(tmp_path) | {"include": "../shared/data.yaml", "data": {"vsr": "elsewhere/vsr"}}
    path = tmp_path / "configs" / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path, check_paths=False)
    assert (loaded.data.images, loaded.data.vsr, loaded.device) == (Path("data/coco"), Path("elsewhere/vsr"), "cpu")


@pytest.mark.parametrize(
    "files,message",
    [
        ({"c.yaml": {"include": "absent.yaml"}}, "{c}: include: {root}/absent.yaml: file not found"),
        (
            {"c.yaml": {"include": ["a.yaml"]}, "a.yaml": {"include": "c.yaml"}},
            "{a}: include: c.yaml: an include cycle ({c} -> {a} -> {c})",
        ),
        ({"c.yaml": {"include": "c.yaml"}}, "{c}: include: c.yaml: an include cycle ({c} -> {c})"),
        ({"c.yaml": {"include": 3}}, "{c}: config field 'include': expected a path or a list of paths, got 3"),
    ],
)
def test_include_errors_are_one_line(capsys, tmp_path, files, message):
    for name, content in files.items():
        body = (small_config(tmp_path) | {"data": {"images": ".", "vsr": "."}}) if name == "c.yaml" else {}
        (tmp_path / name).write_text(yaml.safe_dump(body | content))
    code, _, err = run_cli(capsys, "run", tmp_path / "c.yaml", "--dry-run")
    names = {"c": tmp_path / "c.yaml", "a": tmp_path / "a.yaml", "root": tmp_path}
    assert (code, err) == (2, f"error: {message.format(**names)}\n")
    assert not (tmp_path / "w").exists()


def test_set_overrides_fields_validated_as_the_file_is(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(small_config(tmp_path) | {"data": {"images": ".", "vsr": "."}}))
    loaded = load_config(
        path,
        overrides=["experiments.0.search.trials=3", "experiments.0.layers=[1, 2]", "data.vsr=other", "device=cpu"],
        check_paths=False,
    )
    experiment = loaded.experiments[0]
    assert (experiment.search.trials, experiment.layers, loaded.data.vsr, loaded.device) == (
        3,
        [1, 2],
        Path("other"),
        "cpu",
    )
    for overrides, message in [
        (["data.vsrr=x"], f"{path}: config field 'data.vsrr': unknown field (allowed: images, refs, "),
        (
            ["experiments.0.search.trials=0"],
            f"{path}: config field 'experiments[0].search.trials': must be >= 1, got 0",
        ),
        (["experiments.3.layers=last"], "--set experiments.3.layers=last: config field 'experiments.3': no entry 3"),
        (["name.x=1"], "--set name.x=1: config field 'name' is not a mapping"),
        (["search.trials"], "--set search.trials: expected KEY=VALUE (e.g. search.trials=3)"),
        (["device=[cpu"], "--set device=[cpu: line 1: not valid YAML"),
        (["data.limit=0"], f"{path}: config field 'data.limit': must be >= 1, got 0"),
    ]:
        code, _, err = run_cli(capsys, "run", path, *[item for o in overrides for item in ("--set", o)], "--dry-run")
        assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()


def test_limit_dry_run_and_reuse(capsys, tmp_path, tiny_checkpoints):
    """A limited run: its own workspace folder, the limit in every data fingerprint; the dry run lists it as to run
    before and as reused after, writing nothing; the full run's dry run reuses none of it."""
    from probing.data.types import DataOptions
    from probing.store.features import FeatureStore
    from probing.tasks import load_split

    config = {
        "name": "small",
        "workspace": str(tmp_path / "w"),
        "models": {"BLIP-2 (tiny)": {"model": str(tiny_checkpoints["blip2"])}},
        "data": {"demo": {"refcocog_images": 160, "vsr_images": 60}},
        "experiments": [
            {
                "name": "frozen",
                "tasks": ["vsr"],
                "models": ["BLIP-2 (tiny)"],
                "search": {"trials": 1, "batch": 1, "space": {"vsr": {"epochs": [1]}}},
            }
        ],
        "device": "cpu",
    }
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = run_cli(capsys, "run", path, "--limit", "12", "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["status", "stage", "what", "size", "folder"]
    assert [line.split()[:3] for line in lines[1:-1]] == [
        ["to", "run", "data"],
        *[["to", "run", "features"]] * 3,
        ["to", "run", "searches"],
        ["to", "run", "report"],
    ]
    assert lines[-1] == "6 step(s) to run, 0 reused; nothing was written (--dry-run)"
    assert "1 trials" in lines[5] and str(tmp_path / "w" / "limit-12" / "runs" / "frozen") in lines[5]
    assert not (tmp_path / "w").exists()

    code, out, err = run_cli(capsys, "run", path, "--limit", "12")
    assert code == 0, err
    assert "features: 3 built, 0 reused" in out and "searches: 1 built, 0 reused" in out
    store = FeatureStore(tmp_path / "w" / "limit-12" / "features" / "BLIP-2 (tiny)" / "vsr" / "store" / "train")
    options = DataOptions(
        task="vsr", **{k: Path(v) for k, v in store.manifest["data_options"].items() if k != "task" and k != "limit"}
    )
    limited, full = load_split(DataOptions(**{**vars(options), "limit": 12}), "train"), load_split(options, "train")
    assert len(store) == 12 == len(limited.examples) < len(full.examples)
    assert limited.examples == full.examples[:12]
    assert store.manifest["request"]["dataset_fingerprint"] == limited.fingerprint != full.fingerprint

    code, out, err = run_cli(capsys, "run", path, "--limit", "12", "--dry-run")
    assert code == 0, err
    statuses = [line.split()[0] for line in out.splitlines()[1:-1]]
    assert statuses == ["reused"] * 5 + ["to"]  # the report is written again by every run
    assert " MB on disk" in out.splitlines()[2]
    code, out, err = run_cli(capsys, "run", path, "--dry-run")  # the full run: nothing of the limited one
    assert code == 0 and out.splitlines()[-1] == "6 step(s) to run, 0 reused; nothing was written (--dry-run)"
