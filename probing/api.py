"""The public Python API: what a script may import, one name per concept, from one place.

    from probing import api

    config = api.config_from_dict({...})             # or api.load_config("experiments/x.yaml")
    summary = api.run_config(config)                  # data -> features -> searches -> report
    run = api.load_run(summary.searches[0])           # a search folder's best run
    print(api.overall(run))                           # mean accuracy, 95 % bootstrap CI, std over seeds

Every name below keeps its meaning across versions; anything else in the package may move. The names are
imported when first used (PEP 562's module `__getattr__`), so `import probing.api` is quick and loads neither
torch nor transformers; each stage's heavy libraries come with its first use. docs/python-api.md describes
them and examples/small_study.py runs a small study with them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it, grouped by stage in the order data flows
_EXPORTS: dict[str, str] = {
    # errors: every user mistake raises ProbingError (the CLI prints it as one line)
    "ProbingError": "probing.errors",
    # data and models: tasks, the demo dataset, tiny random checkpoints
    "TaskSpec": "probing.tasks",
    "get_task": "probing.tasks",
    "register_task": "probing.tasks",
    "registered_tasks": "probing.tasks",
    "DataOptions": "probing.data.types",
    "make_demo_data": "probing.data.synthetic",
    "demo_data_options": "probing.data.synthetic",
    "ensure_checkpoint": "probing.models.tiny",
    "ModelSource": "probing.models",
    "load_resampler": "probing.models",
    # extraction and stores: per-layer query outputs on disk
    "ExtractionRequest": "probing.extract",
    "extract": "probing.extract",
    "FeatureStore": "probing.features",
    # probes and training
    "PROBES": "probing.probes",
    "ProbeKind": "probing.probes",
    "register_probe": "probing.probes",
    "Trial": "probing.train",
    "TrainSettings": "probing.train",
    "TrainRequest": "probing.probe_run",
    "run_training": "probing.probe_run",
    # search: Optuna over a task's space, the best trial evaluated on its final seeds
    "SearchSpace": "probing.search_space",
    "SearchRequest": "probing.search",
    "default_space": "probing.search",
    "run_search": "probing.search",
    # whole studies: a config (YAML or dict) run end to end, the packaged demo
    "Config": "probing.config",
    "config_from_dict": "probing.config",
    "load_config": "probing.config",
    "run_config": "probing.pipeline",
    "RunSummary": "probing.pipeline",
    "demo_config": "probing.demo",
    "run_demo": "probing.demo",
    # analysis: a run's results, intervals, comparisons, correlations
    "RunResults": "probing.analysis",
    "Estimate": "probing.analysis",
    "load_run": "probing.analysis",
    "overall": "probing.analysis",
    "per_category": "probing.analysis",
    "chance_level": "probing.analysis",
    "single_class": "probing.analysis",
    "paired_comparison": "probing.analysis",
    "selectivity": "probing.analysis",
    "kendall": "probing.analysis",
    "roc_auc": "probing.analysis",
    # reports: tables (Markdown, CSV, LaTeX), figures, results.csv
    "write_report": "probing.report",
    "load_runs": "probing.report",
    "results_frame": "probing.report",
    "RESULT_DTYPES": "probing.report",
    "Table": "probing.report",
    "register_table": "probing.report",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'probing.api' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # what type checkers and editors see: the same names, imported eagerly
    from probing.analysis import (  # noqa: F401
        Estimate,
        RunResults,
        chance_level,
        kendall,
        load_run,
        overall,
        paired_comparison,
        per_category,
        roc_auc,
        selectivity,
        single_class,
    )
    from probing.config import Config, config_from_dict, load_config  # noqa: F401
    from probing.data.synthetic import demo_data_options, make_demo_data  # noqa: F401
    from probing.data.types import DataOptions  # noqa: F401
    from probing.demo import demo_config, run_demo  # noqa: F401
    from probing.errors import ProbingError  # noqa: F401
    from probing.extract import ExtractionRequest, extract  # noqa: F401
    from probing.features import FeatureStore  # noqa: F401
    from probing.models import ModelSource, load_resampler  # noqa: F401
    from probing.models.tiny import ensure_checkpoint  # noqa: F401
    from probing.pipeline import RunSummary, run_config  # noqa: F401
    from probing.probe_run import TrainRequest, run_training  # noqa: F401
    from probing.probes import PROBES, ProbeKind, register_probe  # noqa: F401
    from probing.report import RESULT_DTYPES, Table, load_runs, register_table, results_frame, write_report  # noqa: F401
    from probing.search import SearchRequest, default_space, run_search  # noqa: F401
    from probing.search_space import SearchSpace  # noqa: F401
    from probing.tasks import TaskSpec, get_task, register_task, registered_tasks  # noqa: F401
    from probing.train import TrainSettings, Trial  # noqa: F401
