"""Tasks from YAML: a user probes their own dataset with a YAML file and jsonl splits, no Python.

    name: whats-up                 # its label in reports and folders (letters, digits, . _ + -)
    kind: binary                   # or: box
    splits: {train: train.jsonl, val: val.jsonl, test: test.jsonl}   # relative to this file; train and val
                                   # are required, every other split is evaluated and reported
    images: images                 # image paths in the jsonl are relative to this folder (relative to this file)
    fields: {image: image, text: caption, label: label, category: relation}   # box: {image, text, box, category}
    box_format: xyxy               # or xywh, cxcywh; box_units: pixels (default) or normalized
    search: {epochs: [3, 5, 10]}   # optional: overrides of the default space

Optional too: `title`, `description`, `patience`, `chance`, `category_order`, `control_type` (the record
field, or list of fields, whose values are an example's type for its control task: `probing.tasks.controls`; e.g.
`control_type: [subject, object]`), and in `fields`: `id` (an
integer example id; default the 0-based line number), `image_id` (an integer; default a stable hash of the
image path), `width` and `height` (pixel boxes; default the image file's size). Every other field of a
record is kept as metadata in the predictions.

Errors name the file, the line and the field (exit 2 from the CLI). The dataset fingerprint of a split
covers the YAML file and the split's jsonl file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_convert

from probing.core.artifacts import file_key
from probing.core.errors import ProbingError
from probing.data.boxes import area_fraction, centre_distance
from probing.data.jsonl import read_objects
from probing.data.types import DataOptions, Example
from probing.tasks.controls import MetadataType
from probing.tasks.heads import HEADS
from probing.tasks.search_space import LOSS_SCALES, SearchSpace
from probing.tasks.spec import TRAIN, VAL, TaskSpec

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
TOP_FIELDS = (
    "name",
    "kind",
    "splits",
    "images",
    "fields",
    "box_format",
    "box_units",
    "search",
    "title",
    "description",
    "patience",
    "chance",
    "category_order",
    "control_type",
)
FIELD_ROLES = {"binary": ("image", "text", "label"), "box": ("image", "text", "box")}
OPTIONAL_ROLES = ("category", "id", "image_id", "width", "height")
DEFAULT_SPACES = {
    "binary": SearchSpace(epochs=(3, 5, 10, 15, 20)),
    "box": SearchSpace(epochs=(20, 30, 40), giou_scale=LOSS_SCALES, l1_scale=LOSS_SCALES),
}


class _Document:
    """The YAML file's data with the line of every key, for messages that name file, line and field."""

    def __init__(self, path: Path):
        from probing.core.yaml_files import read_yaml

        self.path = path
        self.data, node = read_yaml(path, prefix="--task: ")
        self.lines: dict[tuple[str, ...], int] = {}
        if node is not None:
            self._index(node)
        if not isinstance(self.data, dict):
            raise ProbingError(f"{path}: expected a mapping of task fields")

    def _index(self, root: Any) -> None:
        """The line of every key path (iteratively; the loader has bounded the document's size)."""
        import yaml

        stack = [(root, ())]
        while stack:
            node, where = stack.pop()
            self.lines.setdefault(where, node.start_mark.line + 1)
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode):
                        self.lines.setdefault((*where, str(key.value)), key.start_mark.line + 1)
                        stack.append((value, (*where, str(key.value))))

    def error(self, where: tuple[str, ...], message: str) -> ProbingError:
        line = self.lines.get(where) or self.lines.get(where[:-1]) or 1
        return ProbingError(f"{self.path}: line {line}: field '{'.'.join(where)}': {message}")


def _mapping(document: _Document, where: tuple[str, ...], value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise document.error(where, "expected a mapping")
    return value


def _string(document: _Document, where: tuple[str, ...], value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise document.error(where, "expected a non-empty string")
    return value


def load_task_file(path: Path) -> TaskSpec:
    """The TaskSpec a YAML file defines (cached while the file is unchanged)."""
    path = Path(path)
    if not path.is_file():
        raise ProbingError(f"--task: {path}: file not found" if not path.exists() else f"--task: {path}: not a file")
    return _load(file_key(path))


@lru_cache(maxsize=32)
def _load(key: tuple[str, int, int]) -> TaskSpec:
    path = Path(key[0])
    document = _Document(path)
    data = document.data
    _check_top_fields(document)
    name = _task_name(document)
    kind = data["kind"]
    if kind not in HEADS:
        raise document.error(("kind",), f"expected {' or '.join(HEADS)}, got {kind!r}")
    splits, split_files = _split_files(document)
    fields = _field_roles(document, kind)
    images = path.parent / _string(document, ("images",), data.get("images", "."))
    box_format, box_units = _box_layout(document)
    space = _search_space(document, kind)
    patience, chance, order = _report_options(document, kind)
    control_fields = _control_fields(document)
    reader = JsonlReader(
        task_file=path,
        split_files=tuple(sorted(split_files.items())),
        images=images,
        fields=tuple(sorted(fields.items())),
        kind=kind,
        box_format=box_format,
        box_units=box_units,
        kept=control_fields,
    )
    evaluated = tuple(split for split in splits if split not in (TRAIN, VAL)) or (VAL,)
    return TaskSpec(
        name=name,
        title=str(data.get("title", name)),
        reader=reader,
        head=HEADS[kind],
        search_space=space,
        splits=tuple(splits),
        eval_splits=evaluated,
        patience=patience,
        chance=None if chance is None else float(chance),
        category=fields.get("category", "category"),
        category_order=tuple(order) if order else None,
        kendall=kind == "box" and "category" in fields,
        description=str(data.get("description", "")),
        source=str(path),
        control_type=MetadataType(control_fields, ", ".join(control_fields)) if control_fields else None,
    )


def _check_top_fields(document: _Document) -> None:
    """No field the schema does not know; the four that every task needs present."""
    unknown = sorted(set(document.data) - set(TOP_FIELDS))
    if unknown:
        raise document.error((unknown[0],), f"unknown field (allowed: {', '.join(TOP_FIELDS)})")
    for required in ("name", "kind", "splits", "fields"):
        if required not in document.data:
            raise ProbingError(f"{document.path}: field '{required}': missing")


def _task_name(document: _Document) -> str:
    name = _string(document, ("name",), document.data["name"])
    if not NAME_PATTERN.fullmatch(name):
        raise document.error(
            ("name",),
            f"'{name}' is not a task name (letters, digits and . _ + -, at most 64, starting with a letter or digit)",
        )
    return name


def _split_files(document: _Document) -> tuple[dict[str, Any], dict[str, Path]]:
    """The `splits` mapping as written (its order is the evaluated splits' order) and each split's jsonl path."""
    splits = _mapping(document, ("splits",), document.data["splits"])
    for required in (TRAIN, VAL):
        if required not in splits:
            raise document.error(("splits",), f"missing split '{required}'")
    split_files = {}
    for split, file_name in splits.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
            raise document.error(("splits", split), "a split name is letters, digits, _ and -")
        split_files[split] = document.path.parent / _string(document, ("splits", split), file_name)
    return splits, split_files


def _field_roles(document: _Document, kind: str) -> dict[str, str]:
    """The `fields` mapping (role -> record field): only roles the head's kind knows, and every one it needs."""
    fields = _mapping(document, ("fields",), document.data["fields"])
    allowed_roles = FIELD_ROLES[kind] + OPTIONAL_ROLES
    for role in fields:
        if role not in allowed_roles:
            raise document.error(
                ("fields", role), f"unknown role for a {kind} task (allowed: {', '.join(allowed_roles)})"
            )
        _string(document, ("fields", role), fields[role])
    for role in FIELD_ROLES[kind]:
        if role not in fields:
            raise document.error(("fields",), f"missing '{role}' (a {kind} task needs {', '.join(FIELD_ROLES[kind])})")
    return fields


def _box_layout(document: _Document) -> tuple[str, str]:
    """How the jsonl writes a box: its format and its units."""
    box_format = document.data.get("box_format", "xyxy")
    if box_format not in ("xyxy", "xywh", "cxcywh"):
        raise document.error(("box_format",), f"expected xyxy, xywh or cxcywh, got {box_format!r}")
    box_units = document.data.get("box_units", "pixels")
    if box_units not in ("pixels", "normalized"):
        raise document.error(("box_units",), f"expected pixels or normalized, got {box_units!r}")
    return box_format, box_units


def _search_space(document: _Document, kind: str) -> SearchSpace:
    """The kind's default space with the file's `search` overrides."""
    space = DEFAULT_SPACES[kind]
    if "search" in document.data:
        search = _mapping(document, ("search",), document.data["search"])
        for dimension, values in search.items():
            if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            ):
                raise document.error(("search", dimension), "expected a list of numbers")
        where = f"{document.path}: line {document.lines.get(('search',), 1)}: field 'search'"
        try:
            space = space.overridden(search, where)
        except ProbingError as error:
            raise error from None
    return space


def _report_options(document: _Document, kind: str) -> tuple[int | None, float | None, list[str] | None]:
    """`patience`, `chance` (default 0.5 for a binary task) and `category_order`, checked."""
    data = document.data
    patience = data.get("patience")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise document.error(("patience",), f"expected an integer >= 1, got {patience!r}")
    chance = data.get("chance", 0.5 if kind == "binary" else None)
    if chance is not None and (
        isinstance(chance, bool) or not isinstance(chance, (int, float)) or not 0 <= chance <= 1
    ):
        raise document.error(("chance",), f"expected a number in [0, 1], got {chance!r}")
    order = data.get("category_order")
    if order is not None and (not isinstance(order, list) or not all(isinstance(c, str) for c in order)):
        raise document.error(("category_order",), "expected a list of category names")
    return patience, chance, order


def _control_fields(document: _Document) -> tuple[str, ...]:
    """The record fields whose values make an example's control type (none without `control_type`)."""
    if "control_type" not in document.data:
        return ()
    named = document.data["control_type"]
    named = [named] if isinstance(named, str) else named
    if not isinstance(named, list) or not named or not all(isinstance(n, str) and n for n in named):
        raise document.error(("control_type",), "expected a field name or a list of field names")
    if len(set(named)) != len(named):
        raise document.error(("control_type",), "a field is named twice")
    return tuple(named)


@dataclass(frozen=True)
class _FieldReader:
    """Reads a record's field by its role, with messages naming the file, line, field and role."""

    record: dict[str, Any]
    fields: dict[str, str]
    path: Path
    line: int

    def __call__(self, role: str, kinds: type | tuple[type, ...], what: str) -> Any:
        field = self.fields[role]
        if field not in self.record:
            raise ProbingError(f"{self.path}: line {self.line}: missing field '{field}' ({role})")
        found = self.record[field]
        allowed = kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(found, allowed) or (isinstance(found, bool) and bool not in allowed):
            raise ProbingError(f"{self.path}: line {self.line}: field '{field}' ({role}) is not {what}")
        return found


def stable_image_id(relative_path: str) -> int:
    """A positive 62-bit id from an image's path (the same path, the same id, in every split and process)."""
    return int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") >> 2


@dataclass(frozen=True)
class JsonlReader:
    """Reads a YAML task's jsonl splits: one example per line (see the module docstring)."""

    task_file: Path
    split_files: tuple[tuple[str, Path], ...]
    images: Path
    fields: tuple[tuple[str, str], ...]
    kind: str
    box_format: str
    box_units: str
    kept: tuple[str, ...] = ()  # fields kept in the metadata even when a role reads them (the control type's)
    options: tuple[str, ...] = ()

    def sources(self, options: DataOptions, split: str) -> dict[str, Path]:
        return {"task_file": self.task_file, "examples": dict(self.split_files)[split]}

    def read(self, options: DataOptions, split: str) -> list[Example]:
        path = dict(self.split_files)[split]
        fields = dict(self.fields)
        examples: list[Example] = []
        seen_ids: dict[int, int] = {}
        sizes: dict[Path, tuple[float, float]] = {}
        clipped = 0
        for line_index, record in read_objects(path):
            line = line_index + 1
            value = _FieldReader(record, fields, path, line)
            image_name = value("image", str, "a string")
            image_path = self.images / image_name
            example_id = value("id", int, "an integer") if "id" in fields else line_index
            if example_id in seen_ids:
                raise ProbingError(f"{path}: line {line}: id {example_id} repeats line {seen_ids[example_id]}")
            seen_ids[example_id] = line
            image_id = value("image_id", int, "an integer") if "image_id" in fields else stable_image_id(image_name)
            category = str(value("category", (str, int), "a string")) if "category" in fields else "all"
            text = value("text", str, "a string")
            metadata = self._metadata(record, fields, path, line)
            label, box = None, None
            if self.kind == "binary":
                label = self._label(value, fields, path, line)
            else:
                box, outside = self._box(value, record, fields, image_path, sizes, path, line)
                clipped += outside
                xywh = (box[0], box[1], box[2] - box[0], box[3] - box[1])
                metadata |= {
                    "area_fraction": area_fraction(xywh, 1.0, 1.0),
                    "centre_distance": centre_distance(xywh, 1.0, 1.0),
                }
            examples.append(
                Example(
                    example_id=example_id,
                    image_id=image_id,
                    image_path=image_path,
                    text=text,
                    category=category,
                    box=box,
                    label=label,
                    metadata=metadata,
                )
            )
        if not examples:
            raise ProbingError(f"{path}: no examples")
        if clipped:
            log.warning("%s: %d box(es) reach outside the image and were clipped to it", path, clipped)
        return examples

    def _metadata(self, record: dict[str, Any], fields: dict[str, str], path: Path, line: int) -> dict[str, Any]:
        """The record's scalar fields that no role reads, plus the control type's fields (required)."""
        used = {fields[role] for role in fields}
        metadata = {
            key: item
            for key, item in record.items()
            if key not in used and isinstance(item, (str, int, float, bool, type(None)))
        }
        for name in self.kept:
            if name not in record:
                raise ProbingError(f"{path}: line {line}: missing field '{name}' (control_type)")
            if not isinstance(record[name], (str, int, float, bool)):
                raise ProbingError(f"{path}: line {line}: field '{name}' (control_type) is not a string or number")
            metadata[name] = record[name]
        return metadata

    @staticmethod
    def _label(value: _FieldReader, fields: dict[str, str], path: Path, line: int) -> int:
        label = value("label", (int, bool), "0/1 or true/false")
        if label not in (0, 1):
            raise ProbingError(f"{path}: line {line}: field '{fields['label']}' (label) must be 0 or 1")
        return int(label)

    def _box(
        self,
        value: _FieldReader,
        record: dict[str, Any],
        fields: dict[str, str],
        image_path: Path,
        sizes: dict[Path, tuple[float, float]],
        path: Path,
        line: int,
    ) -> tuple[tuple[float, ...], bool]:
        """The record's box as normalized xyxy clipped to the image, and whether clipping changed it."""
        raw = value("box", list, "a list of 4 numbers")
        if len(raw) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in raw
        ):
            raise ProbingError(f"{path}: line {line}: field '{fields['box']}' (box) is not 4 finite numbers")
        xyxy = box_convert(torch.tensor([raw], dtype=torch.float64), in_fmt=self.box_format, out_fmt="xyxy")[0].tolist()
        if self.box_units == "pixels":
            width, height = self._size(record, fields, image_path, sizes, path, line)
        else:
            width, height = 1.0, 1.0
        normalized = [xyxy[0] / width, xyxy[1] / height, xyxy[2] / width, xyxy[3] / height]
        inside = [min(max(v, 0.0), 1.0) for v in normalized]
        if not (inside[2] > inside[0] and inside[3] > inside[1]):
            raise ProbingError(
                f"{path}: line {line}: field '{fields['box']}' (box) {raw} is empty "
                f"inside the image ({self.box_format}, {self.box_units})"
            )
        return tuple(inside), inside != normalized

    @staticmethod
    def _size(
        record: dict[str, Any],
        fields: dict[str, str],
        image_path: Path,
        sizes: dict[Path, tuple[float, float]],
        path: Path,
        line: int,
    ) -> tuple[float, float]:
        """The image's width and height: from the record's fields, else the image file's header."""
        if "width" in fields and "height" in fields:
            width, height = record.get(fields["width"]), record.get(fields["height"])
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (width, height)):
                raise ProbingError(
                    f"{path}: line {line}: fields '{fields['width']}' and '{fields['height']}' must be positive numbers"
                )
            return float(width), float(height)
        if image_path not in sizes:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(image_path) as image:  # the header only: no pixel is decoded
                    sizes[image_path] = (float(image.width), float(image.height))
            except (FileNotFoundError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
                raise ProbingError(
                    f"{path}: line {line}: {image_path}: cannot read the image size for a pixel box "
                    f"({type(error).__name__}); give fields.width and fields.height"
                ) from None
        return sizes[image_path]
