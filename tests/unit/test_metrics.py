"""ServingMetrics instruments that need no server: bounded labels, exposition names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tta.metrics import FALLBACK_REASONS, ServingMetrics, fallback_reason, sample_values


def test_fallback_reasons_are_a_fixed_set() -> None:
    metrics = ServingMetrics(CollectorRegistry())
    for reason in ("deadline_exceeded", "state_unavailable", "gda has no support examples yet; zero-shot", "x" * 500):
        metrics.observe_fallback("m", "gda", reason)
    text = metrics.render().decode()
    seen = {r: sum(sample_values(text, "tta_fallbacks_total", {"reason": r})) for r in FALLBACK_REASONS}
    assert seen["deadline"] == 1 and seen["state_unavailable"] == 1 and seen["other"] == 2
    assert fallback_reason("numerical") == "numerical"
    assert sum(seen.values()) == 4  # every observation landed on a known label value


def test_drift_gauges_show_the_freshest_live_worker(tmp_path) -> None:
    """Worker processes in multiprocess mode: the exporter shows the latest window of a live worker;
    a worker that exited (TorchServe restarts crashed ones) is dropped, not shown, not summed."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from prometheus_client.exposition import generate_latest

    from tta.metrics import LiveMultiProcessCollector

    worker = textwrap.dedent("""
        import importlib.util, sys, types
        spec = importlib.util.spec_from_file_location("tta_metrics", sys.argv[2])
        metrics = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(metrics)
        m = metrics.ServingMetrics()
        fields = dict(reference_ready=True, reference_samples=8, window_samples=4, sample_distance=None,
                      embedding_shift=float(sys.argv[1]), embedding_shift_expected=0.01, class_divergence=None,
                      class_divergence_expected=None, entropy_shift=None, confidence_shift=None)
        m.observe_drift("clip", types.SimpleNamespace(**fields))
        print("written", flush=True)
        sys.stdin.read()  # stay alive until the test closes stdin
    """)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    source = str(Path(__file__).resolve().parents[2] / "tta" / "metrics.py")

    def shown() -> list[float]:
        registry = CollectorRegistry()
        LiveMultiProcessCollector(registry, path=str(tmp_path))
        return list(sample_values(generate_latest(registry).decode(), "tta_drift_embedding_shift", {"model": "clip"}))

    live = subprocess.Popen([sys.executable, "-c", worker, "0.02", source], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert live.stdout.readline().strip() == "written"
        # a worker that writes later and then dies: most recent, but gone
        subprocess.run([sys.executable, "-c", worker, "0.5", source], env=env, check=True, timeout=120, input="")
        assert shown() == [0.02]
        registry = CollectorRegistry()
        LiveMultiProcessCollector(registry, path=str(tmp_path))
        [divergence] = sample_values(generate_latest(registry).decode(), "tta_drift_class_divergence", {"model": "clip"})
        assert divergence != divergence  # NaN (not measurable), never a made-up 0
    finally:
        live.communicate(input="", timeout=60)
    assert shown() == []  # every worker gone: no stale drift reading
