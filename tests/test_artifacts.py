import json
import os

import pytest

from probing.core.artifacts import (
    existing_output_matches,
    first_difference,
    sha256_file,
    staged_directory,
    sweep_stale_partials,
    write_json,
)
from probing.core.errors import ProbingError


def test_first_difference_names_nested_fields():
    expected = {"seed": 1, "inputs": {"refs_sha256": "a", "instances_sha256": "b"}}
    assert first_difference(expected, expected) is None
    assert (
        first_difference(expected, {"seed": 1, "inputs": {"refs_sha256": "x", "instances_sha256": "b"}})
        == "inputs.refs_sha256"
    )
    assert first_difference(expected, {"seed": 2, "inputs": expected["inputs"]}) == "seed"
    assert first_difference(expected, {"inputs": expected["inputs"]}) == "seed"


def test_staged_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staging:
            (staging / "half.txt").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with staged_directory(target) as staging:
        (staging / "whole.txt").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "whole.txt").read_text() == "x"


def test_partials_of_dead_runs_are_swept(tmp_path):
    stale = tmp_path / ".out.partial-999999999"  # no such process
    stale.mkdir()
    (stale / "junk").write_text("x")
    with staged_directory(tmp_path / "out"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sweep_keeps_the_partials_of_live_processes_and_removes_files_too(tmp_path):
    (tmp_path / f".shard-00001.safetensors.partial-{os.getpid()}").write_text("mine, still being written")
    (tmp_path / ".shard-00002.safetensors.partial-999999999").write_text("killed")
    (tmp_path / ".shard-00003.safetensors.partial-x").write_text("not a pid: not ours")
    (tmp_path / "shard-00000.safetensors").write_text("finished")
    sweep_stale_partials(tmp_path, ".*.partial-*")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".shard-00001.safetensors.partial-{os.getpid()}",
        ".shard-00003.safetensors.partial-x",
        "shard-00000.safetensors",
    ]


def test_an_output_finished_meanwhile_by_another_process_is_kept(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ProbingError) as raised:
        with staged_directory(target) as staging:
            (staging / "mine.txt").write_text("mine")
            target.mkdir()  # another process renamed its finished output into place first
            write_json(target / "manifest.json", {"seed": 1})
    assert str(raised.value) == f"{target}: written by another process meanwhile; run again to reuse it"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # our staging folder is gone
    assert [p.name for p in target.iterdir()] == ["manifest.json"]  # theirs is untouched


def test_existing_output_matches(tmp_path):
    out = tmp_path / "out"
    assert existing_output_matches(out, {"seed": 1}, "thing") is False
    out.mkdir()
    assert existing_output_matches(out, {"seed": 1}, "thing") is False  # empty: build into it
    write_json(out / "manifest.json", {"seed": 1, "made_at": "whenever"})
    assert existing_output_matches(out, {"seed": 1}, "thing") is True
    with pytest.raises(ProbingError, match="holds a thing made with a different 'seed'"):
        existing_output_matches(out, {"seed": 2}, "thing")
    (out / "manifest.json").write_text("{broken")
    with pytest.raises(ProbingError, match=r"manifest.json: line 1: not valid JSON"):
        existing_output_matches(out, {"seed": 1}, "thing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProbingError, match="exists and is not a directory"):
        existing_output_matches(tmp_path / "file", {"seed": 1}, "thing")


def test_write_json_leaves_no_temporary_file(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2], "b": 1}


def test_sha256_follows_rewrites(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    path.write_bytes(b"abcd")
    assert sha256_file(path) == "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
