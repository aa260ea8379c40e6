"""tta.offline's statistics against hand-computed cases, the bulk feedback path, and the
calibrated zero-shot temperature in `auto` and the drift monitor (no stored bundles needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tta import offline
from tta.drift import DriftConfig, DriftMonitor
from tta.engine import Engine
from tta.errors import BadRequest
from tta.models import embedding_model
from tta.offline import ece, fit_temperature, paired_gain
from tta.text import LabelSet

D, C = 16, 5


def test_ece_by_hand() -> None:
    # three samples in three different bins: (|1 - .9| + |0 - .8| + |0 - .3|) / 3
    assert ece([0.9, 0.8, 0.3], [True, False, False]) == pytest.approx(1.2 / 3, abs=1e-15)
    # two bins of two: each |acc - conf| = 0.45, weight 1/2
    assert ece([0.95, 0.95, 0.55, 0.55], [1, 0, 1, 1]) == pytest.approx(0.45, abs=1e-15)
    # calibrated within a bin: 7 of 10 right at confidence 0.7
    assert ece([0.7] * 10, [1] * 7 + [0] * 3) == pytest.approx(0.0, abs=1e-12)
    # bins are (k/15, (k+1)/15]: 1.0 falls in the last, 0.0 in the first; 15 bins, not 10
    assert ece([1.0, 0.0], [1, 0]) == 0.0
    assert ece([0.62, 0.68], [1, 0]) == pytest.approx(0.5 * 0.38 + 0.5 * 0.68, abs=1e-15)  # 10 bins would pool them


def test_paired_gain_by_hand() -> None:
    reference = np.array([1, 1, 0, 0])
    correct = np.array([[1, 0, 1, 1], [1, 1, 1, 0]])
    out = paired_gain(correct, reference)
    # per image, mean over orders of the difference: [0, -0.5, 1, 0.5]
    d = np.array([0.0, -0.5, 1.0, 0.5])
    se = math.sqrt(((d - 0.25) ** 2).sum() / 3) / 2
    assert out["gain"] == pytest.approx(0.25, abs=1e-15)
    assert out["se"] == pytest.approx(se, abs=1e-15)
    assert out["low"] == pytest.approx(0.25 - 1.959963984540054 * se, abs=1e-15)
    assert out["high"] == pytest.approx(0.25 + 1.959963984540054 * se, abs=1e-15)
    assert out["n"] == 4
    # identical answers: zero gain, zero width
    same = paired_gain(reference, reference)
    assert same["gain"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0


def test_temperature_by_hand() -> None:
    """One logit vector [4, 0] seen four times with label 0 three times: the NLL is minimal where
    sigmoid(4 / T) = 3/4, i.e. T = 4 / ln 3."""
    logits = torch.tensor([[4.0, 0.0]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    assert fit_temperature(logits, labels) == pytest.approx(4.0 / math.log(3.0), rel=1e-9)
    # always right: the sharpest temperature allowed; never right: the flattest
    assert fit_temperature(logits, torch.zeros(4, dtype=torch.long)) == pytest.approx(0.05)
    assert fit_temperature(logits, torch.ones(4, dtype=torch.long)) == pytest.approx(20.0)


def _deployment(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, LabelSet]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(C, D, generator=gen), dim=-1)
    feats = torch.nn.functional.normalize(text[torch.arange(40) % C] + 0.9 * torch.randn(40, D, generator=gen), dim=-1)
    return text, feats, LabelSet.create([f"class {i}" for i in range(C)])


def _engine(text: torch.Tensor, labels: LabelSet, defaults=None, drift=None) -> Engine:  # noqa: ANN001
    clip = embedding_model(D)
    engine = Engine(clip, labels, method_defaults=defaults, drift=drift)
    engine.text_cache.put(clip, labels, text)
    return engine


def test_bulk_feedback_fits_gda_as_one_example_at_a_time_does() -> None:
    """GDA's feedback_many adds the same support set with one refit; with a fixed alpha the fitted
    classifier is the same closed form, so the answers agree (float32 sums in another order:
    1e-5 on probabilities)."""
    text, feats, labels = _deployment()
    y = [int(i) % C for i in range(20)]
    one = _engine(text, labels, {"gda": {"alpha": 1.0}})
    bulk = _engine(text, labels, {"gda": {"alpha": 1.0}})
    for f, label in zip(feats[:20], y, strict=True):
        one.feedback(None, labels.names[label], "gda", features=f)
    reply = bulk.feedback_many([labels.names[v] for v in y], "gda", features=feats[:20])
    assert reply["examples"] == 20 and reply["support_total"] == 20
    for f in feats[20:]:
        a, b = one.predict_features(f, method="gda"), bulk.predict_features(f, method="gda")
        assert a.label == b.label
        torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=0)


def test_bulk_feedback_refuses_before_any_change() -> None:
    text, feats, labels = _deployment()
    engine = _engine(text, labels)
    with pytest.raises(BadRequest) as info:
        engine.feedback_many(["class 0", "no such class"], "gda", features=feats[:2])
    assert info.value.code == "unknown_label"
    with pytest.raises(BadRequest):
        engine.feedback_many(["class 0"], "gda", features=feats[:2])  # one label for two examples
    with pytest.raises(BadRequest):
        engine.feedback_many(["class 0"], "gda", features=torch.ones(1, D))  # not normalised
    assert engine.state_summary("gda")["total"] == 0
    with pytest.raises(BadRequest) as info:
        engine.feedback_many(["class 0"], "tda", features=feats[:1])  # tda takes no labels
    assert info.value.code == "feedback_unsupported"
    assert engine.state_summary("tda")["updates"] == 0


def test_auto_gates_on_the_calibrated_zero_shot_probability() -> None:
    """With a temperature the zero-shot tier answers softmax(logits / T), and the gate reads it:
    a threshold between the raw and the calibrated confidence escalates only when calibrated."""
    text, feats, labels = _deployment()
    f = feats[0]
    logits = 100.0 * f @ text.t()
    raw = float(logits.softmax(-1).max())
    temperature = 4.0
    calibrated = (logits / temperature).softmax(-1)
    assert float(calibrated.max()) < raw - 0.05  # the case needs a sharp raw answer
    threshold = 0.5 * (raw + float(calibrated.max()))
    engine = _engine(text, labels)
    base = {"tiers": "zeroshot,tda", "threshold": threshold}
    plain = engine.predict_features(f, method="auto", options=base)
    assert plain.extra["tier"] == "zeroshot"
    torch.testing.assert_close(plain.probs, logits.softmax(-1), atol=1e-6, rtol=0)
    cal = engine.predict_features(f, method="auto", options={**base, "temperature": temperature, "threshold": 0.0})
    torch.testing.assert_close(cal.probs, calibrated, atol=1e-6, rtol=0)
    escalated = engine.predict_features(f, method="auto", options={**base, "temperature": temperature})
    assert escalated.extra["tier"] == "tda"
    with pytest.raises(BadRequest):
        engine.predict_features(f, method="auto", options={**base, "temperature": 0.0})


def test_drift_confidence_signals_use_the_calibrated_probability() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    embedding = torch.nn.functional.normalize(torch.ones(4), dim=0)
    plain = DriftMonitor(["a", "b", "c"], "m", 4, DriftConfig(2, 2))
    calibrated = DriftMonitor(["a", "b", "c"], "m", 4, DriftConfig(2, 2, temperature=2.0))
    for monitor in (plain, calibrated):
        monitor.observe(embedding, probs, default_labels=True)
    p = (probs.double().log() / 2.0).softmax(-1)
    assert plain.snapshot()["confidence_sum"] == pytest.approx(0.7, abs=1e-12)
    assert calibrated.snapshot()["confidence_sum"] == pytest.approx(float(p.max()), abs=1e-12)
    entropy = float(-(p * p.log()).sum() / math.log(3))
    assert calibrated.snapshot()["entropy_sum"] == pytest.approx(entropy, abs=1e-12)


def test_drift_temperature_from_the_deployment_config() -> None:
    assert DriftConfig.from_mapping({}, env={}).temperature is None
    assert DriftConfig.from_mapping({"drift_temperature": 1.5}, env={}).temperature == 1.5
    assert DriftConfig.from_mapping({"drift_temperature": 1.5}, env={"TTA_DRIFT_TEMPERATURE": "0.8"}).temperature == 0.8
    for bad in (0.0, -1.0, 1e3, True):
        with pytest.raises(ValueError):
            DriftConfig(temperature=bad)


def test_features_dir_env_override(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(offline.FEATURES_ENV, str(tmp_path))
    assert offline.features_dir() == tmp_path
    monkeypatch.setenv(offline.FEATURES_ENV, str(tmp_path / "absent"))
    assert offline.features_dir() is None


def test_methods_that_need_pixels_are_skipped_with_a_reason() -> None:
    run, skipped = offline.runnable_methods(None, {})
    assert {"zeroshot", "tda", "tfup", "tfup-t", "gda", "auto"} <= set(run)
    assert run[0] == "zeroshot" and run[-1] == "auto"  # auto's tda tier uses tda's chosen defaults
    for name in ("tpt", "zero", "difftpt", "rlcf"):
        assert name in skipped and name in skipped[name]
    _, skipped = offline.runnable_methods(["auto"], {"auto": {"tiers": "zeroshot,zero:8"}})
    assert "pixels" in skipped["auto"]


def test_grid_candidates_put_the_defaults_first() -> None:
    from tta.methods.base import get_method_class

    for name in ("tda", "tfup", "tfup-t", "gda", "auto"):
        cls = get_method_class(name)
        candidates = offline.grid_candidates(name)
        assert len(candidates) == math.prod(len(v) for v in cls.val_grid.values())
        for candidate in candidates:
            cls.Options.from_dict(candidate)  # every candidate is a valid option set
        if name != "gda":  # gda's default alpha (None: cross-validated) is a serving choice, not in the paper's grid
            assert cls.Options.from_dict(candidates[0]) == cls.Options()
    assert offline.grid_candidates("zeroshot") == [{}]


def _bundle(path, seed: int = 0) -> None:  # noqa: ANN001
    """A small synthetic bundle in the real bundles' format (float16 features, int64 labels)."""
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(C, D))
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % C
        x = text[y] + 0.8 * rng.normal(size=(n, D))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16), y.astype(np.int64)

    test, val, shots = split(60), split(30), split(4 * C)
    np.savez(path, test_features=test[0], test_labels=test[1], val_features=val[0], val_labels=val[1],
             cache_keys_16shot=shots[0], cache_labels_16shot=shots[1], text_weights=text.astype(np.float32))


def test_eval_features_cli_runs_the_protocol_and_lists_skipped_methods(tmp_path, capsys) -> None:
    from tta.cli import main

    path = tmp_path / "toy_vitb16.npz"
    _bundle(path)
    out = tmp_path / "out.json"
    rc = main(["eval", "--features", str(path), "--methods", "zeroshot,gda,tpt", "--orders", "2",
               "--json", str(out), "--csv", str(tmp_path / "out.csv"), "--no-progress", "--calibrate"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tpt" in printed and "skipped" in printed and "--drift-temperature" in printed
    body = json.loads(out.read_text())
    (report,) = body["datasets"]
    assert report["dataset"] == "toy" and set(report["skipped"]) == {"tpt"}
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"zeroshot", "gda"}
    assert rows["zeroshot"]["gain"] == 0.0 and rows["zeroshot"]["orders"] == 2
    assert rows["gda"]["feedback_ms"] > 0 and "alpha" in rows["gda"]["options"]  # chosen on val from its grid
    assert rows["gda"]["val_candidates"] == len(offline.grid_candidates("gda"))
    assert body["calibration"][0]["temperature"] > 0
    assert main(["eval", "--features", str(tmp_path / "absent.npz"), "--no-progress"]) == 2


def test_eval_features_runs_pixel_methods_under_their_feature_options_and_says_what_is_left_out(tmp_path, capsys) -> None:
    """dpe's defaults encode 64 views; on embeddings it runs with its class's `feature_options`
    (one view), and the report carries the class's note of what that omits."""
    from tta.cli import main
    from tta.methods.base import get_method_class

    path = tmp_path / "toy_vitb16.npz"
    _bundle(path)
    out = tmp_path / "out.json"
    assert main(["eval", "--features", str(path), "--methods", "zeroshot,dpe", "--orders", "1", "--no-tune",
                 "--json", str(out), "--no-progress"]) == 0
    (report,) = json.loads(out.read_text())["datasets"]
    (dpe,) = [r for r in report["results"] if r["method"] == "dpe"]
    assert dpe["options"]["n_views"] == 1 and not report["skipped"]
    assert report["notes"] == {"dpe": get_method_class("dpe").feature_options_note}
    assert "dpe          note: one view" in capsys.readouterr().out
