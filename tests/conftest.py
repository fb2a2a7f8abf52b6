"""Shared fixtures: datasets written by code in the real on-disk formats (no binary fixtures in git)."""

from __future__ import annotations

import os

# No test may reach a model hub: offline mode makes huggingface_hub answer from its cache or fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import pickle
from pathlib import Path

import pytest
from PIL import Image

from probing.data.synthetic import demo_data_options, make_demo_data

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 62, "name": "chair", "supercategory": "furniture"},
]


def write_refer(
    root: Path, refs: list[dict], images: list[dict], annotations: list[dict], image_folder: str | None = "train2014"
) -> dict[str, Path]:
    """Write refs(umd).p (protocol 2, like REFER's cPickle files), instances.json and tiny JPEGs."""
    (root / "refcocog").mkdir(parents=True, exist_ok=True)
    with open(root / "refcocog" / "refs(umd).p", "wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    instances = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "refcocog" / "instances.json").write_text(json.dumps(instances))
    if image_folder is not None:
        folder = root / "images" / image_folder
        folder.mkdir(parents=True, exist_ok=True)
        for image in images:
            name = (
                f"COCO_train2014_{image['id']:012d}.jpg" if image_folder == "train2014" else f"{image['id']:012d}.jpg"
            )
            Image.new("RGB", (8, 8), (120, 30, 30)).save(folder / name)
    return {
        "refs": root / "refcocog" / "refs(umd).p",
        "instances": root / "refcocog" / "instances.json",
        "images": root / "images",
    }


def sentence(sent_id: int, raw: str) -> dict:
    sent = raw.lower().strip(".")
    return {"raw": raw, "sent": sent, "tokens": sent.split(), "sent_id": sent_id}


def small_refer_dataset(root: Path, image_folder: str | None = "train2014") -> dict[str, Path]:
    """Two images (one not square), four refs over train/val/test, hand-checkable numbers."""
    images = [
        {"id": 11, "file_name": "COCO_train2014_000000000011.jpg", "width": 200, "height": 100},
        {"id": 12, "file_name": "COCO_train2014_000000000012.jpg", "width": 100, "height": 100},
    ]
    annotations = [
        {"id": 501, "image_id": 11, "category_id": 18, "bbox": [10.0, 20.0, 50.0, 40.0], "area": 1.0, "iscrowd": 0},
        {"id": 502, "image_id": 11, "category_id": 1, "bbox": [150.0, 0.0, 50.0, 100.0], "area": 1.0, "iscrowd": 0},
        {"id": 503, "image_id": 12, "category_id": 62, "bbox": [25.0, 25.0, 50.0, 50.0], "area": 1.0, "iscrowd": 0},
        {"id": 504, "image_id": 12, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "area": 1.0, "iscrowd": 0},
        {"id": 505, "image_id": 12, "category_id": 18, "bbox": [90.0, 90.0, 10.0, 10.0], "area": 1.0, "iscrowd": 0},
    ]
    refs = [
        # file_name carries REFER's misleading _<ann_id> suffix: the loader must not use it.
        {
            "ref_id": 1,
            "ann_id": 501,
            "image_id": 11,
            "category_id": 18,
            "split": "train",
            "file_name": "COCO_train2014_000000000011_501.jpg",
            "sent_ids": [7, 8],
            "sentences": [sentence(7, "A brown dog on the left."), sentence(8, "the dog")],
        },
        {
            "ref_id": 2,
            "ann_id": 502,
            "image_id": 11,
            "category_id": 1,
            "split": "train",
            "file_name": "COCO_train2014_000000000011_502.jpg",
            "sent_ids": [9],
            "sentences": [sentence(9, "Person at the right edge")],
        },
        {
            "ref_id": 3,
            "ann_id": 503,
            "image_id": 12,
            "category_id": 62,
            "split": "val",
            "file_name": "COCO_train2014_000000000012_503.jpg",
            "sent_ids": [20],
            "sentences": [sentence(20, "the chair in the middle")],
        },
        {
            "ref_id": 4,
            "ann_id": 504,
            "image_id": 12,
            "category_id": 1,
            "split": "test",
            "file_name": "COCO_train2014_000000000012_504.jpg",
            "sent_ids": [30, 31],
            "sentences": [sentence(30, "tiny person top left"), sentence(31, "the person in the corner")],
        },
    ]
    return write_refer(root, refs, images, annotations, image_folder)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one state per process and refuses a second device or precision: tests that train on
    different devices (the GPU tests beside the CPU ones) each start from a clean state."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small demo dataset shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("demo") / "data"
    make_demo_data(root, seed=0, refcocog_images=200, vsr_images=100)
    return root


@pytest.fixture(scope="session")
def demo_options(demo_root) -> dict[str, dict[str, Path]]:
    return demo_data_options(demo_root)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random BLIP-2 ITM and InstructBLIP checkpoints saved with save_pretrained (sharded)."""
    from probing.models.tiny import write_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {family: write_checkpoint(root / family, family, seed=7) for family in ("blip2", "instructblip")}


@pytest.fixture(scope="session")
def refcocog_val(demo_options):
    from probing.data import DataOptions

    return DataOptions(task="refcocog", **demo_options["refcocog"])


def extract_splits(checkpoint: Path, options, root: Path, splits=("train", "val", "test"), **settings) -> Path:
    """One feature store per split, `root/<split>`, as `probing extract` writes them (layer 4 unless `layers`
    says otherwise); `settings` are further extraction settings."""
    from probing.store.extract import ExtractionRequest, extract

    for split in splits:
        extract(
            ExtractionRequest(
                **{"layers": "4", "workers": 0, "progress": False}
                | settings
                | {"model": str(checkpoint), "data": options, "split": split, "out": root / split}
            )
        )
    return root


@pytest.fixture(scope="session")
def vsr_features(tiny_checkpoints, demo_options, tmp_path_factory) -> Path:
    """The tiny BLIP-2's layer 4 on the demo's VSR, a store per split; tests read them and never write there."""
    from probing.data import DataOptions

    options = DataOptions(task="vsr", **demo_options["vsr"])
    return extract_splits(tiny_checkpoints["blip2"], options, tmp_path_factory.mktemp("vsr-features"))


def unfrozen_search_args(checkpoint: Path, vsr_options, out: Path, *extra, trials: int = 3, epochs="5") -> list:
    """`probing search` arguments for an unfrozen VSR search of layer 2 on the CPU (the demo's VSR and images)."""
    return [
        *("search", "--task", "vsr", "--mode", "unfrozen", "--model", checkpoint, "--vsr", vsr_options["vsr"]),
        *("--images", vsr_options["images"], "--layer", 2, "--trials", trials, "--epoch-choices", epochs),
        *("--batch-size", 32, "--device", "cpu", "--out", out, *extra),
    ]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the `probing` CLI in-process; (exit code, stdout, stderr)."""
    from probing.cli.app import main

    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# The columns of a report table that name what a row is about (their digits are names, not results).
REPORT_LABEL_COLUMNS = {"model", "mode", "task", "layer", "probe", "property", "hyper-parameter", "first", "second"}


def assert_results_hold_every_number(report: Path) -> int:
    """Every number a cell of the report's tables shows is one of `results.csv`'s numbers, as the table formats
    it (percent with one decimal, signed points, tau, p, learning rates ...); returns how many were checked."""
    import re

    import pandas as pd

    results = pd.read_csv(report / "results.csv")
    shown: set[str] = set()
    for column in ("value", "ci_low", "ci_high", "seeds_std", "p_value", "n"):
        for v in results[column].dropna():
            v = float(v)
            shown |= {f"{100 * v:.1f}", f"{100 * v:+.1f}", f"{100 * v:.2f}", f"{v:.2f}", f"{v:+.2f}", f"{v:.3f}"}
            shown |= {f"{v:.3g}", f"{v:.2e}", f"{v:g}"}
    number = re.compile(r"[+-]?\d+(?:\.\d+)?(?:e[+-]\d+)?")
    checked = 0
    for table in sorted((report / "tables").glob("*.md")):
        lines = [line for line in table.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
        headers = lines[0].strip("| ").split(" | ")
        for line in lines[1:]:
            for header, text in zip(headers, line.strip("| ").split(" | "), strict=True):
                if header in REPORT_LABEL_COLUMNS:
                    continue
                for token in number.findall(text):
                    assert token in shown, f"{table.name}: {header} = {text!r}: {token} is not in results.csv"
                    checked += 1
    return checked


# Numbers a table's CSV keeps beside the shown ones, as context: how many examples, seeds, categories or control
# seeds an estimate stands on (a cell shows the estimate, not its count), whether tau is significant (the dagger),
# and the codelengths behind the rigour table's noise-floor and control compressions (it shows the compressions,
# the ratio of two codelengths; results.csv holds the codelengths too).
CONTEXT_NUMBERS = ("examples", "seeds", "categories", "significant", "control_seeds")
UNSHOWN_CODELENGTHS = {
    f"{prefix}{name}"
    for prefix in ("noise_floor_", "control_", "control_noise_floor_")
    for name in ("codelength_kbits", "codelength_ci_low", "codelength_ci_high", "uniform_kbits")
}


def _renderings(value: float) -> set[str]:
    """The ways a table may print `value`: percent, signed points, tau, p, kbits, learning rates, counts."""
    v = float(value)
    shown = {f"{100 * v:.1f}", f"{100 * v:+.1f}", f"{100 * v:.2f}", f"{v:.2f}", f"{v:+.2f}", f"{v:.3f}"}
    return shown | {f"{v:.3g}", f"{v:.2e}", f"{v:g}"}


def _numbers(record: dict, context: bool = False) -> dict[str, float]:
    """A record's numbers that a cell shows (not its labels; its context counts too where `context`)."""
    return {
        key: value
        for key, value in record.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and value == value
        and key != "layer"  # a label: the layer column's, or no column's
        and (context or not (key.endswith(CONTEXT_NUMBERS) or key in UNSHOWN_CODELENGTHS))
    }


def report_tables(paths, compare_paper: bool = False, only=None) -> list:
    """The tables (`probing.report.tables.Table`) a report of the run folders `paths` builds, as objects."""
    from probing.report.tables import ReportOptions, builders_in_place, load_runs

    runs, _ = load_runs([Path(path) for path in paths])
    built = [table for builder in builders_in_place() for table in builder.build(runs, ReportOptions(compare_paper))]
    return [table for table in built if only is None or table.name in only]


def assert_rows_hold_their_numbers(tables, report: Path) -> int:
    """Every number of every table's CSV is shown in the row it came from, every number a row shows is in its
    records (a per-category table's count row aside), and results.csv holds every number of the tables' CSVs;
    returns how many numbers the CSVs hold."""
    mismatches = [m for m in row_number_mismatches(tables) if "['n', " not in m]
    assert mismatches == [], "\n".join(mismatches)
    missing = results_number_mismatches(tables, report)
    assert missing == [], "\n".join(missing)
    for table in tables:  # the objects checked are the tables written
        assert (report / "tables" / f"{table.name}.md").read_text(encoding="utf-8") == table.markdown()
    return sum(isinstance(value, float) for table in tables for record in table.records for value in record.values())


def row_number_mismatches(tables) -> list[str]:
    """For each row of each table (`probing.report.tables.Table`): a number of its records that none of its
    cells shows, or a number a cell shows (outside the label columns) that none of its records holds; named."""
    import re

    number = re.compile(r"[+-]?\d+(?:\.\d+)?(?:e[+-]\d+)?")
    mismatches = []
    for table in tables:
        for row in table.body:
            shown = {
                token
                for header, text in zip(table.headers, row.texts, strict=True)
                if header not in REPORT_LABEL_COLUMNS
                for token in number.findall(text)
            }
            held: set[str] = set()
            for record in row.every_record:
                held |= {text for value in _numbers(record, context=True).values() for text in _renderings(value)}
                for key, value in _numbers(record).items():
                    if not _renderings(value) & shown:
                        mismatches.append(f"{table.name} {row.texts[:2]}: {key}={value} is in no cell of its row")
            for token in sorted(shown - held):
                mismatches.append(f"{table.name} {row.texts[:2]}: {token} is shown but in no record of its row")
    return mismatches


def results_number_mismatches(tables, report: Path) -> list[str]:
    """The numbers of each table's CSV that `results.csv` (written beside them in `report`) does not hold."""
    import pandas as pd

    results = pd.read_csv(report / "results.csv")
    held = {
        round(float(v), 12)
        for column in ("value", "ci_low", "ci_high", "seeds_std", "p_value", "n", "seeds")
        for v in results[column].dropna()
    }
    return [
        f"{table.name}: {key}={value} of {record.get('model')} {record.get('mode')} is not in results.csv"
        for table in tables
        for record in table.records
        for key, value in _numbers(record).items()
        if round(float(value), 12) not in held
    ]


@pytest.fixture(scope="session")
def stage2_checkpoint(tmp_path_factory):
    """A tiny random BLIP-2 stage-2 checkpoint (OPT language model) saved with save_pretrained."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    from probing.models.blip2 import Blip2Resampler
    from probing.models.tiny import build_config

    first_stage = build_config("blip2", "tiny", vocab_size=64)
    qformer = first_stage.qformer_config.to_dict() | {"use_qformer_text_input": False}
    config = Blip2Config(
        vision_config=first_stage.vision_config.to_dict(),
        qformer_config=qformer,
        text_config=OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
        ).to_dict(),
        num_query_tokens=4,
    )
    torch.manual_seed(3)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("stage2") / "blip2-opt"
    model.save_pretrained(out)
    Blip2Resampler.default_image_processor(config).save_pretrained(out)
    return out


def _postgres_binaries() -> Path | None:
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server of its own on 127.0.0.1 (initdb and pg_ctl in a temporary folder, as an unprivileged
    user when the tests run as root), stopped at the end. Skipped, with the reason, where none can start."""
    import shutil
    import socket
    import subprocess
    import tempfile

    pytest.importorskip("psycopg", reason="the [postgres] extra (psycopg) is not installed")
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server installed (Debian: apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="probing-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(folder, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = folder / "data"

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)

    made = run(str(binaries / "initdb"), "-D", str(data), "-U", "probing", "--auth=trust", "-E", "UTF8")
    if made.returncode != 0:
        pytest.skip(
            f"initdb failed: {made.stderr.strip().splitlines()[-1] if made.stderr.strip() else made.returncode}"
        )
    started = run(
        str(binaries / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(folder / "log"),
        "-w",
        "-o",
        f"-p {port} -h 127.0.0.1 -k {folder}",
        "start",
    )
    if started.returncode != 0:
        log = (folder / "log").read_text()[-300:] if (folder / "log").exists() else started.stderr
        pytest.skip(f"PostgreSQL did not start: {log}")
    try:
        yield f"postgresql://probing@127.0.0.1:{port}/postgres"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def val_extraction(checkpoint, options, out, **overrides):
    """An extraction of a tiny checkpoint on a data fixture's val split at test sizes (40-example shards, batches
    of 16, decoding in the process), `overrides` on top."""
    from probing.store.settings import ExtractionRequest

    settings = dict(
        model=str(checkpoint),
        data=options,
        split="val",
        out=out,
        shard_size=40,
        batch_size=16,
        workers=0,
        progress=False,
    )
    return ExtractionRequest(**(settings | overrides))
