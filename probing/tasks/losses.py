"""Losses of the task heads: box regression (GIoU + L1), BCE-with-logits for binary matching.

Boxes are predicted DETR-style: 4 raw outputs -> sigmoid -> normalized `[cx, cy, w, h]`, which is a valid
box by construction (w, h >= 0), converted to `xyxy` for GIoU with `torchvision.ops`. The L1 term is
taken on the normalized `cxcywh` coordinates, summed over the 4 and averaged over the batch (DETR's form),
and the GIoU term is `1 - GIoU` averaged over the batch; `giou_scale` and `l1_scale` weigh them (the
paper searches both in {1, 2, 4, ..., 20}).

Every loss is computed per probe: inputs may carry a leading probe axis `[K, B, ...]` and the result is
`[K]` so that K probes trained together never mix gradients.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss


def predicted_boxes(outputs: torch.Tensor) -> torch.Tensor:
    """Raw probe outputs `[..., 4]` -> normalized `xyxy` boxes (sigmoid `cxcywh`, then converted)."""
    return box_convert(outputs.sigmoid(), in_fmt="cxcywh", out_fmt="xyxy")


def box_loss(
    outputs: torch.Tensor, targets_xyxy: torch.Tensor, giou_scale: torch.Tensor | float, l1_scale: torch.Tensor | float
) -> torch.Tensor:
    """`giou_scale * mean(1 - GIoU) + l1_scale * mean(sum |cxcywh - target cxcywh|)` per probe.

    outputs: `[K, B, 4]` (or `[B, 4]`) raw; targets: `[B, 4]` normalized xyxy; scales: floats or `[K]`.
    """
    outputs = outputs.float()
    predicted_cxcywh = outputs.sigmoid()
    predicted_xyxy = box_convert(predicted_cxcywh, in_fmt="cxcywh", out_fmt="xyxy")
    targets_xyxy = targets_xyxy.float().expand_as(predicted_xyxy)
    giou = generalized_box_iou_loss(predicted_xyxy.reshape(-1, 4), targets_xyxy.reshape(-1, 4), reduction="none").view(
        predicted_xyxy.shape[:-1]
    )
    targets_cxcywh = box_convert(targets_xyxy, in_fmt="xyxy", out_fmt="cxcywh")
    l1 = (predicted_cxcywh - targets_cxcywh).abs().sum(-1)
    return _as_scale(giou_scale, giou) * giou.mean(-1) + _as_scale(l1_scale, l1) * l1.mean(-1)


def binary_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits per probe. outputs `[K, B, 1]` (or `[B, 1]`), labels `[B]` of 0/1."""
    logits = outputs.float().squeeze(-1)
    return F.binary_cross_entropy_with_logits(logits, labels.float().expand_as(logits), reduction="none").mean(-1)


def _as_scale(scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(scale, torch.Tensor):
        return scale.to(like.device, like.dtype)
    return scale
