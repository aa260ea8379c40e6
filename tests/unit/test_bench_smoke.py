"""The bench at its smallest size (tiny-random, 10 classes, 4 views, in-process): seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import run as bench  # noqa: E402

FIELDS = {"method", "impl", "model", "n_classes", "n_views", "device", "latency_s_median", "peak_rss_mb",
          "top1_agrees_with_baseline"}


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_bench_writes_the_table_and_records(tmp_path, capsys):
    out = tmp_path / "latest.json"
    assert bench.main(["--quick", "--no-onnx", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "x faster" in table and "tpt" in table and "baseline" in table
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] and report["machine"]["model"] == "tiny-random"
    records = {(r["method"], r["impl"]): r for r in report["records"]}
    assert {("zeroshot", "ours"), ("zero", "ours"), ("tpt", "baseline"), ("tpt", "ours")} <= set(records)
    for record in records.values():
        assert FIELDS <= set(record) and record["status"] == "ok"
        assert record["latency_s_median"] > 0 and record["peak_rss_mb"] > 0
        assert "probs" not in record
    # ours predicts what the straightforward TPT predicts, on the same photo and views
    assert records[("tpt", "ours")]["top1_agrees_with_baseline"] is True
    assert records[("tpt", "ours")]["max_prob_diff_vs_baseline"] < 1e-4
    whats = {r["what"] for r in report["ratios"]}
    assert "tpt ours vs baseline" in whats and "zero ours / zeroshot" in whats


def test_full_plan_covers_the_issue_grid():
    args = bench.parse_args([])
    configs = bench.plan(args, ["zeroshot", "zero", "tpt", "tda"])
    keys = {c.key for c in configs}
    for c in (10, 100, 300, 1000):
        assert ("zeroshot", "ours", c, 1) in keys
        for v in (16, 64):
            assert ("tpt", "ours", c, v) in keys and ("zero", "ours", c, v) in keys
            assert (("tpt", "baseline", c, v) in keys) == (c <= 300)
