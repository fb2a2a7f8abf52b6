"""Region Cell Matching (RCM): does the phrase refer to this cell of a 3x3 grid? Built from RefCOCOg umd.

The construction follows the paper's Appendix A, per umd split so no sentence crosses splits:
1. Every sentence's target box gets its true cell (`boxes.assign_cell`, nearest cell centre).
2. Positives are downsampled so the 9 cells are equally represented: n per cell, N = 9n in all, where n is
   the smallest cell's sentence count rounded down to a multiple of 8 (so that step 3 divides evenly;
   at most 7 sentences per cell are lost to the rounding).
3. For each claimed cell i with N_i = n positives, n/8 negatives come from every other cell j: sentences
   whose true cell is j, paired with the claim "cell i". Per true cell j one random permutation of its
   sentences is cut into 8 disjoint chunks of n/8, one per claimed cell, so draws are without replacement
   and no (sentence, claimed cell) pair repeats. Negatives = positives = N.
4. Caption: `The phrase '<raw sentence>' refers to the <cell name> part of the image.`
Examples are shuffled and written as `<out>/{train,val,test}.jsonl` with `manifest.json`. The random
stream of each split depends only on the seed and the split name: deterministic for a seed.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from probing.core.artifacts import code_version, existing_output_matches, sha256_file, staged_directory, write_json
from probing.core.errors import ProbingError, shown
from probing.core.locks import one_writer
from probing.core.records import StageResult, read_json_file
from probing.data import boxes
from probing.data.coco import ID_RANGE, read_instances
from probing.data.images import coco2014_candidates, resolve_image
from probing.data.jsonl import read_objects
from probing.data.refer import Sentence, join_sentences, read_refs, sentence_metadata
from probing.data.types import Example

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
NEGATIVE_SOURCES = boxes.GRID_SIZE * boxes.GRID_SIZE - 1  # 8 other cells
REQUIRED_FIELDS = (
    "image_id",
    "ann_id",
    "ref_id",
    "sent_id",
    "phrase",
    "cell",
    "true_cell",
    "cell_name",
    "caption",
    "label",
)
RCM_SPLITS = ("train", "val", "test")  # RefCOCOg umd's splits, each built on its own
_SPLIT_STREAM = {split: index for index, split in enumerate(RCM_SPLITS)}


def rcm_caption(phrase: str, cell: int) -> str:
    return f"The phrase '{phrase}' refers to the {boxes.cell_name(cell)} part of the image."


def true_cell(sentence: Sentence) -> int:
    return boxes.assign_cell(sentence.box_xyxy_pixels, sentence.width, sentence.height)


def _record(sentence: Sentence, claimed_cell: int, cell_of_sentence: int) -> dict[str, Any]:
    normalized = [
        sentence.box_xyxy_pixels[0] / sentence.width,
        sentence.box_xyxy_pixels[1] / sentence.height,
        sentence.box_xyxy_pixels[2] / sentence.width,
        sentence.box_xyxy_pixels[3] / sentence.height,
    ]
    metadata = sentence_metadata(sentence)
    return {
        "image_id": sentence.image_id,
        "ann_id": sentence.ann_id,
        "ref_id": sentence.ref_id,
        "sent_id": sentence.sent_id,
        "phrase": sentence.raw,
        "cell": claimed_cell,
        "true_cell": cell_of_sentence,
        "cell_name": boxes.cell_name(claimed_cell),
        "caption": rcm_caption(sentence.raw, claimed_cell),
        "label": int(claimed_cell == cell_of_sentence),
        "category_id": sentence.category_id,
        "supercategory": sentence.supercategory,
        "area_fraction": metadata["area_fraction"],
        "centre_distance": metadata["centre_distance"],
        "box_xyxy": normalized,
        "width": sentence.width,
        "height": sentence.height,
    }


def build_split(sentences: list[Sentence], split: str, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """RCM records of one split and its counts. Raises ProbingError if some cell has fewer than 8 sentences."""
    cells = boxes.GRID_SIZE * boxes.GRID_SIZE
    by_cell: dict[int, list[Sentence]] = defaultdict(list)
    for sentence in sorted(sentences, key=lambda s: s.sent_id):  # input order must not change the result
        by_cell[true_cell(sentence)].append(sentence)
    available = {cell: len(by_cell[cell]) for cell in range(cells)}
    smallest = min(available.values())
    per_cell = (smallest // NEGATIVE_SOURCES) * NEGATIVE_SOURCES
    if per_cell == 0:
        sparse = boxes.cell_name(min(available, key=available.get))
        raise ProbingError(
            f"split '{split}': cell '{sparse}' has {smallest} sentence(s); RCM needs at least "
            f"{NEGATIVE_SOURCES} in every cell"
        )
    chunk = per_cell // NEGATIVE_SOURCES
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    records: list[dict[str, Any]] = []
    for cell in range(cells):  # positives: n per cell
        for index in sorted(rng.choice(available[cell], size=per_cell, replace=False)):
            records.append(_record(by_cell[cell][index], cell, cell))
    for source_cell in range(cells):  # negatives: n/8 from each true cell j to each claimed cell i != j
        order = rng.permutation(available[source_cell])[:per_cell]
        claimed_cells = [cell for cell in range(cells) if cell != source_cell]
        for position, claimed in enumerate(claimed_cells):
            for index in order[position * chunk : (position + 1) * chunk]:
                records.append(_record(by_cell[source_cell][index], claimed, source_cell))
    records = [records[i] for i in rng.permutation(len(records))]
    counts = {
        "available_per_cell": {boxes.cell_name(c): available[c] for c in range(cells)},
        "positives_per_cell": per_cell,
        "negatives_per_cell_pair": chunk,
        "positives": sum(r["label"] for r in records),
        "negatives": sum(1 - r["label"] for r in records),
        "examples": len(records),
        "sentences": len(sentences),
        "per_cell": {
            boxes.cell_name(c): {
                "positive": sum(1 for r in records if r["cell"] == c and r["label"] == 1),
                "negative": sum(1 for r in records if r["cell"] == c and r["label"] == 0),
            }
            for c in range(cells)
        },
    }
    return records, counts


def _identity(refs_path: Path, instances_path: Path, seed: int) -> dict[str, Any]:
    return {
        "kind": "rcm",
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "inputs": {"refs_sha256": sha256_file(refs_path), "instances_sha256": sha256_file(instances_path)},
    }


def build_rcm(refs_path: Path, instances_path: Path, out_dir: Path, seed: int = 0) -> StageResult[dict[str, Any]]:
    """Build RCM train/val/test from RefCOCOg umd into `out_dir`; its manifest is the result's value.

    An `out_dir` already holding the same build (same inputs and seed) is kept as is; one holding another
    build is refused. Files appear only when all three splits are complete.
    """
    refs_path, instances_path, out_dir = Path(refs_path), Path(instances_path), Path(out_dir)
    if seed < 0:  # numpy's generators take no negative seed
        raise ProbingError(f"--seed must be >= 0 (got {seed})")
    for path in (refs_path, instances_path):
        if not path.is_file():
            raise ProbingError(f"{path}: file not found")
    identity = _identity(refs_path, instances_path, seed)
    with one_writer(out_dir):  # one writer: another worker building it is waited for, then reused
        if existing_output_matches(out_dir, identity, "RCM build"):
            log.info("%s: already holds this RCM build (same inputs and seed); nothing to do", out_dir)
            return StageResult(read_json_file(out_dir / "manifest.json"), out_dir, "reused")
        refs = read_refs(refs_path)
        coco = read_instances(instances_path)
        splits: dict[str, Any] = {}
        outputs: dict[str, list[dict[str, Any]]] = {}
        for split in RCM_SPLITS:
            split_refs = [ref for ref in refs if ref["split"] == split]
            if not split_refs:
                raise ProbingError(f"{refs_path}: no refs in split '{split}'")
            sentences = join_sentences(split_refs, coco, refs_path, instances_path)
            outputs[split], splits[split] = build_split(sentences, split, seed)
        manifest = {
            **identity,
            "input_paths": {"refs": str(refs_path), "instances": str(instances_path)},  # informative only
            "code_version": code_version(),
            "grid": boxes.GRID_SIZE,
            "splits": splits,
        }
        with staged_directory(out_dir) as staging:
            for split, records in outputs.items():
                with open(staging / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                    for record in records:
                        handle.write(json.dumps(record, sort_keys=True) + "\n")
            write_json(staging / "manifest.json", manifest)
        return StageResult(manifest, out_dir, "built")


def read_rcm_file(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(0-based line, record) pairs of an RCM jsonl file, each checked for the required fields."""
    path = Path(path)
    records = []
    for line_index, record in read_objects(path):
        for key in REQUIRED_FIELDS:
            if key not in record:
                raise ProbingError(f"{path}: line {line_index + 1}: missing field '{key}'")
        where = f"{path}: line {line_index + 1}"
        if not _is_int(record["label"]) or record["label"] not in (0, 1):  # true is 1 to Python, not a label
            raise ProbingError(f"{where}: field 'label' must be 0 or 1, got {shown(record['label'])}")
        for key in ("image_id", "ann_id", "ref_id", "sent_id"):
            if not _is_int(record[key]) or not ID_RANGE[0] <= record[key] < ID_RANGE[1]:
                raise ProbingError(f"{where}: field '{key}' is not an integer of 64 bits")
        for key in ("caption", "phrase"):
            if not isinstance(record[key], str):
                raise ProbingError(f"{where}: field '{key}' is not a string")
        for key in ("cell", "true_cell"):
            if not _is_int(record[key]) or not 0 <= record[key] < len(boxes.CELL_NAMES):
                raise ProbingError(f"{where}: field '{key}' must be a cell 0..8, got {shown(record[key])}")
        for key in ("area_fraction", "centre_distance"):  # Kendall's box properties, when given
            value = record.get(key)
            if key in record and (not _is_number(value) or value < 0):
                raise ProbingError(f"{where}: field '{key}' must be a non-negative number, got {shown(value)}")
        records.append((line_index, record))
    return records


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_rcm(rcm_dir: Path, images_dir: Path, split: str) -> list[Example]:
    """RCM examples of one split; ids are 0-based line numbers; images resolved as RefCOCOg's."""
    path = Path(rcm_dir) / f"{split}.jsonl"
    rows = read_rcm_file(path)
    if not rows:
        raise ProbingError(f"{path}: no examples")
    resolved: dict[int, Path] = {}
    examples = []
    for line_index, record in rows:
        image_id = record["image_id"]
        if image_id not in resolved:
            resolved[image_id] = resolve_image(coco2014_candidates(images_dir, image_id))
        metadata = {key: value for key, value in record.items() if key not in ("caption", "label")}
        examples.append(
            Example(
                example_id=line_index,
                image_id=image_id,
                image_path=resolved[image_id],
                text=record["caption"],
                category=str(record.get("supercategory", "unknown")),
                label=int(record["label"]),
                metadata=metadata,
            )
        )
    return examples
