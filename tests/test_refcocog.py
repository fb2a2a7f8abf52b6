import json
import pickle

import numpy as np
import pytest
from conftest import sentence, small_refer_dataset, write_refer
from PIL import Image

from probing.core.errors import ProbingError
from probing.data import DataOptions
from probing.data.refer import load_refer, read_refs
from probing.tasks import load_split


def options_for(paths):
    return DataOptions(task="refcocog", refs=paths["refs"], instances=paths["instances"], images=paths["images"])


def test_one_example_per_sentence_with_normalized_boxes(tmp_path):
    paths = small_refer_dataset(tmp_path)
    train = load_split(options_for(paths), "train")
    assert [e.example_id for e in train.examples] == [7, 8, 9]  # ids are sent_ids
    first = train.examples[0]
    assert first.text == "A brown dog on the left."  # raw sentence, case and punctuation kept
    assert first.image_id == 11
    # bbox [10, 20, 50, 40] on a 200 x 100 image -> xyxy [10, 20, 60, 60] / (200, 100, 200, 100)
    assert first.box == pytest.approx((0.05, 0.2, 0.3, 0.6))
    assert first.category == "animal"
    assert first.metadata["category_id"] == 18
    assert first.metadata["area_fraction"] == pytest.approx(50 * 40 / (200 * 100))
    assert first.metadata["centre_distance"] == pytest.approx(np.hypot(35 / 200 - 0.5, 40 / 100 - 0.5))
    assert first.image_path == paths["images"] / "train2014" / "COCO_train2014_000000000011.jpg"
    assert train.examples[2].box == pytest.approx((0.75, 0.0, 1.0, 1.0))
    val = load_split(options_for(paths), "val")
    test = load_split(options_for(paths), "test")
    assert [e.example_id for e in val.examples] == [20] and [e.example_id for e in test.examples] == [30, 31]
    assert val.examples[0].category == "furniture" and test.examples[0].category == "person"
    assert len({train.fingerprint, val.fingerprint, test.fingerprint}) == 3


def test_images_fall_back_to_coco_2017_names(tmp_path):
    paths = small_refer_dataset(tmp_path, image_folder="train2017")
    examples = load_refer(paths["refs"], paths["instances"], paths["images"], "train")
    assert examples[0].image_path == paths["images"] / "train2017" / "000000000011.jpg"
    assert examples[0].image_path.is_file()


def test_missing_images_resolve_to_the_train2014_name(tmp_path):
    paths = small_refer_dataset(tmp_path, image_folder=None)
    examples = load_refer(paths["refs"], paths["instances"], tmp_path / "nowhere", "val")
    assert examples[0].image_path == tmp_path / "nowhere" / "train2014" / "COCO_train2014_000000000012.jpg"


def test_fingerprint_follows_file_contents(tmp_path):
    paths = small_refer_dataset(tmp_path)
    before = load_split(options_for(paths), "train").fingerprint
    instances = json.loads(paths["instances"].read_text())
    instances["annotations"][0]["bbox"] = [11.0, 20.0, 50.0, 40.0]
    paths["instances"].write_text(json.dumps(instances))
    after = load_split(options_for(paths), "train")
    assert after.fingerprint != before
    assert after.examples[0].box[0] == pytest.approx(11 / 200)  # the cache saw the new file


def test_split_absent_from_file_names_the_splits_present(tmp_path):
    paths = small_refer_dataset(tmp_path)
    refs = [r for r in read_refs(paths["refs"]) if r["split"] != "test"]
    with open(paths["refs"], "wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    with pytest.raises(ProbingError, match=r"no refs in split 'test' \(splits in the file: train, val\)"):
        load_split(options_for(paths), "test")


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda refs, inst: refs[0].pop("ann_id"), r"ref #0 \(ref_id 1\): missing field 'ann_id'"),
        (lambda refs, inst: refs[0]["sentences"][0].pop("raw"), r"ref_id 1: a sentence lacks field 'raw'"),
        (lambda refs, inst: refs[0].update(ann_id=999), r"instances.json: no annotation with id 999 \(ref_id 1"),
        (lambda refs, inst: inst["annotations"][0].update(image_id=12), r"annotation 501 is on image 12"),
        (lambda refs, inst: refs[1]["sentences"][0].update(sent_id=7), r"sent_id 7 appears twice"),
        # ref and sentence field types
        (
            lambda refs, inst: refs[1].update(ann_id="502"),
            r"ref #1 \(ref_id 2\): field 'ann_id' is not a 64-bit integer",
        ),
        (
            lambda refs, inst: refs[1].update(ref_id=True),
            r"ref #1 \(ref_id True\): field 'ref_id' is not a 64-bit integer",
        ),
        (
            lambda refs, inst: refs[2].update(image_id=12.0),
            r"ref #2 \(ref_id 3\): field 'image_id' is not a 64-bit integer",
        ),
        (lambda refs, inst: refs[3].update(split=None), r"ref #3 \(ref_id 4\): field 'split' is not a string"),
        (
            lambda refs, inst: refs[0]["sentences"][1].update(sent_id="8"),
            r"ref_id 1: sentences\[1\]: field 'sent_id' is not a 64-bit integer",
        ),
        (
            lambda refs, inst: refs[0]["sentences"][0].update(raw=["a", "dog"]),
            r"ref_id 1: sentences\[0\]: field 'raw' is not a string",
        ),
        # instances.json entries, checked before pycocotools indexes them
        (
            lambda refs, inst: inst["annotations"][0].update(bbox=[1, 2]),
            r"instances.json: annotations\[0\]: field 'bbox' is not \[x, y, w, h\] with w, h >= 0$",
        ),
        (lambda refs, inst: inst["annotations"][3].update(bbox=[0, 0, -1, 5]), r"annotations\[3\]: field 'bbox'"),
        (
            lambda refs, inst: inst["annotations"][4].update(bbox=[0, 0, float("nan"), 5]),
            r"annotations\[4\]: field 'bbox'",
        ),
        (lambda refs, inst: inst["annotations"][1].update(bbox=[0, "0", 1, 5]), r"annotations\[1\]: field 'bbox'"),
        (
            lambda refs, inst: inst["annotations"][2].pop("category_id"),
            r"annotations\[2\]: field 'category_id' is missing or not a 64-bit integer",
        ),
        (
            lambda refs, inst: inst["annotations"][2].update(image_id=None),
            r"annotations\[2\]: field 'image_id' is missing or not a 64-bit integer",
        ),
        (lambda refs, inst: inst["annotations"].append([1, 2]), r"annotations\[5\]: expected an object, found list"),
        (
            lambda refs, inst: inst["images"][0].pop("width"),
            r"instances.json: images\[0\]: field 'width' is missing or not positive",
        ),
        (lambda refs, inst: inst["images"][1].update(height=0), r"images\[1\]: field 'height' is missing or not pos"),
        (lambda refs, inst: inst["images"][1].pop("id"), r"images\[1\]: field 'id' is missing or not a 64-bit integer"),
    ],
)
def test_malformed_inputs_name_the_field(tmp_path, mutate, message):
    paths = small_refer_dataset(tmp_path)
    refs = read_refs(paths["refs"])
    refs = pickle.loads(pickle.dumps(refs))  # a private copy: read_refs caches its result
    instances = json.loads(paths["instances"].read_text())
    mutate(refs, instances)
    write_refer(tmp_path, refs, instances["images"], instances["annotations"], image_folder=None)
    with pytest.raises(ProbingError, match=message) as raised:
        load_split(options_for(paths), "train")
    assert "\n" not in str(raised.value)


def test_a_split_without_sentences_is_refused(tmp_path):
    paths = small_refer_dataset(tmp_path)
    refs = pickle.loads(pickle.dumps(read_refs(paths["refs"])))
    refs[2]["sentences"] = []  # the only val ref
    instances = json.loads(paths["instances"].read_text())
    write_refer(tmp_path, refs, instances["images"], instances["annotations"], image_folder=None)
    with pytest.raises(ProbingError, match=r"refs\(umd\).p: no sentences in split 'val'"):
        load_split(options_for(paths), "val")
    assert [e.example_id for e in load_split(options_for(paths), "train").examples] == [7, 8, 9]


def test_options_are_checked(tmp_path):
    paths = small_refer_dataset(tmp_path)
    with pytest.raises(ProbingError, match="--instances is required for --task refcocog"):
        load_split(DataOptions(task="refcocog", refs=paths["refs"], images=paths["images"]), "train")
    with pytest.raises(ProbingError, match=r"--refs: .*missing.p: not found"):
        load_split(
            DataOptions(
                task="refcocog", refs=tmp_path / "missing.p", instances=paths["instances"], images=paths["images"]
            ),
            "train",
        )
    with pytest.raises(ProbingError, match="--split: unknown split 'dev2'"):
        load_split(options_for(paths), "dev2")
    with pytest.raises(ProbingError, match="--task: unknown task 'refclef'"):
        load_split(DataOptions(task="refclef"), "train")


def test_demo_refcocog_counts_and_splits(demo_root, demo_options):
    manifest = json.loads((demo_root / "manifest.json").read_text())
    options = DataOptions(task="refcocog", **demo_options["refcocog"])
    seen_images, seen_sentences = {}, set()
    for split in ("train", "val", "test"):
        examples = load_split(options, split).examples
        assert len(examples) == manifest["refcocog"][split]["sentences"]  # counted, not assumed
        assert len({e.image_id for e in examples}) == manifest["refcocog"][split]["images"]
        for example in examples:
            assert seen_images.setdefault(example.image_id, split) == split  # umd: no image in two splits
            assert example.example_id not in seen_sentences
            seen_sentences.add(example.example_id)
            x1, y1, x2, y2 = example.box
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            assert example.image_path.is_file()


def test_demo_boxes_match_the_pixels(demo_options):
    """The annotation box of each shape is where its colour is drawn (shape colours are unique per image)."""
    from probing.data.synthetic import COLOURS

    options = DataOptions(task="refcocog", **demo_options["refcocog"])
    checked = 0
    for example in load_split(options, "val").examples[:60]:
        colour = next(name for name in COLOURS if name in example.text.lower())
        pixels = np.asarray(Image.open(example.image_path).convert("RGB")).astype(float)
        height, width = pixels.shape[:2]
        mask = np.linalg.norm(pixels - np.array(COLOURS[colour]), axis=-1) < 80
        x1, y1, x2, y2 = np.array(example.box) * [width, height, width, height]
        inside = mask[int(y1) + 1 : int(np.ceil(y2)) - 1, int(x1) + 1 : int(np.ceil(x2)) - 1].sum()
        # Other objects of the same colour may exist, so check that this box holds the colour and that
        # its pixel extent (within the box) reaches the box edges.
        ys, xs = np.nonzero(mask[int(y1) : int(np.ceil(y2)) + 1, int(x1) : int(np.ceil(x2)) + 1])
        assert inside > 0
        assert xs.min() <= 4 and ys.min() <= 4
        assert abs((xs.max() + int(x1)) - x2) <= 4 and abs((ys.max() + int(y1)) - y2) <= 4
        checked += 1
    assert checked == 60


def test_non_ascii_sentences_survive(tmp_path):
    paths = small_refer_dataset(tmp_path)
    refs = pickle.loads(pickle.dumps(read_refs(paths["refs"])))
    refs[0]["sentences"][0] = sentence(7, "the café dog")
    write_refer(
        tmp_path,
        refs,
        json.loads(paths["instances"].read_text())["images"],
        json.loads(paths["instances"].read_text())["annotations"],
        image_folder=None,
    )
    assert load_refer(paths["refs"], paths["instances"], paths["images"], "train")[0].text == "the café dog"
