"""State sync cost per stream request: Redis operation log vs the retired flock mode vs in-process.

    python -m bench.bench_state                      # ImageNet size: 1000 classes, d=512, TDA caches full
    python -m bench.bench_state --quick              # seconds, small sizes (the smoke test)

Library level (no TorchServe, no image encoder: those costs are the same for every backend):
one "stream request" is TDA's state step with a random 512-d feature: build the operation,
`commit` it through the backend, and compute the adapted logits from the (full) caches.

1. Added latency: the three backends side by side in one process, interleaved request by request
   (so machine noise hits them alike); added = backend - in-process, p50/p95, for each state size.
   `flock` is the old ``state_sync: shared`` algorithm: exclusive lock, reload when another
   worker wrote, apply, rewrite the whole snapshot.
2. Throughput: 1 and 2 *processes* (two replicas, each with its own copy of the state) per
   backend for `--seconds` each, sharing one Redis / one snapshot file; in-process replicas share
   nothing (the CPU-scaling ceiling).

Starts its own redis-server on a free loopback port. Writes bench/results/state.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.server_bench import _percentile as pct  # noqa: E402
from tta.methods.tda import TDA, TDAOptions  # noqa: E402
from tta.state import StateConfig, StateStore, open_host  # noqa: E402
from tta.state.ops import Op  # noqa: E402
from tta.testing.redis_server import RedisServer  # noqa: E402

DIM = 512
OPTIONS = TDAOptions(neg_entropy=(0.0, 1.0))  # every request is offered to both caches (worst case)


class FlockShared:
    """The retired ``state_sync: shared`` mode, kept here as the baseline it is measured against."""

    mode = "flock"

    def __init__(self, directory: Path, owner: TDA) -> None:
        self.store = StateStore(directory, "bench.tda")
        self.owner = owner
        self.generation = 0

    def commit(self, op: Op) -> bool:
        with self.store.locked():
            generation = self.store.read_generation()
            if generation is not None and generation != self.generation:
                loaded = self.store.load()
                if loaded is not None:
                    self.owner.restore(loaded[0])
            self.owner.apply(op)
            self.generation = max(self.generation, generation or 0) + 1
            self.store.save(self.owner.snapshot(), self.generation)
        return True


def make_tda(classes: int, seed: int = 0) -> TDA:
    """A TDA whose positive (3/class) and negative (2/class) caches are full."""
    clip = SimpleNamespace(embed_dim=DIM, name=f"bench-{DIM}", device=torch.device("cpu"), logit_scale=100.0)
    method = TDA(clip, OPTIONS)
    method._names = tuple(f"class {i}" for i in range(classes))
    gen = torch.Generator().manual_seed(seed)
    for c in range(classes):
        for j in range(3):
            method.pos.offer(c, torch.nn.functional.normalize(torch.randn(DIM, generator=gen), dim=0), 0.1 * j)
        for j in range(2):
            probs = torch.rand(classes, generator=gen).softmax(0)
            method.neg.offer(c, torch.nn.functional.normalize(torch.randn(DIM, generator=gen), dim=0), 0.1 * j, probs)
    return method


def attach(method: TDA, backend: str, url: str, directory: Path, deployment: str) -> Any:
    if backend == "flock":
        return FlockShared(directory, method)
    if backend == "redis":
        return open_host("tda", method, StateConfig(url=url, deployment=deployment, every=200, timeout_ms=2000))
    return open_host("tda", method, StateConfig())


def request(method: TDA, host: Any, gen: torch.Generator, classes: int, cpu: list[float] | None = None) -> float:
    """One stream request's state step; returns the wall seconds spent in sync (commit).

    `cpu` collects the CPU seconds this thread spent in the commit (a loaded machine inflates
    wall time, not CPU time).
    """
    feature = torch.nn.functional.normalize(torch.randn(DIM, generator=gen), dim=0)
    logits = 100.0 * torch.randn(classes, generator=gen)
    probs = logits.softmax(-1)
    loss = float(-(probs * probs.clamp_min(1e-12).log()).sum())
    op = method.update_op(feature, int(logits.argmax()), loss, probs, OPTIONS)
    cpu_start, start = time.thread_time(), time.perf_counter()
    host.commit(op)
    spent = time.perf_counter() - start
    if cpu is not None:
        cpu.append(time.thread_time() - cpu_start)
    method.adapted_logits(feature, logits, OPTIONS)
    return spent


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), e.g. the redis-server's."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency(classes: int, n: int, url: str, workdir: Path, redis_pid: int) -> dict[str, Any]:
    backends = ("process", "redis", "flock")
    methods = {b: make_tda(classes) for b in backends}
    hosts = {b: attach(methods[b], b, url, workdir / f"lat{classes}", f"lat{classes}") for b in backends}
    for b in backends:  # warm-up: seeds Redis with the full state, first snapshot file
        request(methods[b], hosts[b], torch.Generator().manual_seed(1), classes)
    times: dict[str, list[float]] = {b: [] for b in backends}
    cpu: dict[str, list[float]] = {b: [] for b in backends}
    gens = {b: torch.Generator().manual_seed(2) for b in backends}
    server_cpu = 0.0
    for _ in range(n):
        for b in backends:  # interleaved: noise hits all three alike
            before = process_cpu_s(redis_pid) if b == "redis" else 0.0
            times[b].append(request(methods[b], hosts[b], gens[b], classes, cpu[b]) * 1000.0)
            if b == "redis":
                server_cpu += process_cpu_s(redis_pid) - before
    out: dict[str, Any] = {"classes": classes, "requests": n,
                           "state_entries": len(methods["process"].pos) + len(methods["process"].neg)}
    base50, base95 = pct(times["process"], 0.5), pct(times["process"], 0.95)
    for b in backends:
        p50, p95 = pct(times[b], 0.5), pct(times[b], 0.95)
        out[b] = {"p50_ms": round(p50, 3), "p95_ms": round(p95, 3), "mean_ms": round(statistics.mean(times[b]), 3),
                  "added_p50_ms": round(p50 - base50, 3), "added_p95_ms": round(p95 - base95, 3),
                  "cpu_p50_ms": round(1000.0 * pct(cpu[b], 0.5), 3)}
    out["redis"]["server_cpu_ms_per_request"] = round(1000.0 * server_cpu / n, 3)
    out["redis"]["added_cpu_p50_ms"] = round(out["redis"]["cpu_p50_ms"] - out["process"]["cpu_p50_ms"]
                                             + out["redis"]["server_cpu_ms_per_request"], 3)
    if hasattr(hosts["redis"], "wait_snapshot"):
        hosts["redis"].wait_snapshot()
        out["redis"]["snapshot_bytes"] = hosts["redis"].stats.last_snapshot_bytes
        out["redis"]["snapshot_ms"] = round(hosts["redis"].stats.last_snapshot_ms, 1)
    return out


def _replica(backend: str, classes: int, url: str, directory: str, deployment: str, seconds: float,
             ready: Any, go: Any, seed: int, results: Any) -> None:
    torch.set_num_threads(1)
    method = make_tda(classes, seed=0)
    host = attach(method, backend, url, Path(directory), deployment)
    gen = torch.Generator().manual_seed(seed)
    request(method, host, gen, classes)  # joins the log / file before the clock starts
    ready.put(seed)
    go.wait()
    done, sync = 0, 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sync += request(method, host, gen, classes)
        done += 1
    results.put((done, sync))


def throughput(classes: int, replicas: int, backend: str, url: str, workdir: Path, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    deployment = f"tp{classes}-{backend}-{replicas}-{time.monotonic_ns()}"
    directory = workdir / deployment
    procs = [ctx.Process(target=_replica, args=(backend, classes, url, str(directory), deployment, seconds,
                                                ready, go, 10 + i, results)) for i in range(replicas)]
    for p in procs:
        p.start()
    for _ in procs:  # every replica has built its state and joined the log / file
        ready.get(timeout=600)
    go.set()
    got = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    total = sum(d for d, _ in got)
    return {"backend": backend, "replicas": replicas, "requests": total, "rps": round(total / seconds, 2),
            "sync_ms_mean": round(1000.0 * sum(s for _, s in got) / max(1, total), 3)}


def markdown(report: dict[str, Any]) -> str:
    """The README table from a report (`--table results.json`)."""
    lines = ["| classes (entries) | backend | sync wall p50 / p95 ms | added wall p50 / p95 ms | "
             "CPU per sync, p50 ms (client + redis-server) |", "|---|---|---|---|---|"]
    for row in report["latency"]:
        for b in ("process", "redis", "flock"):
            r = row[b]
            cpu = (f"{r['cpu_p50_ms']:.2f} + {r['server_cpu_ms_per_request']:.2f}" if b == "redis"
                   else f"{r['cpu_p50_ms']:.2f}")
            lines.append(f"| {row['classes']} ({row['state_entries']}) | {b} | {r['p50_ms']:.2f} / {r['p95_ms']:.2f} | "
                         f"{r['added_p50_ms']:.2f} / {r['added_p95_ms']:.2f} | {cpu} |")
    lines += ["", "| backend | 1 instance req/s | 2 instances req/s | 2 vs 1 | mean sync ms (2 instances) |",
              "|---|---|---|---|---|"]
    by = {(r["backend"], r["replicas"]): r for r in report["throughput"]}
    for b in ("process", "redis", "flock"):
        one, two = by[(b, 1)], by[(b, 2)]
        lines.append(f"| {b} | {one['rps']:.1f} | {two['rps']:.1f} | {two['rps'] / one['rps']:.2f}x | "
                     f"{two['sync_ms_mean']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="100,1000", help="state sizes (label-set sizes) for the latency table")
    parser.add_argument("--requests", type=int, default=300, help="requests per backend per size")
    parser.add_argument("--seconds", type=float, default=10.0, help="throughput window per (backend, replicas)")
    parser.add_argument("--throughput-classes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the throughput runs (median reported)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "state.json"))
    parser.add_argument("--table", metavar="JSON", help="print the README table of a saved report and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return 0
    torch.set_num_threads(1)
    if args.quick:
        args.classes, args.requests, args.seconds, args.throughput_classes, args.repeat = "10", 20, 1.0, 10, 1
    sizes = [int(c) for c in args.classes.split(",")]
    report: dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(),
                                          "cores": mp.cpu_count(), "torch_threads": 1,
                                          "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
                              "dim": DIM, "latency": [], "throughput": []}
    with tempfile.TemporaryDirectory(prefix="tta-bench-state-") as tmp, RedisServer(Path(tmp) / "redis") as redis:
        workdir = Path(tmp)
        for classes in sizes:
            assert redis.process is not None
            row = latency(classes, args.requests, redis.url, workdir, redis.process.pid)
            report["latency"].append(row)
            print(json.dumps(row), flush=True)
        runs: list[dict[str, Any]] = []
        for repeat in range(args.repeat):  # rounds of every configuration: slow drifts of the load hit all
            for replicas in (1, 2):
                for backend in ("process", "redis", "flock"):
                    row = throughput(args.throughput_classes, replicas, backend, redis.url, workdir, args.seconds)
                    row.update(classes=args.throughput_classes, round=repeat)
                    runs.append(row)
                    print(json.dumps(row), flush=True)
        report["throughput_runs"] = runs
        for backend in ("process", "redis", "flock"):
            for replicas in (1, 2):
                mine = [r for r in runs if r["backend"] == backend and r["replicas"] == replicas]
                report["throughput"].append({
                    "backend": backend, "replicas": replicas, "classes": args.throughput_classes,
                    "rps": round(statistics.median(r["rps"] for r in mine), 2),
                    "sync_ms_mean": round(statistics.median(r["sync_ms_mean"] for r in mine), 3)})
    by = {(r["backend"], r["replicas"]): r["rps"] for r in report["throughput"]}
    report["ratios"] = {
        "two_vs_one_instance": {b: round(by[(b, 2)] / by[(b, 1)], 2) for b in ("process", "redis", "flock")},
        "redis_vs_flock_rps_2_instances": round(by[("redis", 2)] / by[("flock", 2)], 2),
    }
    print(json.dumps(report["ratios"]), flush=True)
    print(markdown(report), flush=True)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
