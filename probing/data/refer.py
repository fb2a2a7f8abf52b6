"""The REFER format: `refs(<split-by>).p` + COCO `instances.json` + COCO train2014 images.

One reader serves RefCOCOg (umd splits train/val/test in `refs(umd).p`, google splits train/val in
`refs(google).p`), RefCOCO and RefCOCO+ (unc splits train/val/testA/testB in `refs(unc).p`): a split is
whatever name the refs carry. One example per sentence, as prior work evaluates. The target box is the COCO
annotation's `[x, y, w, h]` found through the ref's `ann_id` (the pickle holds no boxes), normalized by the
image's width and height into `xyxy`. Counts are computed, never assumed.
"""

from __future__ import annotations

import logging
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from probing.core.artifacts import file_key
from probing.core.errors import ProbingError
from probing.data import boxes
from probing.data.coco import ID_RANGE, annotation, box_inside_image, image_info, read_instances, supercategories
from probing.data.images import coco2014_candidates, resolve_image
from probing.data.safe_pickle import load_plain_pickle
from probing.data.types import Example

log = logging.getLogger(__name__)

_REF_FIELDS = ("ref_id", "ann_id", "image_id", "split", "sentences")
_SENTENCE_FIELDS = ("raw", "sent_id")
_INTEGER_REF_FIELDS = ("ref_id", "ann_id", "image_id")


@dataclass(frozen=True)
class Sentence:
    """One referring sentence joined with its ref, annotation and image (no image path yet)."""

    sent_id: int
    ref_id: int
    ann_id: int
    image_id: int
    split: str
    raw: str
    category_id: int
    supercategory: str
    box_xywh: tuple[float, float, float, float]  # pixels
    width: float
    height: float

    @property
    def box_xyxy_pixels(self) -> tuple[float, float, float, float]:
        x, y, w, h = self.box_xywh
        return (x, y, x + w, y + h)


def read_refs(path: Path) -> list[dict[str, Any]]:
    """Read a REFER `refs(...).p` with the plain-data unpickler and check each ref's fields.

    Cached per (path, mtime, size): loading three splits, or stats then extraction, reads the file once.
    Callers must not mutate the returned refs.
    """
    path = Path(path)
    if not path.is_file():
        raise ProbingError(f"{path}: file not found")
    return _read_refs(file_key(path), path)


@lru_cache(maxsize=2)
def _read_refs(key: tuple[str, int, int], path: Path) -> list[dict[str, Any]]:
    refs = load_plain_pickle(path)
    if not isinstance(refs, list):
        raise ProbingError(f"{path}: expected a list of refs, found {type(refs).__name__}")
    for position, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise ProbingError(f"{path}: ref #{position}: expected a dict, found {type(ref).__name__}")
        where = f"{path}: ref #{position} (ref_id {reprlib.repr(ref.get('ref_id'))})"  # bounded: any depth
        for key in _REF_FIELDS:
            if key not in ref:
                raise ProbingError(f"{where}: missing field '{key}'")
        for key in _INTEGER_REF_FIELDS:
            if not _is_int(ref[key]):
                raise ProbingError(f"{where}: field '{key}' is not a 64-bit integer")
        if not isinstance(ref["split"], str):
            raise ProbingError(f"{where}: field 'split' is not a string")
        if not isinstance(ref["sentences"], list):
            raise ProbingError(f"{path}: ref_id {ref['ref_id']}: field 'sentences' is not a list")
        for index, sentence in enumerate(ref["sentences"]):
            for key in _SENTENCE_FIELDS:
                if not isinstance(sentence, dict) or key not in sentence:
                    raise ProbingError(f"{path}: ref_id {ref['ref_id']}: a sentence lacks field '{key}'")
            if not _is_int(sentence["sent_id"]):
                raise ProbingError(
                    f"{path}: ref_id {ref['ref_id']}: sentences[{index}]: field 'sent_id' is not a 64-bit integer"
                )
            if not isinstance(sentence["raw"], str):
                raise ProbingError(f"{path}: ref_id {ref['ref_id']}: sentences[{index}]: field 'raw' is not a string")
    return refs


def _is_int(value: Any) -> bool:
    """An id: an integer (True is one to Python, not an id) that fits the int64 tensors ids travel in."""
    return isinstance(value, int) and not isinstance(value, bool) and ID_RANGE[0] <= value < ID_RANGE[1]


def _refs_in_split(refs: list[dict[str, Any]], split: str, refs_path: Path) -> list[dict[str, Any]]:
    selected = [ref for ref in refs if ref["split"] == split]
    if not selected:
        present = sorted({str(ref["split"]) for ref in refs})
        raise ProbingError(f"{refs_path}: no refs in split '{split}' (splits in the file: {', '.join(present)})")
    return selected


def sentences_for_split(refs_path: Path, instances_path: Path, split: str) -> list[Sentence]:
    """All sentences of one REFER split, joined with boxes, image sizes and supercategories."""
    refs_path, instances_path = Path(refs_path), Path(instances_path)
    refs = read_refs(refs_path)
    coco = read_instances(instances_path)
    sentences = join_sentences(_refs_in_split(refs, split, refs_path), coco, refs_path, instances_path)
    if not sentences:
        raise ProbingError(f"{refs_path}: no sentences in split '{split}' (its refs have empty 'sentences')")
    return sentences


def join_sentences(refs: Iterable[dict[str, Any]], coco, refs_path: Path, instances_path: Path) -> list[Sentence]:
    """Join refs with their COCO annotation and image; one `Sentence` per referring sentence."""
    supercategory_of = supercategories(coco)
    sentences: list[Sentence] = []
    seen_sentence_ids: set[int] = set()
    clipped: list[int] = []
    for ref in refs:
        context = f"ref_id {ref['ref_id']} in {refs_path}"
        ann = annotation(coco, ref["ann_id"], instances_path, context)
        if ann["image_id"] != ref["image_id"]:
            raise ProbingError(
                f"{instances_path}: annotation {ref['ann_id']} is on image {ann['image_id']}, "
                f"but {context} says image {ref['image_id']}"
            )
        image = image_info(coco, ref["image_id"], instances_path, context)
        category_id = ann["category_id"]
        if category_id not in supercategory_of:
            raise ProbingError(f"{instances_path}: annotation {ref['ann_id']}: unknown category_id {category_id}")
        box, outside = box_inside_image(ann["bbox"], image, f"{instances_path}: annotation {ref['ann_id']}")
        if outside:
            clipped.append(ref["ann_id"])
        for sentence in ref["sentences"]:
            sent_id = sentence["sent_id"]
            if sent_id in seen_sentence_ids:
                raise ProbingError(f"{refs_path}: sent_id {sent_id} appears twice ({context})")
            seen_sentence_ids.add(sent_id)
            sentences.append(
                Sentence(
                    sent_id=sent_id,
                    ref_id=ref["ref_id"],
                    ann_id=ref["ann_id"],
                    image_id=ref["image_id"],
                    split=ref["split"],
                    raw=sentence["raw"],
                    category_id=category_id,
                    supercategory=supercategory_of[category_id],
                    box_xywh=box,
                    width=float(image["width"]),
                    height=float(image["height"]),
                )
            )
    if clipped:
        # Clipped, not refused: the object is in the image, only its annotation overshoots the border.
        log.warning(
            "%s: %d referred box(es) reach outside their image and were clipped to it (annotation ids %s)",
            instances_path,
            len(clipped),
            reprlib.repr(clipped),
        )
    return sentences


def sentence_metadata(sentence: Sentence) -> dict[str, Any]:
    """Analysis metadata kept with every REFER-derived example (the referring tasks and RCM)."""
    return {
        "ref_id": sentence.ref_id,
        "ann_id": sentence.ann_id,
        "category_id": sentence.category_id,
        "supercategory": sentence.supercategory,
        "area_fraction": boxes.area_fraction(sentence.box_xywh, sentence.width, sentence.height),
        "centre_distance": boxes.centre_distance(sentence.box_xywh, sentence.width, sentence.height),
        "width": sentence.width,
        "height": sentence.height,
    }


def load_refer(refs_path: Path, instances_path: Path, images_dir: Path, split: str) -> list[Example]:
    """The examples of one REFER split: one per sentence, box normalized `xyxy`, image resolved by id."""
    sentences = sentences_for_split(refs_path, instances_path, split)
    # One vectorised normalization for the whole split rather than a tensor op per sentence.
    normalized = boxes.normalize_xyxy(
        [sentence.box_xyxy_pixels for sentence in sentences],
        [sentence.width for sentence in sentences],
        [sentence.height for sentence in sentences],
    ).tolist()
    resolved: dict[int, Path] = {}
    examples = []
    for sentence, box in zip(sentences, normalized, strict=False):
        if sentence.image_id not in resolved:
            resolved[sentence.image_id] = resolve_image(coco2014_candidates(images_dir, sentence.image_id))
        examples.append(
            Example(
                example_id=sentence.sent_id,
                image_id=sentence.image_id,
                image_path=resolved[sentence.image_id],
                text=sentence.raw,
                category=sentence.supercategory,
                box=tuple(box),
                metadata=sentence_metadata(sentence),
            )
        )
    return examples
