"""The command line: help everywhere, exit codes, one-line errors, JSON stats, the demo."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import run_cli, small_refer_dataset

from probing.data.synthetic import SUPERCATEGORIES

EVERY_COMMAND = [
    *[[name] for name in ("make-demo-data", "build-rcm", "tasks", "extract", "train", "search", "zeroshot", "mdl")],
    *[[name] for name in ("analyze", "plot", "report", "dashboard", "run", "demo")],
    ["data"],
    ["data", "stats"],
    ["annotate"],
    *[["annotate", name] for name in ("serve", "score", "export")],
]
# Every command's help is built without torch or transformers: the options come from settings declared in torch-free
# modules (docs/architecture.md, "The layout"), which is what keeps `probing CMD --help` under a second.
LIGHT_COMMANDS = [[], *EVERY_COMMAND]
HEAVY_MODULES = ("torch", "transformers")

IMPORTED_HEAVY_MODULES = """
import sys
from probing.cli.app import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(name for name in sys.modules if name.split(".")[0] in {heavy!r}), file=sys.stderr)
"""


@pytest.mark.parametrize("command", [[], *EVERY_COMMAND])
def test_help_on_every_command(capsys, command):
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0 and f"Usage: probing {' '.join(command)}".rstrip() in out
    if command and command[0] not in ("data", "annotate"):
        assert "Example: probing " + command[0] in " ".join(out.split())  # the epilog, whatever the wrapping


def test_importing_the_cli_imports_neither_torch_nor_transformers():
    """A fresh interpreter: `import probing.cli.app` (what every `probing` call does first) stays light."""
    script = (
        f"import sys, probing.cli.app; print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_MODULES!r}))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command", LIGHT_COMMANDS)
def test_help_of_the_root_and_light_commands_imports_no_torch(command):
    """What makes `probing --help` fast, and cannot flake: torch and transformers are never imported for it."""
    script = IMPORTED_HEAVY_MODULES.format(heavy=HEAVY_MODULES)
    result = subprocess.run([sys.executable, "-c", script, *command, "--help"], capture_output=True, text=True)
    assert "Usage: probing" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "[]"


def test_root_help_time():
    """`probing --help` in a fresh interpreter. The target is 1 s; the bound leaves room for a loaded machine (the
    module check above is the exact one)."""
    import time

    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "probing", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0 and "Stages" in result.stdout
    assert elapsed < 2.5, f"probing --help took {elapsed:.2f} s"


def test_version(capsys):
    from probing.core.artifacts import code_version

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out == f"probing {code_version()}\n"


def test_the_help_groups_commands_and_options_into_panels(capsys):
    _, out, _ = run_cli(capsys, "--help")
    panels = [line.split("─ ")[1].split(" ─")[0] for line in out.splitlines() if line.startswith("╭─ ")]
    assert panels == ["Options", "Data", "Stages", "Results", "Pipelines"]
    _, out, _ = run_cli(capsys, "search", "--help")
    panels = [line.split("─ ")[1].split(" ─")[0] for line in out.splitlines() if line.startswith("╭─ ")]
    assert panels == ["Options", "Data", "Model", "Training", "Search", "Search space"]


def test_deprecated_option_spellings_still_work_with_a_warning(capsys):
    from probing.cli.app import _replace_deprecated

    args = ["--batch", "4", "--epochs=3,5", "--trials", "2", "--", "--batch"]
    assert _replace_deprecated("search", args) == [
        "--trials-per-batch",
        "4",
        "--epoch-choices=3,5",
        "--trials",
        "2",
    ] + [
        "--",
        "--batch",
    ]
    assert capsys.readouterr().err == (
        "warning: search --batch is deprecated, use --trials-per-batch\n"
        "warning: search --epochs is deprecated, use --epoch-choices\n"
    )
    assert _replace_deprecated("train", ["--epochs", "3"]) == ["--epochs", "3"]  # train's --epochs is current
    code, _, err = run_cli(capsys, "search", "--batch", "0", "--task", "vsr", "--layer", "1", "--out", "x")
    assert code == 2  # --batch reached the search as --trials-per-batch and was checked there
    assert err.splitlines() == [
        "warning: search --batch is deprecated, use --trials-per-batch",
        "error: --trials-per-batch: must be >= 1, got 0",
    ]


def test_console_script_and_module_entry_points_exist():
    script = shutil.which("probing", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert script is not None
    result = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "build-rcm" in result.stdout


def test_stats_json_on_the_demo_data(capsys, demo_options):
    options = demo_options["refcocog"]
    code, out, err = run_cli(
        capsys,
        "data",
        "stats",
        "--task",
        "refcocog",
        "--refs",
        str(options["refs"]),
        "--instances",
        str(options["instances"]),
        "--images",
        str(options["images"]),
        "--json",
    )
    assert code == 0, err
    stats = json.loads(out)
    assert set(stats["splits"]) == {"train", "val", "test"}
    manifest = json.loads((options["refs"].parent.parent / "manifest.json").read_text())
    for split, values in stats["splits"].items():
        assert values["examples"] == manifest["refcocog"][split]["sentences"]
        assert values["images"] == manifest["refcocog"][split]["images"]
        assert values["missing_images"] == 0
        assert sum(values["categories"].values()) == values["examples"]
        assert set(values["categories"]) <= set(SUPERCATEGORIES)


def test_stats_counts_missing_images_without_decoding(capsys, tmp_path):
    paths = small_refer_dataset(tmp_path)
    (paths["images"] / "train2014" / "COCO_train2014_000000000012.jpg").unlink()
    (paths["images"] / "train2014" / "COCO_train2014_000000000011.jpg").write_bytes(b"not a jpeg")  # exists: ok
    code, out, _ = run_cli(
        capsys,
        "data",
        "stats",
        "--task",
        "refcocog",
        "--refs",
        str(paths["refs"]),
        "--instances",
        str(paths["instances"]),
        "--images",
        str(paths["images"]),
        "--split",
        "train",
        "--split",
        "test",
        "--json",
    )
    assert code == 0
    stats = json.loads(out)["splits"]
    assert set(stats) == {"train", "test"}
    assert stats["train"] == {
        **stats["train"],
        "examples": 3,
        "images": 1,
        "missing_images": 0,
        "categories": {"animal": 2, "person": 1},
    }
    assert stats["test"]["missing_images"] == 1
    assert stats["test"]["first_missing_image"].endswith("train2014/COCO_train2014_000000000012.jpg")


def test_stats_for_vsr_and_rcm(capsys, demo_options, tmp_path):
    vsr = demo_options["vsr"]
    code, out, _ = run_cli(
        capsys,
        "data",
        "stats",
        "--task",
        "vsr",
        "--vsr",
        str(vsr["vsr"]),
        "--images",
        str(vsr["images"]),
        "--split",
        "val",
        "--json",
    )
    assert code == 0
    val = json.loads(out)["splits"]["val"]
    dev_lines = (vsr["vsr"] / "dev.jsonl").read_text().splitlines()
    assert val["examples"] == len(dev_lines)
    assert val["labels"]["1"] == sum(json.loads(line)["label"] for line in dev_lines)
    ref = demo_options["refcocog"]
    code, out, _ = run_cli(
        capsys,
        "build-rcm",
        "--refs",
        str(ref["refs"]),
        "--instances",
        str(ref["instances"]),
        "--out",
        str(tmp_path / "rcm"),
    )
    assert code == 0 and "train examples" in out and "positives" in out
    code, out, _ = run_cli(
        capsys,
        "data",
        "stats",
        "--task",
        "rcm",
        "--rcm",
        str(tmp_path / "rcm"),
        "--images",
        str(ref["images"]),
        "--json",
    )
    assert code == 0
    cells = json.loads(out)["splits"]["test"]["categories"]
    assert list(cells) == [
        "top left",
        "top middle",
        "top right",
        "middle left",
        "middle",
        "middle right",
        "bottom left",
        "bottom middle",
        "bottom right",
    ]
    assert len({(c["positive"], c["negative"]) for c in cells.values()}) == 1  # balanced


@pytest.mark.parametrize(
    "args,message",
    [
        (["data", "stats", "--task", "vsr"], "error: --vsr is required for --task vsr"),
        (["data", "stats", "--task", "coco"], "error: --task: unknown task 'coco'"),
        (
            ["data", "stats", "--task", "vsr", "--vsr", "{missing}", "--images", "{tmp}"],
            "error: --vsr: {missing}: not found",
        ),
        (
            ["build-rcm", "--refs", "{missing}", "--instances", "{missing}", "--out", "{tmp}/rcm"],
            "error: {missing}: file not found",
        ),
        (["make-demo-data", "{tmp}/d", "--vsr-version", "v3"], "error: --vsr-version: unknown version 'v3'"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(capsys, tmp_path, args, message):
    missing = str(tmp_path / "missing")
    args = [a.format(missing=missing, tmp=tmp_path) for a in args]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith(message.format(missing=missing, tmp=tmp_path))
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_jsonl_line_and_truncated_pickle_through_the_cli(capsys, tmp_path):
    paths = small_refer_dataset(tmp_path)
    paths["refs"].write_bytes(paths["refs"].read_bytes()[:40])
    code, _, err = run_cli(
        capsys,
        "data",
        "stats",
        "--task",
        "refcocog",
        "--refs",
        str(paths["refs"]),
        "--instances",
        str(paths["instances"]),
        "--images",
        str(paths["images"]),
    )
    assert code == 2 and "refs(umd).p: not a readable pickle" in err and err.count("\n") == 1
    vsr = tmp_path / "vsr"
    vsr.mkdir()
    for name in ("train", "dev", "test"):
        (vsr / f"{name}.jsonl").write_text('{"image": "000000000001.jpg"}\nnot json\n')
    code, _, err = run_cli(capsys, "data", "stats", "--task", "vsr", "--vsr", str(vsr), "--images", str(tmp_path))
    assert code == 2 and err.strip() == f"error: {vsr / 'train.jsonl'}: line 1: missing field 'caption'"
    (vsr / "train.jsonl").write_text("not json\n")
    code, _, err = run_cli(capsys, "data", "stats", "--task", "vsr", "--vsr", str(vsr), "--images", str(tmp_path))
    assert code == 2 and err.strip().startswith(f"error: {vsr / 'train.jsonl'}: line 1: not valid JSON")


def test_unknown_split_and_verbose_traceback(capsys, demo_options):
    vsr = demo_options["vsr"]
    args = [
        "data",
        "stats",
        "--task",
        "vsr",
        "--vsr",
        str(vsr["vsr"]),
        "--images",
        str(vsr["images"]),
        "--split",
        "holdout",
    ]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err == "error: --split: unknown split 'holdout' (choose train, val, test)\n"
    code, _, err = run_cli(capsys, *args, "--verbose")
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("(choose train, val, test)")


def test_make_demo_data_reuses_and_refuses_another_seed(capsys, tmp_path):
    out = tmp_path / "demo"
    code, text, _ = run_cli(capsys, "make-demo-data", str(out), "--refcocog-images", "30", "--vsr-images", "12")
    assert code == 0 and "demo dataset written" in text and "--refs" in text
    stamp = (out / "manifest.json").stat().st_mtime_ns
    code, text, _ = run_cli(capsys, "make-demo-data", str(out), "--refcocog-images", "30", "--vsr-images", "12")
    assert code == 0 and "already there" in text and (out / "manifest.json").stat().st_mtime_ns == stamp
    code, _, err = run_cli(
        capsys, "make-demo-data", str(out), "--refcocog-images", "30", "--vsr-images", "12", "--seed", "1"
    )
    assert code == 2 and "made with a different 'seed'" in err


def test_output_directory_that_is_not_ours_is_refused(capsys, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "make-demo-data", str(out), "--refcocog-images", "30", "--vsr-images", "12")
    assert code == 2 and "not empty and has no manifest.json" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_a_reduced_demo_runs_end_to_end_and_reuses_its_outputs(capsys, tmp_path):
    reduced = ["--out", str(tmp_path / "demo"), "--refcocog-images", "150", "--vsr-images", "80"]
    code, out, err = run_cli(capsys, "demo", *reduced)
    assert code == 0, err
    # quiet: a line per step (and progress bars on a terminal), Table 1's test accuracies as a narrow text table
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120 and "no parameter importances" not in out + err
    said = [line for line in lines if line]
    assert "info: extracted" not in err and len(said) == len(set(said))  # no line said twice
    assert lines[lines.index("") + 1].startswith("test (%)") and "refcocog" in lines[lines.index("") + 1]
    for model, mode in (
        ("BLIP-2 (tiny random)", "frozen"),
        ("BLIP-2 (tiny random)", "unfrozen"),
        ("InstructBLIP (tiny random)", "frozen"),
        ("InstructBLIP (tiny random)", "unfrozen"),
        ("InstructBLIP (tiny random)", "zero-shot prompt"),
        ("BLIP-2 (tiny random)", "ITM head"),
    ):
        assert any(re.match(rf"{re.escape(model)} +{mode} +(\d|–)", line) for line in lines), (model, mode)
    assert "searches: 43 built, 0 reused" in out and "not the paper's numbers" in out
    assert "rigour runs: 66 built, 0 reused" in out  # per rigour unit: a floor, 5 controls and their floors
    assert "zero-shot runs: 4 built, 0 reused" in out
    assert "mdl: 24 built, 0 reused" in out and "features: 45 built, 0 reused" in out
    report = tmp_path / "demo" / "report-demo"
    assert f"report: {report / 'README.md'}" in out
    readme = (report / "README.md").read_text()
    for section in (
        "### Table 1",
        "### Table 2",
        "### Table 3",
        "### Table 5",
        "### Per layer",
        "### ROC-AUC",
        "### Rigour",
        "### Resampler families",
        "## Figures",
    ):
        assert section in readme
    assert len(list((report / "figures").glob("*.png"))) == 7  # 6 per task (layers, categories) and families
    families = (report / "tables" / "families.md").read_text()
    for model, latents in (("BLIP-2", "4 × 24"), ("InstructBLIP", "4 × 24"), ("IDEFICS2", "5 × 16")):
        assert re.search(rf"\| {model} \(tiny random\) \| \w[^|]* \| {latents} \|", families), model
    assert {p.suffix for p in (report / "figures").glob("per_layer_vsr.*")} == {".pdf", ".png", ".svg"}
    results = (report / "results.csv").read_text()
    assert results.startswith("model,model_id,init,task,mode,layer,probe,") and (report / "runs.txt").is_file()
    tables = {p.name: p.read_bytes() for p in (report / "tables").iterdir()}
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*.safetensors")}
    code, out, err = run_cli(capsys, "demo", *reduced)
    assert code == 0, err
    assert "searches: 0 built, 43 reused" in out and "features: 0 built, 45 reused" in out
    assert "zero-shot runs: 0 built, 4 reused" in out and "mdl: 0 built, 24 reused" in out
    assert "rigour runs: 0 built, 66 reused" in out
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*.safetensors")}  # all reused
    assert tables == {p.name: p.read_bytes() for p in (report / "tables").iterdir()}  # identical results
