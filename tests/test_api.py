"""The public Python API (`probing.api`): its names resolve to the package's own objects, importing it loads no
heavy library, its page documents every name, and examples/small_study.py runs a small study with it."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).parents[1]


def test_the_api_declares_every_name_and_imports_each_from_its_home():
    from probing import api

    assert len(api.__all__) == len(set(api.__all__)) >= 40
    for name in api.__all__:
        home = importlib.import_module(api._EXPORTS[name])
        assert getattr(api, name) is getattr(home, name), name
    assert set(api.__all__) <= set(dir(api))
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        api.nothing_here  # noqa: B018


def test_importing_the_api_loads_neither_torch_nor_transformers():
    code = "import sys, probing.api; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "[]"


def test_the_api_page_documents_every_name():
    from probing import api

    page = (ROOT / "docs" / "python-api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`api\.(\w+)", page))
    assert set(api.__all__) <= documented, set(api.__all__) - documented
    assert documented <= set(api.__all__), documented - set(api.__all__)  # no name the API lacks


@pytest.mark.slow
def test_the_small_study_example_runs_and_its_results_read_back_in_the_documented_types(tmp_path):
    from probing.report.tables import RESULT_DTYPES

    out = tmp_path / "study"
    shown = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "small_study.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    lines = shown.stdout.splitlines()
    assert sum(line.startswith("search layers: ") for line in lines) == 8  # 2 models x 4 layers
    assert any(re.match(r"store .*: layers \[1, 2, 3, 4\], layer 1 \(24, \d+, \d+\)$", line) for line in lines)
    assert any(re.match(r"layer 4, BLIP-2 \(tiny\) - BLIP-2 \(random weights\): [+-]\d", line) for line in lines)
    report = out / "report-small-study"
    text = (report / "results.csv").read_text(encoding="utf-8")
    results = pd.read_csv(report / "results.csv", dtype=RESULT_DTYPES)
    assert results.to_csv(index=False) == text  # the documented types read it whole
    assert str(tmp_path) not in text  # model and run paths relative to the report
    runs = results[(results["metric"] == "accuracy") & results["category"].isna() & results["run"].notna()]
    assert len(runs) == 16 and set(runs["layer"]) == {1, 2, 3, 4}  # 8 runs x (val, test)
    assert set(runs["model_id"]) == {"../models/tiny-blip2"} and set(runs["init"]) == {"pretrained", "random"}
    assert f"{len(results)} numbers, 16 run accuracies" in lines[-1]
