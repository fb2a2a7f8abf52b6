"""Metric arithmetic used by the task heads (`probing.tasks.heads`): IoU of predicted boxes (plain IoU >= 0.5 is the
usual referring-expression accuracy), the sign rule of binary logits, and the likelihoods (in bits) that the
online code of `probing.studies.mdl` transmits targets with. Functions take a leading probe axis where given
(`[K, N, ...]` -> `[K, N]`)."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from probing.data.boxes import paired_iou
from probing.tasks.losses import predicted_boxes

__all__ = [
    "BOX_CODE_BINS",
    "IOU_THRESHOLD",
    "bernoulli_bits",
    "binary_correct",
    "box_ious",
    "discretised_laplace_bits",
    "laplace_scales",
    "predicted_boxes",
]

IOU_THRESHOLD = 0.5


def box_ious(outputs: torch.Tensor, targets_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU of each predicted box (raw outputs) with its target, `[..., N]`."""
    predicted = predicted_boxes(outputs.float())
    return paired_iou(predicted, targets_xyxy.float().to(predicted.device).expand_as(predicted))


def binary_correct(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where the logit's sign matches the label (logit > 0 means 'true'), `[..., N]`."""
    predicted = (outputs.float().squeeze(-1) > 0).float()
    return (predicted == labels.float().to(predicted.device)).float()


# ---------------------------------------------------------------------------------------------- codes
# Likelihoods of a probe's outputs, in bits, for the online code of `probing.studies.mdl` (each head picks its own).

BOX_CODE_BINS = 100  # a box coordinate is coded to 1 % of the image side


def bernoulli_bits(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log2 p(label) under Bernoulli(sigmoid(logit)), per example `[..., N]` (BCE with logits, in bits)."""
    logits = outputs.double().squeeze(-1)
    nats = F.binary_cross_entropy_with_logits(
        logits, labels.double().to(logits.device).expand_as(logits), reduction="none"
    )
    return nats / math.log(2)


def discretised_laplace_bits(
    values: torch.Tensor, locations: torch.Tensor, scales: torch.Tensor, bins: int = BOX_CODE_BINS
) -> torch.Tensor:
    """-log2 of the probability of the bin holding each value under Laplace(location, scale), `[...]`.

    [0, 1] is cut into `bins` equal bins; the first reaches down to -inf and the last up to +inf, so the bins'
    probabilities sum to one for any location and scale. Written by hand in log space because the plain form
    F(high) - F(low) with torch's or scipy's Laplace CDF rounds to 0 (infinite bits) a few dozen scales from
    the location; the tests check it against scipy's CDF where that is exact.
    """
    values, locations, scales = values.double(), locations.double(), scales.double()
    index = (values * bins).floor().clamp(0, bins - 1)
    low = torch.where(index == 0, -math.inf, index / bins)
    high = torch.where(index == bins - 1, math.inf, (index + 1) / bins)
    z_low, z_high = (low - locations) / scales, (high - locations) / scales
    # log(1 - exp(z_low - z_high)): the share of the nearer edge's tail that the bin keeps
    kept = torch.log1p(-torch.exp(z_low - z_high))
    below = math.log(0.5) + z_high + kept  # the bin lies below the location: 0.5 (e^z_high - e^z_low)
    above = math.log(0.5) - z_low + kept  # above it: 0.5 (e^-z_low - e^-z_high)
    across = torch.log1p(-0.5 * (torch.exp(z_low) + torch.exp(-z_high)))  # it holds the location
    log_p = torch.where(z_high <= 0, below, torch.where(z_low >= 0, above, across))
    return -log_p / math.log(2)


def laplace_scales(locations: torch.Tensor, values: torch.Tensor, bins: int = BOX_CODE_BINS) -> torch.Tensor:
    """The maximum-likelihood Laplace scale of each coordinate (its mean absolute error), `[..., N, C] -> [..., C]`,
    at least half a bin: a code cannot promise more precision than its grid has (and a scale of 0 codes
    nothing)."""
    return (values.double() - locations.double()).abs().mean(-2).clamp(min=0.5 / bins)
