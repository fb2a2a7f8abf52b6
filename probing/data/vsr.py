"""VSR (Visual Spatial Reasoning, random split) jsonl files, both released versions.

Current version (2023-03-22 update): vote fields are strings such as "[2, 6]" and `reference_frame` is
present. Original version: vote fields are JSON lists, no `reference_frame`. The Hugging Face copy
`cambridgeltl/vsr_random` holds the same `train.jsonl` / `dev.jsonl` / `test.jsonl` files, so a local
snapshot of it is read the same way (`--vsr <snapshot dir>`). Subject and object are parsed from the
caption (the files have no such fields); relations map to meta-categories through the official table.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from probing.core.errors import ProbingError
from probing.data.images import resolve_image, vsr_candidates
from probing.data.jsonl import read_objects
from probing.data.types import NO_CATEGORY, Example

log = logging.getLogger(__name__)

SPLIT_FILES: dict[str, str] = {"train": "train.jsonl", "val": "dev.jsonl", "test": "test.jsonl"}
META_CATEGORIES: tuple[str, ...] = (
    "Adjacency",
    "Directional",
    "Orientation",
    "Projective",
    "Proximity",
    "Topological",
    "Unallocated",
)
_REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "image": str,
    "caption": str,
    "label": int,  # JSON true/false is refused below, as the RCM reader refuses them (the format says 0 or 1)
    "relation": str,
}


def parse_meta_category_table(text: str) -> dict[str, str]:
    """Parse `Category: rel, rel, ...` lines; a relation listed twice keeps its last category.

    This mirrors the official analysis script, which fills a dict line by line, so `among` (listed under
    Topological and Unallocated) ends up Unallocated.
    """
    table: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        category, _, relations = line.partition(":")
        for relation in relations.split(","):
            if relation.strip():
                table[relation.strip()] = category.strip()
    return table


@lru_cache(maxsize=1)
def meta_category_table() -> dict[str, str]:
    """The relation -> meta-category table shipped with the package (the repo's rel_meta_category_dict.txt)."""
    text = resources.files("probing.data").joinpath("resources/rel_meta_category_dict.txt").read_text("utf-8")
    return parse_meta_category_table(text)


def parse_caption(caption: str, relation: str) -> tuple[str, str] | None:
    """(subject, object) of a VSR caption `The <subj> is <relation> the <obj>.`, or None if it does not parse.

    The subject is the shortest that fits (the first ` [is ]<relation> the ` after `The `), the object the rest
    before the final period; "is" is absent for verb relations (contains, has as a part, consists of). Found
    with two `str.find` calls rather than a regular expression with lazy groups, whose backtracking takes
    quadratic time on a long caption that does not parse.
    """
    if not (caption.startswith("The ") and caption.endswith(".")):
        return None
    plain, with_is = f" {relation} the ", f" is {relation} the "
    found = [
        (position, len(marker)) for marker in (with_is, plain) if (position := caption.find(marker, 5)) >= 0
    ]  # from 5: a subject of at least one character
    if not found:
        return None
    start, length = min(found)  # " is <rel> the " starts 3 before the " <rel> the " inside it: it wins
    subject, obj = caption[4:start], caption[start + length : -1]
    return (subject, obj) if obj else None


def _votes(value: Any, path: Path, line_number: int, key: str) -> list[int]:
    """Vote fields: a JSON list (original version) or a string holding one (current version)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ProbingError(f"{path}: line {line_number}: field '{key}' is not a list of ids") from None
    if not isinstance(value, list):
        raise ProbingError(f"{path}: line {line_number}: field '{key}' is not a list of ids")
    return value


@dataclass(frozen=True)
class VsrRecord:
    line_index: int  # 0-based physical line in the file: the example id
    image: str
    caption: str
    label: int
    relation: str
    meta_category: str
    subject: str | None
    object: str | None
    votes_true: int | None
    votes_false: int | None
    reference_frame: float | None
    version: str  # "current" or "original"


def read_vsr_file(path: Path) -> list[VsrRecord]:
    """Read one VSR jsonl file; malformed lines are ProbingErrors naming the file, line and field."""
    path = Path(path)
    table = meta_category_table()
    records: list[VsrRecord] = []
    unknown_relations: Counter[str] = Counter()
    unparsed_captions = 0
    for line_index, row in read_objects(path):
        line_number = line_index + 1
        for key, expected in _REQUIRED_FIELDS.items():
            if key not in row:
                raise ProbingError(f"{path}: line {line_number}: missing field '{key}'")
            if not isinstance(row[key], expected):
                raise ProbingError(f"{path}: line {line_number}: field '{key}' has the wrong type")
        label = row["label"]
        if isinstance(label, bool) or label not in (0, 1):
            raise ProbingError(f"{path}: line {line_number}: field 'label' must be 0 or 1, got {row['label']}")
        if not re.fullmatch(r"\d+\.jpg", row["image"]):
            raise ProbingError(f"{path}: line {line_number}: field 'image' is not a COCO file name (%012d.jpg)")
        relation = row["relation"]
        meta_category = table.get(relation)
        if meta_category is None:
            unknown_relations[relation] += 1
        parsed = parse_caption(row["caption"], relation)
        if parsed is None:
            unparsed_captions += 1
        votes_true = votes_false = None
        if "vote_true_validator_id" in row:
            votes_true = len(_votes(row["vote_true_validator_id"], path, line_number, "vote_true_validator_id"))
        if "vote_false_validator_id" in row:
            votes_false = len(_votes(row["vote_false_validator_id"], path, line_number, "vote_false_validator_id"))
        frame = row.get("reference_frame")
        if frame is not None and (isinstance(frame, bool) or not isinstance(frame, (int, float))):
            raise ProbingError(f"{path}: line {line_number}: field 'reference_frame' must be a number or null")
        current = "reference_frame" in row or isinstance(row.get("vote_true_validator_id"), str)
        records.append(
            VsrRecord(
                line_index=line_index,
                image=row["image"],
                caption=row["caption"],
                label=label,
                relation=relation,
                meta_category=meta_category if meta_category is not None else NO_CATEGORY,
                subject=parsed[0] if parsed else None,
                object=parsed[1] if parsed else None,
                votes_true=votes_true,
                votes_false=votes_false,
                reference_frame=row.get("reference_frame"),
                version="current" if current else "original",
            )
        )
    if unknown_relations:
        listed = ", ".join(f"{name} ({count})" for name, count in sorted(unknown_relations.items()))
        log.warning(
            "%s: %d caption(s) have a relation absent from the VSR meta-category table (counted in the overall "
            "accuracy, left out of the per-category one, as the official evaluation script does): %s",
            path,
            sum(unknown_relations.values()),
            listed,
        )
    if unparsed_captions:
        log.warning("%s: %d caption(s) do not match 'The <subj> is <relation> the <obj>.'", path, unparsed_captions)
    return records


def split_file(vsr_dir: Path, split: str) -> Path:
    return Path(vsr_dir) / SPLIT_FILES[split]


def load_vsr(vsr_dir: Path, images_dir: Path, split: str) -> list[Example]:
    """VSR examples of one split (`val` reads `dev.jsonl`); ids are 0-based line numbers."""
    path = split_file(vsr_dir, split)
    records = read_vsr_file(path)
    if not records:
        raise ProbingError(f"{path}: no examples")
    resolved: dict[str, Path] = {}
    examples = []
    for record in records:
        if record.image not in resolved:
            resolved[record.image] = resolve_image(vsr_candidates(images_dir, record.image))
        examples.append(
            Example(
                example_id=record.line_index,
                image_id=int(record.image.split(".")[0]),
                image_path=resolved[record.image],
                text=record.caption,
                category=record.meta_category,
                label=record.label,
                metadata={
                    "relation": record.relation,
                    "meta_category": record.meta_category,
                    "subject": record.subject,
                    "object": record.object,
                    "votes_true": record.votes_true,
                    "votes_false": record.votes_false,
                    "reference_frame": record.reference_frame,
                    "version": record.version,
                },
            )
        )
    return examples
