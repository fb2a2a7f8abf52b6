import json
from collections import Counter

import pytest
from conftest import run_cli, sentence, write_refer

from probing.core.artifacts import sha256_file
from probing.core.errors import ProbingError
from probing.data import DataOptions
from probing.data.boxes import CELL_NAMES, assign_cell
from probing.data.rcm import REQUIRED_FIELDS, build_rcm, read_rcm_file
from probing.data.refer import read_refs
from probing.data.synthetic import SUPERCATEGORIES
from probing.tasks import load_split


@pytest.fixture(scope="module")
def built(demo_options, tmp_path_factory):
    out = tmp_path_factory.mktemp("rcm") / "rcm"
    manifest = build_rcm(demo_options["refcocog"]["refs"], demo_options["refcocog"]["instances"], out, seed=3).value
    records = {split: [r for _, r in read_rcm_file(out / f"{split}.jsonl")] for split in ("train", "val", "test")}
    return out, manifest, records


def test_records_have_the_interface_fields(built):
    _, _, records = built
    for rows in records.values():
        for row in rows:
            assert set(REQUIRED_FIELDS) <= set(row)
            assert row["cell_name"] == CELL_NAMES[row["cell"]]
            assert row["caption"] == f"The phrase '{row['phrase']}' refers to the {row['cell_name']} part of the image."
            assert row["label"] == int(row["cell"] == row["true_cell"])


def test_balance_per_cell_and_eighth_per_other_cell(built):
    _, manifest, records = built
    for split, rows in records.items():
        per_cell = manifest["splits"][split]["positives_per_cell"]
        assert per_cell > 0 and per_cell % 8 == 0
        positives = Counter(r["cell"] for r in rows if r["label"] == 1)
        negatives = Counter(r["cell"] for r in rows if r["label"] == 0)
        assert positives == {cell: per_cell for cell in range(9)}  # N/9 positives per cell
        assert negatives == {cell: per_cell for cell in range(9)}  # N_i negatives claimed as each cell
        pairs = Counter((r["cell"], r["true_cell"]) for r in rows if r["label"] == 0)
        assert pairs == {(i, j): per_cell // 8 for i in range(9) for j in range(9) if i != j}
        assert sum(r["label"] for r in rows) == len(rows) // 2  # negatives = positives = N
        # the builder takes the smallest cell, rounded down to a multiple of 8
        assert per_cell == min(manifest["splits"][split]["available_per_cell"].values()) // 8 * 8


def test_no_repeated_pair_and_negatives_without_replacement(built):
    _, _, records = built
    for rows in records.values():
        pairs = [(r["sent_id"], r["cell"]) for r in rows]
        assert len(pairs) == len(set(pairs))
        negative_sentences = [r["sent_id"] for r in rows if r["label"] == 0]
        assert len(negative_sentences) == len(set(negative_sentences))  # each sentence claimed wrongly once


def test_true_cell_is_recomputed_from_the_instances(built, demo_options):
    _, _, records = built
    instances = json.loads(demo_options["refcocog"]["instances"].read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {i["id"]: i for i in instances["images"]}
    for rows in records.values():
        for row in rows:
            x, y, w, h = anns[row["ann_id"]]["bbox"]
            image = images[row["image_id"]]
            assert row["true_cell"] == assign_cell((x, y, x + w, y + h), image["width"], image["height"])


def test_no_sentence_crosses_splits(built, demo_options):
    _, _, records = built
    split_of_ref = {ref["ref_id"]: ref["split"] for ref in read_refs(demo_options["refcocog"]["refs"])}
    seen = {}
    for split, rows in records.items():
        for row in rows:
            assert split_of_ref[row["ref_id"]] == split
            assert seen.setdefault(row["sent_id"], split) == split


def test_manifest_records_inputs_seed_and_counts(built, demo_options):
    out, manifest, records = built
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["seed"] == 3
    assert on_disk["inputs"]["refs_sha256"] == sha256_file(demo_options["refcocog"]["refs"])
    assert on_disk["inputs"]["instances_sha256"] == sha256_file(demo_options["refcocog"]["instances"])
    for split, rows in records.items():
        counts = on_disk["splits"][split]
        assert counts["examples"] == len(rows)
        assert counts["per_cell"]["middle"] == {
            "positive": sum(1 for r in rows if r["cell"] == 4 and r["label"] == 1),
            "negative": sum(1 for r in rows if r["cell"] == 4 and r["label"] == 0),
        }


def test_deterministic_per_seed(built, demo_options, tmp_path):
    out, _, _ = built
    refs, instances = demo_options["refcocog"]["refs"], demo_options["refcocog"]["instances"]
    build_rcm(refs, instances, tmp_path / "same", seed=3)
    build_rcm(refs, instances, tmp_path / "other", seed=4)
    for split in ("train", "val", "test"):
        assert (tmp_path / "same" / f"{split}.jsonl").read_bytes() == (out / f"{split}.jsonl").read_bytes()
        assert (tmp_path / "other" / f"{split}.jsonl").read_bytes() != (out / f"{split}.jsonl").read_bytes()


def test_rebuild_reuses_and_a_different_request_is_refused(built, demo_options):
    out, _, _ = built
    refs, instances = demo_options["refcocog"]["refs"], demo_options["refcocog"]["instances"]
    before = (out / "train.jsonl").stat().st_mtime_ns
    assert build_rcm(refs, instances, out, seed=3).reused is True
    assert (out / "train.jsonl").stat().st_mtime_ns == before
    with pytest.raises(ProbingError, match=r"holds a RCM build made with a different 'seed'"):
        build_rcm(refs, instances, out, seed=5)


def test_loader_reads_the_build(built, demo_options):
    out, manifest, records = built
    options = DataOptions(task="rcm", rcm=out, images=demo_options["refcocog"]["images"])
    examples = load_split(options, "val").examples
    assert [e.example_id for e in examples] == list(range(len(records["val"])))  # line numbers
    assert [e.text for e in examples] == [r["caption"] for r in records["val"]]
    assert all(e.image_path.is_file() for e in examples)
    assert {e.category for e in examples} <= set(SUPERCATEGORIES)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"image_id": "11"}, "line 2: field 'image_id' is not an integer of 64 bits"),
        ({"image_id": True}, "line 2: field 'image_id' is not an integer of 64 bits"),
        ({"sent_id": 2**63}, "line 2: field 'sent_id' is not an integer of 64 bits"),
        ({"caption": None}, "line 2: field 'caption' is not a string"),
        ({"phrase": ["the", "dog"]}, "line 2: field 'phrase' is not a string"),
        ({"cell": 9}, "line 2: field 'cell' must be a cell 0..8, got 9"),
        ({"cell": True}, "line 2: field 'cell' must be a cell 0..8, got True"),
        ({"label": True}, "line 2: field 'label' must be 0 or 1, got True"),
        ({"area_fraction": "0.25"}, "line 2: field 'area_fraction' must be a non-negative number, got '0.25'"),
    ],
)
def test_malformed_rcm_lines_name_file_line_and_field(built, tmp_path, change, message):
    out, _, records = built
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in (records["val"][0], records["val"][1] | change)) + "\n")
    with pytest.raises(ProbingError) as raised:
        read_rcm_file(path)
    assert str(raised.value) == f"{path}: {message}"


def test_a_negative_seed_is_refused(capsys, demo_options, tmp_path):
    refs, instances = demo_options["refcocog"]["refs"], demo_options["refcocog"]["instances"]
    with pytest.raises(ProbingError, match=r"^--seed must be >= 0 \(got -1\)$"):
        build_rcm(refs, instances, tmp_path / "rcm", seed=-1)
    code, _, err = run_cli(
        capsys, "build-rcm", "--refs", refs, "--instances", instances, "--out", tmp_path / "rcm", "--seed", "-2"
    )
    assert code == 2 and err == "error: --seed must be >= 0 (got -2)\n"
    assert not (tmp_path / "rcm").exists()


def test_a_sparse_cell_is_reported(tmp_path):
    images = [{"id": 1, "file_name": "x.jpg", "width": 90, "height": 90}]
    annotations = [
        {"id": 10 + c, "image_id": 1, "category_id": 1, "bbox": [30.0 * (c % 3), 30.0 * (c // 3), 30.0, 30.0]}
        for c in range(9)
    ]
    refs = [
        {
            "ref_id": c,
            "ann_id": 10 + c,
            "image_id": 1,
            "split": split,
            "sentences": [sentence(100 * c + k + 1000 * i, f"thing {k}") for k in range(8 if c != 2 else 5)],
        }
        for i, split in enumerate(("train", "val", "test"))
        for c in range(9)
    ]
    for position, ref in enumerate(refs):
        ref["ref_id"] = position
    paths = write_refer(tmp_path, refs, images, annotations, image_folder=None)
    with pytest.raises(ProbingError, match=r"split 'train': cell 'top right' has 5 sentence\(s\)"):
        build_rcm(paths["refs"], paths["instances"], tmp_path / "rcm")
    assert not (tmp_path / "rcm").exists()  # nothing written half-way


def test_an_interrupted_build_leaves_nothing(monkeypatch, demo_options, tmp_path):
    import probing.data.rcm as rcm

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rcm, "write_json", fail)  # dies after the jsonl files, before the manifest
    with pytest.raises(KeyboardInterrupt):
        build_rcm(demo_options["refcocog"]["refs"], demo_options["refcocog"]["instances"], tmp_path / "rcm")
    assert not (tmp_path / "rcm").exists()
    assert list(tmp_path.iterdir()) == []
