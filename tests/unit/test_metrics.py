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
