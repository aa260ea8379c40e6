"""The `tta` command as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TTA = [sys.executable, "-m", "tta.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TTA, *args], capture_output=True, text=True, timeout=300)


def test_predict_prints_one_json_object_per_image_for_each_method(chelsea_jpeg):
    for method in ("zeroshot", "tpt", "zero"):
        light = ["--option", "n_views=8"] if method != "zeroshot" else []
        result = _run("predict", str(chelsea_jpeg), str(chelsea_jpeg), "--model", "tiny-random",
                      "--labels", "cat,dog,car", "--method", method, "--top-k", "2", *light)
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(lines) == 2
        for body in lines:
            assert body["method"] == method and body["label"] in ("cat", "dog", "car")
            assert len(body["top_k"]) == 2 and body["top_k"][0]["label"] == body["label"]
            assert isinstance(body["changed_by_adaptation"], bool) and "total" in body["timings_ms"]


def test_labels_file(tmp_path, chelsea_jpeg):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    result = _run("predict", str(chelsea_jpeg), "--model", "tiny-random", "--labels-file", str(labels))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["label"] in ("cat", "dog")


@pytest.mark.parametrize("args, fragment", [
    (["--labels", "cat,dog", "--method", "bogus"], "unknown method 'bogus'"),
    (["--labels", " , "], "label list is empty"),
    (["--labels", "cat", "--option", "n_views=-3", "--method", "tpt"], "n_views"),
])
def test_user_errors_exit_2_with_one_line(chelsea_jpeg, args, fragment):
    result = _run("predict", str(chelsea_jpeg), "--model", "tiny-random", *args)
    assert result.returncode == 2
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_unreadable_and_non_image_files_exit_2(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for path, fragment in ((tmp_path / "absent.jpg", "cannot read image"), (text, "not a decodable image")):
        result = _run("predict", str(path), "--model", "tiny-random", "--labels", "cat,dog")
        assert result.returncode == 2 and fragment in result.stderr


def test_methods_lists_the_registry():
    result = _run("methods")
    assert result.returncode == 0
    names = {line.split()[0] for line in result.stdout.splitlines()}
    assert {"zeroshot", "tpt", "zero"} <= names
