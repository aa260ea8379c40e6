"""Prometheus rules, the Grafana dashboard and its picture for clip-tta (see monitoring/README.md)."""
