"""Failure detection time: crash a node in a lab and time how long the survivors take to see it.

Prints one JSON object: per run the time from the crash to the survivors' view showing the node
Isolated (heartbeats lost on every network) and Down (its lease expired), with min/median/max,
and the configured bounds as the reference (heartbeat interval x threshold; lease TTL).

    sudo .venv/bin/python bench/detection.py [--runs 5] [--nodes 3]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vmcluster.agent.config import Timings
from vmcluster.lab import faults
from vmcluster.lab.lab import Lab
from vmcluster.paths import DataDir

POLL_S = 0.02


def _state(lab: Lab, via: str, node: str) -> str:
    return {n["name"]: n["state"] for n in lab.cluster_nodes(via=via)}[node]


def _measure(lab: Lab, victim: str, survivor: str, timeout_s: float = 30.0) -> dict[str, float]:
    crashed_at = time.monotonic()
    faults.crash(lab, victim)
    seen: dict[str, float] = {}
    while "down" not in seen and time.monotonic() - crashed_at < timeout_s:
        state = _state(lab, survivor, victim)
        if state in ("isolated", "down") and "isolated" not in seen:
            seen["isolated"] = time.monotonic() - crashed_at
        if state == "down":
            seen["down"] = time.monotonic() - crashed_at
        time.sleep(POLL_S)
    faults.restart(lab, victim)
    deadline = time.monotonic() + timeout_s
    while _state(lab, survivor, victim) != "up" and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


def _summary(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}  # fmt: skip


def _ratio(values: list[float], reference: float) -> float | None:
    return round(statistics.median(values) / reference, 2) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/detection.py needs root (it builds a lab)", file=sys.stderr)
        return 2
    timings = Timings()
    with tempfile.TemporaryDirectory(prefix="vmcluster-bench-") as home:
        lab = Lab(DataDir(Path(home)), "bdetect")
        lab.up(nodes=args.nodes, arrays=0)
        try:
            names = [f"n{i}" for i in range(1, args.nodes + 1)]
            runs = []
            for run in range(args.runs):
                victim = names[run % len(names)]
                survivor = names[(run + 1) % len(names)]
                runs.append({"victim": victim, **_measure(lab, victim, survivor)})
        finally:
            lab.down()
    isolated = [r["isolated"] for r in runs if "isolated" in r]
    down = [r["down"] for r in runs if "down" in r]
    heartbeat_bound = timings.heartbeat_interval_s * timings.heartbeat_threshold
    result = {
        "figure": "detection",
        "unit": "s",
        "environment": {"nodes": args.nodes, "runs": args.runs, "poll_s": POLL_S},
        "runs": runs,
        "isolated": _summary(isolated) if isolated else None,
        "down": _summary(down) if down else None,
        "reference": {"heartbeat_bound_s": heartbeat_bound, "lease_ttl_s": timings.lease_ttl_s},
        "ratio": {
            "isolated_median_to_heartbeat_bound": _ratio(isolated, heartbeat_bound),
            "down_median_to_lease_ttl": _ratio(down, timings.lease_ttl_s),
        },
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0 if len(down) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
