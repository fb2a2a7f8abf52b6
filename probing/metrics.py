"""Metrics: Acc@IoU>=0.5 and mean IoU for boxes (plain IoU, the usual RefCOCOg accuracy), accuracy for
binary matching. Functions take a leading probe axis where given (`[K, N, ...]` -> `[K]`)."""

from __future__ import annotations

import torch

from probing.data.boxes import paired_iou
from probing.losses import predicted_boxes

IOU_THRESHOLD = 0.5


def main_metric(task: str) -> str:
    """The validation metric that picks the best epoch and trial: Acc@0.5 for RefCOCOg, accuracy otherwise."""
    return "acc@0.5" if task == "refcocog" else "accuracy"


def box_ious(outputs: torch.Tensor, targets_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU of each predicted box (raw outputs) with its target, `[..., N]`."""
    predicted = predicted_boxes(outputs.float())
    return paired_iou(predicted, targets_xyxy.float().to(predicted.device).expand_as(predicted))


def binary_correct(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where the logit's sign matches the label (logit > 0 means 'true'), `[..., N]`."""
    predicted = (outputs.float().squeeze(-1) > 0).float()
    return (predicted == labels.float().to(predicted.device)).float()


def task_metrics(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """{'acc@0.5', 'mean_iou'} for RefCOCOg, {'accuracy'} for VSR / RCM; each `[K]` or a scalar."""
    if task == "refcocog":
        ious = box_ious(outputs, targets)
        return {"acc@0.5": (ious >= IOU_THRESHOLD).float().mean(-1), "mean_iou": ious.mean(-1)}
    return {"accuracy": binary_correct(outputs, targets).mean(-1)}
