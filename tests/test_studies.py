"""Studies that survive and scale out: a search resumes where it was killed, unfrozen trials resume at their last
epoch, pruning spends the budget, a torn journal is repaired, storages fail in one line, and several workers
(journal file or a real PostgreSQL) share one study without losing or repeating a trial."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import run_cli, unfrozen_search_args
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState
from safetensors.torch import load_file

from probing.core.errors import ProbingError
from probing.core.locks import FolderLock
from probing.probes.checkpoints import TrialCheckpoint
from probing.studies.storages import open_storage, repair_journal

SPLITS = ("train", "val", "test")


def probing(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "probing", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def journal_study(path: Path, name: str | None = None):
    """The study `name` of a journal (default: its only one, a search folder's own study)."""
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


def wait_for(condition, timeout: float = 240.0, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def test_a_killed_search_resumes_its_study_and_its_trial(tiny_checkpoints, demo_options, tmp_path):
    """SIGKILL once a trial is finished and the next has a checkpoint; the same command again keeps the finished
    trial, resumes the killed one from its epoch (a retry with its parameters) and ends with exactly its budget of 3."""
    out = tmp_path / "search"
    args = unfrozen_search_args(
        tiny_checkpoints["blip2"], demo_options["vsr"], out, "--heartbeat", 1, "--pruner", "none"
    )
    first = probing(*args)

    def progress():
        if not (out / "study.log").exists():
            return None
        study = journal_study(out / "study.log")
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        running = [t for t in study.trials if t.state == TrialState.RUNNING]
        if done and running and (out / "checkpoints" / f"trial-{running[0].number}" / "latest.json").exists():
            return done, running
        return None

    done, running = wait_for(progress)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert not (out / "manifest.json").exists()
    again = subprocess.run(
        [sys.executable, "-m", "probing", *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming a trial after its epoch" in again.stderr
    study = journal_study(out / "study.log")
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 3  # --trials 3: the killed trial's retry takes its place, no more
    kept = next(t for t in finished if t.number == done[0].number)
    assert kept.params == done[0].params and kept.value == done[0].value  # the finished trial was not redone
    retry = next(t for t in finished if t.user_attrs.get("retry_of") == running[0].number)
    assert retry.params == running[0].params
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials_complete"] == 3 and not (out / "checkpoints").exists()  # checkpoints go when done
    code = subprocess.run(
        [sys.executable, "-m", "probing", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert code.returncode == 0 and "already there" in code.stdout


def test_a_resumed_unfrozen_run_equals_an_uninterrupted_one(tiny_checkpoints, demo_options, tmp_path):
    vsr = demo_options["vsr"]
    args = [
        "train",
        "--task",
        "vsr",
        "--mode",
        "unfrozen",
        "--model",
        tiny_checkpoints["blip2"],
        "--vsr",
        vsr["vsr"],
        "--images",
        vsr["images"],
        "--layer",
        2,
        "--lr",
        3e-3,
        "--epochs",
        5,
        "--batch-size",
        16,
        "--device",
        "cpu",
    ]
    whole = subprocess.run(
        [sys.executable, "-m", "probing", *map(str, args), "--out", str(tmp_path / "whole")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    pointer = tmp_path / ".cut.checkpoints" / "seed-0" / "latest.json"
    cut = probing(*args, "--out", tmp_path / "cut")
    wait_for(lambda: pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 2)
    os.kill(cut.pid, signal.SIGKILL)
    cut.wait()
    resumed = subprocess.run(
        [sys.executable, "-m", "probing", *map(str, args), "--out", str(tmp_path / "cut")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming a trial after its epoch" in resumed.stderr
    first, second = (json.loads((tmp_path / name / "metrics.json").read_text())["runs"][0] for name in ("whole", "cut"))
    assert first["history"] == second["history"] and first["test"] == second["test"] and first["val"] == second["val"]
    weights = [load_file(tmp_path / name / "probes" / "seed-0.safetensors") for name in ("whole", "cut")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert not (tmp_path / ".cut.checkpoints").exists()


def test_a_checkpoint_cut_by_a_full_disk_leaves_the_previous_one(tmp_path, monkeypatch):
    import probing.probes.checkpoints

    checkpoint = TrialCheckpoint(tmp_path / "trial-0")
    assert checkpoint.save(1, {"w": torch.ones(3)}, {"epoch": 1})
    real_save = probing.probes.checkpoints.save_safetensors

    def full_disk(path, tensors, metadata=None):
        real_save(path, tensors, metadata)
        with open(path, "r+b") as handle:  # half the bytes made it to the disk
            handle.truncate(os.path.getsize(path) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(probing.probes.checkpoints, "save_safetensors", full_disk)
    assert not checkpoint.save(2, {"w": torch.full((3,), 2.0)}, {"epoch": 2})
    tensors, state = checkpoint.latest()
    assert state == {"epoch": 1} and torch.equal(tensors["w"], torch.ones(3))
    assert sorted(p.name for p in (tmp_path / "trial-0").iterdir()) == ["epoch-0001", "latest.json"]
    (tmp_path / "trial-0" / "latest.json").write_text(json.dumps({"folder": "../../elsewhere", "epoch": 1}))
    with pytest.raises(ProbingError, match="outside its folder"):  # an index entry stays inside its folder
        checkpoint.latest()


def test_a_torn_journal_is_repaired_keeping_every_finished_trial(tmp_path):
    path = tmp_path / "study.log"
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(path))), study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    whole = path.read_bytes()
    with open(path, "ab") as handle:  # a writer killed mid-record (or a full disk)
        handle.write(b'{"op_code":4,"worker_id":"w","trial_id":3,"sta')
    assert repair_journal(path) == 1 and path.read_bytes() == whole
    with open(path, "ab") as handle:  # a torn head that a later append has joined to a whole record
        handle.write(b'{"op_code":4,"worker_id":"w","tri')
    backend = JournalFileBackend(str(path))
    for note in ("joined", "kept"):  # two later appends: the first lands on the torn line
        backend.append_logs([{"op_code": 2, "worker_id": "w", "study_id": 0, "user_attr": {note: True}}])
    with pytest.raises(json.JSONDecodeError):  # what Optuna alone makes of such a journal: unreadable for good
        journal_study(path, "s")
    storage = open_storage(f"journal:{path}")
    repaired = optuna.load_study(study_name="s", storage=storage)
    assert len([t for t in repaired.trials if t.state == TrialState.COMPLETE]) == 3
    assert repaired.user_attrs["joined"] and repaired.user_attrs["kept"]  # the whole records of the torn line too


def test_storage_errors_are_one_line(capsys, vsr_features, tmp_path):
    base = [
        "search",
        "--task",
        "vsr",
        "--features",
        vsr_features,
        "--layer",
        4,
        "--trials",
        1,
        "--device",
        "cpu",
        "--study-name",
        "s",
        "--out",
        tmp_path / "x",
    ]
    code, _, err = run_cli(capsys, *base, "--storage", "postgresql://user:secret@127.0.0.1:1/db")
    assert code == 2 and err.startswith("error: --storage postgresql://user:***@127.0.0.1:1/db: cannot connect")
    assert "secret" not in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, *base, "--storage", "mysql://user:secret@127.0.0.1/db")
    assert code == 2 and "the database driver 'MySQLdb' is not installed" in err and "secret" not in err
    code, _, err = run_cli(capsys, *base, "--storage", "journal:/proc/probing/study.log")
    assert code == 2 and err.startswith("error: --storage journal:/proc/probing/study.log: cannot create /proc/probing")
    assert not (tmp_path / "x").exists()  # refused before anything was written into --out
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        code, _, err = run_cli(capsys, *base, "--storage", f"journal:{locked / 'study.log'}")
        assert code == 2 and "is not writable" in err


def test_a_study_of_another_search_is_refused(capsys, vsr_features, tmp_path):
    storage = f"journal:{tmp_path / 'shared.log'}"
    base = [
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
        "--storage",
        storage,
        "--study-name",
        "s",
        "--device",
        "cpu",
    ]
    assert run_cli(capsys, *base, "--lr-range", "1e-4,1e-2", "--out", tmp_path / "a")[0] == 0
    code, _, err = run_cli(capsys, *base, "--lr-range", "1e-3,1e-1", "--out", tmp_path / "b")
    assert code == 2 and "study 's' belongs to a search with a different 'space.lr'" in err
    code, _, err = run_cli(capsys, *base, "--lr-range", "1e-4,1e-2", "--trials", 3, "--out", tmp_path / "a")  # budget
    assert code == 2 and "holds a search made with a different 'trials'" in err


def test_a_search_reports_each_epoch_to_its_study(capsys, vsr_features, tmp_path):
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
        4,
        "--batch",
        2,
        "--epochs",
        3,
        "--pruner",
        "median",
        "--device",
        "cpu",
        "--out",
        tmp_path / "s",
    )
    assert code == 0, err
    study = journal_study(tmp_path / "s" / "study.log")
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and all(len(t.intermediate_values) >= 1 for t in finished)
    assert all(set(t.intermediate_values) <= {1, 2, 3} for t in finished)  # the epochs
    # what optuna-dashboard shows: the metric's name and what the trials train
    assert study.metric_names == ["val accuracy"]
    assert {"task", "model", "mode", "layer", "probe", "store"} <= set(study.user_attrs)
    # named after its search, so that journals opened side by side are told apart
    assert study.study_name == "frozen vsr layer 4 linear"
    assert study.user_attrs["task"] == "vsr" and study.user_attrs["layer"] == 4
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["pruner"] == "median" and manifest["study"]["pruner"] == "median"
    assert manifest["study"]["name"] == study.study_name


def test_a_study_is_named_after_its_search_and_a_journal_of_the_old_name_still_resumes():
    from types import SimpleNamespace

    from probing.studies.search import LEGACY_STUDY, _own_study_name, default_study_name

    request = SimpleNamespace(
        label="BLIP-2", mode="unfrozen", task="rcm", layer=12, settings=SimpleNamespace(probe="swiglu2"), control=True
    )
    assert default_study_name(request) == "BLIP-2 unfrozen rcm layer 12 swiglu2 control"
    storage = optuna.storages.InMemoryStorage()
    assert _own_study_name(request, storage) == default_study_name(request)
    optuna.create_study(storage=storage, study_name=LEGACY_STUDY)  # a journal written before studies were named
    assert _own_study_name(request, storage) == LEGACY_STUDY


class PlantedTrainer:
    """The trainer contract on features where the label is a planted linear function: a high rate learns it
    in an epoch, a tiny one never does (what the pruner should see)."""

    keeps_models = False

    def __init__(self):
        from test_train import synthetic

        from probing.probes.train import TrainSettings
        from probing.tasks import get_task

        self.spec = get_task("vsr")
        self.settings = TrainSettings(task="vsr", batch_size=64, device="cpu")
        self.train, self.val = synthetic("vsr", 600, dims=32), synthetic("vsr", 200, dims=32, seed=1)
        self.epochs = 0

    def fit(self, trials, hooks=None):
        from probing.probes.train import train_frozen
        from probing.probes.trainers import FittedTrial, epoch_callback

        results = train_frozen(self.train, self.val, trials, self.settings, epoch_callback(hooks))
        self.epochs += sum(r.epochs_run for r in results)
        return [FittedTrial(r, r.probe) for r in results]


def test_the_pruner_stops_hopeless_trials_and_the_budget_counts_them(tmp_path):
    from probing.studies.search import SearchRequest, TrialFitter, create_study, default_space, run_trials
    from probing.tasks.search_space import SearchSpace

    trainer = PlantedTrainer()
    request = SearchRequest(
        task="vsr",
        layer=1,
        out=tmp_path / "s",
        settings=trainer.settings,
        space=SearchSpace(lr=(1e-6, 1e-1), epochs=(9,)),
        trials=12,
        batch=1,
        seed=0,
        pruner="hyperband",
        features=tmp_path,
    )
    assert default_space("vsr").epochs  # the space above stands in for the task's
    study = create_study(request)
    run_trials(study, request, TrialFitter(trainer))
    states = [t.state for t in study.trials]
    assert (
        states.count(TrialState.PRUNED) >= 2
        and states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 12
    )
    assert trainer.epochs < 12 * 9  # pruned trials stopped early
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    # hyperband's rungs with a reduction factor of 4 over 9 epochs: after epoch 1 or epoch 4 (3 would give 1, 3)
    assert {len(t.intermediate_values) for t in pruned} <= {1, 4}
    assert study.best_trial.state == TrialState.COMPLETE and study.best_value > 0.85


def test_workers_sharing_one_folder_share_the_study_and_reuse_the_result(vsr_features, tmp_path):
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
        1,
        "--epochs",
        3,
        "--heartbeat",
        1,
        "--device",
        "cpu",
        "--out",
        tmp_path / "s",
    ]
    workers = [probing(*args) for _ in range(3)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-2000:]
    study = journal_study(tmp_path / "s" / "study.log")
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 6
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["trials_complete"] == 6


def test_fresh_databases_opened_by_many_workers_at_once(tmp_path):
    script = (
        "import sys; from probing.studies.storages import open_storage, load_or_create_study; import optuna;"
        "s = open_storage(sys.argv[1]); load_or_create_study(s, 'x', 'maximize', None, None)"
    )
    for url in (f"sqlite:///{tmp_path / 'fresh.db'}", f"journal:{tmp_path / 'fresh.log'}"):
        workers = [
            subprocess.Popen([sys.executable, "-c", script, url], stderr=subprocess.PIPE, text=True) for _ in range(6)
        ]
        for worker in workers:
            _, stderr = worker.communicate(timeout=120)
            assert worker.returncode == 0, stderr[-1500:]


def test_a_claim_held_by_a_dead_worker_is_taken_over(tmp_path):
    first, second = FolderLock(tmp_path / "store", heartbeat=0.2), FolderLock(tmp_path / "store", heartbeat=0.2)
    assert first.try_acquire() and not second.try_acquire()
    time.sleep(0.5)
    assert not second.try_acquire()  # the holder beats: it stays the holder
    first._stop.set()  # the holder hangs (its heartbeat stops)
    first._thread.join()
    time.sleep(1.0)
    assert second.try_acquire() and second.owner()["token"] == second.token
    second.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "other.lock").write_text(
        json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "token": "x", "heartbeat": 3600})
    )
    assert FolderLock(tmp_path / "other").try_acquire()  # its process is gone from this machine


def _config(tmp_path: Path, checkpoint: Path, storage: str | None, mode: str = "frozen", trials: int = 4) -> Path:
    config = {
        "name": "shared",
        "workspace": str(tmp_path / "w"),
        "device": "cpu",
        "models": {"tiny": {"model": str(checkpoint)}},
        "data": {"demo": {"refcocog_images": 40, "vsr_images": 40}},
        "extract": {"workers": 0},
        "train": {"unfrozen_batch_size": 32},
        "experiments": [
            {
                "name": "x",
                "tasks": ["vsr"],
                "models": ["tiny"],
                "modes": [mode],
                "layers": [2, 4],
                "search": {
                    "trials": trials,
                    "batch": 1,
                    "heartbeat": 1,
                    "space": {"vsr": {"epochs": [3] if mode == "frozen" else [4]}},
                },
            }
        ],
    }
    if storage is not None:
        config["experiments"][0]["search"]["storage"] = storage
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _studies_of(tmp_path: Path, storage: str | None) -> list:
    if storage is None:
        return [journal_study(p) for p in sorted((tmp_path / "w" / "runs").rglob("study.log"))]
    loaded = open_storage(storage)
    return [optuna.load_study(study_name=s.study_name, storage=loaded) for s in optuna.get_all_study_summaries(loaded)]


@pytest.fixture(params=["journal", "postgresql"])
def study_storage(request):
    return None if request.param == "journal" else request.getfixturevalue("postgres_url")


def test_three_workers_run_one_config_and_a_late_one_finds_it_done(tiny_checkpoints, tmp_path, study_storage):
    config = _config(tmp_path, tiny_checkpoints["blip2"], study_storage)
    workers = [probing("run", config) for _ in range(3)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-2000:]
    studies = _studies_of(tmp_path, study_storage)
    assert len(studies) == 2  # one per search (layers 2 and 4)
    for study in studies:
        finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert len(finished) == 4 and len({t.number for t in finished}) == 4
        assert all("surplus" in t.user_attrs for t in study.trials if t.state == TrialState.FAIL)
    assert (tmp_path / "w" / "report-shared" / "README.md").is_file()
    late = subprocess.run(
        [sys.executable, "-m", "probing", "run", str(config)], capture_output=True, text=True, timeout=300
    )
    assert late.returncode == 0 and "searches: 0 built, 2 reused" in late.stdout


def test_a_worker_killed_mid_trial_has_its_trial_retried_by_another(tiny_checkpoints, tmp_path, study_storage):
    config = _config(tmp_path, tiny_checkpoints["blip2"], study_storage, mode="unfrozen", trials=3)
    doomed = probing("run", config)

    def running_trial():
        for study in (
            _studies_of(tmp_path, study_storage) if (tmp_path / "w" / "runs").exists() or study_storage else []
        ):
            busy = [t for t in study.trials if t.state == TrialState.RUNNING]
            if busy:
                return study.study_name, busy[0]
        return None

    name, trial = wait_for(running_trial, timeout=300, every=0.5)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    helper = subprocess.run(
        [sys.executable, "-m", "probing", "run", str(config)], capture_output=True, text=True, timeout=600
    )
    assert helper.returncode == 0, helper.stderr[-2000:]
    study = next(s for s in _studies_of(tmp_path, study_storage) if s.study_name == name)
    assert next(t for t in study.trials if t.number == trial.number).state == TrialState.FAIL
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 3 and any(t.user_attrs.get("retry_of") == trial.number for t in finished)


def test_the_dashboard_serves_every_study_of_a_workspace(capsys, vsr_features, tmp_path):
    """What `probing dashboard WORKSPACE` serves: optuna-dashboard's own WSGI app over the gathered studies."""
    import threading
    import urllib.request
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    pytest.importorskip("optuna_dashboard", reason="the [dashboard] extra is not installed")
    from optuna_dashboard import wsgi

    from probing.studies.storages import gather_studies

    for layer in (2, 4):
        args = [
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
            "--seed",
            layer,
            "--device",
            "cpu",
            "--out",
            tmp_path / "w" / "runs" / f"seed{layer}",
        ]
        assert run_cli(capsys, *args)[0] == 0
    gathered = gather_studies([tmp_path / "w"])
    names = sorted(study.study_name for study in gathered.get_all_studies())
    assert names == ["runs/seed2", "runs/seed4"]

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, wsgi(gathered), handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/api/studies", timeout=30) as answer:
            listed = json.loads(answer.read())
    finally:
        server.shutdown()
    shown = {study["study_name"]: study for study in listed["study_summaries"]}
    assert set(shown) == set(names)
    study = optuna.load_study(study_name="runs/seed4", storage=gathered)
    assert study.user_attrs["task"] == "vsr" and all(t.intermediate_values for t in study.trials)
    with pytest.raises(ProbingError, match="no study under"):
        gather_studies([tmp_path / "w" / "runs" / "seed4" / "best"])
