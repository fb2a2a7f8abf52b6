"""The embedded demo dataset: coloured shapes on real JPEG images, written in the real on-disk formats.

`make_demo_data(out)` writes what a user would download, with the same names and layouts:

    out/refcocog/refs(umd).p          REFER pickle (protocol 2, as cPickle wrote it), umd-style splits by image
    out/refcocog/instances.json       COCO instances: images, annotations (every object), categories
    out/vsr/{train,dev,test}.jsonl    VSR jsonl (current version by default; the original on request)
    out/images/train2014/COCO_train2014_%012d.jpg   RefCOCOg images
    out/images/trainval2017/%012d.jpg               VSR images (VSR's merged COCO 2017 folder)
    out/manifest.json

Every later stage reads it through the same loaders as the real data. Shapes are COCO-style categories
grouped into supercategories; referring sentences name colour, shape, size and sometimes position; VSR
captions are true or false by the geometry of the two boxes; objects are spread evenly over the 3x3 cells
so that Region Cell Matching can be built from every split.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from probing.core.artifacts import code_version, existing_output_matches, staged_directory, write_json
from probing.core.errors import ProbingError
from probing.core.locks import one_writer
from probing.core.records import StageResult, read_json_file
from probing.data import boxes

GENERATOR_VERSION = 2
REFS_NAME = "refs(umd).p"

# (COCO-style category id, name, supercategory): five supercategories, so that per-supercategory analyses
# (Kendall tau across supercategories) have enough points to rank.
CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "circle", "round"),
    (2, "ring", "round"),
    (3, "square", "quadrilateral"),
    (4, "diamond", "quadrilateral"),
    (5, "triangle", "triangular"),
    (6, "star", "star-shaped"),
    (7, "cross", "cross-shaped"),
)
SUPERCATEGORIES = ("round", "quadrilateral", "triangular", "star-shaped", "cross-shaped")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 200, 30),
    "purple": (135, 55, 175),
    "orange": (240, 135, 25),
}
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((224, 224), (256, 192), (192, 256))
REFCOCOG_SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}  # by image, like umd (no overlap)
VSR_SPLIT_FRACTIONS = {"train": 0.7, "dev": 0.1, "test": 0.2}  # by instance, like VSR's random split
SIZE_RANGE = (0.14, 0.36)  # object side as a fraction of the shorter image side

Box = tuple[float, float, float, float]  # pixels, xyxy


@dataclass(frozen=True)
class Shape:
    category_id: int
    name: str
    supercategory: str
    colour: str
    box: Box
    side_fraction: float

    @property
    def label(self) -> str:
        return f"{self.colour} {self.name}"


def _draw(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x1, y1, x2, y2 = shape.box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    fill = COLOURS[shape.colour]
    side = x2 - x1
    if shape.name == "circle":
        draw.ellipse(shape.box, fill=fill)
    elif shape.name == "ring":
        draw.ellipse(shape.box, outline=fill, width=max(2, int(side / 6)))
    elif shape.name == "square":
        draw.rectangle(shape.box, fill=fill)
    elif shape.name == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
    elif shape.name == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    elif shape.name == "cross":
        bar = side / 3
        draw.rectangle((cx - bar / 2, y1, cx + bar / 2, y2), fill=fill)
        draw.rectangle((x1, cy - bar / 2, x2, cy + bar / 2), fill=fill)
    elif shape.name == "star":
        # A five-pointed star stretched so its points touch all four box edges (COCO boxes are tight).
        unit = [
            (
                math.cos(-math.pi / 2 + k * math.pi / 5) * (1 if k % 2 == 0 else 0.4),
                math.sin(-math.pi / 2 + k * math.pi / 5) * (1 if k % 2 == 0 else 0.4),
            )
            for k in range(10)
        ]
        low_x, high_x = min(u for u, _ in unit), max(u for u, _ in unit)
        low_y, high_y = min(v for _, v in unit), max(v for _, v in unit)
        draw.polygon(
            [
                (x1 + (u - low_x) / (high_x - low_x) * (x2 - x1), y1 + (v - low_y) / (high_y - low_y) * (y2 - y1))
                for u, v in unit
            ],
            fill=fill,
        )
    else:  # pragma: no cover - CATEGORIES and this function are kept in step
        raise ValueError(shape.name)


def render(width: int, height: int, shapes: list[Shape], rng: np.random.Generator) -> Image.Image:
    """A light, slightly noisy background with the shapes drawn on it."""
    base = rng.integers(205, 240) + rng.integers(-8, 9, size=3)  # a light grey with a faint tint
    noise = rng.normal(0, 6, size=(height, width, 1))
    pixels = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        _draw(draw, shape)
    return image


def _gap(a: Box, b: Box) -> float:
    """Distance between two boxes' edges (0 when they touch or overlap)."""
    dx = max(b[0] - a[2], a[0] - b[2], 0.0)
    dy = max(b[1] - a[3], a[1] - b[3], 0.0)
    return math.hypot(dx, dy)


def _overlaps(a: Box, b: Box, margin: float) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


class _CellDeck:
    """Deals target cells from shuffled decks of all nine, so every cell gets the same share of objects."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.cards = rng, []

    def deal(self) -> int:
        if not self.cards:
            self.cards = list(self.rng.permutation(boxes.GRID_SIZE * boxes.GRID_SIZE))
        return int(self.cards.pop())


def _place_in_cell(
    cell: int, width: int, height: int, placed: list[Box], rng: np.random.Generator, tries: int = 40
) -> tuple[Box, float] | None:
    """A square box whose centre lies in `cell` and that overlaps no placed box, or None."""
    row, column = divmod(cell, boxes.GRID_SIZE)
    short = min(width, height)
    for _ in range(tries):
        fraction = float(rng.uniform(*SIZE_RANGE))
        side = fraction * short
        low_x = max(side / 2, column * width / 3 + 1)
        high_x = min(width - side / 2, (column + 1) * width / 3 - 1)
        low_y = max(side / 2, row * height / 3 + 1)
        high_y = min(height - side / 2, (row + 1) * height / 3 - 1)
        if low_x >= high_x or low_y >= high_y:
            continue
        cx, cy = rng.uniform(low_x, high_x), rng.uniform(low_y, high_y)
        box = (round(cx - side / 2, 1), round(cy - side / 2, 1), round(cx + side / 2, 1), round(cy + side / 2, 1))
        if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
            continue
        if all(not _overlaps(box, other, margin=4) for other in placed):
            return box, fraction
    return None


def _pick_shapes(count: int, rng: np.random.Generator) -> list[tuple[int, str, str, str]]:
    """`count` distinct (category, colour) combinations, so 'the red circle' names one object."""
    combos = [(c, n, s, colour) for (c, n, s) in CATEGORIES for colour in COLOURS]
    chosen = rng.choice(len(combos), size=count, replace=False)
    return [combos[i] for i in chosen]


# ---------------------------------------------------------------------------------------------- RefCOCOg


def _size_word(fraction: float) -> str | None:
    if fraction < 0.19:
        return "small"
    if fraction > 0.29:
        return "big"
    return None


def referring_sentences(shape: Shape, cell: int, rng: np.random.Generator) -> list[str]:
    """1-3 distinct raw referring sentences for one object, in RefCOCOg's mixed casing and punctuation."""
    column = cell % boxes.GRID_SIZE
    options = [f"the {shape.label}", f"the {shape.name} that is {shape.colour}"]
    size = _size_word(shape.side_fraction)
    if size:
        options.append(f"the {size} {shape.label}")
    options.append(f"the {shape.label} in the {boxes.cell_name(cell)}")
    if column != 1:
        options.append(f"a {shape.label} on the {'left' if column == 0 else 'right'}")
    count = int(rng.integers(1, 4))
    picked = [options[i] for i in sorted(rng.choice(len(options), size=min(count, len(options)), replace=False))]
    sentences = []
    for text in picked:
        if rng.random() < 0.5:
            text = text[0].upper() + text[1:]
        if rng.random() < 0.3:
            text += "."
        sentences.append(text)
    return sentences


def _normalise_sentence(raw: str) -> str:
    """REFER's `sent`: lower case, punctuation stripped."""
    return "".join(ch for ch in raw.lower() if ch.isalnum() or ch == " ").strip()


def _assign_splits(count: int, fractions: dict[str, float], rng: np.random.Generator) -> list[str]:
    names = list(fractions)
    sizes = [int(round(fractions[name] * count)) for name in names[1:]]
    sizes.insert(0, count - sum(sizes))
    labels = [name for name, size in zip(names, sizes, strict=False) for _ in range(size)]
    return [labels[i] for i in rng.permutation(count)]


def make_refcocog(out: Path, images_dir: Path, image_count: int, rng: np.random.Generator) -> dict[str, Any]:
    """Write `refs(umd).p` and `instances.json` plus the images; return counts per split."""
    splits = _assign_splits(image_count, REFCOCOG_SPLIT_FRACTIONS, rng)
    decks = {split: _CellDeck(rng) for split in REFCOCOG_SPLIT_FRACTIONS}
    records = _RefcocogRecords()
    folder = images_dir / "train2014"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(image_count):
        image_id = 100000 + index
        split = splits[index]
        width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        placed = _place_shapes(decks[split], width, height, rng)
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        render(width, height, placed, rng).save(folder / file_name, quality=90)
        records.images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": width,
                "height": height,
                "license": 1,
                "coco_url": "",
                "flickr_url": "",
                "date_captured": "2014-01-01 00:00:00",
            }
        )
        records.counts[split]["images"] += 1
        # Like RefCOCOg, annotations cover every object; some objects get no referring expression.
        unreferred = len(placed) - 1 if len(placed) > 2 and rng.random() < 0.3 else None
        for position, shape in enumerate(placed):
            records.add_object(shape, image_id, split, (width, height), position != unreferred, rng)
    instances = {
        "info": {"description": "probing demo shapes (synthetic)", "version": str(GENERATOR_VERSION)},
        "licenses": [{"id": 1, "name": "generated", "url": ""}],
        "images": records.images,
        "annotations": records.annotations,
        "categories": [{"id": c, "name": n, "supercategory": s} for c, n, s in CATEGORIES],
    }
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "instances.json", "w", encoding="utf-8") as handle:
        json.dump(instances, handle)
    with open(out / REFS_NAME, "wb") as handle:
        pickle.dump(records.refs, handle, protocol=2)  # the protocol of REFER's Python-2 cPickle files
    return records.counts


def _place_shapes(deck: _CellDeck, width: int, height: int, rng: np.random.Generator) -> list[Shape]:
    """2 to 4 shapes, each in the next cell its split's deck deals (a shape that finds no room is left out)."""
    placed: list[Shape] = []
    for category_id, name, supercategory, colour in _pick_shapes(int(rng.integers(2, 5)), rng):
        cell = deck.deal()
        found = _place_in_cell(cell, width, height, [s.box for s in placed], rng)
        if found is None:
            continue
        box, fraction = found
        placed.append(Shape(category_id, name, supercategory, colour, box, fraction))
    return placed


@dataclass
class _RefcocogRecords:
    """What `make_refcocog` gathers over its images: COCO images and annotations, REFER refs, the next free ids
    and the counts per split."""

    images: list[dict[str, Any]] = field(default_factory=list)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    refs: list[dict[str, Any]] = field(default_factory=list)
    next_ann_id: int = 1001
    next_ref_id: int = 1
    next_sent_id: int = 1
    counts: dict[str, dict[str, int]] = field(
        default_factory=lambda: {split: {"images": 0, "refs": 0, "sentences": 0} for split in REFCOCOG_SPLIT_FRACTIONS}
    )

    def add_object(
        self,
        shape: Shape,
        image_id: int,
        split: str,
        size: tuple[int, int],
        referred: bool,
        rng: np.random.Generator,
    ) -> None:
        """The object's COCO annotation and, when `referred`, its ref with its referring sentences."""
        width, height = size
        x1, y1, x2, y2 = shape.box
        ann_id = self.next_ann_id
        self.next_ann_id += 1
        self.annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": shape.category_id,
                "iscrowd": 0,
                "bbox": [x1, y1, round(x2 - x1, 1), round(y2 - y1, 1)],
                "area": round((x2 - x1) * (y2 - y1), 2),
                "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
            }
        )
        if not referred:
            return
        cell = boxes.assign_cell((x1, y1, x1 + round(x2 - x1, 1), y1 + round(y2 - y1, 1)), width, height)
        sentences = []
        for raw in referring_sentences(shape, cell, rng):
            sent = _normalise_sentence(raw)
            sentences.append({"raw": raw, "sent": sent, "tokens": sent.split(), "sent_id": self.next_sent_id})
            self.next_sent_id += 1
        self.refs.append(
            {
                "ref_id": self.next_ref_id,
                "ann_id": ann_id,
                "image_id": image_id,
                "category_id": shape.category_id,
                "split": split,
                "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "sent_ids": [s["sent_id"] for s in sentences],
                "sentences": sentences,
            }
        )
        self.next_ref_id += 1
        self.counts[split]["refs"] += 1
        self.counts[split]["sentences"] += len(sentences)


# ---------------------------------------------------------------------------------------------- VSR


def _horizontal(a: Box, b: Box) -> bool | None:
    """a entirely left of b: True; entirely right: False; overlapping in x: ambiguous."""
    if a[2] <= b[0]:
        return True
    if a[0] >= b[2]:
        return False
    return None


def _vertical(a: Box, b: Box) -> bool | None:
    """a entirely above b (image y grows downward): True; entirely below: False; else ambiguous."""
    if a[3] <= b[1]:
        return True
    if a[1] >= b[3]:
        return False
    return None


def _not(value: bool | None) -> bool | None:
    return None if value is None else not value


def _near(a: Box, b: Box, size: tuple[int, int]) -> bool | None:
    gap = _gap(a, b) / min(size)
    return True if gap < 0.08 else False if gap > 0.3 else None


def _side(a: Box, b: Box, size: tuple[int, int], left: bool) -> bool | None:
    """'at the left/right side of': beside b on that side, rows overlapping, close."""
    order = _horizontal(a, b) if left else _horizontal(b, a)
    rows_overlap = a[1] < b[3] and b[1] < a[3]
    if order is False:
        return False
    if order and rows_overlap and _gap(a, b) / min(size) < 0.12:
        return True
    return None


def _touching(a: Box, b: Box, size: tuple[int, int]) -> bool | None:
    gap = _gap(a, b)
    return True if gap <= 1.0 else False if gap / min(size) > 0.12 else None


# Relation -> truth of "The <a> is <relation> the <b>." from the two pixel boxes; None where ambiguous.
RELATIONS: dict[str, Callable[[Box, Box, tuple[int, int]], bool | None]] = {
    "left of": lambda a, b, size: _horizontal(a, b),
    "right of": lambda a, b, size: _not(_horizontal(a, b)),
    "above": lambda a, b, size: _vertical(a, b),
    "below": lambda a, b, size: _not(_vertical(a, b)),
    "near": _near,
    "far from": lambda a, b, size: _not(_near(a, b, size)),
    "at the left side of": lambda a, b, size: _side(a, b, size, left=True),
    "at the right side of": lambda a, b, size: _side(a, b, size, left=False),
    "touching": _touching,
    "next to": lambda a, b, size: (
        True
        if _side(a, b, size, True) or _side(a, b, size, False)
        else (False if _gap(a, b) / min(size) > 0.3 else None)
    ),
}


def vsr_caption(subject: str, relation: str, obj: str) -> str:
    return f"The {subject} is {relation} the {obj}."


def _vsr_pair(width: int, height: int, rng: np.random.Generator) -> list[Shape] | None:
    """Two shapes; a quarter of the time the second touches the first (so 'touching' can be true)."""
    (c1, n1, s1, k1), (c2, n2, s2, k2) = _pick_shapes(2, rng)
    deck = _CellDeck(rng)
    first = _place_in_cell(deck.deal(), width, height, [], rng)
    if first is None:
        return None
    a = Shape(c1, n1, s1, k1, first[0], first[1])
    if rng.random() < 0.25:  # put b flush against a's left or right edge, same row
        fraction = float(rng.uniform(*SIZE_RANGE))
        side = fraction * min(width, height)
        y = min(max(a.box[1] + rng.uniform(-side / 2, side / 2), 0), height - side)
        x = a.box[2] if rng.random() < 0.5 else a.box[0] - side
        box = (round(x, 1), round(y, 1), round(x + side, 1), round(y + side, 1))
        if box[0] >= 0 and box[2] <= width:
            return [a, Shape(c2, n2, s2, k2, box, fraction)]
    second = _place_in_cell(deck.deal(), width, height, [a.box], rng)
    if second is None:
        return None
    return [a, Shape(c2, n2, s2, k2, second[0], second[1])]


def _vsr_captions(shapes: list[Shape], size: tuple[int, int], rng: np.random.Generator) -> list[tuple[str, str, int]]:
    """One true and one false caption (when both exist) about the ordered pair, relations in random order."""
    a, b = shapes if rng.random() < 0.5 else shapes[::-1]
    found: dict[int, tuple[str, str, int]] = {}
    for relation in rng.permutation(list(RELATIONS)):
        truth = RELATIONS[relation](a.box, b.box, size)
        if truth is not None and int(truth) not in found:
            found[int(truth)] = (vsr_caption(a.label, relation, b.label), str(relation), int(truth))
    return [found[label] for label in sorted(found)]


def make_vsr(
    out: Path, images_dir: Path, image_count: int, rng: np.random.Generator, version: str = "current"
) -> dict[str, Any]:
    """Write VSR-format `train/dev/test.jsonl` with COCO-2017-named images; return counts per split."""
    if version not in ("current", "original"):
        raise ValueError(f"VSR version must be 'current' or 'original', got {version!r}")
    folder = images_dir / "trainval2017"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(image_count):
        image_id = 500000 + index
        width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        shapes = _vsr_pair(width, height, rng)
        if shapes is None:
            continue
        file_name = f"{image_id:012d}.jpg"
        render(width, height, shapes, rng).save(folder / file_name, quality=90)
        for caption, relation, label in _vsr_captions(shapes, (width, height), rng):
            voters = [int(v) for v in rng.choice(20, size=3, replace=False)]
            agree = voters[: 2 + int(rng.integers(0, 2))]
            disagree = [v for v in voters if v not in agree]
            votes_true, votes_false = (agree, disagree) if label else (disagree, agree)
            row = {
                "image": file_name,
                "image_link": f"http://images.cocodataset.org/train2017/{file_name}",
                "caption": caption,
                "label": label,
                "relation": relation,
                "annotator_id": int(rng.integers(0, 40)),
                "vote_true_validator_id": votes_true,
                "vote_false_validator_id": votes_false,
            }
            if version == "current":  # stringified vote lists and reference_frame, as in the 2023 update
                row["vote_true_validator_id"] = json.dumps(votes_true)
                row["vote_false_validator_id"] = json.dumps(votes_false)
                row["reference_frame"] = None
            rows.append(row)
    splits = _assign_splits(len(rows), VSR_SPLIT_FRACTIONS, rng)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in VSR_SPLIT_FRACTIONS:
        chosen = [row for row, assigned in zip(rows, splits, strict=False) if assigned == split]
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for row in chosen:
                handle.write(json.dumps(row) + "\n")
        counts[split] = {"examples": len(chosen), "true": sum(r["label"] for r in chosen)}
    return counts


# ---------------------------------------------------------------------------------------------- entry point


def demo_data_options(root: Path) -> dict[str, dict[str, Path]]:
    """The data options that point the loaders at a demo dataset, per task."""
    root = Path(root)
    return {
        "refcocog": {
            "refs": root / "refcocog" / REFS_NAME,
            "instances": root / "refcocog" / "instances.json",
            "images": root / "images",
        },
        "vsr": {"vsr": root / "vsr", "images": root / "images"},
    }


def make_demo_data(
    out: Path, seed: int = 0, refcocog_images: int = 300, vsr_images: int = 240, vsr_version: str = "current"
) -> StageResult[dict[str, Any]]:
    """Write the demo dataset into `out` (atomically); its manifest is the result's value.

    An `out` that already holds the same dataset (same seed, sizes, version) is kept as is.
    """
    if refcocog_images < 20 or vsr_images < 10:
        raise ProbingError("demo data needs at least 20 RefCOCOg images and 10 VSR images")
    out = Path(out)
    identity = {
        "kind": "demo-data",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "refcocog_images": refcocog_images,
        "vsr_images": vsr_images,
        "vsr_version": vsr_version,
    }
    with one_writer(out):  # one writer: another worker building it is waited for, then reused
        if existing_output_matches(out, identity, "demo dataset"):
            return StageResult(read_json_file(out / "manifest.json"), out, "reused")
        refcocog_rng, vsr_rng = (np.random.default_rng([seed, stream]) for stream in (1, 2))
        with staged_directory(out) as staging:
            manifest = {
                **identity,
                "code_version": code_version(),
                "synthetic": True,
                "refcocog": make_refcocog(staging / "refcocog", staging / "images", refcocog_images, refcocog_rng),
                "vsr": make_vsr(staging / "vsr", staging / "images", vsr_images, vsr_rng, vsr_version),
            }
            write_json(staging / "manifest.json", manifest)
        return StageResult(manifest, out, "built")
