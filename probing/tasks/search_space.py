"""A probe's hyper-parameter search space: what a task declares as its default and a config or YAML overrides.

The paper's Table 4 for its tasks: lr log-uniform in [1e-5, 5e-4]; epochs RefCOCOg {20, 30, 40}, VSR
{3, 5, 10, 15, 20}, RCM {50, 100, 150}; RefCOCOg's GIoU and L1 loss scales each in {1, 2, 4, 6, ..., 20}
(our reading of the paper's "{1, 2, 4, ..., 20}"). The logistic-regression probe searches its inverse
regularisation strength C instead (log-uniform), the only hyper-parameter of an L-BFGS fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from probing.core.errors import ProbingError
from probing.core.settings import BOX_TASKS, LOGREG_PROBE, SGD_PROBES, comma_separated, scoped, setting

LR_RANGE = (1e-5, 5e-4)
LOSS_SCALES: tuple[int, ...] = (1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20)
LOGREG_C_RANGE = (1e-4, 1e2)


@scoped
@dataclass(frozen=True)
class SearchSpace:
    """The dimensions searched; on the command line each is an override of the task's default space."""

    lr: tuple[float, float] = setting(
        LR_RANGE,
        cli="--lr-range",
        parse=comma_separated(float, 2),
        applies=SGD_PROBES,
        help="low,high of the log-uniform learning rate (default: the task's).",
    )
    epochs: tuple[int, ...] = setting(
        (20, 30, 40),
        cli="--epoch-choices",  # --epochs is one number of epochs in train and mdl
        low=1,
        parse=comma_separated(int),
        applies=SGD_PROBES,
        help="Comma-separated epoch choices (default: the task's).",
    )
    giou_scale: tuple[float, ...] | None = setting(
        None,
        cli="--giou-scales",
        parse=comma_separated(float),
        applies=BOX_TASKS,
        help="Box tasks: GIoU loss scale choices (default: the task's).",
    )
    l1_scale: tuple[float, ...] | None = setting(
        None,
        cli="--l1-scales",
        parse=comma_separated(float),
        applies=BOX_TASKS,
        help="Box tasks: L1 loss scale choices (default: the task's).",
    )
    logreg_c: tuple[float, float] | None = setting(
        None,
        cli="--logreg-c-range",
        parse=comma_separated(float, 2),
        applies=LOGREG_PROBE,
        help="logreg probe: low,high of the log-uniform C (default 1e-4,1e2).",
    )

    def check(self) -> SearchSpace:
        if self.logreg_c is not None:
            low, high = self.logreg_c
            if not (0 < low <= high and math.isfinite(high)):
                raise ProbingError(
                    f"search space: logreg_c bounds must satisfy 0 < low <= high, got {list(self.logreg_c)}"
                )
            return self
        low, high = self.lr
        if not (0 < low <= high and math.isfinite(high)):
            raise ProbingError(f"search space: lr bounds must satisfy 0 < low <= high, got {list(self.lr)}")
        if not self.epochs or any(e < 1 for e in self.epochs):
            raise ProbingError(f"search space: epochs must be positive integers, got {list(self.epochs)}")
        for name in ("giou_scale", "l1_scale"):
            values = getattr(self, name)
            if values is not None and (not values or any(not (v >= 0 and math.isfinite(v)) for v in values)):
                raise ProbingError(f"search space: {name} must be non-negative numbers, got {list(values)}")
        return self

    def overridden(self, changes: dict[str, Any], where: str | None) -> SearchSpace:
        """This space with some dimensions replaced (values as lists); errors name `where` (if given)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ProbingError(
                f"{where or 'search space'}: unknown search dimension '{unknown[0]}' (allowed: "
                f"{', '.join(sorted(known))})"
            )
        values = {name: tuple(value) for name, value in changes.items() if value is not None}
        if "epochs" in values:  # choices of a whole number of epochs, also when a file wrote them as 3.0
            if not all(float(e).is_integer() for e in values["epochs"]):
                raise ProbingError(
                    f"{where or 'search space'}: epochs must be whole numbers, got {list(values['epochs'])}"
                )
            values["epochs"] = tuple(int(e) for e in values["epochs"])
        for name in ("lr", "logreg_c"):
            if name in values and len(values[name]) != 2:
                raise ProbingError(f"{where or 'search space'}: {name}: expected [low, high]")
        try:
            return replace(self, **values).check()
        except ProbingError as error:
            raise ProbingError(f"{where}: {error}" if where else str(error)) from None

    def identity(self) -> dict[str, Any]:
        """The space as manifests record it; `logreg_c` only when used (searches made before it existed keep
        their identity)."""
        result = {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}
        if result["logreg_c"] is None:
            del result["logreg_c"]
        return result

    def for_probe(self, probe: str) -> SearchSpace:
        """The space a probe kind searches: C alone for the logistic regression, the rest otherwise."""
        if probe == "logreg":
            return SearchSpace(lr=self.lr, epochs=(1,), logreg_c=self.logreg_c or LOGREG_C_RANGE)
        return replace(self, logreg_c=None)

    def distributions(self) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        if self.logreg_c is not None:
            return {"logreg_c": FloatDistribution(self.logreg_c[0], self.logreg_c[1], log=True)}
        result: dict[str, Any] = {
            "lr": FloatDistribution(self.lr[0], self.lr[1], log=True),
            "epochs": CategoricalDistribution(list(self.epochs)),
        }
        for name in ("giou_scale", "l1_scale"):
            values = getattr(self, name)
            if values is not None:
                result[name] = CategoricalDistribution(list(values))
        return result
