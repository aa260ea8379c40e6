"""The `tta` command as a user runs it: one real subprocess (the console entry point, process exit
codes), the rest through `tta.cli.main` in this process with the same argv, stdout, stderr and exit
code (each subprocess pays a ~10 s torch import on a 2-core machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TTA = [sys.executable, "-m", "tta.cli"]


def _subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TTA, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture()
def run(capsys):
    """`tta ARGS...` in this process: a CompletedProcess-like (returncode, stdout, stderr)."""
    import logging

    from tta.cli import main

    def _run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        root = logging.getLogger()
        handlers = list(root.handlers)
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse and the commands' user errors
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            root.handlers[:] = handlers  # main() configures logging once per process
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return _run


def test_predict_prints_one_json_object_per_image_for_each_method(chelsea_jpeg, run):
    for method in ("zeroshot", "tpt", "zero"):
        light = ["--option", "n_views=8"] if method != "zeroshot" else []
        result = (_subprocess if method == "zeroshot" else run)("predict", str(chelsea_jpeg), str(chelsea_jpeg), "--model", "tiny-random",
                      "--labels", "cat,dog,car", "--method", method, "--top-k", "2", *light)
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(lines) == 2
        for body in lines:
            assert body["method"] == method and body["label"] in ("cat", "dog", "car")
            assert len(body["top_k"]) == 2 and body["top_k"][0]["label"] == body["label"]
            assert isinstance(body["changed_by_adaptation"], bool) and "total" in body["timings_ms"]


def test_labels_file(tmp_path, chelsea_jpeg, run):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    result = run("predict", str(chelsea_jpeg), "--model", "tiny-random", "--labels-file", str(labels))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["label"] in ("cat", "dog")


@pytest.mark.parametrize("args, fragment", [
    (["--labels", "cat,dog", "--method", "bogus"], "unknown method 'bogus'"),
    (["--labels", " , "], "label list is empty"),
    (["--labels", "cat", "--option", "n_views=-3", "--method", "tpt"], "n_views"),
])
def test_user_errors_exit_2_with_one_line(chelsea_jpeg, args, fragment, run):
    result = run("predict", str(chelsea_jpeg), "--model", "tiny-random", *args)
    assert result.returncode == 2
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_unreadable_and_non_image_files_exit_2(tmp_path, run):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for path, fragment in ((tmp_path / "absent.jpg", "cannot read image"), (text, "not a decodable image")):
        result = run("predict", str(path), "--model", "tiny-random", "--labels", "cat,dog")
        assert result.returncode == 2 and fragment in result.stderr


def test_methods_lists_the_registry(run):
    result = run("methods")
    assert result.returncode == 0
    names = {line.split()[0] for line in result.stdout.splitlines()}
    assert {"zeroshot", "tpt", "zero"} <= names
