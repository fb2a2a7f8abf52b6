"""COCO `instances.json` through pycocotools, with errors that name the file and the field.

pycocotools builds the indexes (annotations by id, images by id, categories); we parse the JSON ourselves
first so that a malformed file is reported with its line, check every image and annotation entry for the
fields the loaders use (reported by position), and silence pycocotools' progress prints.
REFER keeps category names only, so supercategories are read from `categories` here.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from probing.core.artifacts import file_key
from probing.core.errors import ProbingError


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
    except ValueError as error:  # an integer of thousands of digits: Python refuses to convert it
        raise ProbingError(f"{path}: not valid JSON ({str(error).split(':')[0]})") from None
    except RecursionError:
        raise ProbingError(f"{path}: not valid JSON (nested too deeply)") from None


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
    _check_images(dataset["images"], path)
    _check_annotations(dataset["annotations"], path)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


ID_RANGE = (-(2**63), 2**63)  # ids travel as int64 tensors


def _is_int(value: Any) -> bool:
    """An integer id (not a bool, which Python counts as one) that fits an int64."""
    return isinstance(value, int) and not isinstance(value, bool) and ID_RANGE[0] <= value < ID_RANGE[1]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_images(images: list[Any], path: Path) -> None:
    """Every image entry has an integer id and a positive width and height (boxes are divided by them).

    Checked before pycocotools indexes the file, so that a bad entry is named by its position instead of
    surfacing later as a KeyError or a division by zero. A plain loop: ~100k entries take a few ms.
    """
    seen: dict[int, int] = {}
    for position, image in enumerate(images):
        if not isinstance(image, dict):
            raise ProbingError(f"{path}: images[{position}]: expected an object, found {type(image).__name__}")
        if not _is_int(image.get("id")):
            raise ProbingError(f"{path}: images[{position}]: field 'id' is missing or not a 64-bit integer")
        if image["id"] in seen:
            raise ProbingError(f"{path}: images[{seen[image['id']]}] and images[{position}] share the id {image['id']}")
        seen[image["id"]] = position
        for key in ("width", "height"):
            value = image.get(key)
            if not _is_number(value) or value <= 0:
                raise ProbingError(f"{path}: images[{position}]: field '{key}' is missing or not positive")


def _check_annotations(annotations: list[Any], path: Path) -> None:
    """Every annotation has integer ids and a bbox of 4 finite numbers with w, h >= 0 (see `_check_images`)."""
    seen: dict[int, int] = {}
    for position, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise ProbingError(f"{path}: annotations[{position}]: expected an object, found {type(ann).__name__}")
        for key in ("id", "image_id", "category_id"):
            if not _is_int(ann.get(key)):
                raise ProbingError(f"{path}: annotations[{position}]: field '{key}' is missing or not a 64-bit integer")
        if ann["id"] in seen:
            raise ProbingError(
                f"{path}: annotations[{seen[ann['id']]}] and annotations[{position}] share the id {ann['id']}"
            )
        seen[ann["id"]] = position
        bbox = ann.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(_is_number(v) for v in bbox)
            and bbox[2] >= 0
            and bbox[3] >= 0
        ):
            raise ProbingError(f"{path}: annotations[{position}]: field 'bbox' is not [x, y, w, h] with w, h >= 0")


CLIP_TOLERANCE = 1.0  # pixels: COCO's float boxes may overhang their image by rounding; more is worth a warning


def box_inside_image(bbox: list[float], image: dict[str, Any], where: str) -> tuple[tuple[float, ...], bool]:
    """The annotation's `[x, y, w, h]`, clipped to its image when it reaches outside by more than
    `CLIP_TOLERANCE` (and whether it did); a box with nothing inside the image (entirely outside, or of zero
    width or height) is a ProbingError naming it."""
    x, y, w, h = (float(v) for v in bbox)
    width, height = float(image["width"]), float(image["height"])
    x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(width, x + w), min(height, y + h)
    if not (x2 > x1 and y2 > y1):
        raise ProbingError(f"{where}: box {list(bbox)} has no area inside its {width:g} x {height:g} image")
    outside = max(x1 - x, y1 - y, x + w - x2, y + h - y2) > CLIP_TOLERANCE
    if not outside:  # COCO's own rounding overshoots by a fraction of a pixel: the box stays as annotated
        return (x, y, w, h), False
    return (x1, y1, x2 - x1, y2 - y1), True


def supercategories(coco: COCO) -> dict[int, str]:
    """Category id -> COCO supercategory name."""
    return {category_id: category["supercategory"] for category_id, category in coco.cats.items()}


def annotation(coco: COCO, ann_id: int, path: Path, context: str) -> dict[str, Any]:
    """The annotation with `ann_id` (its fields were checked when the file was read)."""
    found = coco.anns.get(ann_id)
    if found is None:
        raise ProbingError(f"{path}: no annotation with id {ann_id} ({context})")
    return found


def image_info(coco: COCO, image_id: int, path: Path, context: str) -> dict[str, Any]:
    """The image entry with `image_id` (its width and height were checked when the file was read)."""
    found = coco.imgs.get(image_id)
    if found is None:
        raise ProbingError(f"{path}: no image with id {image_id} ({context})")
    return found
