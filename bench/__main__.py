"""`python -m bench`: start everything on loopback, measure, stop everything, report.

    python -m bench                      # full sizes, every leg, 5 runs
    python -m bench --smoke              # tiny sizes: proves the scripts run (CI)
    python -m bench --only throughput,keystroke --runs 7 --json out.json
    python -m bench --no-rly             # OpenSSH baselines only

Exit status: 0 when the report was written (whatever the figures say), 2 on
bad arguments. Benchmarks are not tests: a missed target is a FAIL in the
table, not a non-zero exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import (
    approval,
    checkins,
    connect_time,
    dial_back,
    events,
    fleet_checkins,
    idle_tunnels,
    keystroke,
    on_demand_fleet,
    peering,
    throughput,
    websocket,
)
from bench.common import FULL, SMOKE, LegResult, Scale
from bench.report import machine, table, to_json
from bench.topology import Topology, open_topology

SHARED: dict[str, Callable[[Topology, Scale], LegResult]] = {
    "throughput": throughput.run,
    "keystroke": keystroke.run,
    "connect_time": connect_time.run,
    "approval": approval.run,
}
STANDALONE: dict[str, Callable[[Path, Scale, bool], LegResult]] = {
    "idle_tunnels": idle_tunnels.run,
    "checkins": checkins.run,
    "events": events.run,
    "websocket": websocket.run,
    "peering": peering.run,
    "dial_back": dial_back.run,
    "fleet_checkins": fleet_checkins.run,
    "on_demand_fleet": on_demand_fleet.run,
}
LEGS = [*SHARED, *STANDALONE]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run (CI)")
    parser.add_argument("--only", help=f"comma-separated legs: {','.join(LEGS)}")
    parser.add_argument("--runs", type=int, help="runs per comparison (default 5, smoke 1)")
    parser.add_argument(
        "--json", type=Path, help="where to write raw figures (default: ./bench-<time>.json)"
    )
    parser.add_argument("--no-rly", action="store_true", help="OpenSSH baselines only")
    parser.add_argument(
        "--workdir", type=Path, help="keep logs and keys here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    args.legs = LEGS if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.legs if n not in LEGS]
    if unknown:
        parser.error(f"unknown leg(s) {', '.join(unknown)}; choose from {', '.join(LEGS)}")
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def raise_fd_limit() -> None:
    """Idle tunnels need one descriptor per connection: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_legs(
    args: argparse.Namespace, scale: Scale, work: Path
) -> tuple[list[LegResult], dict[str, list[str]]]:
    """Run the chosen legs: the shared ones on one topology, the others on their own."""
    results: list[LegResult] = []
    hops: dict[str, list[str]] = {}
    shared = [n for n in args.legs if n in SHARED]
    if shared:
        with open_topology(work / "shared", rly=not args.no_rly) as topo:
            hops = topo.hops
            for name in shared:
                print(f"bench: {name} …", file=sys.stderr, flush=True)
                results.append(SHARED[name](topo, scale))
    for name in (n for n in args.legs if n in STANDALONE):
        print(f"bench: {name} …", file=sys.stderr, flush=True)
        leg_dir = work / name
        leg_dir.mkdir(mode=0o700)
        results.append(STANDALONE[name](leg_dir, scale, not args.no_rly))
    return results, hops


def stop_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so every ExitStack stops its processes."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    scale = SMOKE if args.smoke else FULL
    if args.runs is not None:
        scale = dataclasses.replace(scale, runs=args.runs)
    raise_fd_limit()
    json_path = args.json or Path(f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with tempfile.TemporaryDirectory(prefix="rly-bench-") as tmp:
        work = args.workdir or Path(tmp)
        for sub in ("shared",):
            (work / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        results, hops = run_legs(args, scale, work)
    print(table(results, hops))
    json_path.write_text(json.dumps(to_json(results, hops, scale, machine()), indent=1))
    print(f"\nraw figures: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
