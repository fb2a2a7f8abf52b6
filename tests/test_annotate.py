"""`probing annotate`: the human baseline. Sampling, the SQLite store, the HTTP API's refusals, a killed server,
scoring against hand computations (and statsmodels' Fleiss' kappa against Fleiss 1971), and two annotators
answering in a real headless Chromium (Debian's, driven by Selenium), one with the keyboard, one with the
mouse."""

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_results_hold_every_number, run_cli
from PIL import Image

from probing.baselines.annotate.scoring import fleiss_agreement, score
from probing.baselines.annotate.server import create_app
from probing.baselines.annotate.store import AnnotationStore, NotNext
from probing.baselines.annotate.study import StudyDesign, prepare_study, sequence_of
from probing.core.errors import ProbingError
from probing.data.rcm import build_rcm
from probing.data.types import DataOptions
from probing.report.analysis import estimate
from probing.tasks import load_split

REQUIRE_BROWSER = os.environ.get("PROBING_REQUIRE_BROWSER") == "1"  # CI: a browser that cannot start fails
SCREENSHOT = os.environ.get("PROBING_ANNOTATE_SCREENSHOT")  # also save the page's screenshot here


@pytest.fixture(scope="module")
def rcm_options(demo_root, tmp_path_factory):
    """RCM built from the demo dataset (72 true and 72 false test examples, real JPEGs)."""
    folder = tmp_path_factory.mktemp("rcm") / "rcm"
    build_rcm(demo_root / "refcocog" / "refs(umd).p", demo_root / "refcocog" / "instances.json", folder)
    return {"rcm": folder, "images": demo_root / "images"}


def rcm_design(rcm_options, **changes) -> StudyDesign:
    values = {"task": "rcm", "n": 10, "intro": 2, "seed": 3} | changes
    return StudyDesign(**values, data=DataOptions(task="rcm", **rcm_options))


def new_store(tmp_path, design, name="study.db") -> AnnotationStore:
    return AnnotationStore.create_or_resume(tmp_path / name, prepare_study(design))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------ Fleiss' kappa


# Fleiss (1971), Table 1: 30 patients, each diagnosed by 6 psychiatrists into 5 categories (counts per category).
FLEISS_1971 = [
    [0, 0, 0, 6, 0], [0, 3, 0, 0, 3], [0, 1, 4, 0, 1], [0, 0, 0, 0, 6], [0, 3, 0, 3, 0], [2, 0, 4, 0, 0],
    [0, 0, 4, 0, 2], [2, 0, 3, 1, 0], [2, 0, 0, 4, 0], [0, 0, 0, 0, 6], [1, 0, 0, 5, 0], [1, 1, 0, 4, 0],
    [0, 3, 3, 0, 0], [1, 0, 0, 5, 0], [0, 2, 0, 3, 1], [0, 0, 5, 0, 1], [3, 0, 0, 1, 2], [5, 1, 0, 0, 0],
    [0, 2, 0, 4, 0], [1, 0, 2, 0, 3], [0, 0, 0, 0, 6], [0, 1, 0, 5, 0], [0, 2, 0, 1, 3], [2, 0, 0, 4, 0],
    [1, 0, 0, 4, 1], [0, 5, 0, 1, 0], [4, 0, 0, 0, 2], [0, 2, 0, 4, 0], [1, 0, 5, 0, 0], [0, 0, 0, 0, 6],
]  # fmt: skip


def hand_fleiss(table) -> float:
    """Fleiss' kappa by its definition: mean pairwise agreement per subject against chance from the margins."""
    table = [[float(v) for v in row] for row in table]
    raters = sum(table[0])
    per_subject = [(sum(v * v for v in row) - raters) / (raters * (raters - 1)) for row in table]
    observed = sum(per_subject) / len(table)
    margins = [sum(row[j] for row in table) / (len(table) * raters) for j in range(len(table[0]))]
    chance = sum(p * p for p in margins)
    return (observed - chance) / (1 - chance)


def test_statsmodels_fleiss_kappa_gives_the_textbook_values():
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    # Fleiss (1971) reports the category proportions .144 .144 .167 .306 .239 and kappa = .430.
    margins = np.array(FLEISS_1971).sum(axis=0) / (30 * 6)
    assert np.round(margins, 3).tolist() == [0.144, 0.144, 0.167, 0.306, 0.239]
    assert round(fleiss_kappa(FLEISS_1971), 3) == 0.430
    assert fleiss_kappa(FLEISS_1971) == pytest.approx(hand_fleiss(FLEISS_1971), abs=1e-12)
    # the same from one column per rater, as the scorer builds it (aggregate_raters counts the categories)
    ratings = np.array([[j for j, count in enumerate(row) for _ in range(count)] for row in FLEISS_1971])
    table, _ = aggregate_raters(ratings, n_cat=5)
    assert table.tolist() == FLEISS_1971
    # Wikipedia's example (10 subjects, 14 raters): P = 0.378, Pe = 0.213, kappa = 0.210
    wikipedia = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]  # fmt: skip
    assert round(fleiss_kappa(wikipedia), 3) == 0.210


# ------------------------------------------------------------------ sampling


def test_export_never_writes_over_the_study(tmp_path, capsys):
    study = tmp_path / "rcm.db"
    study.write_bytes(b"the study")
    for out in (study, tmp_path / "." / "rcm.db"):
        code, _, err = run_cli(capsys, "annotate", "export", "--db", study, "--out", out)
        assert code == 2 and "is the study's own --db file" in err and err.count("\n") == 1
    assert study.read_bytes() == b"the study"


def test_the_sample_is_balanced_seeded_and_shared(rcm_options):
    study = prepare_study(rcm_design(rcm_options))
    scored = [item for item in study.items if item.role != "intro"]
    intro = [item for item in study.items if item.role == "intro"]
    assert [item.item for item in study.items] == list(range(12))
    assert len(intro) == 2 and sorted(item.example.label for item in intro) == [0, 1]
    assert len(scored) == 10 and Counter(item.example.label for item in scored) == {0: 5, 1: 5}
    assert all(item.role == "shared" for item in scored)
    assert len({item.example.example_id for item in study.items}) == 12  # drawn without replacement
    assert prepare_study(rcm_design(rcm_options)).items == study.items  # seeded
    assert prepare_study(rcm_design(rcm_options, seed=4)).items != study.items
    # every annotator: the practice items first, then the same scored items in an order of their own
    roles = [(item.item, item.role, item.slot) for item in study.items]
    orders = [sequence_of(roles, slot, 3) for slot in range(3)]
    assert all(order[:2] == [0, 1] and sorted(order[2:]) == list(range(2, 12)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3

    overlapping = prepare_study(rcm_design(rcm_options, overlap=4, annotators=3))
    shared = [item for item in overlapping.items if item.role == "shared"]
    assert Counter(item.example.label for item in shared) == {0: 2, 1: 2}
    blocks = {slot: [item for item in overlapping.items if item.slot == slot] for slot in range(3)}
    assert all(Counter(item.example.label for item in block) == {0: 3, 1: 3} for block in blocks.values())
    assert len({item.example.example_id for item in overlapping.items}) == 2 + 4 + 3 * 6  # disjoint blocks
    roles = [(item.item, item.role, item.slot) for item in overlapping.items]
    second = sequence_of(roles, 1, 3)
    assert sorted(second[2:]) == sorted(item.item for item in shared + blocks[1])


def test_study_mistakes_are_one_line(rcm_options, demo_options):
    with pytest.raises(ProbingError, match=r"^--n: must be even \(n/2 true, n/2 false\), got 9$"):
        prepare_study(rcm_design(rcm_options, n=9))
    with pytest.raises(ProbingError, match=r"^--overlap needs --annotators"):
        prepare_study(rcm_design(rcm_options, overlap=4))
    with pytest.raises(ProbingError, match=r"^--overlap: must be even and at most --n 10, got 12$"):
        prepare_study(rcm_design(rcm_options, overlap=12, annotators=2))
    with pytest.raises(ProbingError, match=r"^--n: the study needs 73 true examples .*, the split has 72$"):
        prepare_study(rcm_design(rcm_options, n=142, intro=4))
    with pytest.raises(ProbingError, match=r"^--split: val is not an evaluated split of rcm \(choose test\)"):
        prepare_study(rcm_design(rcm_options, split="val"))
    refcocog = StudyDesign(task="refcocog", data=DataOptions(task="refcocog", **demo_options["refcocog"]))
    with pytest.raises(ProbingError, match=r"needs a binary task; refcocog is a box task$"):
        prepare_study(refcocog)


@pytest.fixture
def task_registry_restored():
    """The task registry as it was before the test: a YAML task registered here must not reach other tests (their
    lists of known tasks, their own task of the same name)."""
    from probing.tasks import TASKS

    before = set(TASKS.names())
    yield
    for name in set(TASKS.names()) - before:
        TASKS.unregister(name)


def test_vsr_and_yaml_items_show_their_text(demo_options, tmp_path, task_registry_restored):
    from fastapi.testclient import TestClient

    vsr = StudyDesign(task="vsr", n=4, intro=0, data=DataOptions(task="vsr", **demo_options["vsr"]))
    client = TestClient(create_app(new_store(tmp_path, vsr)))
    item = client.post("/api/annotators", json={"name": "Zoë"}).json()["item"]
    captions = {
        e.example_id: e.text for e in load_split(DataOptions(task="vsr", **demo_options["vsr"]), "test").examples
    }
    assert item["claims_cell"] is False and item["text"] in captions.values()
    assert item["question"] == "Is the text true of the image?"
    answer = {"annotator": "Zoë", "item": item["id"], "answer": True}
    assert client.post("/api/answers", json=answer | {"cells": [4]}).status_code == 400  # no cell to rank
    assert client.post("/api/answers", json=answer).status_code == 200

    folder = tmp_path / "whats-up"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (20, 16), (30, 90, 160)).save(folder / "images" / "a.png")
    for split in ("train", "val", "test"):
        lines = [{"image": "a.png", "caption": f"{split} caption {i}", "label": i % 2} for i in range(6)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "whats-up.yaml").write_text(
        "name: whats-up\nkind: binary\nsplits: {train: train.jsonl, val: val.jsonl, test: test.jsonl}\n"
        "images: images\nfields: {image: image, text: caption, label: label}\n"
    )
    task = str(folder / "whats-up.yaml")
    study = prepare_study(StudyDesign(task=task, n=4, intro=2, data=DataOptions(task=task)))
    assert {item.example.text for item in study.items} <= {f"test caption {i}" for i in range(6)}
    assert study.description["task_file"] == task and study.identity["task"] == "whats-up"


# ------------------------------------------------------------------ the store and the HTTP API


def test_the_api_refuses_what_it_should(rcm_options, tmp_path):
    from fastapi.testclient import TestClient

    store = new_store(tmp_path, rcm_design(rcm_options, overlap=4, annotators=2))
    client = TestClient(create_app(store))
    page = client.get("/")
    assert page.status_code == 200 and 'id="item-image"' in page.text
    # the introduction says what a "part of the image" is: the cells of the 3 x 3 grid, named as the items name them
    intro = page.text.split('id="grid-intro">')[1].split("</p>")[0]
    assert "3 × 3 grid" in intro and all(word in intro for word in ("top", "middle", "bottom", "left", "right"))
    assert "default-src 'none'" in page.headers["content-security-policy"]
    state = client.post("/api/annotators", json={"name": "ada"}).json()
    first = state["item"]["id"]
    assert state["answered"] == 0 and state["total"] == 12 and state["practice"] == 2
    answer = {"annotator": "ada", "item": first, "answer": True}
    # malformed: each one 400, nothing stored
    for bad in (
        answer | {"answer": "yes"},
        answer | {"cells": [9]},
        answer | {"cells": [0, 1, 2, 3, 4]},
        answer | {"cells": [1, 1]},
        answer | {"cells": "1"},
        answer | {"item": -1},
        answer | {"seconds": -2.0},
        answer | {"path": "/etc/passwd"},
        {"annotator": "ada", "item": first},
    ):
        assert client.post("/api/answers", json=bad).status_code == 400, bad
    assert (
        client.post("/api/answers", content=b"{not json", headers={"content-type": "application/json"}).status_code
        == 400
    )
    for name in ("", "   ", "../../etc", "a" * 41, "<script>"):
        assert client.post("/api/annotators", json={"name": name}).status_code == 400, name
    # unknown annotator, unknown item, an item of another annotator's block: 404
    assert client.post("/api/answers", json=answer | {"annotator": "eve"}).status_code == 404
    assert client.get("/api/state", params={"annotator": "eve"}).status_code == 404
    assert client.post("/api/answers", json=answer | {"item": 999}).status_code == 404
    others = [i["item"] for i in store.items() if i["role"] == "own" and i["slot"] == 1]
    assert client.post("/api/answers", json=answer | {"item": others[0]}).status_code == 404
    # in order, once: a later item and a second answer are 409 with the state to catch up with
    sequence = [
        row[0]
        for row in sqlite3.connect(store.path).execute(
            "SELECT item FROM sequence WHERE annotator = 0 ORDER BY position"
        )
    ]
    assert sequence[0] == first
    assert client.post("/api/answers", json=answer | {"item": sequence[3]}).status_code == 409
    stored = client.post("/api/answers", json=answer | {"cells": [4, 0], "seconds": 1.5})
    assert stored.status_code == 200 and stored.json()["state"]["answered"] == 1
    again = client.post("/api/answers", json=answer | {"answer": False})
    assert again.status_code == 409 and again.json()["detail"]["state"]["item"]["id"] == sequence[1]
    rows = sqlite3.connect(store.path).execute("SELECT annotator, item, answer, cells FROM answers").fetchall()
    assert rows == [(0, first, 1, "[4, 0]")]
    with pytest.raises(NotNext):
        store.record(0, sequence[5], True, [], False, None)
    # a place per annotator: the third name is refused, a known name resumes
    assert client.post("/api/annotators", json={"name": "bob"}).status_code == 200
    assert client.post("/api/annotators", json={"name": "cyd"}).status_code == 409
    assert client.post("/api/annotators", json={"name": " ada "}).json()["answered"] == 1
    # images: only the study's, by item number; no path from the browser reaches the file system
    image = client.get(f"/api/images/{first}")
    assert image.status_code == 200 and image.content == Path(store.item(first)["image"]).read_bytes()
    assert client.get("/api/images/999").status_code == 404
    assert client.get("/api/images/-1").status_code == 404
    assert client.get("/api/images/abc").status_code == 400
    for path in ("/api/images/..%2F..%2Fetc%2Fpasswd", "/api/images/0/../../../etc/passwd", "/etc/passwd",
                 "/static/page.html", "/docs", "/openapi.json", "/api/images/"):  # fmt: skip
        assert 400 <= client.get(path).status_code < 500, path

    guarded = TestClient(create_app(store, token="s3cret-t0ken"))
    assert guarded.get("/").status_code == 403
    assert guarded.get("/?token=wrong").status_code == 403
    assert guarded.get(f"/api/images/{first}").status_code == 403
    assert guarded.post("/api/annotators", json={"name": "bob"}).status_code == 403
    assert guarded.get("/?token=s3cret-t0ken").status_code == 200
    assert guarded.get("/api/study", headers={"X-Annotate-Token": "s3cret-t0ken"}).status_code == 200
    assert guarded.get(f"/api/images/{first}?token=s3cret-t0ken").status_code == 200


def test_a_restart_resumes_the_same_study_and_refuses_another(rcm_options, tmp_path, capsys):
    design = rcm_design(rcm_options)
    store = new_store(tmp_path, design)
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert AnnotationStore.create_or_resume(store.path, prepare_study(design)).path == store.path
    arguments = ["annotate", "serve", "--task", "rcm", "--rcm", rcm_options["rcm"], "--images", rcm_options["images"]]
    arguments += ["--n", 10, "--intro", 2, "--db", store.path]
    code, _, err = run_cli(capsys, *arguments, "--seed", 4)
    assert (
        code == 2
        and err.strip()
        == f"error: --db {store.path}: holds a study made with a different 'seed' (3); give the same options or "
        "another --db"
    )
    (tmp_path / "other.db").write_text("not a database at all")
    code, _, err = run_cli(capsys, *arguments[:-2], "--db", tmp_path / "other.db", "--seed", 3)
    assert code == 2 and "not an annotation database" in err
    code, _, err = run_cli(capsys, *arguments, "--seed", 3, "--port", 70000)
    assert code == 2 and err.strip() == "error: --port: must be <= 65535, got 70000"
    code, _, err = run_cli(capsys, "annotate", "score", "--db", tmp_path / "missing.db", "--out", tmp_path / "run")
    assert code == 2 and err.strip() == f"error: --db {tmp_path / 'missing.db'}: not found"
    code, _, err = run_cli(capsys, "annotate", "score", "--db", store.path, "--out", tmp_path / "run")
    assert code == 2 and "no scored answers yet" in err


def test_a_killed_server_keeps_every_answer_it_confirmed(rcm_options, tmp_path):
    """The real command in its own process, killed with SIGKILL after four confirmed answers."""
    import httpx

    port, db = free_port(), tmp_path / "killed.db"
    command = [sys.executable, "-m", "probing", "annotate", "serve", "--task", "rcm", "--n", "10", "--intro", "2"]
    command += ["--seed", "3", "--rcm", str(rcm_options["rcm"]), "--images", str(rcm_options["images"])]
    command += ["--db", str(db), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # the command imports torch and transformers first
        while True:
            try:
                httpx.get(f"{base}/api/study", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read().decode()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        state = httpx.post(f"{base}/api/annotators", json={"name": "ada"}).json()
        confirmed = []
        for _ in range(3):
            item = state["item"]["id"]
            reply = httpx.post(f"{base}/api/answers", json={"annotator": "ada", "item": item, "answer": True})
            assert reply.status_code == 200
            confirmed.append(item)
            state = reply.json()["state"]
        # the same answer sent 8 times at once (tabs, double clicks): stored once, the others told 409
        from concurrent.futures import ThreadPoolExecutor

        same = {"annotator": "ada", "item": state["item"]["id"], "answer": False}
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{base}/api/answers", json=same).status_code, range(8)))
        assert sorted(codes) == [200] + [409] * 7
        confirmed.append(same["item"])
        state = httpx.get(f"{base}/api/state", params={"annotator": "ada"}).json()
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        server.stdout.close()
    assert server.returncode == -signal.SIGKILL
    with contextlib.closing(sqlite3.connect(db)) as connection:
        assert [row[0] for row in connection.execute("SELECT item FROM answers ORDER BY rowid")] == confirmed
    # the restarted server (same study) resumes ada at her fifth item
    from fastapi.testclient import TestClient

    store = AnnotationStore.create_or_resume(db, prepare_study(rcm_design(rcm_options)))
    resumed = TestClient(create_app(store)).get("/api/state", params={"annotator": "ada"}).json()
    assert resumed["answered"] == 4 and resumed["item"]["id"] == state["item"]["id"]


# ------------------------------------------------------------------ scoring


def hand_score(answers: list[dict], labels: dict[int, int], items: list[int]):
    """Exclusions, accuracy and Fleiss' kappa of (annotator, item, answer, cells, incorrect) by hand."""
    excluded = {"marked_incorrect": 0, "several_cells": 0, "total": 0}
    kept = []
    for answer in answers:
        rules = [
            rule
            for rule, hit in (("marked_incorrect", answer["incorrect"]), ("several_cells", len(answer["cells"]) > 1))
            if hit
        ]
        for rule in rules:
            excluded[rule] += 1
        excluded["total"] += bool(rules)
        if not rules:
            kept.append(answer)
    correct = [a["answer"] == bool(labels[a["item"]]) for a in kept]
    by = {(a["annotator"], a["item"]): a["answer"] for a in answers}
    raters = sorted({a["annotator"] for a in answers if all((a["annotator"], i) in by for i in items)})
    kept_pairs = {(a["annotator"], a["item"]) for a in kept}
    shared = [i for i in items if all((r, i) in kept_pairs for r in raters)]
    table = [[sum(not by[(r, i)] for r in raters), sum(by[(r, i)] for r in raters)] for i in shared]
    return excluded, correct, hand_fleiss(table), raters, shared


def test_score_applies_the_exclusions_and_agrees_with_a_hand_computation(rcm_options, tmp_path, capsys):
    store = new_store(tmp_path, rcm_design(rcm_options, intro=0))
    labels = {item["item"]: item["label"] for item in store.items()}
    items = sorted(labels)
    rng = np.random.default_rng(0)
    planned = []
    for name, complete in (("ada", True), ("bob", True), ("cyd", True), ("dan", False)):
        annotator = store.register(name)
        for _ in range(10 if complete else 4):
            item = store.progress(annotator)["next"]
            answer = {
                "annotator": annotator,
                "item": item,
                "answer": bool(labels[item]) if rng.random() < 0.8 else not labels[item],
                "cells": [int(c) for c in rng.choice(9, size=rng.choice([0, 1, 1, 1, 2]), replace=False)],
                "incorrect": bool(rng.random() < 0.1),
            }
            assert store.record(answer["annotator"], item, answer["answer"], answer["cells"], answer["incorrect"], 2.0)
            planned.append(answer)
    excluded, correct, kappa, raters, shared = hand_score(planned, labels, items)
    assert excluded["total"] > 0 and raters == [0, 1, 2] and 0 < len(shared) < 10  # the incomplete dan is no rater
    summary = score(store.path, tmp_path / "run").value
    assert summary["excluded"] == excluded
    assert summary["kept"] == len(correct) and summary["answers"] == len(planned)
    assert summary["accuracy"]["mean"] == pytest.approx(sum(correct) / len(correct))
    assert summary["accuracy"] == estimate(np.array([correct], dtype=float)).as_dict()
    assert summary["fleiss_kappa"]["kappa"] == pytest.approx(kappa, abs=1e-12)
    assert summary["fleiss_kappa"]["raters"] == raters and summary["fleiss_kappa"]["items"] == shared
    # run again: reused; after another answer: refused, naming what differs
    assert score(store.path, tmp_path / "run").status == "reused"
    store.record(3, store.progress(3)["next"], True, [], False, None)
    code, _, err = run_cli(capsys, "annotate", "score", "--db", store.path, "--out", tmp_path / "run")
    assert code == 2 and "holds a human run made with a different 'inputs.answers'" in err
    # one rater only: kappa undefined, with the reason
    alone = new_store(tmp_path, rcm_design(rcm_options, intro=0), name="alone.db")
    annotator = alone.register("ada")
    for _ in range(10):
        alone.record(annotator, alone.progress(annotator)["next"], True, [], False, None)
    agreement = score(alone.path, tmp_path / "alone").value["fleiss_kappa"]
    assert agreement["kappa"] is None and agreement["reason"].startswith("1 annotator(s) answered every shared item")
    assert fleiss_agreement([], [1], set())["kappa"] is None


# ------------------------------------------------------------------ in a real browser


@contextlib.contextmanager
def serving(store, token=None):
    """The page on 127.0.0.1 at a free port, by uvicorn in a thread; stopped on exit."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(create_app(store, token), host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def chromium():
    """Debian's headless Chromium through its own chromedriver (never a downloaded one), or a skip saying why
    (a failure where PROBING_REQUIRE_BROWSER=1, as in CI)."""
    give_up = pytest.fail if REQUIRE_BROWSER else pytest.skip
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        give_up("no Chromium: apt-get install chromium chromium-driver (Debian's packages)")
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,760",
    ):
        options.add_argument(argument)
    try:
        return webdriver.Chrome(service=Service(executable_path=driver), options=options)
    except WebDriverException as error:
        give_up(f"Chromium did not start: {(error.msg or str(error)).splitlines()[0]}")


def test_two_annotators_in_a_real_browser_then_score_report_and_export(rcm_options, tmp_path, capsys):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    store = new_store(tmp_path, rcm_design(rcm_options))
    labels = {item["item"]: item["label"] for item in store.items()}  # the truth, checked against the data
    truth = {e.example_id: e.label for e in load_split(DataOptions(task="rcm", **rcm_options), "test").examples}
    assert labels == {item["item"]: truth[item["example_id"]] for item in store.items()}
    # what each annotator does on each scored item (2..11): answer wrongly, rank cells (keys or clicks), flag
    plans = {
        "ada": {"wrong": {3, 8}, "cells": {5: [0, 1], 6: [2], 9: [3, 7]}, "incorrect": {9, 10}},
        "bob": {"wrong": {3, 4, 11}, "cells": {7: [5, 1, 3], 2: [8], 11: [0]}, "incorrect": {2}},
    }
    driver = chromium()
    try:
        with serving(store, token="t0ken") as address:
            wait = WebDriverWait(driver, 15)
            element = lambda name: driver.find_element(By.ID, name)  # noqa: E731

            def answered(count):
                wait.until(
                    lambda d: (
                        element("item-screen").get_attribute("data-answered") == str(count)
                        or (count == 12 and element("done-screen").is_displayed())
                    )
                )

            def keys(*pressed):
                ActionChains(driver).send_keys(*pressed).perform()

            def shown_item() -> int:
                return int(element("item-screen").get_attribute("data-item"))

            def by_keyboard(item: int, plan: dict) -> None:
                assert not element("practice-mark").is_displayed()
                assert element("phrase").text == store.item(item)["metadata"]["phrase"]
                cells = plan["cells"].get(item, [])
                if cells == [0, 1]:
                    keys("1", "2", "3", "4", "5")  # a fifth cell is refused, then two are taken back
                    assert element("feedback").text == "At most 4 cells."
                    keys("3", "4")
                else:
                    keys(*[str(cell + 1) for cell in cells])
                ranked = {b.get_attribute("id"): b.text for b in driver.find_elements(By.CSS_SELECTOR, "#cells button")}
                assert all(ranked[f"cell-{c + 1}"].endswith(f"#{rank + 1}") for rank, c in enumerate(cells))
                if item in plan["incorrect"]:
                    keys("i")
                    assert element("incorrect").is_selected()
                if cells and not (tmp_path / "annotate.png").exists():
                    driver.save_screenshot(str(tmp_path / "annotate.png"))
                keys("y" if (labels[item] == 1) != (item in plan["wrong"]) else "n")

            # ada: the keyboard only
            driver.get(address + "?token=t0ken")
            wait.until(lambda d: element("name").is_displayed())
            element("name").send_keys("ada\n")  # Enter submits the form
            answered(0)
            assert not driver.find_elements(By.CSS_SELECTOR, "canvas, svg")  # no grid drawn over the image
            assert element("practice-mark").is_displayed() and element("claim").is_displayed()
            keys("n" if labels[shown_item()] else "y")  # a wrong practice answer
            answered(1)
            assert element("feedback").text.startswith("Practice: the right answer was")
            keys("y" if labels[shown_item()] else "n")
            answered(2)
            done = 2
            while done < 12:
                by_keyboard(shown_item(), plans["ada"])
                done += 1
                answered(done)
                if done == 7:  # halfway: reload, and come back in a second tab too
                    driver.refresh()
                    answered(7)
                    first_tab = driver.current_window_handle
                    driver.switch_to.new_window("tab")
                    driver.get(address + "?token=t0ken&annotator=ada")
                    answered(7)
                    item = shown_item()
                    by_keyboard(item, plans["ada"])
                    done += 1
                    answered(done)
                    driver.close()
                    driver.switch_to.window(first_tab)  # still showing the item the other tab answered
                    assert shown_item() == item
                    keys("y")  # refused (409): the page moves on without counting it
                    answered(done)
                    assert "already answered" in element("feedback").text
            wait.until(lambda d: element("done").is_displayed())
            assert element("done").text == "Thank you, ada: all 12 items are answered."

            # bob: the mouse (his name is typed, then everything is clicked)
            driver.get(address + "?token=t0ken")
            wait.until(lambda d: element("name").is_displayed())
            element("name").send_keys("bob")
            element("start").click()
            answered(0)
            for done in range(12):
                item = shown_item()
                assert element("practice-mark").is_displayed() == (done < 2)
                plan = plans["bob"]
                for cell in plan["cells"].get(item, []):
                    element(f"cell-{cell + 1}").click()
                if item in plan["incorrect"]:
                    element("incorrect").click()
                element("yes" if (labels[item] == 1) != (item in plan["wrong"]) else "no").click()
                answered(done + 1)
            wait.until(lambda d: element("done").is_displayed())
    finally:
        driver.quit()
    assert (tmp_path / "annotate.png").stat().st_size > 5000
    if SCREENSHOT:
        shutil.copyfile(tmp_path / "annotate.png", SCREENSHOT)

    # the database holds exactly the planned answers, once each
    expected = set()
    for name, annotator in (("ada", 0), ("bob", 1)):
        plan = plans[name]
        for item in range(2, 12):
            wrong = item in plan["wrong"]
            expected.add(
                (
                    annotator,
                    item,
                    int(bool(labels[item]) != wrong),
                    json.dumps(plan["cells"].get(item, [])),
                    int(item in plan["incorrect"]),
                )
            )
    with contextlib.closing(sqlite3.connect(store.path)) as connection:
        rows = connection.execute(
            "SELECT a.annotator, a.item, a.answer, a.cells, a.incorrect FROM answers a JOIN items i USING (item) "
            "WHERE i.role != 'intro'"
        ).fetchall()
        practice = connection.execute(
            "SELECT COUNT(*) FROM answers a JOIN items i USING (item) WHERE i.role = 'intro'"
        ).fetchone()
        names = connection.execute("SELECT annotator, name FROM annotators ORDER BY annotator").fetchall()
    assert len(rows) == 20 and set(rows) == expected and practice == (4,)
    assert names == [(0, "ada"), (1, "bob")]

    # score: the hand computation's numbers
    answers = [
        {"annotator": a, "item": i, "answer": bool(v), "cells": json.loads(c), "incorrect": bool(f)}
        for a, i, v, c, f in rows
    ]
    excluded, correct, kappa, raters, shared = hand_score(answers, labels, list(range(2, 12)))
    assert excluded == {"marked_incorrect": 3, "several_cells": 3, "total": 5}
    assert sum(correct) == 10 and len(correct) == 15 and shared == [3, 4, 6, 8, 11] and raters == [0, 1]
    run = tmp_path / "human-run"
    code, out, err = run_cli(capsys, "annotate", "score", "--db", store.path, "--out", run)
    assert code == 0, err
    assert "test accuracy 66.7%" in out and "excluded 5 of 20: marked incorrect 3, several cells 3" in out
    assert f"Fleiss' kappa {kappa:.4f} (2 annotators, 5 shared items)" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["label"] == "Human" and metrics["runs"][0]["test"]["accuracy"] == pytest.approx(10 / 15)
    assert metrics["runs"][0]["test"]["fleiss_kappa"] == pytest.approx(kappa, abs=1e-12)
    records = [json.loads(line) for line in (run / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(records) == 15 and {r["seed"] for r in records} == {0} and sum(r["correct"] for r in records) == 10

    # analyze and report read it unchanged: Table 1's Human row
    code, out, err = run_cli(capsys, "analyze", run)
    assert code == 0, err
    assert out.startswith("Human human rcm layer 0 none: test accuracy 66.7%") and "(1 seed(s), 15 examples)" in out
    code, out, err = run_cli(capsys, "report", run, "--out", tmp_path / "report", "--compare-paper")
    assert code == 0, err
    table1 = (tmp_path / "report" / "tables" / "table1.md").read_text()
    assert "| Human | human | 66.7 [" in table1 and "| Human (paper) | human | 92.29 |" in table1
    assert not (tmp_path / "report" / "tables" / "roc_auc.md").exists()  # answers have no probabilities
    assert assert_results_hold_every_number(tmp_path / "report") > 5

    # export: every answer, practice ones too
    code, out, err = run_cli(capsys, "annotate", "export", "--db", store.path, "--out", tmp_path / "answers.jsonl")
    assert code == 0 and out.strip() == f"24 answers: {tmp_path / 'answers.jsonl'}"
    exported = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert Counter(line["role"] for line in exported) == {"shared": 20, "intro": 4}
    assert {
        (e["annotator"], e["item"], int(e["answer"]), json.dumps(e["cells"]), int(e["incorrect"]))
        for e in exported
        if e["role"] != "intro"
    } == expected


def test_ci_installs_the_browser_and_requires_it():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    install = ci.index('apt-get install -y -qq \\\n    --no-install-recommends "${debian_packages[@]}"')
    assert "command -v chromium >/dev/null || debian_packages+=(chromium)" in ci
    assert "command -v chromedriver >/dev/null || debian_packages+=(chromium-driver)" in ci
    assert "export PROBING_REQUIRE_BROWSER=1" in ci
    assert install < ci.index('bash -euo pipefail -c "$command"')  # before the README's test command


@pytest.mark.parametrize("command", [[], ["serve"], ["score"], ["export"]])
def test_help_on_every_annotate_command(capsys, command):
    code, out, _ = run_cli(capsys, "annotate", *command, "--help")
    assert code == 0 and "Usage: probing annotate" in out
