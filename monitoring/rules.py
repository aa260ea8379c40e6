"""One source for clip-tta's alerting: recording rules, alerts, and the Grafana dashboard.

Everything Prometheus or Grafana reads is generated from the tables below, so thresholds drawn
on the dashboard are the thresholds that alert, and the Prometheus rules file and the Kubernetes
PrometheusRule cannot disagree:

    python -m monitoring.rules            # (re)write the generated files
    python -m monitoring.rules --check    # fail if a generated file is stale (the tests run this)

Generated: monitoring/prometheus/clip-tta-rules.yml (plain Prometheus `rule_files`),
k8s/components/monitoring/prometheusrule.yaml (Prometheus Operator),
k8s/components/monitoring/dashboards/clip-tta-drift.json (Grafana sidecar ConfigMap) and the
promtool unit tests monitoring/prometheus/clip-tta-rules.test.yml (cases in monitoring/rule_tests.py).

Override for tests and staging: `render_rules(for_override="5s")` (CLI: ``--for 5s --out FILE``)
shortens every alert's ``for:`` and changes nothing else; the drift windows themselves are
server-side sizes (``tta archive --drift-window/--drift-reference-size``), not range selectors,
so no expression has to be edited to make drift visible quickly.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RULES_FILE = REPO / "monitoring" / "prometheus" / "clip-tta-rules.yml"
PROMETHEUS_RULE = REPO / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"
DASHBOARD = REPO / "k8s" / "components" / "monitoring" / "dashboards" / "clip-tta-drift.json"
RUNBOOK = "docs/monitoring/alerts.md#runbook-"  # + alert name in lower case: the runbook headings of that page

# Methods answered from a cache or a closed form (one encoder pass); the rest run many views/steps.
LIGHT_METHODS = "zeroshot|tda|tfup|gda"

# Labelled answers (tta_labelled_answers_total, labels clients send later by answer id): a sign
# test on the discordant pairs of a sliding window. Gains G: served right, zero-shot wrong; losses
# L: zero-shot right, served wrong (pairs where both agree say nothing about the difference). If
# the served answers are no worse than zero-shot, a discordant pair is a loss with probability at
# most 1/2, so L ~ Binomial(G + L, 1/2) at worst. The alert is the one-sided test in its
# continuity-corrected normal form, z = (L - G - 1) / sqrt(G + L) > Z, once G + L >= MIN_PAIRS
# (McNemar's test, one-sided). bench/labelled_alert.py measures what this rule, evaluated every
# minute over the sliding window with its `for:`, fires on streams where served == zero-shot.
# z 3.72: one-sided alpha 1e-4 per look; 3.09 (1e-3) fired ~0.3 times a month per method on null streams.
LABELLED = {"window": "6h", "min_pairs": 30, "z": 3.72, "for": "30m"}
_W = LABELLED["window"]
_ANSWERS = "tta_labelled_answers_total"

# --------------------------------------------------------------------------------------------
# Recording rules: every alert compares one of these with a threshold, so the live test can check
# that each signal exists (returns series) on real scraped data, apart from whether it fires.
# --------------------------------------------------------------------------------------------
RECORDING: dict[str, str] = {
    "tta:latency_seconds:p95_5m":
        'histogram_quantile(0.95, sum by (model, method, le) (rate(tta_stage_duration_seconds_bucket{stage="total"}[5m])))',
    "tta:requests:rate5m":
        "sum by (model, method, outcome) (rate(tta_requests_total[5m]))",
    "tta:requests:rate15m":
        "sum by (model) (rate(tta_requests_total[15m]))",
    "tta:server_errors:ratio_5m":
        '(sum by (model) (rate(tta_requests_total{outcome="server_error"}[5m]))'
        " or 0 * sum by (model) (rate(tta_requests_total[5m])))"
        " / sum by (model) (rate(tta_requests_total[5m]))",
    "tta:fallbacks:ratio_5m":
        "(sum by (model, method) (rate(tta_fallbacks_total[5m]))"
        " or 0 * sum by (model, method) (rate(tta_requests_total[5m])))"
        ' / sum by (model, method) (rate(tta_requests_total{outcome!="client_error"}[5m]))',
    "tta:state_unavailable:rate5m":
        "sum by (model, method) (rate(tta_state_unavailable_total[5m]))"
        " or 0 * sum by (model, method) (rate(tta_requests_total[5m]))",
    "tta:state_rejected:increase15m":  # refusals that did not answer a client (imports answer 400 instead)
        'sum by (model, method, source) (increase(tta_state_rejected_total{source=~"log|snapshot|request"}[15m]))',
    "tta:drift_embedding_shift:excess":
        "max by (model) (tta_drift_embedding_shift - tta_drift_embedding_shift_expected)",
    "tta:drift_class_divergence:excess":
        "max by (model) (tta_drift_class_divergence - tta_drift_class_divergence_expected)",
    "tta:drift_entropy_shift:max_abs":
        "max by (model) (abs(tta_drift_entropy_shift))",
    "tta:adaptation_changed:ratio_15m":
        "sum by (model, method) (rate(tta_adaptation_changed_total[15m]))"
        ' / sum by (model, method) (rate(tta_requests_total{outcome=~"ok|fallback"}[15m]))',
    # labelled answers: counts over the window, the accuracy difference, the sign-test statistic
    f"tta:labelled_answers:increase{_W}": f"sum by (model, method) (increase({_ANSWERS}[{_W}]))",
    f"tta:labelled_gains:increase{_W}":
        f'sum by (model, method) (increase({_ANSWERS}{{zeroshot_correct="false",served_correct="true"}}[{_W}]))',
    f"tta:labelled_losses:increase{_W}":
        f'sum by (model, method) (increase({_ANSWERS}{{zeroshot_correct="true",served_correct="false"}}[{_W}]))',
    f"tta:labelled_gain:ratio_{_W}":  # served accuracy minus zero-shot accuracy on the same answers
        f"(tta:labelled_gains:increase{_W} - tta:labelled_losses:increase{_W}) / tta:labelled_answers:increase{_W}",
    f"tta:labelled_losses:sign_z_{_W}":
        f"(tta:labelled_losses:increase{_W} - tta:labelled_gains:increase{_W} - 1)"
        f" / sqrt(tta:labelled_losses:increase{_W} + tta:labelled_gains:increase{_W})",
}


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    duration: str  # the rule's `for:`
    severity: str
    summary: str
    description: str
    drift: bool = False  # one of the input-drift alerts the live test drives to firing
    threshold: float | None = None  # drawn on the dashboard panel of the same signal
    runbook: str = ""  # what the on-call does (Markdown); docs/monitoring/alerts.md shows it (scripts/gen_docs.py)


THRESHOLDS = {
    "latency_light_s": 1.0, "latency_heavy_s": 15.0, "server_errors": 0.05, "fallbacks": 0.2,
    "embedding_excess": 0.05, "class_excess": 0.1, "entropy_abs": 0.1, "changed": 0.3,
    "labelled_z": LABELLED["z"],
}
T = THRESHOLDS

ALERTS: tuple[Alert, ...] = (
    Alert("TTALatencyP95High",
          f'tta:latency_seconds:p95_5m{{method=~"{LIGHT_METHODS}"}} > {T["latency_light_s"]}'
          f' or tta:latency_seconds:p95_5m{{method!~"{LIGHT_METHODS}"}} > {T["latency_heavy_s"]}',
          "10m", "warning",
          "p95 latency of {{ $labels.method }} on {{ $labels.model }} is high",
          "p95 of whole requests over 5 minutes is {{ $value | humanizeDuration }} for method {{ $labels.method }} "
          f"(thresholds: {T['latency_light_s']:g} s for {LIGHT_METHODS.replace('|', '/')}, "
          f"{T['latency_heavy_s']:g} s for multi-view methods).",
          runbook=(
              "Open the \"Stage latency\" panel: which stage grew? `encode`/`augment` on a heavy method: lower "
              "`n_views` in `--method-defaults` or move the method to GPU; `text`: requests bring new label sets "
              "(cache misses); TorchServe queue wait high: add workers/replicas (HPA) or lower `batchSize` "
              "delay. Check CPU throttling of the pod.")),
    Alert("TTAServerErrors", f"tta:server_errors:ratio_5m > {T['server_errors']}", "5m", "critical",
          "{{ $labels.model }} answers {{ $value | humanizePercentage }} of requests with a server error",
          "{{ $value | humanizePercentage }} of requests to {{ $labels.model }} failed with 5xx over 5 minutes "
          f"(threshold {T['server_errors']:.0%}).", threshold=T["server_errors"],
          runbook=(
              "Read the worker log (`logs/model_log.log`, `request ... failed unexpectedly`); 503 with "
              "`unavailable`: see TTAStreamStateUnavailable; worker crashes: \"Worker (re)starts\" panel, OOM kills "
              "in `kubectl describe pod`. Roll back the last rollout if it started with it.")),
    Alert("TTAFallbacksHigh", f"tta:fallbacks:ratio_5m > {T['fallbacks']}", "15m", "warning",
          "{{ $labels.method }} on {{ $labels.model }} falls back on {{ $value | humanizePercentage }} of answers",
          "{{ $value | humanizePercentage }} of {{ $labels.method }} answers over 5 minutes took a fallback path "
          "(deadline, state unavailable, numerical, over budget; see tta_fallbacks_total by reason; "
          f"threshold {T['fallbacks']:.0%}).", threshold=T["fallbacks"],
          runbook=(
              "`sum by (reason) (rate(tta_fallbacks_total[5m]))` says why: `deadline`/`over_budget` - the "
              "deployment is too slow for its budget (scale out, fewer views); `state_unavailable` - see "
              "TTAStreamStateUnavailable; `numerical` - look for NaN inputs or a bad state import; `state_invalid` - "
              "a stream method failed on its state (worker log: `raised while answering from its stream state`; "
              "export the state, reset it, file a bug with the export); `other` - "
              "cold caches (GDA without feedback) or requests with foreign label sets on stream methods.")),
    Alert("TTAStreamStateUnavailable", "tta:state_unavailable:rate5m > 0", "2m", "critical",
          "stream state of {{ $labels.method }} on {{ $labels.model }} is unreachable",
          "{{ $value | humanize }} requests/s of {{ $labels.method }} could not reach their stream state over "
          "5 minutes (refused with 503, or answered zero-shot).",
          runbook=(
              "The stream state backend is unreachable or another worker owns the state: check Redis "
              "(`persistence.last_error` in the state answer; answers meanwhile come from each replica's last "
              "known state and their operations are queued) or the state directory's volume (writable, not "
              "full); with several workers and no state URL, give the deployment a Redis URL (`TTA_STATE_URL`) "
              "or run one worker. `{\"action\": \"state\", \"method\": M}` shows the persistence mode and warnings.")),
    Alert("TTAStreamStateRejected", "tta:state_rejected:increase15m > 0", "0m", "warning",
          "{{ $labels.method }} state on {{ $labels.model }} refused invalid content ({{ $labels.source }})",
          "{{ $value | humanize }} {{ $labels.source }} item(s) of {{ $labels.method }} failed stream-state validation "
          "over 15 minutes and were skipped (log entries, this replica's own operations) or refused (snapshots); "
          "the state is unchanged by each. The worker log names the entry and the field and rule.",
          runbook=(
              "Something failed stream-state validation and was kept out: the state is unchanged by it. The "
              "worker log names it (`log entry <id> refused: <field>: <rule>`, `snapshot <path or key> refused`). "
              "`source=\"log\"`: an operation in the Redis log that no replica applies (written by a different "
              "build or by hand: compare the replicas' versions; read it with `XRANGE <key>:log <id> <id>`). "
              "`source=\"snapshot\"`: a snapshot file or the Redis snapshot was refused at start and kept for "
              "inspection (`<file>.rejected`, or the `:rejected` Redis hash); that replica started empty (file) "
              "or from the log after the snapshot (Redis), so it may now differ from the others: import a known "
              "good export, or reset. `source=\"request\"`: this replica produced an operation it refused itself "
              "(non-finite features: check the model and its inputs). Rules and recovery: the state page, "
              "\"Validation\".")),
    Alert("TTANoTraffic", "tta:requests:rate15m == 0", "15m", "warning",
          "{{ $labels.model }} received no requests for 30 minutes",
          "No request reached {{ $labels.model }} over the last 15 minutes, for 15 minutes "
          "(current rate {{ $value | humanize }} requests/s).",
          runbook=(
              "Check the route to the service (Ingress, NetworkPolicy, token), the clients, and `up` of both "
              "scrape targets. If the deployment is legitimately idle, silence the alert for that model.")),
    Alert("TTAEmbeddingDrift", f"tta:drift_embedding_shift:excess > {T['embedding_excess']}", "15m", "warning",
          "image embeddings sent to {{ $labels.model }} drifted from the reference",
          "The sliding window's mean image embedding is {{ $value | humanize }} (cosine distance, beyond the "
          f"sampling noise) away from the drift reference (threshold {T['embedding_excess']}).",
          drift=True, threshold=T["embedding_excess"],
          runbook=(
              "The images themselves changed (camera, resolution, compression, a new client). Compare recent "
              "inputs with old ones; check the class-mix and confidence panels: if accuracy-relevant signals moved "
              "too, consider a stream method (TDA/TFUP) or retraining prompts. If the change is deliberate and "
              "the new input is correct, re-capture: `{\"action\": \"reset\", \"method\": \"drift\"}`.")),
    Alert("TTAClassMixDrift", f"tta:drift_class_divergence:excess > {T['class_excess']}", "15m", "warning",
          "the predicted-class mix of {{ $labels.model }} drifted from the reference",
          "Jensen-Shannon divergence between the window's and the reference's zero-shot class histograms is "
          f"{{{{ $value | humanize }}}} bits beyond the sampling noise (threshold {T['class_excess']}).",
          drift=True, threshold=T["class_excess"],
          runbook=(
              "The predicted classes changed share. Either the world changed (seasonality, a new client: fine, "
              "re-capture the reference) or the model is mislabelling shifted images into a few classes (check "
              "the confidence panel and a sample of requests). After changing the label set, always reset the "
              "reference.")),
    Alert("TTAConfidenceDrift", f"tta:drift_entropy_shift:max_abs > {T['entropy_abs']}", "15m", "warning",
          "zero-shot confidence on {{ $labels.model }} shifted",
          "Mean zero-shot entropy / log(#classes) of the window differs from the reference's by "
          f"{{{{ $value | humanize }}}} (threshold {T['entropy_abs']}); see tta_drift_entropy_shift for the sign.",
          drift=True, threshold=T["entropy_abs"],
          runbook=(
              "Zero-shot is less (or more) sure than on the reference: usually degraded inputs (blur, noise, "
              "crops) or out-of-label-set images. Sample requests; for a lasting shift enable an adaptive method; "
              "after a deliberate change, reset the reference.")),
    Alert("TTAAdaptationChangesManyAnswers", f"tta:adaptation_changed:ratio_15m > {T['changed']}", "30m", "warning",
          "{{ $labels.method }} changes {{ $value | humanizePercentage }} of zero-shot answers on {{ $labels.model }}",
          "Test-time adaptation ({{ $labels.method }}) overrode the zero-shot answer on {{ $value | humanizePercentage }} "
          f"of requests over 15 minutes (threshold {T['changed']:.0%}).", threshold=T["changed"],
          runbook=(
              "Adaptation now overrides zero-shot often: inspect the method's state (`{\"action\": \"state\"}`: a "
              "cache full of one class means it was poisoned by a one-sided stream) and reset it; compare with the "
              "drift panels: with drift, the overrides may be right - check accuracy on labelled feedback.")),
    Alert("TTAAdaptationWorseThanZeroShot",
          f"tta:labelled_losses:sign_z_{_W} > {LABELLED['z']}"
          f" and (tta:labelled_gains:increase{_W} + tta:labelled_losses:increase{_W}) >= {LABELLED['min_pairs']}",
          LABELLED["for"], "warning",
          "{{ $labels.method }} answers are worse than zero-shot on labelled answers of {{ $labels.model }}",
          f"Over the last {_W} of labels sent for earlier answers, {{{{ $labels.method }}}} got more answers wrong "
          "that zero-shot got right than the reverse: sign-test z = {{ $value | humanize }} "
          f"> {LABELLED['z']} (one-sided, alpha 1e-4 per evaluation) on at least {LABELLED['min_pairs']} "
          "discordant pairs; see the panel \"Adaptation gain on labelled answers\".",
          threshold=T["labelled_z"],
          runbook=(
              "On the labels clients sent back over the window, the method broke significantly more right zero-shot "
              "answers than it fixed (the rule and its false-alarm rate: [Labelled answers](labelled-answers.md)).\n\n"
              "1. Confirm on the panel \"Adaptation gain on labelled answers\" and check how many discordant pairs "
              "the test saw (`tta:labelled_gains:increase6h`, `tta:labelled_losses:increase6h`); one replica or all "
              "(`sum by (pod)` of `tta_labelled_answers_total`).\n"
              "2. Stop the harm: send traffic to `zeroshot` or make it the default method; for a stream method "
              "inspect its state (`{\"action\": \"state\"}`; a cache or support set dominated by one class means a "
              "one-sided stream or poisoned feedback), `export` it for later study, then `reset` it.\n"
              "3. Find the cause: drift alerts or a changed class mix (the input moved away from what the method "
              "adapted to); for GDA, wrong labels sent as feedback; a changed `method_defaults`.\n"
              "4. Check the labels: a client that labels only some kinds of answers biases the comparison.\n\n"
              "The alert clears once the window no longer holds the bad pairs; no counter needs resetting.")),
)


def render_rules(for_override: str | None = None) -> dict[str, Any]:
    """The Prometheus rule groups; `for_override` replaces every alert's `for:` (tests, staging)."""
    alerts = []
    for alert in ALERTS:
        annotations = {"summary": alert.summary, "description": alert.description,
                       "runbook_url": RUNBOOK + alert.name.lower()}
        alerts.append({"alert": alert.name, "expr": alert.expr, "for": for_override or alert.duration,
                       "labels": {"severity": alert.severity, "component": "clip-tta"},
                       "annotations": annotations})
    return {"groups": [
        {"name": "clip-tta.signals", "rules": [{"record": name, "expr": expr} for name, expr in RECORDING.items()]},
        {"name": "clip-tta.alerts", "rules": alerts},
    ]}


def render_prometheus_rule() -> dict[str, Any]:
    """The same groups as a Prometheus Operator PrometheusRule (selected by the release label)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "clip-tta", "labels": {"release": "kube-prometheus-stack"}},
        "spec": render_rules(),
    }


# --------------------------------------------------------------------------------------------
# Dashboard
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[tuple[str, str], ...]  # (expr, legend)
    unit: str = "short"
    threshold: float | None = None
    main: bool = False  # drawn in the dashboard picture (docs/img/drift-dashboard.png)


PANELS: tuple[Panel, ...] = (
    Panel("Latency p50 / p95 (whole request) by method", (
        ('histogram_quantile(0.5, sum by (method, le) (rate(tta_stage_duration_seconds_bucket{stage="total"}[5m])))',
         "p50 {{method}}"),
        ('histogram_quantile(0.95, sum by (method, le) (rate(tta_stage_duration_seconds_bucket{stage="total"}[5m])))',
         "p95 {{method}}"),
    ), unit="s", main=True),
    Panel("Stage latency p50 / p95", (
        ('histogram_quantile(0.5, sum by (stage, le) (rate(tta_stage_duration_seconds_bucket{stage!="total"}[5m])))',
         "p50 {{stage}}"),
        ('histogram_quantile(0.95, sum by (stage, le) (rate(tta_stage_duration_seconds_bucket{stage!="total"}[5m])))',
         "p95 {{stage}}"),
    ), unit="s"),
    Panel("Requests by method and outcome", (
        ("sum by (method, outcome) (tta:requests:rate5m)", "{{method}} {{outcome}}"),
    ), unit="reqps", main=True),
    Panel("Server errors and fallbacks (share of answers)", (
        ("tta:server_errors:ratio_5m", "server errors {{model}}"),
        ("tta:fallbacks:ratio_5m", "fallbacks {{method}}"),
        ("sum by (reason) (rate(tta_fallbacks_total[5m]))", "fallbacks/s {{reason}}"),
    ), unit="percentunit", threshold=T["fallbacks"]),
    Panel("Embedding shift beyond sampling noise (cosine distance)", (
        ("tta:drift_embedding_shift:excess", "excess {{model}}"),
        ("max by (model) (tta_drift_embedding_shift)", "raw {{model}}"),
    ), threshold=T["embedding_excess"], main=True),
    Panel("Class-mix divergence beyond sampling noise (JS, bits)", (
        ("tta:drift_class_divergence:excess", "excess {{model}}"),
        ("max by (model) (tta_drift_class_divergence)", "raw {{model}}"),
    ), threshold=T["class_excess"], main=True),
    Panel("Zero-shot entropy / confidence shift (window vs reference)", (
        ("max by (model) (tta_drift_entropy_shift)", "entropy shift {{model}}"),
        ("max by (model) (tta_drift_confidence_shift)", "confidence drop {{model}}"),
    ), threshold=T["entropy_abs"], main=True),
    Panel("Answers changed by adaptation", (
        ("tta:adaptation_changed:ratio_15m", "{{method}}"),
    ), unit="percentunit", threshold=T["changed"]),
    Panel(f"Adaptation gain on labelled answers (served minus zero-shot accuracy, {_W})", (
        (f"tta:labelled_gain:ratio_{_W}", "{{method}} {{model}}"),
    ), unit="percentunit"),
    Panel(f"Labelled answers: discordant pairs and the worse-than-zero-shot test ({_W})", (
        (f"tta:labelled_gains:increase{_W}", "served right, zero-shot wrong {{method}}"),
        (f"tta:labelled_losses:increase{_W}", "zero-shot right, served wrong {{method}}"),
        (f"tta:labelled_losses:sign_z_{_W}", "sign-test z {{method}} (alert above the line)"),
    ), threshold=T["labelled_z"]),
    Panel("Drift reference and window fill (images)", (
        ("max by (model) (tta_drift_reference_samples)", "reference {{model}}"),
        ("max by (model) (tta_drift_window_samples)", "window {{model}}"),
    )),
    Panel("Stream state cache fill (entries)", (
        ("max by (method) (tta_stream_state_entries)", "{{method}}"),
    )),
    Panel("TorchServe mean queue wait", (
        ("sum by (model_name) (rate(ts_queue_latency_microseconds[5m])) / 1e6"
         " / sum by (model_name) (rate(ts_inference_requests_total[5m]))", "{{model_name}}"),
    ), unit="s"),
    Panel("Worker (re)starts", (
        ("sum by (model) (increase(tta_worker_starts_total[1h]))", "{{model}} last hour"),
    )),
)


def render_dashboard() -> dict[str, Any]:
    panels = []
    for i, panel in enumerate(PANELS):
        defaults: dict[str, Any] = {"unit": panel.unit}
        if panel.threshold is not None:  # the alert threshold as a red line
            defaults["thresholds"] = {"mode": "absolute", "steps": [
                {"color": "green", "value": None}, {"color": "red", "value": panel.threshold}]}
            defaults["custom"] = {"thresholdsStyle": {"mode": "line+area"}}
        panels.append({
            "id": i + 1, "type": "timeseries", "title": panel.title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
                        for j, (expr, legend) in enumerate(panel.targets)],
        })
    return {
        "title": "clip-tta: latency and drift", "uid": "clip-tta-drift", "schemaVersion": 39, "version": 2,
        "tags": ["clip-tta", "drift"], "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


HEADER = "# Generated by `python -m monitoring.rules` from monitoring/rules.py: edit that, not this file.\n"


def dump(data: dict[str, Any]) -> str:
    """A generated YAML file's text: the header, then `data` in the tables' order."""
    return HEADER + yaml.safe_dump(data, sort_keys=False, width=200)


def generated() -> dict[Path, str]:
    """Every generated file and its exact content (the promtool unit tests included)."""
    from monitoring import rule_tests

    return {
        RULES_FILE: dump(render_rules()),
        PROMETHEUS_RULE: dump(render_prometheus_rule()),
        DASHBOARD: json.dumps(render_dashboard(), indent=2) + "\n",
        rule_tests.TESTS_FILE: rule_tests.render(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.rules", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file differs")
    parser.add_argument("--for", dest="for_override", help="write the rules with every `for:` set to this")
    parser.add_argument("--out", type=Path, help="with --for: where to write those rules")
    args = parser.parse_args(argv)
    if args.for_override:
        out = args.out or Path("clip-tta-rules.yml")
        out.write_text(dump(render_rules(args.for_override)))
        print(out)
        return 0
    stale = []
    for path, text in generated().items():
        if path.is_file() and path.read_text() == text:
            continue
        if args.check:
            stale.append(str(path.relative_to(REPO)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print(f"stale (run python -m monitoring.rules): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
