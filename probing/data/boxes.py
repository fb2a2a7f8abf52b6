"""Box formats, IoU and the 3x3 grid cells used by Region Cell Matching.

Conventions (those of COCO, REFER and DETR-style box regression):
- COCO / REFER ground truth is `[x, y, w, h]` in absolute pixels, top-left origin.
- Inside the toolkit a target box is normalized `xyxy`: `[x1/W, y1/H, x2/W, y2/H]`. Probes may predict
  normalized `cxcywh` (DETR style); conversions go through `torchvision.ops.box_convert`.
- IoU is invariant to the same axis-wise scaling of both boxes, so it can be computed on normalized boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from probing.data.types import CELL_NAMES, GRID_SIZE  # noqa: F401 (the grid is data vocabulary)


def _as_boxes(boxes: torch.Tensor | Sequence[float] | Sequence[Sequence[float]]) -> torch.Tensor:
    tensor = torch.as_tensor(boxes, dtype=torch.float64 if not torch.is_tensor(boxes) else None)
    if tensor.shape[-1] != 4:
        raise ValueError(f"boxes must have 4 coordinates in the last dimension, got shape {tuple(tensor.shape)}")
    return tensor


def _image_scale(width, height, like: torch.Tensor) -> torch.Tensor:
    width = torch.as_tensor(width, dtype=like.dtype)
    height = torch.as_tensor(height, dtype=like.dtype)
    return torch.stack([width, height, width, height], dim=-1)


def normalize_xyxy(boxes_xyxy: torch.Tensor | Sequence, width, height) -> torch.Tensor:
    """Pixel `xyxy` to `[x1/W, y1/H, x2/W, y2/H]`; width/height may be scalars or per-box tensors."""
    boxes = _as_boxes(boxes_xyxy)
    return boxes / _image_scale(width, height, boxes)


def paired_iou(boxes_a: torch.Tensor | Sequence, boxes_b: torch.Tensor | Sequence) -> torch.Tensor:
    """IoU of box i of `boxes_a` with box i of `boxes_b` (both `xyxy`, same units), shape `[N]`.

    Written by hand because torchvision.ops.box_iou is pairwise (N x M): for an evaluation set of ~10k
    examples its N x N matrix is quadratic memory where only the diagonal is wanted. The tests check this
    against the diagonal of torchvision's result. A pair with an empty union (two identical degenerate
    boxes) has IoU 0 by convention.
    """
    a, b = _as_boxes(boxes_a), _as_boxes(boxes_b)
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    union = area_a + area_b - intersection
    return torch.where(union > 0, intersection / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def _nearest_centre_index(twice_centre: float, extent: float, grid: int) -> int:
    """Index of the grid line segment whose centre is nearest a coordinate, ties toward the image centre.

    Cell k spans [k*extent/grid, (k+1)*extent/grid]; its centre is (k + 1/2) * extent / grid. Along one axis
    the nearest centre is the segment containing the point (points before 0 or past `extent` go to the
    first or last cell). A point exactly on a boundary k*extent/grid is equidistant from cells k-1 and k:
    the tie goes to the cell whose index is nearer the middle of the grid, so the rule is symmetric under a
    horizontal or vertical flip of the image (left/right and top/bottom stay mirror images); for even grids
    the exact centre line goes to the lower index. The comparison `grid * 2c` vs `2k * extent` uses
    the doubled centre x1 + x2, exact in floating point for pixel boxes, instead of a rounded division.
    """
    scaled = grid * twice_centre  # = 2 * extent * (position in grid units)
    unit = 2.0 * extent
    if scaled <= 0:
        return 0
    if scaled >= grid * unit:
        return grid - 1
    lower = int(scaled // unit)
    if scaled == lower * unit and lower > 0:  # exactly on the boundary between cells lower-1 and lower
        middle = (grid - 1) / 2.0
        return lower - 1 if abs(lower - 1 - middle) <= abs(lower - middle) else lower
    return min(lower, grid - 1)


def assign_cell(box_xyxy: Sequence[float], width: float, height: float, grid: int = GRID_SIZE) -> int:
    """The row-major grid cell (0 = top left ... grid*grid-1 = bottom right) nearest the box centre.

    `box_xyxy` is in pixels of an image of `width` x `height`. The nearest cell centre is found per axis
    (see `_nearest_centre_index` for the tie rule: toward the middle row/column). Degenerate boxes (zero
    width or height) are allowed: their centre is still defined. Boxes with x2 < x1 or y2 < y1, non-finite
    coordinates or a non-positive image size are refused with ValueError.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f"image size must be positive and finite, got {width} x {height}")
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box has non-finite coordinates: {box_xyxy}")
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box is not xyxy (x2 < x1 or y2 < y1): {box_xyxy}")
    column = _nearest_centre_index(x1 + x2, float(width), grid)
    row = _nearest_centre_index(y1 + y2, float(height), grid)
    return row * grid + column


def cell_name(cell: int) -> str:
    """Human name of a 3x3 cell, as used in RCM captions ("top left" ... "bottom right")."""
    if not 0 <= cell < len(CELL_NAMES):
        raise ValueError(f"cell must be in 0..{len(CELL_NAMES) - 1}, got {cell}")
    return CELL_NAMES[cell]


def area_fraction(box_xywh: Sequence[float], width: float, height: float) -> float:
    """Box area as a fraction of the image area (the box, not the segmentation mask)."""
    return float(box_xywh[2]) * float(box_xywh[3]) / (float(width) * float(height))


def centre_distance(box_xywh: Sequence[float], width: float, height: float) -> float:
    """Euclidean distance of the box centre from the image centre in normalized coordinates (0 .. ~0.707)."""
    centre_x = (float(box_xywh[0]) + float(box_xywh[2]) / 2.0) / float(width)
    centre_y = (float(box_xywh[1]) + float(box_xywh[3]) / 2.0) / float(height)
    return math.hypot(centre_x - 0.5, centre_y - 0.5)
