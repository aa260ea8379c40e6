"""Prometheus rules, the Grafana dashboard and its picture for clip-tta (README: "Monitoring drift")."""
