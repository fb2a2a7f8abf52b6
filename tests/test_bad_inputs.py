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

from probing.extract import ExtractionRequest, extract
from probing.features import _VERIFIED


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
    from probing.cli import main

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
]


def _params():
    for case in CASES:
        name, build, fragment, *marks = case
        yield pytest.param(build, fragment, id=name, marks=marks)


@pytest.mark.parametrize("build,fragment", list(_params()))
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(world, capsys, tmp_path, build, fragment):
    args = build(world, tmp_path)
    capsys.readouterr()
    before = {p for p in tmp_path.rglob("*")}
    started = time.perf_counter()
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: "), err[:2000]
    assert len(err) < 600, err[:600]  # a short line, never a value's whole repr
    assert fragment in err, err
    assert time.perf_counter() - started < 60
    written = {p for p in tmp_path.rglob("*")} - before
    # nothing complete written: no run, store manifest marked complete or report; no folder outside the workspace
    assert not [p for p in written if p.name in ("metrics.json", "README.md")], written
    for manifest in (p for p in written if p.name == "manifest.json"):
        assert json.loads(manifest.read_text()).get("complete") is False, manifest
    assert not list(tmp_path.rglob("ESCAPED*")) and not Path("/tmp/ESCAPED").exists()
    assert not (tmp_path / "deep" / "er" / "ws").exists()  # configs are refused before any work


def test_a_decompression_bomb_with_skip_bad_images_is_skipped_and_recorded(world, capsys, tmp_path):
    args = bomb_image(world, tmp_path) + ["--skip-bad-images"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert len(manifest["bad_images"]) == 1
    assert "COCO_train2014_000000000012.jpg: image refused" in manifest["bad_images"][0]
    assert "1 bad images skipped" in out


def test_two_trains_with_different_requests_never_share_a_run_folder(world, capsys, tmp_path):
    from probing.locks import FolderLock

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
    from probing.errors import ProbingError
    from probing.extract import ExtractionRequest, extract

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
