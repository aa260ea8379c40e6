"""The alerting rules with the real `promtool`: syntax, unit tests of every alert firing and not
firing, and the generated Prometheus/Kubernetes/Grafana files agreeing with monitoring/rules.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from monitoring import rules
from tests.prometheus import binary

RULES_DIR = rules.RULES_FILE.parent
UNIT_TESTS = RULES_DIR / "clip-tta-rules.test.yml"


def test_generated_files_are_current() -> None:
    assert rules.main(["--check"]) == 0, "run: uv run python -m monitoring.rules"


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run([binary("promtool"), "check", "rules", str(rules.RULES_FILE)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules.RECORDING) + len(rules.ALERTS)} rules found" in out.stdout


def test_promtool_unit_tests_cover_every_alert_firing_and_not_firing() -> None:
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired, quiet = set(), set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {a.name for a in rules.ALERTS}
    assert fired == names and quiet == names
    out = subprocess.run([binary("promtool"), "test", "rules", str(UNIT_TESTS)], capture_output=True, text=True,
                         timeout=120, cwd=RULES_DIR)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_rule_holds_the_same_groups() -> None:
    plain = yaml.safe_load(rules.RULES_FILE.read_text())
    operator = yaml.safe_load(rules.PROMETHEUS_RULE.read_text())
    assert operator["kind"] == "PrometheusRule" and operator["spec"] == plain


def test_alerts_are_documented_and_carry_their_value() -> None:
    def anchors(page: str) -> set[str]:  # heading ids as MkDocs' toc extension makes them
        text = (rules.REPO / page).read_text()
        return {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}

    for group in rules.render_rules()["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            notes = rule["annotations"]
            assert notes["summary"] and "$value" in notes["description"], rule["alert"]
            page, anchor = notes["runbook_url"].split("#")
            assert anchor in anchors(page), f"{page} has no runbook for {rule['alert']}"


def test_expressions_use_only_exported_metrics() -> None:
    from tta.metrics import ServingMetrics

    families = {m.name for m in ServingMetrics().registry.collect()}
    series = {f"{name}{suffix}" for name in families for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    dashboard = json.loads(rules.DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]] + list(rules.RECORDING.values())
    used = {name for expr in exprs for name in re.findall(r"\b(tta_[a-z_]+)", expr)}
    assert used and used <= series, used - series
    recorded = {name for expr in exprs for name in re.findall(r"\b(tta:[a-z0-9_:]+)", expr)}
    assert recorded <= set(rules.RECORDING)


def test_kustomize_ships_the_rules_and_the_dashboard() -> None:
    """Both overlays render the generated PrometheusRule and dashboard (the monitoring component)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (kustomize) not installed")
    for overlay in ("gpu", "cpu"):
        rendered = subprocess.run([kubectl, "kustomize", str(rules.REPO / "k8s" / "overlays" / overlay)], check=True,
                                  capture_output=True, text=True, timeout=120).stdout
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
        assert rule["spec"] == rules.render_rules()
        [dashboard] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard")]
        assert json.loads(dashboard["data"]["clip-tta-drift.json"]) == rules.render_dashboard()
