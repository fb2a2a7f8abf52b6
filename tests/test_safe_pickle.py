import os
import pickle
import subprocess
import sys

import pytest
from conftest import small_refer_dataset

from probing.core.errors import ProbingError
from probing.data.safe_pickle import load_plain_pickle


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_refs(path, marker):
    # A list of refs with the payload hidden inside one ref's sentences.
    refs = [
        {
            "ref_id": 1,
            "ann_id": 1,
            "image_id": 1,
            "split": "train",
            "sentences": [{"raw": "x", "sent_id": 1, "tokens": RunsAShellCommand(marker)}],
        }
    ]
    path.write_bytes(pickle.dumps(refs, protocol=2))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    crafted_refs(tmp_path / "refs(umd).p", marker)
    # Sanity check of the fixture: the stock unpickler would run the command.
    pickle.loads((tmp_path / "refs(umd).p").read_bytes())
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ProbingError, match=r"refused: the pickle refers to (posix|os|nt)\.system"):
        load_plain_pickle(tmp_path / "refs(umd).p")
    assert not marker.exists()


def test_crafted_pickle_through_the_cli(tmp_path):
    paths = small_refer_dataset(tmp_path)
    marker = tmp_path / "pwned"
    crafted_refs(paths["refs"], marker)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "probing",
            "data",
            "stats",
            "--task",
            "refcocog",
            "--refs",
            str(paths["refs"]),
            "--instances",
            str(paths["instances"]),
            "--images",
            str(paths["images"]),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "refs(umd).p: refused" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_containers_load_under_every_protocol(tmp_path, protocol):
    payload = [
        {
            "ref_id": 1,
            "sentences": [{"raw": "a dog", "sent_id": 3, "tokens": ["a", "dog"]}],
            "score": 0.5,
            "flag": True,
            "none": None,
            "pair": (1, 2),
            "ids": {4, 5},
            "frozen": frozenset({6}),
        }
    ]
    path = tmp_path / "plain.p"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    assert load_plain_pickle(path) == payload


def test_python2_byte_strings_decode_as_utf8(tmp_path):
    # What cPickle in Python 2 writes for [{'raw': 'caf\xc3\xa9'}]: SHORT_BINSTRING opcodes (raw bytes).
    stream = b"\x80\x02]q\x00}q\x01(U\x03rawq\x02U\x05caf\xc3\xa9q\x03U\x07sent_idq\x04K\x07ua."
    path = tmp_path / "py2.p"
    path.write_bytes(stream)
    assert load_plain_pickle(path) == [{"raw": "café", "sent_id": 7}]


def test_truncated_pickles_are_one_clear_error(tmp_path):
    full = pickle.dumps([{"ref_id": i, "sentences": [{"raw": "x" * i}]} for i in range(50)], protocol=2)
    path = tmp_path / "truncated.p"
    for cut in (1, 2, 10, len(full) // 2, len(full) - 1):
        path.write_bytes(full[:cut])
        with pytest.raises(ProbingError, match=r"truncated.p: not a readable pickle"):
            load_plain_pickle(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ProbingError, match=r"absent.p: file not found"):
        load_plain_pickle(tmp_path / "absent.p")
    (tmp_path / "empty.p").write_bytes(b"")
    with pytest.raises(ProbingError, match=r"empty.p: not a readable pickle"):
        load_plain_pickle(tmp_path / "empty.p")


def test_persistent_ids_are_refused(tmp_path):
    path = tmp_path / "persistent.p"
    path.write_bytes(b"\x80\x02X\x01\x00\x00\x00aQ.")  # BINPERSID on the string 'a'
    with pytest.raises(ProbingError, match="persistent ids"):
        load_plain_pickle(path)
