import functools
import json
import logging

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from probing.core.errors import ProbingError
from probing.data import DataOptions
from probing.data.synthetic import COLOURS, RELATIONS, make_vsr
from probing.data.types import NO_CATEGORY
from probing.data.vsr import META_CATEGORIES, meta_category_table, parse_caption, read_vsr_file
from probing.tasks import load_split

CURRENT_LINES = [
    {
        "image": "000000000101.jpg",
        "image_link": "http://images.cocodataset.org/train2017/000000000101.jpg",
        "caption": "The cup is on top of the dining table.",
        "label": 1,
        "relation": "on top of",
        "annotator_id": 7,
        "vote_true_validator_id": "[3, 11]",
        "vote_false_validator_id": "[]",
        "reference_frame": None,
    },
    {
        "image": "000000000102.jpg",
        "image_link": "http://images.cocodataset.org/val2017/000000000102.jpg",
        "caption": "The bowl contains the banana.",
        "label": 0,
        "relation": "contains",
        "annotator_id": 2,
        "vote_true_validator_id": "[1]",
        "vote_false_validator_id": "[4, 5]",
        "reference_frame": 1.0,
    },
    {
        "image": "000000000101.jpg",
        "image_link": "http://images.cocodataset.org/train2017/000000000101.jpg",
        "caption": "The cat is among the dog.",
        "label": 0,
        "relation": "among",
        "annotator_id": 1,
        "vote_true_validator_id": "[]",
        "vote_false_validator_id": "[1, 2]",
        "reference_frame": None,
    },
]
ORIGINAL_LINES = [
    {
        "image": "000000000103.jpg",
        "image_link": "http://images.cocodataset.org/train2017/000000000103.jpg",
        "caption": "The person is congruent the horse.",
        "label": 1,
        "relation": "congruent",
        "annotator_id": 3,
        "vote_true_validator_id": [1, 2, 3],
        "vote_false_validator_id": [9],
    },
    {
        "image": "000000000104.jpg",
        "image_link": "http://images.cocodataset.org/train2017/000000000104.jpg",
        "caption": "The teddy bear is at the left side of the couch.",
        "label": 1,
        "relation": "at the left side of",
        "annotator_id": 3,
        "vote_true_validator_id": [1, 2],
        "vote_false_validator_id": [],
    },
]


def write_jsonl(path, rows, blank_line_after=None):
    lines = [json.dumps(row) for row in rows]
    if blank_line_after is not None:
        lines.insert(blank_line_after + 1, "")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def vsr_dir(tmp_path):
    folder = tmp_path / "vsr"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", CURRENT_LINES, blank_line_after=0)
    write_jsonl(folder / "dev.jsonl", ORIGINAL_LINES)
    write_jsonl(folder / "test.jsonl", CURRENT_LINES[:1])
    images = tmp_path / "images"
    for folder_name, image in [
        ("train2017", "000000000101.jpg"),
        ("val2017", "000000000102.jpg"),
        ("trainval2017", "000000000103.jpg"),
        ("train2017", "000000000103.jpg"),
    ]:
        (images / folder_name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(images / folder_name / image)
    return folder


def test_meta_category_table_matches_the_official_file():
    table = meta_category_table()
    assert len(table) == 70  # 71 entries, `among` listed twice
    assert table["among"] == "Unallocated"  # listed under Topological and Unallocated: the last wins
    assert table["touching"] == "Topological" and table["facing"] == "Orientation" and table["near"] == "Proximity"
    sizes = {category: sum(1 for v in table.values() if v == category) for category in META_CATEGORIES}
    assert sizes == {
        "Adjacency": 10,
        "Directional": 16,
        "Orientation": 4,
        "Projective": 12,
        "Proximity": 5,
        "Topological": 17,
        "Unallocated": 6,
    }
    assert "congruent" not in table


def test_current_version_loads_with_ids_categories_and_parsed_captions(vsr_dir, tmp_path):
    data = load_split(DataOptions(task="vsr", vsr=vsr_dir, images=tmp_path / "images"), "train")
    assert [e.example_id for e in data.examples] == [0, 2, 3]  # physical line numbers; line 1 is blank
    cup, bowl, cat = data.examples
    assert (cup.label, cup.category, cup.image_id) == (1, "Projective", 101)
    assert cup.metadata["subject"] == "cup" and cup.metadata["object"] == "dining table"
    assert cup.metadata["votes_true"] == 2 and cup.metadata["votes_false"] == 0
    assert cup.metadata["version"] == "current"
    assert bowl.metadata["subject"] == "bowl" and bowl.metadata["object"] == "banana"  # verb relation, no "is"
    assert bowl.category == "Topological" and bowl.metadata["reference_frame"] == 1.0
    assert cat.category == "Unallocated"
    assert cup.image_path == tmp_path / "images" / "train2017" / "000000000101.jpg"
    assert bowl.image_path == tmp_path / "images" / "val2017" / "000000000102.jpg"


def test_original_version_and_unknown_relation_warning(vsr_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="probing"):
        data = load_split(DataOptions(task="vsr", vsr=vsr_dir, images=tmp_path / "images"), "val")  # dev.jsonl
    person, bear = data.examples
    # absent from the table: no category (left out of per-category breakdowns, as the official script does)
    assert person.category == NO_CATEGORY and person.metadata["relation"] == "congruent"
    assert person.metadata["version"] == "original" and person.metadata["votes_true"] == 3
    assert bear.category == "Adjacency" and bear.metadata["subject"] == "teddy bear"
    # trainval2017 wins over train2017
    assert person.image_path == tmp_path / "images" / "trainval2017" / "000000000103.jpg"
    warnings = [r.getMessage() for r in caplog.records if "meta-category table" in r.getMessage()]
    assert len(warnings) == 1 and "1 caption(s)" in warnings[0] and "congruent (1)" in warnings[0]


def test_dev_is_accepted_as_val(vsr_dir, tmp_path):
    options = DataOptions(task="vsr", vsr=vsr_dir, images=tmp_path / "images")
    assert load_split(options, "dev").fingerprint == load_split(options, "val").fingerprint


def test_caption_parsing():
    assert parse_caption("The cup is on top of the dining table.", "on top of") == ("cup", "dining table")
    assert parse_caption("The oven has as a part the handle.", "has as a part") == ("oven", "handle")
    assert parse_caption("The cup is on top of the dining table", "on top of") is None  # no full stop
    assert parse_caption("The cup is on top of the table.", "under") is None


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", r"train.jsonl: line 2: not valid JSON"),
        ("[1, 2]", r"train.jsonl: line 2: expected a JSON object"),
        (
            json.dumps({k: v for k, v in CURRENT_LINES[0].items() if k != "caption"}),
            r"train.jsonl: line 2: missing field 'caption'",
        ),
        (json.dumps({**CURRENT_LINES[0], "label": 2}), r"line 2: field 'label' must be 0 or 1"),
        (json.dumps({**CURRENT_LINES[0], "label": True}), r"line 2: field 'label' must be 0 or 1, got True"),
        (json.dumps({**CURRENT_LINES[0], "label": "1"}), r"line 2: field 'label' has the wrong type"),
        (
            json.dumps({**CURRENT_LINES[0], "vote_true_validator_id": "[1, "}),
            r"line 2: field 'vote_true_validator_id' is not a list",
        ),
        (json.dumps({**CURRENT_LINES[0], "image": "cat.png"}), r"line 2: field 'image' is not a COCO file name"),
    ],
)
def test_malformed_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(CURRENT_LINES[0]) + "\n" + line + "\n")
    with pytest.raises(ProbingError, match=message):
        read_vsr_file(path)


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    good = [json.dumps(row).encode() for row in CURRENT_LINES]
    latin1 = json.dumps({**CURRENT_LINES[1], "caption": "The bowl is near the caf\u00e9."}, ensure_ascii=False).encode(
        "latin-1"
    )
    path.write_bytes(b"\n".join([good[0], b"", good[1], latin1, good[2]]) + b"\n")
    with pytest.raises(ProbingError) as raised:
        read_vsr_file(path)
    assert str(raised.value) == f"{path}: line 4: not UTF-8"
    path.write_bytes(b"\n".join([good[0], b"", good[1], latin1.decode("latin-1").encode(), good[2]]) + b"\n")
    records = read_vsr_file(path)  # the same line in UTF-8 reads; the blank line keeps its number
    assert [r.line_index for r in records] == [0, 2, 3, 4] and records[2].caption == "The bowl is near the café."


def test_missing_split_file(tmp_path):
    (tmp_path / "vsr").mkdir()
    (tmp_path / "images").mkdir()
    with pytest.raises(ProbingError, match=r"vsr/dev.jsonl: file not found"):
        load_split(DataOptions(task="vsr", vsr=tmp_path / "vsr", images=tmp_path / "images"), "val")


def test_generated_original_version_reads_the_same(tmp_path):
    for version in ("current", "original"):
        make_vsr(tmp_path / version, tmp_path / f"images-{version}", 30, np.random.default_rng(5), version)
    current = read_vsr_file(tmp_path / "current" / "train.jsonl")
    original = read_vsr_file(tmp_path / "original" / "train.jsonl")
    assert {r.version for r in current} == {"current"} and {r.version for r in original} == {"original"}
    strip = lambda r: (r.caption, r.label, r.relation, r.votes_true, r.votes_false)  # noqa: E731
    assert [strip(r) for r in current] == [strip(r) for r in original]
    first_line = json.loads((tmp_path / "current" / "train.jsonl").read_text().splitlines()[0])
    assert isinstance(first_line["vote_true_validator_id"], str) and "reference_frame" in first_line


def test_relation_rules_on_hand_made_boxes():
    size = (200, 200)
    left, right = (10, 80, 50, 120), (120, 80, 160, 120)
    assert RELATIONS["left of"](left, right, size) is True
    assert RELATIONS["left of"](right, left, size) is False
    assert RELATIONS["right of"](right, left, size) is True
    assert RELATIONS["left of"]((10, 10, 100, 50), (50, 80, 150, 120), size) is None  # overlapping in x
    top, bottom = (80, 10, 120, 50), (80, 120, 120, 160)
    assert RELATIONS["above"](top, bottom, size) is True and RELATIONS["below"](top, bottom, size) is False
    flush = (50, 80, 90, 120)
    assert RELATIONS["touching"](left, flush, size) is True
    assert RELATIONS["touching"](left, right, size) is False
    assert RELATIONS["at the left side of"](left, flush, size) is True
    assert RELATIONS["at the right side of"](left, flush, size) is False
    assert RELATIONS["near"](left, flush, size) is True and RELATIONS["far from"](left, flush, size) is False
    assert RELATIONS["far from"]((0, 0, 20, 20), (180, 180, 200, 200), size) is True
    assert all(relation in meta_category_table() for relation in RELATIONS)


@functools.lru_cache(maxsize=4)
def palette_labels(image_path):
    """Per pixel: index of the nearest palette colour, or -1 where no palette colour is near (background)."""
    pixels = np.asarray(Image.open(image_path).convert("RGB")).astype(np.float32)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    distances = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
    return np.where(distances.min(-1) < 45, distances.argmin(-1), -1)


def colour_box(image_path, colour):
    """Pixel box of the largest blob of a colour (JPEG edges of other shapes can pass for it here and there)."""
    mask = palette_labels(image_path) == list(COLOURS).index(colour)
    labels, count = ndimage.label(mask)
    largest = 1 + int(np.argmax(ndimage.sum(mask, labels, index=range(1, count + 1))))
    ys, xs = np.nonzero(labels == largest)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def test_demo_captions_are_true_or_false_by_the_geometry_in_the_pixels(demo_options):
    """Recover each shape's box from its colour in the JPEG and re-evaluate the caption's relation."""
    options = DataOptions(task="vsr", **demo_options["vsr"])
    agreed = ambiguous = 0
    for split in ("train", "val", "test"):
        for example in load_split(options, split).examples:
            subject_colour = example.metadata["subject"].split()[0]
            object_colour = example.metadata["object"].split()[0]
            if subject_colour == object_colour:
                continue
            size = Image.open(example.image_path).size
            truth = RELATIONS[example.metadata["relation"]](
                colour_box(example.image_path, subject_colour), colour_box(example.image_path, object_colour), size
            )
            if truth is None:  # pixel boxes are +-1 px; a relation at its threshold may become undecided
                ambiguous += 1
                continue
            assert int(truth) == example.label, example.text
            agreed += 1
    assert agreed > 100 and ambiguous < 0.1 * agreed, (agreed, ambiguous)


def test_demo_vsr_labels_are_balanced_and_categories_known(demo_options):
    options = DataOptions(task="vsr", **demo_options["vsr"])
    examples = load_split(options, "train").examples
    positives = sum(e.label for e in examples)
    assert 0.4 < positives / len(examples) < 0.6
    assert {e.category for e in examples} <= set(META_CATEGORIES)
    assert all(e.metadata["subject"] is not None for e in examples)
