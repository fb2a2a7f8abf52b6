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
    "ProbingError": "probing.core.errors",
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
    "ExtractionRequest": "probing.store.extract",
    "extract": "probing.store.extract",
    "FeatureStore": "probing.store.features",
    # probes and training
    "PROBES": "probing.probes.modules",
    "ProbeKind": "probing.probes.modules",
    "register_probe": "probing.probes.modules",
    "Trial": "probing.probes.train",
    "TrainSettings": "probing.probes.train",
    "TrainRequest": "probing.probes.run",
    "run_training": "probing.probes.run",
    # search: Optuna over a task's space, the best trial evaluated on its final seeds
    "SearchSpace": "probing.tasks.search_space",
    "SearchRequest": "probing.studies.search",
    "default_space": "probing.studies.settings",
    "run_search": "probing.studies.search",
    # whole studies: a config (YAML or dict) run end to end, the packaged demo
    "Config": "probing.runs.config",
    "config_from_dict": "probing.runs.config",
    "load_config": "probing.runs.config",
    "run_config": "probing.runs.pipeline",
    "RunSummary": "probing.runs.pipeline",
    "demo_config": "probing.runs.demo",
    "run_demo": "probing.runs.demo",
    # analysis: a run's results, intervals, comparisons, correlations
    "RunResults": "probing.report.analysis",
    "Estimate": "probing.report.analysis",
    "load_run": "probing.report.analysis",
    "overall": "probing.report.analysis",
    "per_category": "probing.report.analysis",
    "chance_level": "probing.report.analysis",
    "single_class": "probing.report.analysis",
    "paired_comparison": "probing.report.analysis",
    "selectivity": "probing.report.analysis",
    "kendall": "probing.report.analysis",
    "roc_auc": "probing.report.analysis",
    # reports: tables (Markdown, CSV, LaTeX), figures, results.csv
    "write_report": "probing.report.tables",
    "load_runs": "probing.report.tables",
    "results_frame": "probing.report.tables",
    "RESULT_DTYPES": "probing.report.tables",
    "Table": "probing.report.tables",
    "register_table": "probing.report.tables",
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
    from probing.core.errors import ProbingError  # noqa: F401
    from probing.data.synthetic import demo_data_options, make_demo_data  # noqa: F401
    from probing.data.types import DataOptions  # noqa: F401
    from probing.models import ModelSource, load_resampler  # noqa: F401
    from probing.models.tiny import ensure_checkpoint  # noqa: F401
    from probing.probes.modules import PROBES, ProbeKind, register_probe  # noqa: F401
    from probing.probes.run import TrainRequest, run_training  # noqa: F401
    from probing.probes.train import TrainSettings, Trial  # noqa: F401
    from probing.report.analysis import (  # noqa: F401
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
    from probing.report.tables import RESULT_DTYPES, Table, load_runs, register_table, results_frame, write_report  # noqa: F401
    from probing.runs.config import Config, config_from_dict, load_config  # noqa: F401
    from probing.runs.demo import demo_config, run_demo  # noqa: F401
    from probing.runs.pipeline import RunSummary, run_config  # noqa: F401
    from probing.store.extract import ExtractionRequest, extract  # noqa: F401
    from probing.store.features import FeatureStore  # noqa: F401
    from probing.studies.search import SearchRequest, default_space, run_search  # noqa: F401
    from probing.tasks import TaskSpec, get_task, register_task, registered_tasks  # noqa: F401
    from probing.tasks.search_space import SearchSpace  # noqa: F401
