#!/usr/bin/env python3
"""What Prometheus scraping costs the data path, measured end to end.

Why a load run and not only the criterion bench (`benches/benches/metrics.rs`): the question an
operator asks is "how many requests per second do I lose if Prometheus scrapes every second?",
and the answer depends on the whole process: a scrape of a node with 10,000 service ports renders
tens of thousands of series on the admin thread, which competes with the data plane for the same
cores. So this drives lightpath exactly as `run.py` does (same namespace topology, same nginx
backends, same wrk/TPROXY path, same 10,000-service manifest) and, on one running proxy, alternates
identical wrk runs with and without a scraper that GETs `/metrics` from the node every second.
Alternating on the same process keeps machine drift out of the comparison.

    sudo python3 benches/load/metrics_cost.py --services 10000 --duration 8 --rounds 3

Prints a Markdown section (append it to BENCHMARKS.md by hand or with --append).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as lpb  # noqa: E402  (the load harness: topology, modes, wrk)

METRICS_URL = "http://127.0.0.1:15090/metrics"  # lightpath's metrics-only listener (defaults.rs)


class Scraper:
    """GETs /metrics from inside the node namespace every `interval` seconds, as Prometheus would."""

    def __init__(self, node_ns: str, interval: float):
        self.node_ns, self.interval = node_ns, interval
        self.stop = threading.Event()
        self.samples: list[tuple[int, float]] = []  # (bytes, seconds) per scrape
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        cmd = lpb.in_ns(self.node_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} "
                                       "%{time_total}", "--max-time", "5", METRICS_URL])
        next_at = time.monotonic()
        while not self.stop.is_set():
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            parts = p.stdout.split()
            if len(parts) == 3 and parts[0] == "200":
                self.samples.append((int(parts[1]), float(parts[2])))
            else:
                self.errors.append(f"curl exit {p.returncode}: {p.stdout.strip()} {p.stderr.strip()}")
            next_at += self.interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


def measure(bench: lpb.Bench, spec: lpb.ModeSpec, run: lpb.Running, case: str, scrape: float | None) -> dict:
    if scrape is None:
        r = bench.run_case(spec, run, case)
        r["scrapes"] = []
        return r
    assert bench.topo is not None
    with Scraper(bench.topo.node, scrape) as s:
        r = bench.run_case(spec, run, case)
    if s.errors:
        raise lpb.BenchError(f"scrape failed: {s.errors[0]}")
    r["scrapes"] = s.samples
    return r


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10000, help="service ports loaded (default 10,000)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="off/on pairs per mode and case (default 3)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes (default 1)")
    ap.add_argument("--modes", default="lightpath-l4,lightpath-l7")
    ap.add_argument("--cases", default="keepalive,newconn")
    ap.add_argument("--lightpath", type=Path, default=None)
    ap.add_argument("--append", type=Path, default=None, help="append the report to this file")
    args = ap.parse_args(argv)
    harness_args = ["--services", str(args.services), "--duration", str(args.duration), "--bulk-mib", "1",
                    "--no-append"]
    if args.lightpath is not None:
        harness_args += ["--lightpath", str(args.lightpath)]
    hargs = lpb.parse_args(harness_args)
    modes = [m for m in args.modes.split(",") if m]
    cases = [c for c in args.cases.split(",") if c]
    try:
        lpb.check_env(hargs, modes)
    except lpb.BenchError as e:
        print(f"metrics cost: {e}", file=sys.stderr)
        return 2

    bench = lpb.Bench(hargs)
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    results: dict[tuple[str, str, bool], list[dict]] = {}
    try:
        for mode in modes:
            spec = lpb.ModeSpec(mode, args.services)
            lpb.log(f"{spec.label}: starting")
            bench.new_topology()
            run = bench.start_mode(spec)
            for rnd in range(args.rounds):
                # Alternate which goes first, so a drifting machine load favours neither.
                order = [None, args.interval] if rnd % 2 == 0 else [args.interval, None]
                for case in cases:
                    for scrape in order:
                        r = measure(bench, spec, run, case, scrape)
                        results.setdefault((spec.label, case, scrape is not None), []).append(r)
                        lpb.log(f"  round {rnd + 1} {case} scrape={'on' if scrape else 'off'}: "
                                f"{r['rps']:,.0f} req/s, p99 {r['p99_ms']:.2f} ms, errors {r['errors']}, "
                                f"{len(r['scrapes'])} scrapes")
            bench.close_topology()
    except lpb.BenchError as e:
        print(f"metrics cost: {e}", file=sys.stderr)
        return 1
    finally:
        bench.cleanup()
    load_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(report(results, args, hargs, load_start, load_end))
    return 0


def report(results, args, hargs, load_start: str, load_end: str) -> str:
    out = [f"### Metrics cost under load ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
           f"`{' '.join(['benches/load/metrics_cost.py'] + sys.argv[1:])}`: {args.services:,} services, "
           f"{args.rounds} rounds of alternating wrk runs ({args.duration:g} s, 2 threads, 32 connections) "
           f"without and with a scrape of `/metrics` every {args.interval:g} s, on one running "
           f"`{hargs.lightpath.name}` per mode. {lpb.machine()}; load average {load_start} -> {load_end}.", "",
           "| mode | case | req/s without scraping | req/s scraping | change | p99 without / with (ms) "
           "| scrape size | scrape time (median) | errors |",
           "|---|---|---|---|---|---|---|---|---|"]
    seen = sorted({(m, c) for (m, c, _) in results})
    for mode, case in seen:
        off, on = results.get((mode, case, False), []), results.get((mode, case, True), [])
        if not off or not on:
            continue
        rps_off = statistics.median(r["rps"] for r in off)
        rps_on = statistics.median(r["rps"] for r in on)
        p99_off = statistics.median(r["p99_ms"] for r in off)
        p99_on = statistics.median(r["p99_ms"] for r in on)
        scrapes = [s for r in on for s in r["scrapes"]]
        size = statistics.median(b for b, _ in scrapes) if scrapes else 0
        secs = statistics.median(t for _, t in scrapes) if scrapes else 0.0
        errors = sum(r["errors"] for r in off + on)
        change = (rps_on / rps_off - 1) * 100 if rps_off else 0.0
        spread = ", ".join(f"{r['rps']:,.0f}" for r in off) + " / " + ", ".join(f"{r['rps']:,.0f}" for r in on)
        out.append(f"| {mode} | {case} | {rps_off:,.0f} | {rps_on:,.0f} | {change:+.1f} % | {p99_off:.2f} / "
                   f"{p99_on:.2f} | {size / 1e6:.2f} MB | {secs * 1000:.0f} ms | {errors} |")
        out.append(f"|  | (each run) | {spread} |  |  |  |  |  |  |")
    text = "\n".join(out) + "\n"
    if args.append is not None:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    return text


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
