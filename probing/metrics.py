"""Metric arithmetic used by the task heads (`probing.heads`): IoU of predicted boxes (plain IoU >= 0.5 is the
usual referring-expression accuracy) and the sign rule of binary logits. Functions take a leading probe axis
where given (`[K, N, ...]` -> `[K, N]`)."""

from __future__ import annotations

import torch

from probing.data.boxes import paired_iou
from probing.losses import predicted_boxes

__all__ = ["IOU_THRESHOLD", "binary_correct", "box_ious", "predicted_boxes"]

IOU_THRESHOLD = 0.5


def box_ious(outputs: torch.Tensor, targets_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU of each predicted box (raw outputs) with its target, `[..., N]`."""
    predicted = predicted_boxes(outputs.float())
    return paired_iou(predicted, targets_xyxy.float().to(predicted.device).expand_as(predicted))


def binary_correct(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where the logit's sign matches the label (logit > 0 means 'true'), `[..., N]`."""
    predicted = (outputs.float().squeeze(-1) > 0).float()
    return (predicted == labels.float().to(predicted.device)).float()
