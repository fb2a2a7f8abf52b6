"""The feature store and extraction loop: dedup, resume after SIGKILL, refusals, bad images, vision store."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, val_extraction

from probing.core.errors import ProbingError
from probing.data import DataOptions
from probing.data.images import load_rgb_image
from probing.models import load_resampler
from probing.store.extract import extract, parse_layers, plan_shards
from probing.store.features import FeatureStore, VisionStore
from probing.tasks import load_split


def request(checkpoint, options, out, **overrides):
    return val_extraction(checkpoint, options, out, **({"dtype": "float32"} | overrides))


def cli_args(checkpoint, options, out, *extra):
    return [
        "extract",
        "--model",
        str(checkpoint),
        "--task",
        "refcocog",
        "--refs",
        str(options.refs),
        "--instances",
        str(options.instances),
        "--images",
        str(options.images),
        "--split",
        "val",
        "--out",
        str(out),
        "--workers",
        "0",
        *extra,
    ]


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def store(tiny_checkpoints, refcocog_val, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "features"
    return extract(request(tiny_checkpoints["blip2"], refcocog_val, out, store_vision=True, layers="1,4")).value


def test_store_interface(store, refcocog_val):
    examples = load_split(refcocog_val, "val").examples
    assert sorted(store.ids) == sorted(e.example_id for e in examples)  # every example, once
    by_id = {e.example_id: e for e in examples}
    image_ids = [by_id[i].image_id for i in store.ids]
    assert image_ids == sorted(image_ids)  # store order groups an image's examples together, by image id
    split_order = {e.example_id: position for position, e in enumerate(examples)}
    for image_id in set(image_ids):  # and keeps the split's order within an image
        rows = [split_order[i] for i in store.ids if by_id[i].image_id == image_id]
        assert rows == sorted(rows)
    assert store.manifest["request"]["order"] == "grouped by image id"
    assert store.layers == [1, 4] and len(store) == len(examples)
    features = store.load(4)
    assert features.shape == (len(examples), 4, 24) and features.dtype == torch.float32
    assert store.load(4, dtype=torch.float16).dtype == torch.float16
    manifest = store.manifest
    assert manifest["complete"] and manifest["request"]["split"] == "val"
    assert manifest["request"]["dataset_fingerprint"] == load_split(refcocog_val, "val").fingerprint
    assert manifest["request"]["model"]["family"] == "blip2"
    assert manifest["request"]["preprocessing"]["image_processor"] == "BlipImageProcessorPil"
    assert manifest["request"]["text"] == {"max_tokens": 32, "truncation_side": "right", "padding": "longest"}
    assert manifest["images"] == len({e.image_path for e in examples})
    assert sum(shard["examples"] for shard in manifest["shards"]) == len(examples)
    with pytest.raises(ProbingError, match=r"layer 2 is not in the store \(it has \[1, 4\]\)"):
        store.load(2)


def test_deduplicated_images_give_the_per_example_features(store, tiny_checkpoints, refcocog_val):
    """One ViT pass per unique image equals one ViT pass per example (the plain way)."""
    resampler = load_resampler(str(tiny_checkpoints["blip2"]))
    by_id = {e.example_id: e for e in load_split(refcocog_val, "val").examples}
    stored = store.load(4)
    shared = 0
    with torch.no_grad():
        for row, example_id in enumerate(store.ids[:80]):
            example = by_id[example_id]
            pixels = resampler.preprocess([load_rgb_image(example.image_path)])
            alone = resampler.query_states(resampler.encode_images(pixels), [example.text], [4])[0, 0]
            assert torch.allclose(stored[row], alone, atol=1e-6, rtol=0), example_id
            shared += row > 0 and by_id[store.ids[row - 1]].image_path == example.image_path
    assert shared > 20  # the check covered images shared by several sentences


def test_vision_store_holds_each_image_once(store, tiny_checkpoints, refcocog_val):
    vision = store.vision
    examples = load_split(refcocog_val, "val").examples
    assert sorted(vision.ids) == sorted({e.image_id for e in examples})
    embeds = vision.load()
    resampler = load_resampler(str(tiny_checkpoints["blip2"]))
    path_of = {e.image_id: e.image_path for e in examples}
    with torch.no_grad():
        for row in (0, len(vision.ids) // 2, len(vision.ids) - 1):
            expected = resampler.encode_images(resampler.preprocess([load_rgb_image(path_of[vision.ids[row]])]))[0]
            assert torch.allclose(embeds[row], expected, atol=1e-6, rtol=0)
    assert embeds.shape[1:] == (17, 32)  # 16 patches + CLS, ViT width
    assert isinstance(VisionStore(store.path / "vision"), VisionStore)


def test_storage_dtype_and_layer_zero(tiny_checkpoints, refcocog_val, tmp_path, store):
    half = extract(
        request(tiny_checkpoints["blip2"], refcocog_val, tmp_path / "half", dtype="float16", layers="0,4")
    ).value
    assert half.load(4).dtype == torch.float16 and half.layers == [0, 4]
    assert torch.allclose(half.load(4).float(), store.load(4), atol=2e-3, rtol=1e-3)


def test_a_compiled_vit_gives_the_same_features(tiny_checkpoints, refcocog_val, tmp_path, store):
    """`--compile-vision` (torch.compile, here through the CPU compiler): the same features to rounding, and a
    store identity that says so (fused kernels change the last bits, so such a store is never mixed)."""
    compiled = extract(
        request(
            tiny_checkpoints["blip2"],
            refcocog_val,
            tmp_path / "compiled",
            store_vision=True,
            layers="1,4",
            compile_vision=True,
        )
    ).value
    assert compiled.manifest["request"]["vision_compiled"] is True
    assert "vision_compiled" not in store.manifest["request"]
    assert compiled.ids == store.ids
    for layer in (1, 4):
        assert torch.allclose(compiled.load(layer), store.load(layer), atol=1e-5, rtol=0)


def test_a_kill_mid_run_resumes_to_identical_bytes(tiny_checkpoints, refcocog_val, tmp_path):
    """SIGKILL a real extraction after some shards, rerun it: the store equals an uninterrupted run's."""
    options = DataOptions(
        task="refcocog", refs=refcocog_val.refs, instances=refcocog_val.instances, images=refcocog_val.images
    )
    args = cli_args(
        tiny_checkpoints["instructblip"],
        options,
        tmp_path / "killed",
        "--shard-size",
        "4",
        "--batch-size",
        "4",
        "--store-vision",
    )
    args[args.index("val")] = "train"  # ~1,100 examples: ~290 shards, long enough to be killed mid-way
    process = subprocess.Popen(
        [sys.executable, "-m", "probing", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while len(list((tmp_path / "killed").glob("shard-*.safetensors"))) < 3 and time.time() < deadline:
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    finished = len(list((tmp_path / "killed").glob("shard-*.safetensors")))
    assert not manifest["complete"] and 3 <= finished < 280  # really killed mid-way
    with pytest.raises(ProbingError, match="incomplete"):
        FeatureStore(tmp_path / "killed")
    assert subprocess.run([sys.executable, "-m", "probing", *args], capture_output=True).returncode == 0
    clean_args = [a if a != str(tmp_path / "killed") else str(tmp_path / "clean") for a in args]
    assert subprocess.run([sys.executable, "-m", "probing", *clean_args], capture_output=True).returncode == 0
    resumed, clean = tree_bytes(tmp_path / "killed"), tree_bytes(tmp_path / "clean")
    shards = len(json.loads((tmp_path / "clean" / "manifest.json").read_text())["shards"])
    assert list(resumed) == list(clean) and len(resumed) == 1 + 2 * shards  # manifest, query and vision shards
    assert all(resumed[name] == clean[name] for name in clean)


def test_a_different_request_is_refused_naming_the_field(capsys, tiny_checkpoints, refcocog_val, tmp_path):
    out = tmp_path / "f"
    code, _, err = run_cli(capsys, *cli_args(tiny_checkpoints["blip2"], refcocog_val, out, "--layers", "4"))
    assert code == 0, err
    stamp = (out / "manifest.json").stat().st_mtime_ns
    code, text, _ = run_cli(capsys, *cli_args(tiny_checkpoints["blip2"], refcocog_val, out, "--layers", "4"))
    assert code == 0 and (out / "manifest.json").stat().st_mtime_ns == stamp  # complete: nothing redone
    cases = [
        (cli_args(tiny_checkpoints["instructblip"], refcocog_val, out, "--layers", "4"), "model.family"),
        (cli_args(tiny_checkpoints["blip2"], refcocog_val, out, "--layers", "4", "--init", "random"), "model.init"),
        (cli_args(tiny_checkpoints["blip2"], refcocog_val, out, "--layers", "4", "--dtype", "float32"), "dtype"),
        (cli_args(tiny_checkpoints["blip2"], refcocog_val, out, "--layers", "4", "--batch-size", "7"), "batch_size"),
        (
            cli_args(tiny_checkpoints["blip2"], refcocog_val, out, "--layers", "4", "--compile-vision"),
            "vision_compiled",
        ),
    ]
    test_split = cli_args(tiny_checkpoints["blip2"], refcocog_val, out, "--layers", "4")
    test_split[test_split.index("val")] = "test"
    cases.append((test_split, "split"))
    for args, field in cases:
        code, _, err = run_cli(capsys, *args)
        assert code == 2, err
        assert err == (
            f"error: {out}: holds features made with a different '{field}'; choose another output "
            "directory or remove it\n"
        )


def test_bad_images_stop_the_run_or_are_recorded(capsys, tiny_checkpoints, demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    options = DataOptions(
        task="refcocog",
        refs=data / "refcocog" / "refs(umd).p",
        instances=data / "refcocog" / "instances.json",
        images=data / "images",
    )
    examples = load_split(options, "val").examples
    broken = examples[0].image_path
    gone = next(e.image_path for e in examples if e.image_path != broken)
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated JPEG
    code, _, err = run_cli(capsys, *cli_args(tiny_checkpoints["blip2"], options, tmp_path / "a"))
    assert code == 2 and err.startswith(f"error: {broken}: image cannot be decoded") and err.count("\n") == 1
    assert not list((tmp_path / "a").glob("shard-*"))
    gone.unlink()
    code, _, err = run_cli(capsys, *cli_args(tiny_checkpoints["blip2"], options, tmp_path / "b"))
    assert code == 2 and err == (
        f"error: {gone}: image not found (1 of {len({e.image_path for e in examples})} "
        "images missing; --skip-bad-images records them in the manifest and leaves their "
        "examples out)\n"
    )
    code, out, err = run_cli(capsys, *cli_args(tiny_checkpoints["blip2"], options, tmp_path / "c", "--skip-bad-images"))
    assert code == 0, err
    stored = FeatureStore(tmp_path / "c")
    dropped = {e.example_id for e in examples if e.image_path in (broken, gone)}
    assert set(stored.ids) == {e.example_id for e in examples} - dropped and dropped
    assert len(stored.manifest["bad_images"]) == 2
    assert any(str(broken) in message for message in stored.manifest["bad_images"])
    assert "2 bad images skipped" in out


def test_layer_and_option_errors(capsys, tiny_checkpoints, refcocog_val, tmp_path):
    assert parse_layers("all", 12) == list(range(1, 13))
    assert parse_layers("12,1,6,6", 12) == [1, 6, 12]
    for spec, message in [
        ("13", "layer 13 does not exist"),
        ("a,b", "is not 'all' or a comma-separated"),
        ("", "no layer given"),
        ("-1", "layer -1 does not exist"),
    ]:
        with pytest.raises(ProbingError, match=message):
            parse_layers(spec, 12)
    code, _, err = run_cli(capsys, *cli_args(tiny_checkpoints["blip2"], refcocog_val, tmp_path / "x", "--layers", "5"))
    assert code == 2 and err == "error: --layers: layer 5 does not exist (the Q-Former has layers 1..4)\n"
    code, _, err = run_cli(
        capsys, *cli_args(tiny_checkpoints["blip2"], refcocog_val, tmp_path / "x", "--dtype", "int8")
    )
    assert code == 2 and err == "error: --dtype: unknown value 'int8' (choose float16, bfloat16, float32)\n"
    assert not (tmp_path / "x").exists()  # nothing written for a refused request


@pytest.mark.parametrize("write_threads", [1, 3])
def test_memory_stays_bounded_by_one_shard_per_writer(
    monkeypatch, tiny_checkpoints, refcocog_val, tmp_path, write_threads
):
    """With a slow disk, computation waits for the writers: at most one shard waits per writing thread beside
    the one just computed (computed - written <= threads + 1 when a shard's computation ends), the threads write
    at once, and no shard exceeds --shard-size."""
    import threading

    import probing.store.extract
    from probing.store.features import FeatureStoreWriter

    changed = threading.Condition()
    computed, written, ahead, sizes, writing, most_writing = [0], [0], [], [], [0], [0]
    original_query, original_write = probing.store.extract._query_shard, FeatureStoreWriter.write_shard

    def counted_query(*args, **kwargs):
        result = original_query(*args, **kwargs)
        with changed:
            computed[0] += 1
            ahead.append(computed[0] - written[0])
            changed.notify_all()
        return result

    shards = -(-len(load_split(refcocog_val, "val").examples) // 32)

    def slow_write(self, index, tensors, metadata, vision=None, **options):
        # A slow disk that stays busy until every thread is writing (or the last shards are computed), so that
        # computation runs as far ahead as the back-pressure lets it, however fast this machine computes.
        with changed:
            writing[0] += 1
            most_writing[0] = max(most_writing[0], writing[0])
            changed.notify_all()
            changed.wait_for(lambda: writing[0] == write_threads or computed[0] == shards, timeout=30)
        original_write(self, index, tensors, metadata, vision, **options)
        with changed:
            written[0] += 1
            writing[0] -= 1
            sizes.append(len(tensors["ids"]))

    monkeypatch.setattr(probing.store.extract, "_query_shard", counted_query)
    monkeypatch.setattr(FeatureStoreWriter, "write_shard", slow_write)
    out = tmp_path / "f"
    extract(
        request(tiny_checkpoints["blip2"], refcocog_val, out, shard_size=32, layers="4", write_threads=write_threads)
    )
    assert len(ahead) == computed[0] == written[0] == -(-sum(sizes) // 32) == shards >= 5  # enough to run ahead
    assert max(ahead) <= write_threads + 1 and max(sizes) == 32
    assert most_writing[0] == write_threads


def test_a_shard_whose_images_are_all_bad_loads(tiny_checkpoints, demo_root, tmp_path):
    """A shard with no good image stores an empty vision tensor; the vision store still loads, sized by the
    other shards."""
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    options = DataOptions(
        task="refcocog",
        refs=data / "refcocog" / "refs(umd).p",
        instances=data / "refcocog" / "instances.json",
        images=data / "images",
    )
    examples = load_split(options, "val").examples
    first_image = min(e.image_id for e in examples)  # the store's first shard starts with it
    first = [e for e in examples if e.image_id == first_image]
    first[0].image_path.write_bytes(first[0].image_path.read_bytes()[:200])  # a truncated JPEG
    stored = extract(
        request(
            tiny_checkpoints["blip2"],
            options,
            tmp_path / "f",
            shard_size=len(first),
            skip_bad_images=True,
            store_vision=True,
            layers="4",
        )
    ).value
    assert stored.manifest["shards"][0]["examples"] == 0 and len(stored.manifest["bad_images"]) == 1
    images = {e.image_id for e in examples} - {first_image}
    vision = stored.vision.load()
    assert vision.shape == (len(images), 17, 32) and sorted(stored.vision.ids) == sorted(images)
    assert stored.load(4).shape == (len(examples) - len(first), 4, 24)


def test_plan_groups_images_and_owns_each_once(refcocog_val):
    examples = load_split(refcocog_val, "train").examples
    shards = plan_shards(examples, 7)
    owners = [image for shard in shards for image, owns in zip(shard.images, shard.owns_image, strict=True) if owns]
    assert sorted(owners) == sorted({e.image_path for e in examples})  # each image stored exactly once
    for shard in shards:
        assert [shard.images[s] for s in shard.slot_of_example] == [e.image_path for e in shard.examples]
        assert len(shard.images) == len(set(shard.images))


def test_several_processes_through_accelerate(tiny_checkpoints, refcocog_val, tmp_path):
    """`accelerate launch` with 2 processes: each writes its own shards; the store matches one process's."""
    accelerate = Path(sys.executable).parent / "accelerate"
    args = cli_args(
        tiny_checkpoints["blip2"],
        refcocog_val,
        tmp_path / "multi",
        "--shard-size",
        "16",
        "--store-vision",
        "--dtype",
        "float32",
    )
    result = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "probing",
            "--verbose",  # each process's "extracted N examples" line is debug logging beside a progress bar
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    counts = [int(n) for n in re.findall(r"extracted (\d+) examples", result.stderr)]
    multi = FeatureStore(tmp_path / "multi")
    assert len(counts) == 2 and sum(counts) == len(multi) and min(counts) > 0  # the work was split
    single = extract(
        request(tiny_checkpoints["blip2"], refcocog_val, tmp_path / "single", shard_size=16, store_vision=True)
    ).value
    assert multi.ids == single.ids and multi.vision.ids == single.vision.ids
    for layer in single.layers:  # torchrun gives each process one thread: last-bit differences only
        assert torch.allclose(multi.load(layer), single.load(layer), atol=1e-6, rtol=0)
    assert torch.allclose(multi.vision.load(), single.vision.load(), atol=1e-6, rtol=0)
