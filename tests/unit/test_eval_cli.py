"""`tta eval` on a folder of real photos (skimage samples saved as files) and on the digits set."""

from __future__ import annotations

import csv
import json

import pytest

from tta.cli import main
from tta.engine import Engine
from tta.images import load_image_file
from tta.models import load_model
from tta.text import LabelSet


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, sample_images):
    """class_name/image files: each photo as JPEG and its mirror image as PNG."""
    from PIL import Image

    root = tmp_path_factory.mktemp("eval_photos")
    for name, image in sample_images.items():
        folder = root / (name if name != "chelsea" else "tabby_cat")
        folder.mkdir()
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{name}.jpg", quality=90)
        Image.fromarray(array[:, ::-1].copy()).save(folder / f"{name}_mirror.png")
    (root / "notes.txt").write_text("not a class folder")
    return root


def test_eval_on_a_folder_of_photos_reports_accuracy_and_latency(photo_folder, tmp_path, capsys):
    out_json, out_csv = tmp_path / "eval.json", tmp_path / "eval.csv"
    code = main(["eval", str(photo_folder), "--methods", "zeroshot,tpt,zero", "--model", "tiny-random",
                 "--option", "n_views=4", "--option", "tpt.steps=1", "--json", str(out_json), "--csv", str(out_csv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "8 images, 4 classes" in captured.out
    for method in ("zeroshot", "tpt", "zero"):
        assert method in captured.out
    report = json.loads(out_json.read_text())
    assert [r["method"] for r in report["results"]] == ["zeroshot", "tpt", "zero"]
    assert all(r["n"] == 8 and r["latency_ms_median"] > 0 for r in report["results"])
    assert report["options"] == {"zeroshot": {}, "tpt": {"n_views": 4, "steps": 1}, "zero": {"n_views": 4}}
    rows = list(csv.DictReader(out_csv.open()))
    assert [row["method"] for row in rows] == ["zeroshot", "tpt", "zero"]
    # the reported accuracy is what the engine gives on those files (class names from folder names)
    images = report["images"]
    assert {r["label"] for r in images} == {"tabby cat", "astronaut", "coffee", "rocket"}
    clip = load_model("tiny-random")
    engine = Engine(clip, LabelSet.create(sorted(r["label"] for r in images[:4])))
    correct = 0
    for i, record in enumerate(images):
        path = record["image"]
        pred = engine.predict(load_image_file(path), method="zero", options={"n_views": 4}, seed=i)
        assert pred.label == record["zero"]
        correct += pred.label == record["label"]
    assert report["results"][2]["accuracy"] == pytest.approx(correct / 8)


def test_eval_limit_interleaves_classes(photo_folder, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(photo_folder), "--methods", "zeroshot", "--limit", "4", "--no-progress",
                 "--json", str(out_json)]) == 0
    images = json.loads(out_json.read_text())["images"]
    assert len(images) == 4 and len({r["label"] for r in images}) == 4


def test_eval_builtin_digits_with_shift(tmp_path, capsys):
    out_json = tmp_path / "digits.json"
    code = main(["eval", "digits", "--model", "tiny-random", "--methods", "zeroshot,zero", "--limit", "6",
                 "--shift", "noise", "--option", "zero.n_views=4", "--no-progress", "--json", str(out_json)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out_json.read_text())
    assert report["n_images"] == 6 and report["n_classes"] == 10 and report["shift"] == "noise"


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nope"], "unknown method"),
    (["--option", "bogus=1"], "no selected method has an option"),
    (["--option", "tpt.n_views=4"], "not in --methods"),
])
def test_eval_rejects_bad_arguments(photo_folder, capsys, argv, message):
    assert main(["eval", str(photo_folder), "--methods", "zeroshot", *argv]) == 2  # the last --methods wins
    assert message in capsys.readouterr().err


def test_eval_rejects_a_missing_folder(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "absent"), "--methods", "zeroshot"]) == 2
    assert "neither a folder" in capsys.readouterr().err
