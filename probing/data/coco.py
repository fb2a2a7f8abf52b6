"""COCO `instances.json` through pycocotools, with errors that name the file and the field.

pycocotools builds the indexes (annotations by id, images by id, categories); we parse the JSON ourselves
first so that a malformed file is reported with its line, and we silence pycocotools' progress prints.
REFER keeps category names only, so supercategories are read from `categories` here.
"""

from __future__ import annotations

import contextlib
import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from probing.artifacts import file_key
from probing.errors import ProbingError


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ProbingError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise ProbingError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    except UnicodeDecodeError:
        raise ProbingError(f"{path}: not UTF-8 text") from None


def read_instances(path: Path) -> COCO:
    """Load a COCO-format `instances.json` into a pycocotools `COCO` index.

    Cached per (path, mtime, size), as the file is large and read once per split; do not mutate the result.
    """
    path = Path(path)
    if not path.is_file():
        raise ProbingError(f"{path}: file not found")
    return _read_instances(file_key(path), path)


@lru_cache(maxsize=2)
def _read_instances(key: tuple[str, int, int], path: Path) -> COCO:
    dataset = _read_json(path)
    if not isinstance(dataset, dict):
        raise ProbingError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ProbingError(f"{path}: field '{key}' is missing or not a list")
    for position, category in enumerate(dataset["categories"]):
        for key in ("id", "name", "supercategory"):
            if not isinstance(category, dict) or key not in category:
                raise ProbingError(f"{path}: categories[{position}]: missing field '{key}'")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def supercategories(coco: COCO) -> dict[int, str]:
    """Category id -> COCO supercategory name."""
    return {category_id: category["supercategory"] for category_id, category in coco.cats.items()}


def annotation(coco: COCO, ann_id: int, path: Path, context: str) -> dict[str, Any]:
    """The annotation with `ann_id`, checked for the fields the loaders use."""
    found = coco.anns.get(ann_id)
    if found is None:
        raise ProbingError(f"{path}: no annotation with id {ann_id} ({context})")
    bbox = found.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise ProbingError(f"{path}: annotation {ann_id}: field 'bbox' is not [x, y, w, h]")
    for key in ("image_id", "category_id"):
        if key not in found:
            raise ProbingError(f"{path}: annotation {ann_id}: missing field '{key}'")
    return found


def image_info(coco: COCO, image_id: int, path: Path, context: str) -> dict[str, Any]:
    """The image entry with `image_id`, checked for a positive width and height."""
    found = coco.imgs.get(image_id)
    if found is None:
        raise ProbingError(f"{path}: no image with id {image_id} ({context})")
    for key in ("width", "height"):
        value = found.get(key)
        if not isinstance(value, (int, float)) or value <= 0:
            raise ProbingError(f"{path}: image {image_id}: field '{key}' is missing or not positive")
    return found
