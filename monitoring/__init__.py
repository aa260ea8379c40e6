"""Prometheus rules, the Grafana dashboard and its picture for clip-tta (docs/monitoring/index.md)."""
