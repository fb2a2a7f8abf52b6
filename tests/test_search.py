"""The search: finds good settings, shares one budget between workers, retries a dead worker's trial."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import run_cli, unfrozen_search_args
from optuna.trial import TrialState
from test_train import synthetic

from probing.core.errors import ProbingError
from probing.probes.train import TrainSettings, train_frozen
from probing.studies.search import SearchRequest, SearchSpace, create_study, default_space, run_trials


def test_the_paper_spaces():
    assert default_space("refcocog").epochs == (20, 30, 40) and default_space("vsr").epochs == (3, 5, 10, 15, 20)
    assert default_space("rcm").epochs == (50, 100, 150) and default_space("rcm").giou_scale is None
    assert default_space("refcocog").giou_scale[:3] == (1, 2, 4) and default_space("refcocog").l1_scale[-1] == 20
    assert default_space("vsr").lr == (1e-5, 5e-4)


def test_search_finds_the_right_decade_on_synthetic_features(tmp_path):
    """Two epochs of a linear probe: too small a rate learns nothing, the search must find a large one."""
    train, val = synthetic("vsr", 1500, dims=48), synthetic("vsr", 500, dims=48, seed=1)
    settings = TrainSettings(task="vsr", batch_size=64, device="cpu")
    space = SearchSpace(lr=(1e-7, 1e-1), epochs=(2,))
    request = SearchRequest(
        task="vsr",
        mode="frozen",
        layer=1,
        out=tmp_path / "s",
        settings=settings,
        space=space,
        trials=16,
        batch=4,
        seed=0,
        features=tmp_path,
    )
    study = create_study(request)
    run_trials(
        study, request, lambda trials: [r.val_metrics["accuracy"] for r in train_frozen(train, val, trials, settings)]
    )
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 16 and len(study.trials) == 16
    assert 1e-3 <= study.best_trial.params["lr"] <= 1e-1  # the right decades
    assert study.best_value > 0.85 and study.best_value > min(t.value for t in done) + 0.2


def test_search_end_to_end_and_deterministic(capsys, vsr_features, tmp_path):
    args = [
        "search",
        "--task",
        "vsr",
        "--features",
        vsr_features,
        "--layer",
        4,
        "--trials",
        6,
        "--batch",
        3,
        "--lr-range",
        "1e-4,1e-2",
        "--device",
        "cpu",
    ]
    code, out, err = run_cli(capsys, *args, "--out", tmp_path / "a")
    assert code == 0, err
    assert "best trial" in out and "test accuracy" in out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["trials_complete"] == 6 and len(summary["trials"]) == 6
    best = summary["best"]
    assert best["val"]["accuracy"] == pytest.approx(best["val_search"], abs=1e-6)  # the retrained best agrees
    assert best["val_search"] == max(t["value"] for t in summary["trials"])
    assert (tmp_path / "a" / "best" / "predictions" / "test.jsonl").is_file()
    assert (tmp_path / "a" / "plots" / "optimization_history.png").stat().st_size > 10_000
    assert (tmp_path / "a" / "trials.csv").read_text().splitlines()[0].startswith("number,")
    assert run_cli(capsys, *args, "--out", tmp_path / "b")[0] == 0
    again = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert [t["param_lr"] for t in again["trials"]] == [t["param_lr"] for t in summary["trials"]]  # seeded
    code, out, _ = run_cli(capsys, *args, "--out", tmp_path / "a")
    assert code == 0 and "already there" in out


def test_a_study_resumes_counting_finished_trials(capsys, vsr_features, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    base = [
        "search",
        "--task",
        "vsr",
        "--features",
        vsr_features,
        "--layer",
        4,
        "--batch",
        2,
        "--storage",
        storage,
        "--study-name",
        "s",
        "--device",
        "cpu",
    ]
    assert run_cli(capsys, *base, "--trials", 3, "--out", tmp_path / "first")[0] == 0
    assert run_cli(capsys, *base, "--trials", 5, "--out", tmp_path / "second")[0] == 0
    study = optuna.load_study(study_name="s", storage=storage)
    assert len(study.trials) == 5 and all(t.state == TrialState.COMPLETE for t in study.trials)
    code, _, err = run_cli(
        capsys,
        "search",
        "--task",
        "vsr",
        "--features",
        vsr_features,
        "--layer",
        4,
        "--storage",
        storage,
        "--out",
        tmp_path / "x",
    )
    assert code == 2 and err == "error: --storage needs --study-name (the study that workers share)\n"
    code, _, err = run_cli(
        capsys, *base[:-2], "--storage", "redis://host", "--study-name", "s", "--out", tmp_path / "y"
    )
    assert code == 2 and "is not sqlite:///..., postgresql://... or journal:PATH" in err


def worker(args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "probing", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_two_workers_share_a_journal_study(vsr_features, tmp_path):
    journal = tmp_path / "study.log"
    base = [
        "search",
        "--task",
        "vsr",
        "--features",
        vsr_features,
        "--layer",
        4,
        "--trials",
        8,
        "--batch",
        2,
        "--storage",
        f"journal:{journal}",
        "--study-name",
        "shared",
        "--epochs",
        "10,15,20",
        "--device",
        "cpu",
    ]
    processes = [worker([*base, "--out", tmp_path / f"out{i}"]) for i in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="shared", storage=JournalStorage(JournalFileBackend(str(journal))))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 8  # exactly the budget: none lost, none extra
    assert all("surplus" in t.user_attrs for t in study.trials if t.state == TrialState.FAIL)
    assert len({t.number for t in complete}) == 8  # no trial trained twice
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 8  # workers propose different points
    for i in range(2):
        assert json.loads((tmp_path / f"out{i}" / "summary.json").read_text())["trials_complete"] == 8


SLOW_WORKER = """
import sys, time
from pathlib import Path
from probing.studies.search import SearchRequest, create_study, default_space, run_trials
from probing.probes.train import TrainSettings
request = SearchRequest(task="vsr", mode="frozen", layer=4, out=Path(sys.argv[2]), settings=TrainSettings(task="vsr"),
                        space=default_space("vsr"), trials=3, batch=1, storage="journal:" + sys.argv[1],
                        study_name="killed", heartbeat=0.25)
run_trials(create_study(request), request, lambda trials: [time.sleep(600) or 0.0 for _ in trials])
"""


def test_a_killed_workers_trial_is_retried(vsr_features, tmp_path):
    journal = tmp_path / "study.log"
    slow = subprocess.Popen(
        [sys.executable, "-c", SLOW_WORKER, str(journal), str(tmp_path / "never")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    deadline = time.time() + 120
    running = []
    while time.time() < deadline and not running:
        time.sleep(0.2)
        if journal.exists():
            study = optuna.load_study(study_name="killed", storage=JournalStorage(JournalFileBackend(str(journal))))
            running = [t for t in study.trials if t.state == TrialState.RUNNING and "heartbeat" in t.user_attrs]
    assert running, "the slow worker never started a trial"
    killed_params = running[0].params
    os.kill(slow.pid, signal.SIGKILL)
    slow.wait()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "probing",
            "search",
            "--task",
            "vsr",
            "--features",
            str(vsr_features),
            "--layer",
            "4",
            "--trials",
            "3",
            "--batch",
            "1",
            "--storage",
            f"journal:{journal}",
            "--study-name",
            "killed",
            "--heartbeat",
            "0.25",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "resumed"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    study = optuna.load_study(study_name="killed", storage=JournalStorage(JournalFileBackend(str(journal))))
    states = {t.number: t.state for t in study.trials}
    assert states[running[0].number] == TrialState.FAIL
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    retries = [t for t in complete if t.user_attrs.get("retry_of") == running[0].number]
    assert len(retries) == 1 and retries[0].params == killed_params  # the same trial, run again


def test_unfrozen_search_runs(capsys, tiny_checkpoints, demo_options, tmp_path):
    args = unfrozen_search_args(tiny_checkpoints["blip2"], demo_options["vsr"], tmp_path / "u", trials=2, epochs="1,2")
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    summary = json.loads((tmp_path / "u" / "summary.json").read_text())
    assert summary["mode"] == "unfrozen" and summary["trials_complete"] == 2
    assert math.isfinite(summary["best"]["test"]["accuracy"])


def test_bad_search_options(capsys, vsr_features, tmp_path):
    base = ["search", "--task", "vsr", "--features", vsr_features, "--layer", 4, "--out", tmp_path / "x"]
    code, _, err = run_cli(capsys, *base, "--lr-range", "1e-3")
    assert code == 2 and err == "error: --lr-range: expected 2 comma-separated numbers, got '1e-3'\n"
    code, _, err = run_cli(capsys, *base, "--lr-range", "1e-2,1e-3")
    assert code == 2 and err.startswith("error: search space: lr bounds must satisfy 0 < low <= high")
    code, _, err = run_cli(capsys, *base, "--trials", 0)
    assert code == 2 and err == "error: --trials: must be >= 1, got 0\n"
    with pytest.raises(ProbingError, match="epochs must be positive"):
        SearchSpace(epochs=(0,)).check()


def test_staleness_is_judged_by_each_trials_own_heartbeat():
    from probing.studies.search import retry_stale_trials

    study = optuna.create_study(direction="maximize")
    slow = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)})
    quick = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)})
    five_seconds_ago = time.time() - 5
    slow.set_user_attr("heartbeat_interval", 30.0)  # a worker that beats every 30 s, last beat 5 s ago: alive
    slow.set_user_attr("heartbeat", five_seconds_ago)
    quick.set_user_attr("heartbeat_interval", 0.25)  # beats every 0.25 s, silent for 5 s: dead
    quick.set_user_attr("heartbeat", five_seconds_ago)
    assert retry_stale_trials(study, default_interval=0.25) == [quick.number]
    states = {t.number: t.state for t in study.trials}
    assert states[slow.number] == TrialState.RUNNING and states[quick.number] == TrialState.FAIL
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs["retry_of"] == quick.number


def test_a_trial_failed_by_another_worker_while_running_is_not_fatal(tmp_path):
    """The owner finishes a trial that another worker has meanwhile failed and retried: its value is dropped,
    the retry is trained, and the budget still ends at exactly `trials` complete trials."""
    from probing.studies.search import retry_stale_trials

    request = SearchRequest(
        task="vsr",
        mode="frozen",
        layer=1,
        out=tmp_path / "s",
        settings=TrainSettings(task="vsr", device="cpu"),
        space=default_space("vsr"),
        trials=3,
        batch=1,
        features=tmp_path,
        heartbeat=0.05,
    )
    study = create_study(request)
    calls = []

    def train_batch(trials):
        calls.append(trials)
        if len(calls) == 1:  # another worker judges this one dead while it runs, and enqueues it again
            time.sleep(0.3)  # longer than 4 heartbeats of 0.05 s would allow, were the heartbeat stopped
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study.tell(trial.number, state=TrialState.FAIL)
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        return [0.5 for _ in trials]

    run_trials(study, request, train_batch)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and study.trials[0].state == TrialState.FAIL
    assert any(t.user_attrs.get("retry_of") == 0 for t in complete)
    assert retry_stale_trials(study, 0.05) == []


def test_search_refuses_a_distributed_launch(capsys, vsr_features, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what `accelerate launch` / torchrun set for each process
    code, _, err = run_cli(
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
        "--device",
        "cpu",
        "--out",
        tmp_path / "s",
    )
    assert code == 2 and err.startswith("error: probing search runs one process per worker") and err.count("\n") == 1
    assert not (tmp_path / "s").exists()
