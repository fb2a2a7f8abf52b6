"""Settings are declared once: every field that enters an output's identity can be set from the command line and
from a config, and reaches the identity of what it makes; options and config fields follow the declarations."""

import dataclasses

import pytest
import yaml
from conftest import run_cli

from probing.core.errors import ProbingError
from probing.core.settings import declared, identity, option_name
from probing.data.types import DataOptions
from probing.models import ModelSource
from probing.probes.run import run_identity
from probing.probes.train import TrainSettings, Trial
from probing.runs.config import Config, from_dict
from probing.runs.pipeline import plan, search_request, store_requests
from probing.store.extract import ExtractionSettings
from probing.studies.search import SearchSettings, search_identity

# field -> (command-line arguments, config change, expected identity value); one row per identity field
EXTRACT = {
    "shard_size": (["--shard-size", "7"], {"extract": {"shard_size": 7}}, 7),
    "batch_size": (["--batch-size", "5"], {"extract": {"batch_size": 5}}, 5),
    "store_vision": (["--store-vision"], {"modes": ["frozen", "unfrozen"]}, True),  # a config derives it
    "dtype": (["--dtype", "bfloat16"], {"extract": {"dtype": "bfloat16"}}, "bfloat16"),
    "vision_dtype": (["--vision-dtype", "float16"], {"extract": {"vision_dtype": "float16"}}, "float16"),
    "qformer_dtype": (["--qformer-dtype", "bfloat16"], {"extract": {"qformer_dtype": "bfloat16"}}, "bfloat16"),
    "compile_vision": (["--compile-vision"], {"extract": {"compile_vision": True}}, True),
    "skip_bad_images": (["--skip-bad-images"], {"extract": {"skip_bad_images": True}}, True),
    "text_preprocessing": (["--text-preprocessing", "lavis"], {"extract": {"text_preprocessing": "lavis"}}, "lavis"),
    "instruction": (["--instruction", "Q: {text}"], {"extract": {"instruction": "Q: {text}"}}, "Q: {text}"),
}
TRAIN = {
    "probe": (["--probe", "swiglu2"], {"probes": ["swiglu2"]}, "swiglu2"),
    # a width is a SwiGLU probe's (given with a linear probe it is refused: test_rigor's table of scopes)
    "hidden": (["--probe", "swiglu2", "--hidden", "32"], {"probes": ["swiglu2"], "train": {"hidden": 32}}, 32),
    "batch_size": (["--batch-size", "16"], {"train": {"batch_size": 16}}, 16),
    "warmup_fraction": (["--warmup-fraction", "0.25"], {"train": {"warmup_fraction": 0.25}}, 0.25),
    "weight_decay": (["--weight-decay", "0.5"], {"train": {"weight_decay": 0.5}}, 0.5),
    "patience": (["--patience", "3"], {"train": {"patience": {"vsr": 3}}}, 3),
    "order_seed": (["--seed", "4"], {"search": {"seed": 4}}, 4),  # a search's batch order is its seed
    "latents": (["--latents", "mean"], {"train": {"latents": "mean"}}, "mean"),
}
SEARCH = {
    "trials": (["--trials", "3"], {"search": {"trials": 3}}, 3),
    "batch": (["--batch", "2"], {"search": {"batch": 2}}, 2),
    "seed": (["--seed", "4"], {"search": {"seed": 4}}, 4),
    "final_seeds": (["--final-seeds", "1,2"], {"search": {"final_seeds": [1, 2]}}, [1, 2]),
    "pruner": (["--pruner", "median"], {"search": {"pruner": "median"}}, "median"),
    "study_name": (
        ["--study-name", "s", "--storage", "sqlite:///x.db"],
        {"search": {"storage": "sqlite:///x.db"}},
        "t/runs/x/m/vsr/frozen/layer4-linear",
    ),  # a config names its studies after their folders
}
# A trial's hyper-parameters: one value per `probing train` run; a search draws them from its space.
TRIAL = {
    "lr": (["--lr", "0.02"], {"search": {"space": {"vsr": {"lr": [0.02, 0.03]}}}}, [0.02, 0.03]),
    "epochs": (["--epochs", "9"], {"search": {"space": {"vsr": {"epochs": [9]}}}}, [9]),
    "seed": (["--seeds", "5"], {"search": {"final_seeds": [5]}}, [5]),
    # loss scales are a box task's (on VSR they are refused: test_rigor's table of scopes)
    "giou_scale": (
        ["--giou-scale", "3"],
        {"tasks": ["refcocog"], "search": {"space": {"refcocog": {"giou_scale": [3]}}}},
        [3.0],
    ),
    "l1_scale": (
        ["--l1-scale", "3"],
        {"tasks": ["refcocog"], "search": {"space": {"refcocog": {"l1_scale": [3]}}}},
        [3.0],
    ),
    "logreg_c": (
        ["--logreg-c", "0.5", "--probe", "logreg"],
        {"probes": ["logreg"], "search": {"space": {"vsr": {"logreg_c": [0.5, 2]}}}},
        [0.5, 2.0],
    ),
}

TRIAL_ON_THE_COMMAND_LINE = {"lr": 0.02, "epochs": 9, "seed": 5, "giou_scale": 3.0, "l1_scale": 3.0, "logreg_c": 0.5}


def identity_fields(cls) -> list[str]:
    return [field.name for field, info in declared(cls) if info.identity]


@pytest.mark.parametrize(
    "cls,table", [(ExtractionSettings, EXTRACT), (TrainSettings, TRAIN), (SearchSettings, SEARCH), (Trial, TRIAL)]
)
def test_every_identity_field_has_a_route(cls, table):
    assert sorted(identity_fields(cls)) == sorted(table)  # a new identity field must be given its routes here


class Captured(Exception):
    pass


def capture(monkeypatch, module, name):
    """Replace a stage function by one that keeps the request the command built, and stops there."""
    seen = {}

    def stage(request):
        seen["request"] = request
        raise Captured

    monkeypatch.setattr(module, name, stage)
    return seen


def run_captured(capsys, seen, *args):
    with pytest.raises(Captured):
        run_cli(capsys, *args)
    return seen["request"]


@pytest.mark.parametrize("name", list(EXTRACT))
def test_extraction_settings_from_the_command_line(capsys, monkeypatch, name):
    import probing.store.extract

    seen = capture(monkeypatch, probing.store.extract, "extract")
    args, _, value = EXTRACT[name]
    request = run_captured(
        capsys, seen, "extract", "--model", "blip2", "--task", "vsr", "--split", "val", "--out", "x", *args
    )
    key = "vision_compiled" if name == "compile_vision" else name
    assert identity(request)[key] == value


def config_for(tmp_path, change: dict) -> dict:
    experiment = {"name": "x", "tasks": ["vsr"], "models": ["m"]}
    config = {
        "name": "t",
        "workspace": str(tmp_path / "w"),
        "models": {"m": {"model": "blip2"}},
        "experiments": [experiment],
    }
    for key, value in change.items():
        if key in ("extract", "train"):
            config[key] = value
        else:
            experiment[key] = value
    return from_dict(Config, config)


def requests_of(config):
    from probing.runs.config import check

    check(config, paths=False)
    sources = {"m": ModelSource(model="blip2")}
    task = config.experiments[0].tasks[0]
    options = {task: DataOptions(task=task)}
    units = plan(config, {"m": 4})
    stores = store_requests(config, units, options, sources, {"m": 4})
    searches = [search_request(config, unit, sources, options, config.workspace) for unit in units]
    return stores[("m", task)][0], searches


@pytest.mark.parametrize("name", list(EXTRACT))
def test_extraction_settings_from_a_config(tmp_path, name):
    _, change, value = EXTRACT[name]
    store, _ = requests_of(config_for(tmp_path, change))
    key = "vision_compiled" if name == "compile_vision" else name
    assert identity(store)[key] == value


@pytest.mark.parametrize("name", list(TRAIN))
def test_train_settings_from_the_command_line_and_a_config(capsys, monkeypatch, tmp_path, name):
    import probing.probes.run
    import probing.studies.search

    args, change, value = TRAIN[name]
    seen = capture(monkeypatch, probing.probes.run, "run_training")
    train_args = ["--order-seed", "4"] if name == "order_seed" else args  # train names it; a search takes its seed
    request = run_captured(
        capsys,
        seen,
        "train",
        "--task",
        "vsr",
        "--layer",
        4,
        "--lr",
        1e-3,
        "--epochs",
        2,
        "--features",
        tmp_path,
        "--out",
        "x",
        *train_args,
    )
    run = run_identity(request, {})
    assert (run[name] if name in ("probe", "hidden") else run["settings"][name]) == value
    seen = capture(monkeypatch, probing.studies.search, "run_search")
    request = run_captured(
        capsys, seen, "search", "--task", "vsr", "--layer", 4, "--features", tmp_path, "--out", "x", *args
    )
    found = search_identity(request, {})
    assert (found[name] if name in ("probe", "hidden") else found["settings"][name]) == value
    _, searches = requests_of(config_for(tmp_path, change))
    found = search_identity(searches[0], {})
    assert (found[name] if name in ("probe", "hidden") else found["settings"][name]) == value


@pytest.mark.parametrize("name", list(SEARCH))
def test_search_settings_from_the_command_line_and_a_config(capsys, monkeypatch, tmp_path, name):
    import probing.studies.search

    args, change, value = SEARCH[name]
    seen = capture(monkeypatch, probing.studies.search, "run_search")
    request = run_captured(
        capsys, seen, "search", "--task", "vsr", "--layer", 4, "--features", tmp_path, "--out", "x", *args
    )
    expected = "s" if name == "study_name" else value
    assert search_identity(request, {})[name] == expected
    _, searches = requests_of(config_for(tmp_path, change))
    assert search_identity(searches[0], {})[name] == value


@pytest.mark.parametrize("name", list(TRIAL))
def test_trial_settings_from_the_command_line_and_a_config(capsys, monkeypatch, tmp_path, name):
    import probing.probes.run

    args, change, value = TRIAL[name]
    seen = capture(monkeypatch, probing.probes.run, "run_training")
    request = run_captured(
        capsys,
        seen,
        "train",
        "--task",
        "vsr",
        "--layer",
        4,
        "--lr",
        1e-3,
        "--epochs",
        2,
        "--features",
        tmp_path,
        "--out",
        "x",
        *args,
    )
    assert run_identity(request, {})["trials"][0][name] == TRIAL_ON_THE_COMMAND_LINE[name]
    _, searches = requests_of(config_for(tmp_path, change))
    found = search_identity(searches[0], {})
    assert (found["final_seeds"] if name == "seed" else found["space"][name]) == value


def test_options_and_config_fields_follow_the_declarations(capsys):
    """Each declared command-line field is an option of its commands, each config-settable one a config field."""
    from probing.cli.app import built_command
    from probing.runs.config import SearchConfig, TrainConfig

    def options_of(command: str) -> set[str]:
        return {opt for param in built_command(command).params for opt in param.opts}

    for command, classes in (
        ("extract", (ExtractionSettings, ModelSource, DataOptions)),
        ("train", (TrainSettings, Trial, ModelSource, DataOptions)),
        ("search", (SearchSettings, ModelSource, DataOptions)),
    ):
        for cls in classes:
            for field, _ in declared(cls):
                flag = option_name(field)
                if flag is None or (command == "search" and field.name == "order_seed"):
                    continue
                assert flag in options_of(command), (command, flag)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"hidden", "batch_size", "warmup_fraction", "weight_decay"} <= train_fields
    assert not {"task", "device", "probe"} & train_fields  # set elsewhere in a config (experiments, top level)
    assert {f.name for f in dataclasses.fields(SearchConfig)} >= {"trials", "batch", "seed", "final_seeds", "storage"}
    with pytest.raises(ProbingError, match=r"config field 'extract.progress': unknown field"):
        from_dict(ExtractionSettings, {"progress": False}, "extract")


def test_a_config_refuses_an_unknown_table(tmp_path, capsys):
    config = {
        "name": "t",
        "workspace": str(tmp_path / "w"),
        "models": {"m": {"model": "blip2"}},
        "experiments": [{"name": "x", "tasks": ["vsr", "refcoco"], "models": ["m"]}],
        "report": {"tables": ["table1", "categories_refcoco_testA", "table9"]},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = run_cli(capsys, "run", path)
    assert code == 2 and "config field 'report.tables[2]': unknown table 'table9'; known: table1, " in err
    assert "categories_refcoco_testB" in err and err.count("\n") == 1
