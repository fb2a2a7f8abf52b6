"""RefCOCO and RefCOCO+ (unc: train, val, testA, testB) and RefCOCOg's google split through the REFER reader."""

import pickle

import pytest
from conftest import run_cli, sentence, write_refer

from probing.core.errors import ProbingError
from probing.data import DataOptions
from probing.tasks import get_task, load_split

# (split, image id, category): testA holds people, testB other objects, as in the unc splits
UNC_REFS = [
    ("train", 11, 1),
    ("train", 11, 18),
    ("train", 12, 62),
    ("val", 13, 1),
    ("testA", 14, 1),
    ("testA", 14, 1),
    ("testB", 15, 18),
    ("testB", 16, 62),
    ("testB", 16, 18),
]


def unc_dataset(root, sentences_per_ref=(2, 1, 3, 1, 2, 1, 1, 2, 1)):
    images = [
        {"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "width": 100 + image_id, "height": 80}
        for image_id in sorted({image for _, image, _ in UNC_REFS})
    ]
    annotations, refs, sent_id = [], [], 100
    for ref_id, ((split, image_id, category), count) in enumerate(zip(UNC_REFS, sentences_per_ref, strict=True)):
        ann_id = 1000 + ref_id
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": category,
                "bbox": [10.0 + ref_id, 5.0, 20.0, 30.0],
                "area": 600.0,
                "iscrowd": 0,
            }
        )
        sentences = [sentence(sent_id + i, f"object {ref_id} sentence {i}") for i in range(count)]
        sent_id += count
        refs.append(
            {
                "ref_id": ref_id,
                "ann_id": ann_id,
                "image_id": image_id,
                "category_id": category,
                "split": split,
                "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "sent_ids": [s["sent_id"] for s in sentences],
                "sentences": sentences,
            }
        )
    paths = write_refer(root, refs, images, annotations)
    unc = paths["refs"].with_name("refs(unc).p")
    paths["refs"].rename(unc)
    return paths | {"refs": unc}


@pytest.mark.parametrize("task", ["refcoco", "refcoco+"])
def test_unc_splits_are_read_with_their_counts(tmp_path, task):
    paths = unc_dataset(tmp_path)
    options = DataOptions(task=task, **paths)
    spec = get_task(task)
    assert spec.splits == ("train", "val", "testA", "testB") and spec.eval_splits == ("testA", "testB")
    counts = {split: len(load_split(options, split).examples) for split in spec.splits}
    assert counts == {"train": 2 + 1 + 3, "val": 1, "testA": 2 + 1, "testB": 1 + 2 + 1}
    test_a = load_split(options, "testA")
    assert {e.category for e in test_a.examples} == {"person"} and {e.image_id for e in test_a.examples} == {14}
    # the box of ref 7 (ann 1007) normalised by its image (16: 116 x 80 px)
    example = next(e for e in load_split(options, "testB").examples if e.metadata["ref_id"] == 7)
    assert example.box == pytest.approx((17 / 116, 5 / 80, 37 / 116, 35 / 80))
    with pytest.raises(ProbingError, match=r"--split: unknown split 'test' \(choose train, val, testA, testB\)"):
        load_split(options, "test")


def test_google_split_has_train_and_val(tmp_path):
    paths = unc_dataset(tmp_path)
    refs = pickle.loads(paths["refs"].read_bytes())
    for ref in refs:
        ref["split"] = "train" if ref["split"] == "train" else "val"
    google = paths["refs"].with_name("refs(google).p")
    google.write_bytes(pickle.dumps(refs, protocol=2))
    options = DataOptions(task="refcocog-google", refs=google, instances=paths["instances"], images=paths["images"])
    spec = get_task("refcocog-google")
    assert spec.eval_splits == ("val",) and spec.evaluated_splits == ("val",)
    assert {split: len(load_split(options, split).examples) for split in spec.splits} == {"train": 6, "val": 8}


def test_data_stats_of_refcoco(capsys, tmp_path):
    paths = unc_dataset(tmp_path)
    code, out, err = run_cli(
        capsys,
        "data",
        "stats",
        "--task",
        "refcoco",
        "--refs",
        paths["refs"],
        "--instances",
        paths["instances"],
        "--images",
        paths["images"],
        "--json",
    )
    assert code == 0, err
    import json

    stats = json.loads(out)
    assert list(stats["splits"]) == ["train", "val", "testA", "testB"]
    assert stats["splits"]["testB"]["categories"] == {"animal": 2, "furniture": 2}


def test_a_task_evaluated_on_two_splits_writes_and_reports_both(capsys, tmp_path, tiny_checkpoints):
    paths = unc_dataset(tmp_path, sentences_per_ref=(4, 4, 4, 3, 3, 3, 3, 3, 3))
    data = ["--refs", paths["refs"], "--instances", paths["instances"], "--images", paths["images"]]
    for split in ("train", "val", "testA", "testB"):
        code, _, err = run_cli(
            capsys,
            "extract",
            "--model",
            tiny_checkpoints["blip2"],
            "--task",
            "refcoco",
            *data,
            "--split",
            split,
            "--layers",
            "4",
            "--workers",
            0,
            "--out",
            tmp_path / "f" / split,
        )
        assert code == 0, err
    code, out, err = run_cli(
        capsys,
        "train",
        "--task",
        "refcoco",
        "--features",
        tmp_path / "f",
        "--layer",
        4,
        "--lr",
        1e-2,
        "--epochs",
        2,
        "--seeds",
        "0,1",
        "--device",
        "cpu",
        "--out",
        tmp_path / "run",
    )
    assert code == 0, err
    assert "testA acc@0.5" in out and "testB acc@0.5" in out
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["runs"][0]) >= {"val", "testA", "testB"} and "test" not in metrics["runs"][0]
    assert sorted(p.name for p in (tmp_path / "run" / "predictions").iterdir()) == [
        "testA.jsonl",
        "testB.jsonl",
        "val.jsonl",
    ]
    testb = [json.loads(line) for line in (tmp_path / "run" / "predictions" / "testB.jsonl").read_text().splitlines()]
    assert len(testb) == 2 * 9  # 9 sentences, 2 seeds
    code, _, err = run_cli(capsys, "report", tmp_path / "run", "--out", tmp_path / "report")
    assert code == 0, err
    table1 = (tmp_path / "report" / "tables" / "table1.md").read_text()
    assert "| model | mode | RefCOCO val (Acc@0.5) | RefCOCO testA (Acc@0.5) | RefCOCO testB (Acc@0.5) |" in table1
    assert (tmp_path / "report" / "tables" / "categories_refcoco_testB.md").is_file()
