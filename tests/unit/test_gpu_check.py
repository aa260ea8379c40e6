"""bench/gpu_check.py's dry run: the GPU check's whole plan on CPU with tiny sizes, so it never rots
between the rare runs on a GPU machine (docs/gpu-check.md)."""

from __future__ import annotations

import json

from bench import gpu_check


def test_dry_run_runs_every_step_and_writes_json_and_table(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ok"] and result["env"]["dry_run"] and result["env"]["device"] == "cpu"
    steps = result["steps"]
    assert list(steps) == list(gpu_check.STEPS) and all(s["status"] == "ok" for s in steps.values())
    assert steps["cuda_tests"]["files"] == ["tests/unit/test_speedups.py"]
    parity = steps["autocast_parity"]["zeroshot_bf16"]
    assert parity["n"] == gpu_check.DRY_PLAN.photos and 0 <= parity["top1_agreement"] <= 1
    # CPU autocast is off in TPT (fp32 stays fp32): the TPT comparison is exact there
    assert steps["autocast_parity"]["tpt_bf16"]["max_prob_error"] == 0.0
    latency = steps["tpt_latency"]
    assert latency["classes"] == gpu_check.DRY_PLAN.classes and latency["fp32"]["median_ms"] > 0
    assert set(steps["zeroshot_throughput"]["batches"]) == {str(b) for b in gpu_check.DRY_PLAN.batches}
    oom = steps["oom_retry"]
    assert oom["answered"] and oom["oom_retries"] == 2 and oom["final_views"] == gpu_check.DRY_PLAN.oom_views // 4
    assert result["peak_memory_mb"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| OOM path |" in table and "TPT 20 classes x 8 views, fp32" in table and "**" not in table


def test_without_cuda_the_real_check_refuses_instead_of_timing_the_cpu(monkeypatch, capsys) -> None:
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
