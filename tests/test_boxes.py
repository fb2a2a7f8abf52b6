import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from probing.data import boxes
from probing.data.boxes import CELL_NAMES, assign_cell


def centred_box(cx, cy, w=2.0, h=2.0):
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


@pytest.mark.parametrize("width,height", [(300, 300), (300, 150), (90, 270)])
def test_every_cell_from_its_centre(width, height):
    for cell in range(9):
        row, column = divmod(cell, 3)
        cx, cy = (column + 0.5) * width / 3, (row + 0.5) * height / 3
        assert assign_cell(centred_box(cx, cy), width, height) == cell
        assert assign_cell(centred_box(cx, cy, w=width / 3, h=height / 3), width, height) == cell


def test_cell_names_are_row_major():
    assert CELL_NAMES[0] == "top left" and CELL_NAMES[4] == "middle" and CELL_NAMES[8] == "bottom right"
    assert CELL_NAMES[2] == "top right" and CELL_NAMES[6] == "bottom left"
    assert boxes.cell_name(5) == "middle right"
    with pytest.raises(ValueError):
        boxes.cell_name(9)


def test_ties_on_cell_borders_go_toward_the_middle():
    # Centre exactly on x = W/3 (between columns 0 and 1) and on x = 2W/3 (between 1 and 2): middle column.
    assert assign_cell((80, 10, 120, 20), 300, 300) == 1  # centre x = 100 = 300/3
    assert assign_cell((180, 10, 220, 20), 300, 300) == 1  # centre x = 200 = 2*300/3
    assert assign_cell((10, 80, 20, 120), 300, 300) == 3  # centre y = 100: middle row, left column
    assert assign_cell((10, 180, 20, 220), 300, 300) == 3
    assert assign_cell((90, 90, 110, 110), 300, 300) == 4  # on both borders: the middle cell
    # Just off the border falls on the side the centre lies.
    assert assign_cell((79.9, 10, 119.9, 20), 300, 300) == 0
    assert assign_cell((180.1, 10, 220.1, 20), 300, 300) == 2


def test_border_tie_on_non_square_image():
    # 224 / 3 is not a float you can write: the doubled centre 2*cx = 224*2/3 is compared exactly.
    width, height = 224.0, 150.0
    third = width / 3
    assert assign_cell((third - 5, 0, third + 5, 10), width, height) == 1
    assert assign_cell((0, 45, 10, 55), width, height) == 3  # centre y = 50 = 150/3


def test_even_grid_centre_tie_goes_to_lower_index():
    assert assign_cell((40, 40, 60, 60), 100, 100, grid=2) == 0
    assert assign_cell((41, 41, 61, 61), 100, 100, grid=2) == 3


def test_image_edges_and_boxes_outside():
    assert assign_cell((0, 0, 0, 0), 300, 300) == 0  # degenerate box at the origin
    assert assign_cell((300, 300, 300, 300), 300, 300) == 8
    assert assign_cell((-50, -50, -10, -10), 300, 300) == 0  # centre outside: nearest centre is still top left
    assert assign_cell((310, -5, 320, 5), 300, 300) == 2


def test_degenerate_boxes():
    assert assign_cell((150, 20, 150, 20), 300, 300) == 1  # a point
    assert assign_cell((10, 250, 10, 290), 300, 300) == 6  # zero width
    assert assign_cell((10, 260, 200, 260), 300, 300) == 7  # zero height, centre x = 105
    for bad in [(10, 10, 5, 20), (10, 10, 20, 5), (math.nan, 0, 1, 1), (0, 0, math.inf, 1)]:
        with pytest.raises(ValueError):
            assign_cell(bad, 300, 300)
    for width, height in [(0, 10), (10, -1), (math.nan, 10)]:
        with pytest.raises(ValueError):
            assign_cell((0, 0, 1, 1), width, height)


def test_flip_symmetry_on_random_and_border_boxes():
    """Mirroring the image mirrors the cell: the tie rule is symmetric (ties toward the middle)."""
    rng = np.random.default_rng(0)
    width, height = 240.0, 180.0
    samples = []
    for _ in range(500):
        x1, x2 = sorted(rng.uniform(0, width, 2))
        y1, y2 = sorted(rng.uniform(0, height, 2))
        samples.append((x1, y1, x2, y2))
    for d in (0.0, 1.0, 5.0):  # centres exactly on borders
        samples.append((width / 3 - d, height / 3 - d, width / 3 + d, height / 3 + d))
        samples.append((2 * width / 3 - d, 2 * height / 3 - d, 2 * width / 3 + d, 2 * height / 3 + d))
    for x1, y1, x2, y2 in samples:
        row, column = divmod(assign_cell((x1, y1, x2, y2), width, height), 3)
        assert assign_cell((width - x2, y1, width - x1, y2), width, height) == row * 3 + (2 - column)
        assert assign_cell((x1, height - y2, x2, height - y1), width, height) == (2 - row) * 3 + column


def test_normalisation_by_image_size():
    rng = np.random.default_rng(1)
    xyxy = torch.tensor(rng.uniform(1, 100, size=(50, 4)))
    widths, heights = torch.full((50,), 640.0), torch.full((50,), 480.0)
    normalized = boxes.normalize_xyxy(xyxy, widths, heights)
    assert torch.allclose(normalized * torch.tensor([640.0, 480.0, 640.0, 480.0]), xyxy)
    assert boxes.normalize_xyxy([10, 20, 40, 60], 200, 100).tolist() == [0.05, 0.2, 0.2, 0.6]


def test_paired_iou_hand_cases():
    a = [[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    b = [[0, 0, 2, 2], [1, 0, 3, 2], [1, 1, 3, 3], [1, 0, 2, 1], [5, 5, 6, 6], [1, 1, 1, 1]]
    expected = [1.0, 1 / 3, 0.25, 0.0, 0.0, 0.0]  # same, half overlap, contained, touching, disjoint, empty
    assert torch.allclose(boxes.paired_iou(a, b), torch.tensor(expected, dtype=torch.float64))


def test_paired_iou_equals_torchvision_diagonal():
    rng = np.random.default_rng(2)
    corners = rng.uniform(0, 1, size=(200, 2, 2))
    first = torch.tensor(
        np.concatenate(
            [
                corners[:, 0].min(1, keepdims=True),
                corners[:, 1].min(1, keepdims=True),
                corners[:, 0].max(1, keepdims=True),
                corners[:, 1].max(1, keepdims=True),
            ],
            axis=1,
        )
    )
    second = first[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    assert torch.allclose(boxes.paired_iou(first, second), box_iou(first, second).diagonal())


def test_area_fraction_and_centre_distance():
    assert boxes.area_fraction([0, 0, 50, 25], 100, 50) == 0.25
    assert boxes.centre_distance([25, 0, 50, 50], 100, 50) == 0.0
    assert math.isclose(boxes.centre_distance([0, 0, 0, 0], 100, 50), math.sqrt(0.5))
    assert math.isclose(boxes.centre_distance([70, 20, 20, 10], 100, 50), 0.3)
