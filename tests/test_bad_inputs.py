"""Nothing silently wrong: every bad input tried is refused with ONE line on stderr naming the option, config
field, file or line, exit status 2, no traceback, and nothing written half-way; the cases that were already clean
are in the same table, so that they stay so. Plus: two extractions started together into one folder with different
requests never both succeed."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import run_cli, small_refer_dataset

from probing.store.extract import ExtractionRequest, extract
from probing.store.features import _VERIFIED


@dataclass
class World:
    """What the cases damage copies of: a tiny checkpoint, REFER files, VSR and RCM folders, stores, a run."""

    tmp: Path
    checkpoint: Path
    refer: dict[str, Path]
    vsr: dict[str, Path]
    rcm: Path
    features: Path  # train/ val/ test/ stores of layer 1
    run: Path  # a run folder trained on them

    def refer_options(self, refer: dict[str, Path] | None = None) -> list:
        refer = refer or self.refer
        return ["--refs", refer["refs"], "--instances", refer["instances"], "--images", refer["images"]]

    def extract_args(self, out: Path, *extra, refer: dict[str, Path] | None = None) -> list:
        return [
            "extract",
            "--task",
            "refcocog",
            *self.refer_options(refer),
            "--model",
            self.checkpoint,
            "--split",
            "val",
            "--layers",
            "1",
            "--workers",
            "0",
            "--out",
            out,
            *extra,
        ]

    def train_args(self, out: Path, *extra, features: Path | None = None) -> list:
        options = ["--task", "refcocog", "--features", features or self.features, "--layer", "1"]
        return ["train", *options, "--lr", "0.01", "--epochs", "1", "--out", out, *extra]

    def search_args(self, out: Path, *extra) -> list:
        options = ["--task", "refcocog", "--features", self.features, "--layer", "1"]
        return ["search", *options, "--trials", "1", "--epoch-choices", "1", "--out", out, *extra]


@pytest.fixture(scope="module")
def world(tiny_checkpoints, demo_options, tmp_path_factory) -> World:
    from probing.data.rcm import build_rcm

    root = tmp_path_factory.mktemp("bad-inputs")
    refer = small_refer_dataset(root / "refer")
    checkpoint = tiny_checkpoints["blip2"]
    features = root / "features"
    for split in ("train", "val", "test"):
        request = ExtractionRequest(
            model=str(checkpoint),
            data=_refer_data(refer),
            split=split,
            out=features / split,
            layers="1",
            workers=0,
            progress=False,
        )
        extract(request)
    run = root / "run"
    code = _cli_quiet(World(root, checkpoint, refer, {}, root, features, run).train_args(run, "--seeds", "0,1"))
    assert code == 0
    rcm = root / "rcm"
    build_rcm(demo_options["refcocog"]["refs"], demo_options["refcocog"]["instances"], rcm)
    return World(root, checkpoint, refer, demo_options["vsr"], rcm, features, run)


def _refer_data(refer: dict[str, Path]):
    from probing.data import DataOptions

    return DataOptions(task="refcocog", refs=refer["refs"], instances=refer["instances"], images=refer["images"])


def _cli_quiet(args: list) -> int:
    from probing.cli.app import main

    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


# ------------------------------------------------------------------------------------------- builders


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb): a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def copy_refer(world: World, tmp: Path) -> dict[str, Path]:
    shutil.copytree(world.refer["refs"].parent.parent, tmp / "refer")
    return {
        "refs": tmp / "refer" / "refcocog" / "refs(umd).p",
        "instances": tmp / "refer" / "refcocog" / "instances.json",
        "images": tmp / "refer" / "images",
    }


def deep_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def with_refs(change: Callable[[list], None]) -> Callable[[World, Path], list]:
    def build(world: World, tmp: Path) -> list:
        refer = copy_refer(world, tmp)
        refs = pickle.loads(refer["refs"].read_bytes())
        change(refs)
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(20_000)  # the pickler recurses once per level of a deep list
        try:
            refer["refs"].write_bytes(pickle.dumps(refs, protocol=2))
        finally:
            sys.setrecursionlimit(limit)
        return world.extract_args(tmp / "store", refer=refer)

    return build


def huge_image_id(world: World, tmp: Path) -> list:
    refer = copy_refer(world, tmp)
    text = refer["instances"].read_text()
    refer["instances"].write_text(text.replace('"id": 11,', '"id": ' + "9" * 5001 + ",", 1))
    return world.extract_args(tmp / "store", refer=refer)


def duplicated_image_id(world: World, tmp: Path) -> list:
    refer = copy_refer(world, tmp)
    instances = json.loads(refer["instances"].read_text())
    instances["images"][1]["id"] = instances["images"][0]["id"]
    refer["instances"].write_text(json.dumps(instances))
    return world.extract_args(tmp / "store", refer=refer)


def bomb_image(world: World, tmp: Path) -> list:
    refer = copy_refer(world, tmp)
    (refer["images"] / "train2014" / "COCO_train2014_000000000012.jpg").write_bytes(bomb_png())  # val's image
    return world.extract_args(tmp / "store", refer=refer)


def vsr_line(change: Callable[[str], str]) -> Callable[[World, Path], list]:
    def build(world: World, tmp: Path) -> list:
        folder = tmp / "vsr"
        shutil.copytree(world.vsr["vsr"], folder)
        lines = (folder / "dev.jsonl").read_text().splitlines()
        lines[1] = change(lines[1])
        (folder / "dev.jsonl").write_text("\n".join(lines) + "\n")
        return ["data", "stats", "--task", "vsr", "--vsr", folder, "--images", world.vsr["images"], "--split", "val"]

    return build


def rcm_record(change: dict) -> Callable[[World, Path], list]:
    def build(world: World, tmp: Path) -> list:
        folder = tmp / "rcm"
        shutil.copytree(world.rcm, folder)
        lines = (folder / "val.jsonl").read_text().splitlines()
        lines[1] = json.dumps(json.loads(lines[1]) | change)
        (folder / "val.jsonl").write_text("\n".join(lines) + "\n")
        return ["data", "stats", "--task", "rcm", "--rcm", folder, "--images", world.refer["images"], "--split", "val"]

    return build


def checkpoint_index(file_name: str) -> Callable[[World, Path], list]:
    def build(world: World, tmp: Path) -> list:
        folder = tmp / "checkpoint"
        shutil.copytree(world.checkpoint, folder)
        index = folder / "model.safetensors.index.json"
        content = json.loads(index.read_text())
        key = next(k for k in content["weight_map"] if k.startswith("qformer."))
        content["weight_map"][key] = file_name
        index.write_text(json.dumps(content))
        args = world.extract_args(tmp / "store")
        args[args.index("--model") + 1] = folder
        return args

    return build


CONFIG = """\
name: {name}
workspace: {workspace}
models:
  {label}: {{tiny: blip2}}
data:
  demo: {{refcocog_images: 20, vsr_images: 20}}
experiments:
  - name: {experiment}
    tasks: [vsr]
    models: [{label}]
"""


def config(
    text: str | bytes | None = None, append: str = "", replace: tuple[str, str] = ("", ""), **fields: str
) -> Callable[[World, Path], list]:
    """A config file under tmp/deep/er: CONFIG filled with `fields` (`replace` done, `append` added), or `text`."""

    def build(world: World, tmp: Path) -> list:
        folder = tmp / "deep" / "er"
        folder.mkdir(parents=True)
        values = {"name": "x", "workspace": str(folder / "ws"), "label": "M", "experiment": "e"} | fields
        content = text if text is not None else CONFIG.format(**values).replace(*replace) + append
        path = folder / "c.yaml"
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return ["run", path]

    return build


def workspace_is_a_file(world: World, tmp: Path) -> list:
    (tmp / "taken").write_text("a file")
    return config(workspace=str(tmp / "taken"))(world, tmp)


def config_is_a_folder(world: World, tmp: Path) -> list:
    (tmp / "folder.yaml").mkdir()
    return ["run", tmp / "folder.yaml"]


BILLION_LAUGHS = "".join(
    f"{chr(97 + level)}: &{chr(97 + level)} [{', '.join([f'*{chr(96 + level)}'] * 9) if level else 'lol'}]\n"
    for level in range(9)
)


def task_file(text: str) -> Callable[[World, Path], list]:
    def build(world: World, tmp: Path) -> list:
        (tmp / "task.yaml").write_text(text)
        return ["data", "stats", "--task", tmp / "task.yaml"]

    return build


def damaged_run(damage: Callable[[Path], None]) -> Callable[[World, Path], list]:
    def build(world: World, tmp: Path) -> list:
        run = tmp / "run"
        shutil.copytree(world.run, run)
        damage(run)
        return ["analyze", run]

    return build


def _rewrite(name: str, change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / name).write_bytes(change((run / name).read_bytes()))

    return damage


def _edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        manifest = json.loads((run / "manifest.json").read_text())
        change(manifest)
        (run / "manifest.json").write_text(json.dumps(manifest))

    return damage


def _without_seed(data: bytes) -> bytes:
    lines = data.decode().splitlines()
    record = json.loads(lines[1])
    del record["seed"]
    lines[1] = json.dumps(record)
    return ("\n".join(lines) + "\n").encode()


def damaged_store(world: World, tmp: Path) -> list:
    features = tmp / "features"
    shutil.copytree(world.features, features)
    shard = features / "val" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size, one byte of tensor data changed
    shard.write_bytes(bytes(data))
    _VERIFIED.clear()
    return world.train_args(tmp / "out", features=features)


def journal_in_a_file(world: World, tmp: Path) -> list:
    (tmp / "a-file").write_text("not a folder")
    return world.search_args(tmp / "out", "--study-name", "s", "--storage", f"journal:{tmp}/a-file/sub/j.log")


def plain(*args, out: str = "out") -> Callable[[World, Path], list]:
    """A command of the world's kind: 'extract', 'train' or 'search' with extra options, into tmp/out."""

    def build(world: World, tmp: Path) -> list:
        kind, *extra = args
        return getattr(world, f"{kind}_args")(tmp / out, *extra)

    return build


# ------------------------------------------------------------------------------------------- outputs


def out_args(command: str, world: World, out: str | Path) -> list:
    """`command` writing to `out`, its other options valid (so the output path is what is refused)."""
    features, run = world.features, world.run
    commands = {
        "extract": lambda: world.extract_args(out),
        "train": lambda: world.train_args(out),
        "search": lambda: world.search_args(out),
        "mdl": lambda: (
            ["mdl", "--task", "refcocog", "--features", features, "--layer", "1", "--lr", "0.01"]
            + ["--epochs", "1", "--out", out]
        ),
        "zeroshot": lambda: (
            ["zeroshot", "--model", world.checkpoint, "--task", "vsr", "--vsr", world.vsr["vsr"]]
            + ["--images", world.vsr["images"], "--out", out]
        ),
        "make-demo-data": lambda: ["make-demo-data", out],
        "build-rcm": lambda: (
            ["build-rcm", "--refs", world.refer["refs"], "--instances", world.refer["instances"]] + ["--out", out]
        ),
        "plot": lambda: ["plot", run, "--out", out],
        "report": lambda: ["report", run, "--out", out],
        "annotate-score": lambda: ["annotate", "score", "--db", world.tmp / "study.db", "--out", out],
        "annotate-export": lambda: ["annotate", "export", "--db", world.tmp / "study.db", "--out", out],
    }
    return commands[command]()


def bad_out(command: str, make: Callable[[World, Path], str | Path]) -> Callable[[World, Path], list]:
    """`command` into the output path `make` prepares in tmp (the current folder while the case runs)."""

    def build(world: World, tmp: Path) -> list:
        return out_args(command, world, make(world, tmp))

    return build


def _a_file(world: World, tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("someone's notes\n")
    return tmp / "notes.txt"


def _a_link(target: str) -> Callable[[World, Path], Path]:
    def make(world: World, tmp: Path) -> Path:
        (tmp / "target.txt").write_text("the link's target\n")
        (tmp / "target-dir").mkdir()
        (tmp / "link").symlink_to(tmp / target)
        return tmp / "link"

    return make


def _a_fifo(world: World, tmp: Path) -> Path:
    import os

    os.mkfifo(tmp / "fifo")
    return tmp / "fifo"


def _under_a_file(world: World, tmp: Path) -> Path:
    return _a_file(world, tmp) / "sub"


def _other_commands_folder(world: World, tmp: Path) -> Path:
    shutil.copytree(world.rcm, tmp / "rcm-copy")  # an RCM dataset: no command but build-rcm writes there
    return tmp / "rcm-copy"


FOLDER_OUTS = ["extract", "train", "search", "mdl", "zeroshot", "build-rcm", "plot", "report", "annotate-score"]
OUT_COMMANDS = [*FOLDER_OUTS, "make-demo-data", "annotate-export"]


def _out_cases():
    for command in OUT_COMMANDS:
        option = "OUT" if command == "make-demo-data" else "--out"
        is_file = command == "annotate-export"
        here = f"{option} .: is a folder (give a file)" if is_file else f"{option} .: is the current folder"
        yield (f"{command}-out-dot", bad_out(command, lambda w, t: "."), here)
        yield (f"{command}-out-empty", bad_out(command, lambda w, t: ""), here)
        if not is_file:
            yield (f"{command}-out-parent", bad_out(command, lambda w, t: ".."), f"{option} ..: is the current folder")
        yield (
            f"{command}-out-existing-file",
            bad_out(command, _a_file),
            "an existing file that is not an export of answers" if is_file else "an existing file, not a folder",
        )
        yield (f"{command}-out-symlink-to-file", bad_out(command, _a_link("target.txt")), "link: is a symbolic link")
        yield (f"{command}-out-symlink-to-folder", bad_out(command, _a_link("target-dir")), "is a symbolic link")
        yield (f"{command}-out-fifo", bad_out(command, _a_fifo), "fifo: is not a regular file or folder")
        yield (f"{command}-out-device", bad_out(command, lambda w, t: "/dev/null"), "/dev/null: is not a regular")
        yield (f"{command}-out-under-a-file", bad_out(command, _under_a_file), "notes.txt is a file, not a folder")
        if not is_file and command != "build-rcm":
            yield (f"{command}-out-rcm-folder", bad_out(command, _other_commands_folder), "holds a rcm of another")


def _into_an_input(command: str, input_of: Callable[[World], Path]) -> Callable[[World, Path], list]:
    return lambda world, tmp: out_args(command, world, input_of(world))


OUT_CASES = [
    *_out_cases(),
    ("demo-out-dot", lambda w, t: ["demo", "--out", "."], "--out .: is the current folder"),
    ("demo-out-a-file", lambda w, t: ["demo", "--out", _a_file(w, t)], "an existing file, not a folder"),
    ("demo-out-a-run", lambda w, t: ["demo", "--out", w.run], "holds a probe-run of another command"),
    ("plot-into-its-run", _into_an_input("plot", lambda w: w.run), "is an input of this command"),
    ("report-into-its-run", _into_an_input("report", lambda w: w.run), "is an input of this command"),
    ("plot-into-the-runs-parent", _into_an_input("plot", lambda w: w.run.parent), "is an input of this command"),
    ("train-into-its-features", _into_an_input("train", lambda w: w.features), "is an input of this command"),
    ("train-into-a-store", _into_an_input("train", lambda w: w.features / "val"), "is an input of this command"),
    ("search-into-a-run", _into_an_input("search", lambda w: w.run), "holds a probe-run of another command"),
    ("mdl-into-a-run", _into_an_input("mdl", lambda w: w.run), "holds a probe-run of another command"),
    ("extract-into-a-run", _into_an_input("extract", lambda w: w.run), "holds a probe-run of another command"),
    ("extract-into-the-model", _into_an_input("extract", lambda w: w.checkpoint), "is an input of this command"),
    ("build-rcm-into-images", _into_an_input("build-rcm", lambda w: w.refer["refs"].parent), "is an input of"),
    ("zeroshot-into-a-run", _into_an_input("zeroshot", lambda w: w.run), "holds a probe-run of another command"),
    ("export-onto-its-db", _into_an_input("annotate-export", lambda w: w.tmp / "study.db"), "is an input of"),
    ("export-onto-the-study", _into_an_input("annotate-export", lambda w: w.run / "manifest.json"), "not an export"),
]


# ------------------------------------------------------------------------------------------- usage, runs, report


def line(*args) -> Callable[[World, Path], list]:
    return lambda world, tmp: list(args)


def relative_model(world: World, tmp: Path) -> list:
    args = world.extract_args(tmp / "store")
    args[args.index("--model") + 1] = "models/blip2-tiny"  # relative to the current folder (tmp), absent
    return args


def serve_args(world: World, tmp: Path, *extra) -> list:
    vsr = ["--vsr", world.vsr["vsr"], "--images", world.vsr["images"]]
    return ["annotate", "serve", "--task", "vsr", *vsr, "--n", "4", "--intro", "0", "--db", tmp / "s.db", *extra]


def same_label_twice(world: World, tmp: Path) -> list:
    for name in ("first", "second"):
        shutil.copytree(world.run, tmp / name)
    return ["report", tmp / "first", tmp / "second", "--out", tmp / "report"]


RUN_CONFIG = """\
name: x
workspace: {workspace}
models:
  M: {model}
data:
  vsr: {vsr}
  images: {images}
experiments:
  - name: e
    tasks: [vsr]
    models: [M]
    modes: [frozen]
    layers: {layers}
    probes: [linear]
    search: {{trials: 1, batch: 1, seed: 0, final_seeds: [0]}}
"""


def run_config(
    damage: Callable[[Path], None] | None = None, layers: str = "[1]", model: str = "{tiny: blip2}"
) -> Callable[[World, Path], list]:
    """`probing run` of a one-experiment VSR config over a copy of the VSR files `damage` changed."""

    def build(world: World, tmp: Path) -> list:
        vsr = tmp / "vsr"
        shutil.copytree(world.vsr["vsr"], vsr)
        if damage is not None:
            damage(vsr)
        fields = {"workspace": tmp / "ws", "model": model, "vsr": vsr, "images": world.vsr["images"], "layers": layers}
        (tmp / "c.yaml").write_text(RUN_CONFIG.format(**fields))
        return ["run", tmp / "c.yaml"]

    return build


def _corrupt_line(vsr: Path) -> None:
    lines = (vsr / "dev.jsonl").read_text().splitlines()
    (vsr / "dev.jsonl").write_text("\n".join([*lines[:3], "{corrupt", *lines[4:]]) + "\n")


def _empty_split(vsr: Path) -> None:
    (vsr / "test.jsonl").write_text("")


USAGE_CASES = [
    ("train-lr-not-a-number", plain("train", "--lr", "abc"), "Invalid value for '--lr'"),
    ("train-layer-not-a-number", plain("train", "--layer", "one"), "Invalid value for '--layer'"),
    ("extract-batch-size-a-word", plain("extract", "--batch-size", "many"), "Invalid value for '--batch-size'"),
    ("search-trials-a-float", plain("search", "--trials", "1.5"), "Invalid value for '--trials'"),
    ("train-misspelt-layer", plain("train", "--layr", "1"), "--layr: no such option; did you mean --layer?"),
    ("extract-misspelt-layers", plain("extract", "--layres", "1"), "--layres: no such option; did you mean --layers?"),
    ("search-misspelt-trials", plain("search", "--trails", "2"), "--trails: no such option; did you mean --trials?"),
    ("report-misspelt-overwrite", line("report", "r", "--out", "o", "--overwirte"), "did you mean --overwrite?"),
    ("plot-misspelt-out", line("plot", "r", "--ot", "o"), "--ot: no such option; did you mean --out?"),
    ("export-misspelt-db", line("annotate", "export", "--dbb", "d"), "--dbb: no such option; did you mean --db?"),
    ("tasks-misspelt-json", line("tasks", "--jsno"), "--jsno: no such option; did you mean --json?"),
    ("unknown-command", line("trian"), "No such command 'trian'. Did you mean 'train'?"),
    ("unknown-subcommand", line("annotate", "exprt"), "No such command 'exprt'. Did you mean 'export'?"),
    ("unknown-data-command", line("data", "stat"), "No such command 'stat'"),
    ("option-without-value", line("train", "--task"), "Option '--task' requires an argument"),
    ("missing-required-option", line("plot", "r"), "Missing option '--out'"),
    ("missing-argument", line("report", "--out", "o"), "Missing argument"),
    ("search-epochs-zero", plain("search", "--epoch-choices", "0,3"), "--epoch-choices"),
    ("search-final-seeds-repeated", plain("search", "--final-seeds", "1,1"), "--final-seeds"),
    ("train-seeds-repeated", plain("train", "--seeds", "1,1"), "--seeds"),
    ("extract-relative-model-absent", relative_model, "models/blip2-tiny does not exist)"),
    ("extract-layer-beyond-the-model", plain("extract", "--layers", "9"), "--layers"),
    ("search-layer-not-stored", plain("search", "--layer", "9"), "layer 9"),
    ("train-layer-not-stored", plain("train", "--layer", "9"), "layer 9"),
    ("serve-reachable-without-token", lambda w, t: serve_args(w, t, "--host", "0.0.0.0"), "--host 0.0.0.0: reachable"),
    ("serve-db-a-folder", lambda w, t: serve_args(w, t) + ["--db", t], "is a folder (give a file)"),
    ("report-same-label-and-layer", same_label_twice, "second"),
    ("run-corrupt-vsr-line", run_config(_corrupt_line), "dev.jsonl: line 4"),
    ("run-empty-split", run_config(_empty_split), "test.jsonl"),
    ("run-layer-99", run_config(layers="[99]"), "99"),
    ("run-unknown-model", run_config(model="{model: no-such-model}"), "no-such-model"),
]


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")

# (id, how to build the bad input and the command, the fragment of the one line it must print, marks)
CASES = [
    # numeric settings: range and finiteness, one template
    ("giou-scale-nan", plain("train", "--giou-scale", "nan"), "--giou-scale: must be a finite number, got nan"),
    ("l1-scale-inf", plain("train", "--l1-scale", "inf"), "--l1-scale: must be a finite number, got inf"),
    ("seeds-negative", plain("train", "--seeds", "-1"), "--seeds: must be >= 0, got -1"),
    ("train-workers-negative", plain("train", "--workers", "-1"), "--workers: must be >= 0, got -1"),
    ("extract-workers-negative", plain("extract", "--workers", "-1"), "--workers: must be >= 0, got -1"),
    ("heartbeat-nan", plain("search", "--heartbeat", "nan"), "--heartbeat: must be a finite number, got nan"),
    ("heartbeat-inf", plain("search", "--heartbeat", "inf"), "--heartbeat: must be a finite number, got inf"),
    ("search-seed-negative", plain("search", "--seed", "-1"), "--seed: must be >= 0, got -1"),
    ("journal-in-a-file", journal_in_a_file, "a-file/sub/j.log: cannot create"),
    # devices, checked before any work
    ("extract-device-tpu", plain("extract", "--device", "tpu0"), "--device: unknown device 'tpu0'"),
    ("train-device-tpu", plain("train", "--device", "tpu0"), "--device: unknown device 'tpu0'"),
    ("search-device-tpu", plain("search", "--device", "tpu0"), "--device: unknown device 'tpu0'"),
    ("extract-cuda", plain("extract", "--device", "cuda"), "--device: cuda: there is no CUDA GPU", NO_GPU),
    ("train-cuda", plain("train", "--device", "cuda:1"), "--device: cuda:1: there is no CUDA GPU", NO_GPU),
    ("config-device-tpu", config(append="device: tpu0\n"), "config field 'device': unknown device 'tpu0'"),
    # names are data, not paths
    ("config-name-escapes", config(name="../../ESCAPED-report"), "config field 'name': '../../ESCAPED-report'"),
    ("config-name-empty", config(name="''"), "config field 'name': '' is empty"),
    ("config-name-dot-dot", config(name="'..'"), "config field 'name': '..' is not a folder name"),
    ("config-name-absolute", config(name="/tmp/ESCAPED"), "config field 'name': '/tmp/ESCAPED' contains a path"),
    ("config-name-backslash", config(name="'a\\b'"), "config field 'name': 'a\\\\b' contains a path separator"),
    ("config-name-nul", config(name='"a\\0b"'), "config field 'name': 'a\\x00b' contains a path separator or NUL"),
    ("config-name-long", config(name="n" * 129), "is longer than 128 characters (129)"),
    (
        "experiment-name-escapes",
        config(experiment="../../../ESCAPED-runs"),
        "config field 'experiments[0].name': '../../../ESCAPED-runs' contains",
    ),
    ("model-label-escapes", config(label="../../../ESCAPED-features"), "config field 'models': label '../../../ESC"),
    ("workspace-is-a-file", workspace_is_a_file, "config field 'workspace':"),
    # config files
    ("config-is-a-folder", config_is_a_folder, "folder.yaml: a folder, not a file"),
    ("config-not-utf8", config(text=b"name: \xff\n"), "c.yaml: line 1: not UTF-8 text (byte 0xff at offset 6)"),
    ("config-duplicated-key", config(text="name: a\nname: b\n"), "c.yaml: line 2: field 'name' is given twice"),
    ("config-alias-bomb", config(text=BILLION_LAUGHS), "c.yaml: its aliases expand to more than 100,000 values"),
    ("config-recursive-alias", config(text="a: &a [*a]\n"), "c.yaml: line 1: an alias refers to a node"),
    ("config-unknown-task", config(replace=("[vsr]", "[nope]")), "experiments[0].tasks[0]"),
    ("task-duplicated-key", task_file("name: a\nkind: box\nname: b\n"), "task.yaml: line 3: field 'name' is given"),
    ("task-alias-bomb", task_file(BILLION_LAUGHS), "task.yaml: its aliases expand to more than 100,000 values"),
    ("unknown-task", lambda world, tmp: ["data", "stats", "--task", "nope"], "--task"),
    # images: a decompression bomb is a per-image error naming the file
    ("decompression-bomb", bomb_image, "COCO_train2014_000000000012.jpg: image refused"),
    # integers, ids and field types where records are read
    ("instances-huge-integer", huge_image_id, "instances.json: not valid JSON (Exceeds the limit (4300 digits)"),
    ("instances-duplicate-image-id", duplicated_image_id, "share the id 11"),
    (
        "sent-id-2-63",
        with_refs(lambda refs: refs[2]["sentences"][0].__setitem__("sent_id", 2**63)),
        "field 'sent_id' is not a 64-bit integer",
    ),
    (
        "refs-deep-list",
        with_refs(lambda refs: refs[2].__setitem__("ref_id", deep_list(5000))),
        "(ref_id [[[[[[[...]]]]]]]): field 'ref_id' is not a 64-bit integer",
    ),
    (
        "jsonl-huge-integer",
        vsr_line(lambda line: line.replace('"label": ', '"annotator_id": ' + "9" * 5001 + ', "label": ', 1)),
        "dev.jsonl: line 2: not valid JSON (Exceeds the limit (4300 digits)",
    ),
    (
        "vsr-reference-frame-type",
        vsr_line(lambda line: json.dumps(json.loads(line) | {"reference_frame": [1]})),
        "dev.jsonl: line 2: field 'reference_frame' must be a number or null",
    ),
    ("rcm-cell-bool", rcm_record({"cell": True}), "val.jsonl: line 2: field 'cell' must be a cell 0..8, got True"),
    (
        "rcm-area-string",
        rcm_record({"area_fraction": "0.5"}),
        "val.jsonl: line 2: field 'area_fraction' must be a non-negative number, got '0.5'",
    ),
    ("checkpoint-index-parent", checkpoint_index("../x.safetensors"), "is not a file name inside the checkpoint"),
    ("checkpoint-index-absolute", checkpoint_index("/etc/passwd"), "'/etc/passwd' is not a file name inside"),
    # stores and runs
    ("damaged-store-shard", damaged_store, "shard-00000.safetensors: shard damaged"),
    (
        "metrics-truncated",
        damaged_run(_rewrite("metrics.json", lambda data: data[:40])),
        "metrics.json: line 3: not valid JSON",
    ),
    (
        "manifest-truncated",
        damaged_run(_rewrite("manifest.json", lambda data: data[:40])),
        "manifest.json: line 3: not valid JSON",
    ),
    ("predictions-empty", damaged_run(_rewrite("predictions/test.jsonl", lambda _: b"")), "test.jsonl: no predictions"),
    (
        "predictions-blank-line",
        damaged_run(_rewrite("predictions/test.jsonl", lambda data: b"\n" + data)),
        "test.jsonl: line 1: a blank line",
    ),
    (
        "predictions-garbage-line",
        damaged_run(_rewrite("predictions/test.jsonl", lambda data: data + b"garbage\n")),
        "test.jsonl: line 5: not valid JSON",
    ),
    (
        "predictions-not-utf8",
        damaged_run(_rewrite("predictions/test.jsonl", lambda data: data[:10] + b"\xff" + data[11:])),
        "test.jsonl: line 1: not UTF-8 text",
    ),
    (
        "predictions-without-seed",
        damaged_run(_rewrite("predictions/test.jsonl", _without_seed)),
        "test.jsonl: line 2: field 'seed' is missing",
    ),
    (
        "manifest-not-utf8",
        damaged_run(_rewrite("manifest.json", lambda data: data.replace(b"{", b"{\n\xff", 1))),
        "manifest.json: line 2: not UTF-8 text (byte 0xff at offset 2)",
    ),
    (
        "manifest-without-mode",
        damaged_run(_edit_manifest(lambda manifest: manifest.pop("mode"))),
        "manifest.json: field 'mode' is missing",
    ),
    (
        "manifest-layer-a-string",
        damaged_run(_edit_manifest(lambda manifest: manifest.__setitem__("layer", "1"))),
        "manifest.json: field 'layer' has the wrong type",
    ),
    *OUT_CASES,
    *USAGE_CASES,
]


def _params():
    for case in CASES:
        name, build, fragment, *marks = case
        yield pytest.param(build, fragment, id=name, marks=marks)


def listing(*folders: Path) -> dict[str, tuple]:
    """Every path under `folders` with its kind, size and SHA-256 (a file), its target (a link): what a refused
    command must leave exactly as it was."""
    import hashlib
    import stat

    found: dict[str, tuple] = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            status = path.lstat()
            if stat.S_ISLNK(status.st_mode):
                found[str(path)] = ("link", str(path.readlink()))
            elif stat.S_ISREG(status.st_mode):
                found[str(path)] = ("file", status.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                found[str(path)] = (stat.S_IFMT(status.st_mode),)
    return found


@pytest.mark.parametrize("build,fragment", list(_params()))
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(world, capsys, tmp_path, monkeypatch, build, fragment):
    monkeypatch.chdir(tmp_path)  # `--out .` and relative paths land in the case's own folder
    args = build(world, tmp_path)
    capsys.readouterr()
    before = listing(tmp_path, world.tmp)
    started = time.perf_counter()
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: "), err[:2000]
    assert len(err) < 600, err[:600]  # a short line, never a value's whole repr
    assert fragment in err, err
    assert time.perf_counter() - started < 60
    # nothing written, removed or changed: not in the case's folder, not in the inputs shared by every case
    after = listing(tmp_path, world.tmp)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:10]
    assert not Path("/tmp/ESCAPED").exists()
    assert not (tmp_path / "deep" / "er" / "ws").exists()  # configs are refused before any work


def test_a_refused_extraction_into_an_empty_folder_leaves_it_empty_and_the_corrected_command_runs(
    world, capsys, tmp_path
):
    """A folder made by hand for the store: the refusal (a decompression bomb) empties it again, no claim is
    left, and the corrected command (--skip-bad-images, another request) is not refused for what it found."""
    args = bomb_image(world, tmp_path)
    (tmp_path / "store").mkdir()
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "image refused" in err, err
    assert list((tmp_path / "store").iterdir()) == [] and not (tmp_path / "store.lock").exists()
    code, _, err = run_cli(capsys, *args, "--skip-bad-images")
    assert code == 0, err


def test_a_decompression_bomb_with_skip_bad_images_is_skipped_and_recorded(world, capsys, tmp_path):
    args = bomb_image(world, tmp_path) + ["--skip-bad-images"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert len(manifest["bad_images"]) == 1
    assert "COCO_train2014_000000000012.jpg: image refused" in manifest["bad_images"][0]
    assert "1 bad images skipped" in out


def test_two_trains_with_different_requests_never_share_a_run_folder(world, capsys, tmp_path):
    from probing.core.locks import FolderLock

    out = tmp_path / "run"
    other = FolderLock(out, request={"kind": "probe-run", "layer": 99})  # another worker's claim, alive
    assert other.try_acquire()
    try:
        code, _, err = run_cli(capsys, *world.train_args(out))
    finally:
        other.release()
    assert code == 2 and "is writing a probe run there with a different" in err, err
    assert not out.exists()
    code, _, err = run_cli(capsys, *world.train_args(out))
    assert code == 0, err


def test_probe_weights_get_the_umask_mode(world):
    modes = {p.stat().st_mode & 0o777 for p in (world.run / "probes").iterdir()}
    assert modes == {0o666 & ~_umask()}


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


RACE = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from probing.data import DataOptions
    from probing.core.errors import ProbingError
    from probing.store.extract import ExtractionRequest, extract

    refs, instances, images, model, root, rounds = sys.argv[1:]
    data = DataOptions(task="refcocog", refs=Path(refs), instances=Path(instances), images=Path(images))

    def one(out, dtype, gate):
        os.close(os.open(gate + f".{dtype}", os.O_CREAT))
        while not all(os.path.exists(gate + f".{d}") for d in ("float16", "float32")):
            time.sleep(0.001)  # both processes ready: start at the same moment
        request = ExtractionRequest(model=model, data=data, split="train", out=Path(out), layers="1",
                                    dtype=dtype, shard_size=1, batch_size=1, workers=0, progress=False)
        try:
            extract(request)
        except ProbingError:
            os._exit(2)
        os._exit(0)

    results = []
    for index in range(int(rounds)):
        out, gate = f"{root}/store-{index}", f"{root}/gate-{index}"
        children = []
        for dtype in ("float16", "float32"):
            pid = os.fork()
            if pid == 0:
                one(out, dtype, gate)
            children.append((dtype, pid))
        codes = {dtype: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for dtype, pid in children}
        results.append(codes)
    print(json.dumps(results))
    """
)


def test_two_extractions_started_together_never_both_succeed(world, tmp_path):
    """20 rounds: two processes forked from one that has imported everything (no compute in the parent), released
    at the same moment, extract the same split into one folder with different --dtype."""
    refer = world.refer
    arguments = [refer["refs"], refer["instances"], refer["images"], world.checkpoint, tmp_path, 20]
    done = subprocess.run(
        [sys.executable, "-c", RACE, *map(str, arguments)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 20
    for index, codes in enumerate(results):
        assert sorted(codes.values()) == [0, 2], (index, codes)  # exactly one wins, the other is refused
        winner = next(dtype for dtype, code in codes.items() if code == 0)
        store = tmp_path / f"store-{index}"
        manifest = json.loads((store / "manifest.json").read_text())
        assert manifest["request"]["dtype"] == winner and manifest["complete"] is True
        from safetensors import safe_open

        for entry in manifest["shards"]:
            with safe_open(store / entry["file"], framework="pt") as handle:
                assert {str(handle.get_slice(k).get_dtype()) for k in handle.keys() if k.startswith("layer")} == {
                    {"float16": "F16", "float32": "F32"}[winner]
                }


# ------------------------------------------------------------------------------------------- the annotation server


@pytest.fixture(scope="module")
def study(world, tmp_path_factory):
    """An annotation study of the VSR test split (four items, no practice) and a client of its server."""
    from fastapi.testclient import TestClient

    from probing.baselines.annotate.server import create_app
    from probing.baselines.annotate.store import AnnotationStore
    from probing.baselines.annotate.study import StudyDesign, prepare_study
    from probing.data import DataOptions

    design = StudyDesign(task="vsr", n=4, intro=0, data=DataOptions(task="vsr", **world.vsr))
    store = AnnotationStore.create_or_resume(tmp_path_factory.mktemp("study") / "study.db", prepare_study(design))
    client = TestClient(create_app(store))
    item = client.post("/api/annotators", json={"name": "ada"}).json()["item"]["id"]
    return store, client, {"annotator": "ada", "item": item, "answer": True}


def _json(text: str) -> dict:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def _answer_with(first: dict, **raw: str) -> dict:
    """The first answer's JSON with some values written as raw JSON text (huge integers, NaN ...)."""
    fields = [f'"{key}": {raw.pop(key) if key in raw else json.dumps(value)}' for key, value in first.items()]
    fields += [f'"{key}": {value}' for key, value in raw.items()]
    return _json("{" + ", ".join(fields) + "}")


HTTP_CASES = [
    ("body-50-mb", lambda a: _json('{"annotator": "' + "a" * 50_000_000 + '"}'), 413, "over 16384 bytes"),
    ("body-over-limit-chunked", lambda a: {"content": iter([b"{" + b" " * 20_000, b"}"])}, 413, "over 16384 bytes"),
    ("item-huge", lambda a: _answer_with(a, item=str(10**30)), 400, "item:"),
    ("item-2-63", lambda a: _answer_with(a, item=str(2**63)), 400, "item:"),
    ("item-5000-digits", lambda a: _answer_with(a, item="9" * 5000), 400, "error parsing the body"),
    ("item-negative", lambda a: _answer_with(a, item="-1"), 400, "item:"),
    ("item-a-float", lambda a: _answer_with(a, item="1.5"), 400, "item:"),
    ("seconds-nan", lambda a: _answer_with(a, seconds="NaN"), 400, "seconds:"),
    ("seconds-infinity", lambda a: _answer_with(a, seconds="Infinity"), 400, "seconds:"),
    ("seconds-minus-infinity", lambda a: _answer_with(a, seconds="-1e400"), 400, "seconds:"),
    ("seconds-negative", lambda a: _answer_with(a, seconds="-2"), 400, "seconds:"),
    ("seconds-over-a-day", lambda a: _answer_with(a, seconds="86401"), 400, "seconds:"),
    ("seconds-huge", lambda a: _answer_with(a, seconds="1" + "0" * 400), 400, "seconds:"),
    ("cells-huge", lambda a: _answer_with(a, cells=f"[{10**30}]"), 400, "cells.0:"),
    ("cells-on-a-vsr-item", lambda a: _answer_with(a, cells="[4]"), 400, "cells:"),
    ("answer-a-string", lambda a: _answer_with(a, answer='"yes"'), 400, "answer:"),
    ("an-extra-field", lambda a: _answer_with(a, path='"/etc/passwd"'), 400, "path:"),
    ("not-json", lambda a: _json("{not json"), 400, "body: JSON decode error"),
    ("annotator-too-long", lambda a: _answer_with(a, annotator='"' + "a" * 41 + '"'), 400, "annotator:"),
]


@pytest.mark.parametrize("build,status,fragment", [pytest.param(*c[1:], id=c[0]) for c in HTTP_CASES])
def test_a_bad_answer_is_refused_with_its_status_unechoed_and_stores_nothing(study, build, status, fragment):
    store, client, first = study
    before = store.answers()
    request = build(first)
    response = client.post("/api/answers", **request)
    assert response.status_code == status, response.text[:300]
    assert fragment in response.json()["detail"], response.text[:300]
    assert len(response.content) < 400  # the value sent is never echoed back
    assert store.answers() == before


def test_a_full_disk_is_503_stores_nothing_and_the_same_answer_is_taken_again(study, monkeypatch):
    """SQLite's own "database or disk is full" (SQLITE_FULL), from inside the answer's transaction."""
    import sqlite3

    store, client, first = study
    real_connect = sqlite3.connect

    class FullDisk(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql.lstrip().startswith("INSERT INTO answers"):
                raise sqlite3.OperationalError("database or disk is full")
            return super().execute(sql, *args)

    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: real_connect(*a, factory=FullDisk, **k))
    response = client.post("/api/answers", json=first | {"seconds": 2.5})
    assert response.status_code == 503, response.text
    assert response.json()["detail"] == "the server's disk is full: the answer was not stored; send it again"
    monkeypatch.undo()
    assert store.answers() == []  # rolled back: no half-written row
    retried = client.post("/api/answers", json=first | {"seconds": 2.5})
    assert retried.status_code == 200 and [a["seconds"] for a in store.answers()] == [2.5]
    page = client.get("/").text
    assert "result.status === 503" in page and "Your answer is kept here" in page  # the page keeps it to resend


# ------------------------------------------------------------------------------------------- a full disk


def test_extract_on_a_full_disk_is_one_line_and_the_resume_is_byte_identical(world, capsys, tmp_path, monkeypatch):
    """The third file write of an extraction runs out of space half-way (ENOSPC from the file's write, as a full
    disk gives it): one line naming the file, exit 2, no half-written file and no claim left behind; the same
    command then resumes, and the store is byte for byte the one an undisturbed extraction writes."""
    import errno
    import os

    import probing.core.artifacts

    def extract_into(out: Path) -> tuple[int, str, str]:
        vsr = ["--task", "vsr", "--vsr", world.vsr["vsr"], "--images", world.vsr["images"]]
        args = ["extract", *vsr, "--model", world.checkpoint, "--split", "val", "--layers", "1", "--workers", "0"]
        return run_cli(capsys, *args, "--shard-size", "8", "--out", out)

    code, _, err = extract_into(tmp_path / "reference")
    assert code == 0, err
    shards = sorted(p.name for p in (tmp_path / "reference").iterdir() if p.name != "manifest.json")
    assert len([name for name in shards if name.endswith(".safetensors")]) == 3, shards  # the fault hits the 2nd

    real_open, opened = open, []

    class HalfWritten:
        """A file whose write stores half the bytes, then fails as a full disk does."""

        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.handle.name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def full_after_two(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode and Path(path).name.startswith(".shard-"):
            opened.append(path)
            if len(opened) > 2:
                return HalfWritten(handle)
        return handle

    monkeypatch.setattr(probing.core.artifacts, "open", full_after_two, raising=False)
    store = tmp_path / "store"
    code, _, err = extract_into(store)
    monkeypatch.undo()
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert f"{store}/.shard-" in err and "No space left on device; free some space and run the same command" in err
    assert not [p for p in store.rglob("*") if ".partial-" in p.name]  # the half-written file is gone
    assert not (tmp_path / "store.lock").exists()  # the claim is released
    assert json.loads((store / "manifest.json").read_text())["complete"] is False

    code, _, err = extract_into(store)
    assert code == 0, err
    for name in shards:
        assert (store / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert sorted(p.name for p in store.iterdir() if p.name != "manifest.json") == shards
