"""How often TTAAdaptationWorseThanZeroShot fires when it should not, and how soon when it should.

The alert (monitoring/rules.py, `LABELLED`) is a one-sided sign test on the discordant pairs of a
sliding window: z = (L - G - 1) / sqrt(G + L) > Z with G + L >= MIN_PAIRS, evaluated every minute,
firing after `for:`. Its per-look false-alarm probability is a binomial tail; Prometheus looks
every minute at overlapping windows, so the rate that matters is false alarms per day. Both are
computed here, for the rule exactly as configured:

1. exact: the largest per-look probability P(z > Z) under L ~ Binomial(n, 1/2), over every pair
   count n >= MIN_PAIRS up to `--max-n` (the worst case of "served no worse than zero-shot");
2. simulated: discordant pairs arriving as a Poisson stream at several rates, each a loss with
   probability p (0.5: served exactly as good as zero-shot, the worst case of no harm; above 0.5:
   served worse), minute counts summed over the sliding window, the rule evaluated every minute
   with its `for:`; alarms counted as episodes (a firing alert that stays firing counts once).

    uv run python -m bench.labelled_alert            # writes bench/results/labelled_alert.json

Seeded (numpy's PCG64), numpy only; about a minute on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from monitoring.rules import LABELLED

OUT = Path(__file__).resolve().parent / "results" / "labelled_alert.json"


def minutes(duration: str) -> int:
    """A Prometheus duration such as 6h or 30m, in whole minutes."""
    match = re.fullmatch(r"(\d+)([mhd])", duration)
    if match is None:
        raise ValueError(f"unsupported duration {duration!r}")
    return int(match.group(1)) * {"m": 1, "h": 60, "d": 1440}[match.group(2)]


def fires(losses: np.ndarray, gains: np.ndarray, z: float, min_pairs: int) -> np.ndarray:
    """The alert's condition on window counts (no extrapolation: the counts themselves)."""
    n = losses + gains
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = (losses - gains - 1) / np.sqrt(n)
    return (n >= min_pairs) & (stat > z)


def exact_per_look(z: float, min_pairs: int, max_n: int) -> dict[str, Any]:
    """max over n of P(z > Z) when L ~ Binomial(n, 1/2): the per-evaluation false-alarm bound."""
    from math import lgamma

    worst, worst_n = 0.0, min_pairs
    for n in range(min_pairs, max_n + 1):
        # z > Z  <=>  2L - n - 1 > Z sqrt(n)  <=>  L > (n + 1 + Z sqrt(n)) / 2
        threshold = math.floor((n + 1 + z * math.sqrt(n)) / 2) + 1
        if threshold > n:
            continue
        logs = [lgamma(n + 1) - lgamma(k + 1) - lgamma(n - k + 1) - n * math.log(2) for k in range(threshold, n + 1)]
        peak = max(logs)
        tail = math.exp(peak) * sum(math.exp(v - peak) for v in logs)
        if tail > worst:
            worst, worst_n = tail, n
    return {"max_per_look_false_alarm": worst, "at_pairs": worst_n, "nominal_alpha": 0.5 * math.erfc(z / math.sqrt(2)),
            "pairs_checked": [min_pairs, max_n]}


def simulate(rate_per_h: float, p_loss: float, days: float, seed: int, z: float | None = None) -> dict[str, Any]:
    """Alarm episodes of the rule (or the rule with another `z`) on a simulated stream (minute resolution)."""
    z = LABELLED["z"] if z is None else z
    window, hold = minutes(LABELLED["window"]), minutes(LABELLED["for"])
    rng = np.random.Generator(np.random.PCG64(seed))
    total = int(days * 1440)
    per_minute = rate_per_h / 60.0
    losses_pm = rng.poisson(per_minute * p_loss, total)
    gains_pm = rng.poisson(per_minute * (1 - p_loss), total)
    cl, cg = np.concatenate([[0], np.cumsum(losses_pm)]), np.concatenate([[0], np.cumsum(gains_pm)])
    t = np.arange(window, total + 1)  # evaluations once a whole window exists
    cond = fires(cl[t] - cl[t - window], cg[t] - cg[t - window], z, LABELLED["min_pairs"])
    # for: the condition held at every evaluation of the last `hold` minutes (hold + 1 looks)
    held = np.concatenate([[0], np.cumsum(cond)])
    firing = np.zeros(cond.size, dtype=bool)
    firing[hold:] = held[hold + 1:] - held[:-hold - 1] == hold + 1
    episodes = int(np.count_nonzero(firing[1:] & ~firing[:-1]) + int(firing[0]))
    first = int(np.argmax(firing)) + window if firing.any() else None
    evaluated_days = cond.size / 1440
    return {"z": z, "rate_pairs_per_h": rate_per_h, "p_loss": p_loss, "days": round(evaluated_days, 2),
            "alarm_episodes": episodes, "alarms_per_30_days": round(episodes / evaluated_days * 30, 4),
            "share_of_time_firing": round(float(firing.mean()), 6),
            "minutes_to_first_alarm": first}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.labelled_alert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=float, default=3650.0, help="simulated days per null stream")
    parser.add_argument("--max-n", type=int, default=5000, help="largest pair count of the exact per-look bound")
    parser.add_argument("--z", type=float, nargs="*", default=[3.09, 3.29],
                        help="other thresholds to compare with the configured one, on the same streams")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    exact = exact_per_look(LABELLED["z"], LABELLED["min_pairs"], args.max_n)
    rates = (10.0, 50.0, 200.0, 1000.0)
    null, harmful = [], []
    for z in (LABELLED["z"], *args.z):  # the same seeds: every threshold sees the same streams
        null += [simulate(rate, 0.5, args.days, seed=i, z=z) for i, rate in enumerate(rates)]
        harmful += [simulate(rate, p, 30.0, seed=100 + i, z=z) for i, (rate, p) in
                    enumerate((r, p) for r in rates for p in (0.6, 0.7))]
    exact_other = {str(z): exact_per_look(z, LABELLED["min_pairs"], args.max_n) for z in args.z}
    result = {"rule": LABELLED, "exact": exact, "exact_other_z": exact_other, "served_as_good_as_zeroshot": null,
              "served_worse": harmful}
    print(f"rule: window {LABELLED['window']}, z > {LABELLED['z']}, >= {LABELLED['min_pairs']} discordant pairs, "
          f"for {LABELLED['for']}")
    print(f"per look (exact binomial, n in [{LABELLED['min_pairs']}, {args.max_n}]): at most "
          f"{exact['max_per_look_false_alarm']:.2e} (n = {exact['at_pairs']}); nominal {exact['nominal_alpha']:.2e}")
    print("served as good as zero-shot (p(loss) = 0.5): false alarms")
    print("    z  discordant pairs/h     days  alarm episodes  per 30 days")
    for row in sorted(null, key=lambda r: (r["rate_pairs_per_h"], r["z"])):
        print(f"{row['z']:>5g}  {row['rate_pairs_per_h']:>18g}  {row['days']:>7g}  {row['alarm_episodes']:>14d}"
              f"  {row['alarms_per_30_days']:>11.4f}")
    print("served worse than zero-shot: time to the first alarm, share of time firing (30 days)")
    print("    z  discordant pairs/h  p(loss)  first alarm (min)  firing")
    for row in sorted(harmful, key=lambda r: (r["p_loss"], r["rate_pairs_per_h"], r["z"])):
        print(f"{row['z']:>5g}  {row['rate_pairs_per_h']:>18g}  {row['p_loss']:>7.2f}  "
              f"{str(row['minutes_to_first_alarm']):>17}  {row['share_of_time_firing']:>6.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
