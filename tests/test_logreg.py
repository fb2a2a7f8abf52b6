"""The logistic-regression probe (scikit-learn, L-BFGS): a cross-check of the SGD probes; ROC-AUC beside accuracy."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_results_hold_every_number, run_cli
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from test_train import synthetic

from probing.core.errors import ProbingError
from probing.probes.logreg import fit_logreg
from probing.probes.train import TrainSettings, Trial, train_frozen


def test_logreg_agrees_with_the_sgd_linear_probe_and_with_scikit_learn():
    train, val = synthetic("vsr", 1500, dims=48), synthetic("vsr", 500, dims=48, seed=1)
    logreg = fit_logreg(train, val, [Trial(logreg_c=1.0)], TrainSettings(task="vsr", probe="logreg", device="cpu"))[0]
    sgd = train_frozen(train, val, [Trial(lr=3e-2, epochs=20)], TrainSettings(task="vsr", batch_size=64, device="cpu"))[
        0
    ]
    assert (
        logreg.val_metrics["accuracy"] > 0.9
        and abs(logreg.val_metrics["accuracy"] - sgd.val_metrics["accuracy"]) < 0.05
    )  # two ways to the same linear decision
    reference = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000).fit(
        train.features.numpy(), train.targets.numpy().astype(int)
    )
    with torch.no_grad():
        ours = logreg.probe(val.features).squeeze(-1).numpy()
    assert np.allclose(ours, reference.decision_function(val.features.numpy()), atol=1e-4)
    assert logreg.best_epoch == 1 and logreg.history[0]["converged"] is True


def test_logreg_is_for_binary_frozen_probes(capsys, vsr_features, tmp_path):
    train = synthetic("refcocog", 100)
    with pytest.raises(ProbingError, match="--probe logreg: for binary tasks only"):
        fit_logreg(train, train, [Trial()], TrainSettings(task="refcocog", probe="logreg", device="cpu"))
    code, _, err = run_cli(
        capsys,
        "train",
        "--task",
        "vsr",
        "--mode",
        "unfrozen",
        "--model",
        "blip2",
        "--vsr",
        ".",
        "--layer",
        2,
        "--probe",
        "logreg",
        "--out",
        tmp_path / "x",
    )
    assert code == 2 and err.startswith("error: --probe logreg: frozen only")
    code, _, err = run_cli(
        capsys, "train", "--task", "vsr", "--features", vsr_features, "--layer", 4, "--out", tmp_path / "y"
    )
    assert code == 2 and err == "error: --lr is required for --probe linear\n"


def test_logreg_train_search_report_and_roc_auc(capsys, vsr_features, tmp_path):
    code, out, err = run_cli(
        capsys,
        "train",
        "--task",
        "vsr",
        "--features",
        vsr_features,
        "--layer",
        4,
        "--probe",
        "logreg",
        "--logreg-c",
        0.1,
        "--device",
        "cpu",
        "--out",
        tmp_path / "run",
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["probe"] == "logreg" and manifest["trials"][0]["logreg_c"] == 0.1
    code, out, err = run_cli(
        capsys,
        "search",
        "--task",
        "vsr",
        "--features",
        vsr_features,
        "--layer",
        4,
        "--probe",
        "logreg",
        "--trials",
        3,
        "--batch",
        3,
        "--device",
        "cpu",
        "--out",
        tmp_path / "search",
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    assert all(1e-4 <= t["param_logreg_c"] <= 1e2 for t in summary["trials"]) and "param_lr" not in summary["trials"][0]
    space = json.loads((tmp_path / "search" / "manifest.json").read_text())["space"]
    assert space["logreg_c"] == [1e-4, 1e2]
    code, out, err = run_cli(
        capsys,
        "search",
        "--task",
        "vsr",
        "--features",
        vsr_features,
        "--layer",
        4,
        "--trials",
        2,
        "--batch",
        2,
        "--epochs",
        2,
        "--lr-range",
        "1e-3,1e-2",
        "--device",
        "cpu",
        "--out",
        tmp_path / "linear",
    )
    assert code == 0, err
    code, _, err = run_cli(capsys, "report", tmp_path / "search", tmp_path / "linear", "--out", tmp_path / "report")
    assert code == 0, err
    table3 = (tmp_path / "report" / "tables" / "table3.md").read_text()
    assert "| BLIP-2 | logistic regression (L-BFGS) |" in table3 and "| BLIP-2 | linear |" in table3
    searches = (tmp_path / "report" / "tables" / "searches.md").read_text()  # every search's best trial
    assert "C=" in searches
    assert assert_results_hold_every_number(tmp_path / "report") > 20  # the searches' C, val, trials ... too
    code, out, err = run_cli(capsys, "analyze", tmp_path / "run", "--json")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions" / "test.jsonl").read_text().splitlines()]
    expected = roc_auc_score([r["label"] for r in records], [r["probability"] for r in records])
    assert json.loads(out)["roc_auc"]["mean"] == pytest.approx(expected)
