"""Draw the dashboard's main panels from a Prometheus server's `query_range` (Grafana stand-in).

The dashboard picture (docs/img/drift-dashboard.png, shown in docs/monitoring/index.md) is drawn by the live monitoring test from the
Prometheus it ran against; regenerate it with ``make drift-dashboard``. Standalone, against any
Prometheus that scrapes clip-tta:

    python -m monitoring.plot --url http://prometheus:9090 --minutes 60 --out drift.png
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

from monitoring.rules import ALERTS, PANELS, Panel

ALERT_PANEL = "Drift alerts (Prometheus ALERTS)"


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    reply = requests.get(f"{url}/api/v1/query_range", timeout=30,
                         params={"query": expr, "start": start, "end": end, "step": step}).json()
    if reply.get("status") != "success":
        raise RuntimeError(f"{expr}: {reply.get('error')}")
    return reply["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def draw(url: str, start: float, end: float, out: Path, step: float = 1.0,
         marks: Sequence[tuple[float, str]] = (), panels: Sequence[Panel] | None = None) -> Path:
    """PNG of the main panels (+ drift alert states) over [start, end]; `marks` are labelled vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = list(panels) if panels is not None else [p for p in PANELS if p.main]
    cells = len(chosen) + 1
    cols = 2
    rows = math.ceil(cells / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.2 * rows), sharex=True, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, panel in zip(flat, chosen, strict=False):
        draw_panel(ax, url, panel, start, end, step)
    draw_alerts(flat[len(chosen)], url, start, end, step)
    for extra in flat[cells:]:
        extra.set_visible(False)
    for ax in flat[:cells]:
        for at, text in marks:
            ax.axvline(at - start, color="grey", linestyle=":", linewidth=1)
            ax.text(at - start, ax.get_ylim()[1], f" {text}", fontsize=7, va="top", color="grey")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("seconds")
    fig.suptitle("clip-tta: latency and drift (live Prometheus data)", fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def draw_panel(ax: Any, url: str, panel: Panel, start: float, end: float, step: float) -> None:
    for expr, template in panel.targets:
        for series in query_range(url, expr, start, end, step):
            xs = [float(t) - start for t, _ in series["values"]]
            ys = [float(v) for _, v in series["values"]]
            ax.plot(xs, ys, label=legend(template, series["metric"]), linewidth=1.4)
    if panel.threshold is not None:
        ax.axhline(panel.threshold, color="red", linestyle="--", linewidth=1, label=f"alert > {panel.threshold:g}")
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.unit if panel.unit != "short" else "")


def draw_alerts(ax: Any, url: str, start: float, end: float, step: float) -> None:
    """One row per drift alert: orange while pending, red while firing (Prometheus's ALERTS series)."""
    names = [a.name for a in ALERTS if a.drift]
    for i, name in enumerate(names):
        for state, color in (("pending", "orange"), ("firing", "red")):
            for series in query_range(url, f'max(ALERTS{{alertname="{name}", alertstate="{state}"}})', start, end, step):
                xs = [float(t) - start for t, _ in series["values"]]
                ax.scatter(xs, [i] * len(xs), s=8, color=color, label=state if i == 0 else None)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(-0.5, len(names) - 0.5)
    ax.set_title(ALERT_PANEL, fontsize=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="Prometheus base URL")
    parser.add_argument("--minutes", type=float, default=60.0, help="time range ending now")
    parser.add_argument("--step", type=float, default=15.0, help="query_range step in seconds")
    parser.add_argument("--out", type=Path, default=Path("drift-dashboard.png"))
    args = parser.parse_args(argv)
    end = time.time()
    print(draw(args.url, end - 60 * args.minutes, end, args.out, step=args.step))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
