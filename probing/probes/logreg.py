"""The logistic-regression probe (`--probe logreg`): scikit-learn's L-BFGS fit of an L2-regularised logistic
regression on frozen features, the classic probing baseline (the linear evaluations of pyvene and DINOv2),
and a cross-check of the SGD-trained linear probes.

The fit converges to the optimum for its C, so there are no epochs, learning rate or early stopping: one
"epoch" is recorded. The fitted coefficients become a `linear` `Probe`, so outputs, predictions, saved
weights and reports go through the same code as every other probe.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch

from probing.core.errors import ProbingError
from probing.probes.modules import Probe
from probing.probes.train import ProbeData, TrainSettings, Trial, TrialResult, probe_outputs

log = logging.getLogger(__name__)

MAX_ITERATIONS = 1000
DEFAULT_C = 1.0


def fit_logreg(train: ProbeData, val: ProbeData, trials: Sequence[Trial], settings: TrainSettings) -> list[TrialResult]:
    """One L-BFGS fit per trial (C = `trial.logreg_c`, default 1); results shaped as the SGD trainers'."""
    settings.check()
    trials = [trial.check(settings.probe) for trial in trials]
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    head = settings.head
    if head.kind != "binary":
        raise ProbingError(f"--probe logreg: for binary tasks only (task {settings.task} has a {head.kind} head)")
    features = train.example_features().float().numpy()
    labels = train.targets.numpy().astype(int)
    if len(set(labels.tolist())) < 2:
        raise ProbingError(f"--probe logreg: the train split of {settings.task} has a single label")
    results = []
    for trial in trials:
        c = trial.logreg_c if trial.logreg_c is not None else DEFAULT_C
        model = LogisticRegression(C=c, solver="lbfgs", max_iter=MAX_ITERATIONS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(features, labels)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        if not converged:
            log.warning("logreg C=%g: L-BFGS did not converge in %d iterations", c, MAX_ITERATIONS)
        probe = Probe("linear", features.shape[1], 1, settings.hidden)
        with torch.no_grad():
            probe.layers[0].weight.copy_(torch.as_tensor(model.coef_, dtype=torch.float32))
            probe.layers[0].bias.copy_(torch.as_tensor(model.intercept_, dtype=torch.float32))
        train_outputs = probe_outputs(probe, train, settings)
        val_outputs = probe_outputs(probe, val, settings)
        val_metrics = {
            "loss": float(head.loss(val_outputs, val.targets)),
            **{name: float(v) for name, v in head.metrics(val_outputs, val.targets).items()},
        }
        record = {
            "epoch": 1,
            "train_loss": float(head.loss(train_outputs, train.targets)),
            "val_loss": val_metrics["loss"],
            **{k: v for k, v in val_metrics.items() if k != "loss"},
            "iterations": int(model.n_iter_[0]),
            "converged": converged,
        }
        results.append(
            TrialResult(
                trial=trial,
                best_epoch=1,
                epochs_run=1,
                stopped_early=False,
                val_metrics=val_metrics,
                history=[record],
                probe=probe,
            )
        )
    return results
