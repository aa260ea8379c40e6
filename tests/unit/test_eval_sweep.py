"""`tta eval --methods ...,auto --sweep`: the replayed curve's ends are the first and last tier,
the chosen threshold is run for real and written where a deployment reads it."""

from __future__ import annotations

import csv
import json

from tta.cli import main


def test_sweep_prices_thresholds_and_picks_one(tmp_path, capsys):
    out_json, out_csv, png = tmp_path / "sweep.json", tmp_path / "sweep.csv", tmp_path / "sweep.png"
    code = main(["eval", "digits", "--model", "tiny-random", "--methods", "zeroshot,tpt,auto", "--sweep",
                 "--limit", "8", "--shift", "noise", "--option", "tpt.n_views=4",
                 "--option", "auto.tiers=zeroshot,tpt:4", "--thresholds", "0,0.3,1", "--no-progress",
                 "--json", str(out_json), "--csv", str(out_csv), "--plot", str(png)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "auto gate sweep" in captured.out and "--method-defaults" in captured.out
    report = json.loads(out_json.read_text())
    by_method = {r["method"]: r for r in report["results"]}
    sweep = {r["threshold"]: r for r in report["sweep"]}
    assert sorted(sweep) == [0.0, 0.3, 1.0]
    # gate 0 answers with zero-shot, gate 1 with the last tier (same seeds as the fixed tpt run)
    assert sweep[0.0]["escalation_rate"] == 0.0 and sweep[0.0]["accuracy"] == by_method["zeroshot"]["accuracy"]
    assert sweep[1.0]["escalation_rate"] == 1.0 and sweep[1.0]["accuracy"] == by_method["tpt"]["accuracy"]
    assert sweep[0.0]["latency_ms_mean"] < sweep[1.0]["latency_ms_mean"]
    chosen = report["chosen"]["threshold"]
    assert report["options"]["auto"]["threshold"] == chosen and by_method["auto"]["threshold"] == chosen
    assert by_method["auto"]["escalation_rate"] is not None
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["method"] for r in rows] == ["zeroshot", "tpt", "auto", "auto-sweep", "auto-sweep", "auto-sweep"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_needs_auto(capsys):
    assert main(["eval", "digits", "--model", "tiny-random", "--methods", "zeroshot", "--sweep", "--limit", "2"]) == 2
    assert "add auto to --methods" in capsys.readouterr().err
