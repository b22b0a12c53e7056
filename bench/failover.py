"""Failover time: crash the node that runs a probe VM and time each stage until the VM is back.

Prints one JSON object. Per run, from the crash (t0, the wall clock right before the power cut):
detect (the event node.isolated or node.down of the crashed node, whichever is first), fence (the
leader's agent log line vm.fenced of the new generation), placed (the event vm.failover),
qemu_started (the new owner's agent log line vm.instance.started of the new generation) and
first_ack (the first ACK line on the new instance's console, as polled every 20 ms), each with
min/median/max over the runs; the goals of docs/ha.md and whether every run met them (by the
max); the probe checker's verdict (lost ACKs, stale writes) after the last run, the VM stopped.
The reference is measured in the same lab, between the failovers: a cold start of the same VM
(stopped, then started; t0 right before the start request) timed by the same stages, so
first_ack minus the cold start's first_ack is what detection and fencing add; and the configured
detection bounds (heartbeat interval x threshold; lease TTL) as bench/detection.py reports them.

The leader stamps an event when it commits it: node.isolated is committed after the fence and the
placement that the same controller cycle decided, so detect comes out a few ms after fence and
placed (bench/detection.py, which polls the survivors' view, measures detection by itself).
Whether the VM's owner is also the cluster's leader depends on placement; when it is, nothing
fails over before a survivor leads (after the crashed leader's lease expires), so the stages are
also summarised apart by the victim's role ("stages_by_victim").
Exits 1 if a run missed a stage or the checker found lost ACKs or stale writes (a missed goal is
reported in "met", not in the exit status).

    sudo .venv/bin/python bench/failover.py [--runs 5] [--home DIR] [--keep]

--home is the data directory (default: the repository's .cache/test-home, which the tests fill
with the probe image and the accelerator verdict); --keep leaves the lab up for a look inside
(remove it with 'vmcluster lab down --name bfailover').
"""

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vmcluster.agent.config import Timings
from vmcluster.cli.client import ApiClient
from vmcluster.errors import VmclusterError
from vmcluster.guest.record import acked_sequences
from vmcluster.lab import faults
from vmcluster.lab.lab import Lab
from vmcluster.paths import DataDir

POLL_S = 0.02
LAB_NAME = "bfailover"
_CURRENT = {"vm": "probe1"}  # the VM of the current run


def _vm() -> str:
    return _CURRENT["vm"]


VM_MEMORY = "128"
VM_DISK = "64M"
NODES = 3
ARRAYS = 2
STAGES = ("detect", "fence", "placed", "qemu_started", "first_ack")
COLD_STAGES = ("fence", "placed", "qemu_started", "first_ack")
GOALS = {"qemu_started_s": 2.5, "first_ack_s": 6.0}  # docs/ha.md
STAGE_TIMEOUT_S = 60.0  # from t0 to the first ACK
LOG_WAIT_S = 5.0  # after the first ACK, for events and log lines still on their way
READY_TIMEOUT_S = 120.0
DEFAULT_HOME = Path(__file__).resolve().parent.parent / ".cache" / "test-home"
LOG_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (vm\.fenced|vm\.instance\.started) "
    r"vm=(\S+) generation=(\d+)(.*)$"
)
GENERATION_RE = re.compile(r"\[generation (\d+)\]")


def _log(message: str) -> None:
    print(f"bench/failover: {message}", file=sys.stderr, flush=True)


def _vm_path(suffix: str = "") -> str:
    return f"/v1/vms/{quote(_vm(), safe='')}{suffix}"


def _get(api: ApiClient, path: str) -> Any:
    """GET that treats an agent without quorum or out of reach as no answer yet."""
    try:
        return api.get(path)
    except VmclusterError:
        return None


def _console(lab: Lab, node: str, generation: int) -> Path:
    return lab.host_dir(node) / "data" / "vms" / _vm() / f"g{generation}.console"


def _acks(path: Path) -> list[int]:
    try:
        return acked_sequences(path.read_bytes().decode("utf-8", "replace"))
    except OSError:
        return []


def _agent_log(lab: Lab, node: str) -> Path:
    return lab.host_dir(node) / "agent.log"


def _log_sizes(lab: Lab, nodes: list[str]) -> dict[str, int]:
    return {
        n: _agent_log(lab, n).stat().st_size if _agent_log(lab, n).exists() else 0 for n in nodes
    }


def _log_lines(lab: Lab, offsets: dict[str, int]) -> list[dict[str, Any]]:
    """vm.fenced and vm.instance.started lines of the probe VM written since ``offsets``."""
    found = []
    for node, offset in offsets.items():
        try:
            with _agent_log(lab, node).open("rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        for line in text.splitlines():
            match = LOG_RE.match(line)
            if match is None or match[3] != _vm():
                continue
            at = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            extra = dict(kv.split("=", 1) for kv in match[5].split() if "=" in kv)
            found.append(
                {"time": at, "what": match[2], "node": node, "generation": int(match[4]), **extra}
            )
    return found


def _poll_first_ack(lab: Lab, nodes: list[str], after: int, t0: float) -> tuple[int, float] | None:
    """Poll the consoles of every generation above ``after`` on every node until one shows an
    ACK: (its generation, seconds from t0), or None after STAGE_TIMEOUT_S."""
    vm_dirs = [lab.host_dir(n) / "data" / "vms" / _vm() for n in nodes]
    while time.time() - t0 < STAGE_TIMEOUT_S:
        for vm_dir in vm_dirs:
            for path in vm_dir.glob("g*.console"):
                try:
                    generation = int(path.name[1:].split(".")[0])
                except ValueError:
                    continue
                if generation > after and _acks(path):
                    return generation, time.time() - t0
        time.sleep(POLL_S)
    return None


def _stages(
    lab: Lab,
    api: ApiClient,
    offsets: dict[str, int],
    t0: float,
    generation: int,
    placed_kind: str,
    victim: str | None,
) -> dict[str, Any]:
    """The stages from the events and the agents' logs (retried for a while: the event of a
    placement is written with it, but a node's view of a crash may be noted later)."""
    wanted = ("fence", "placed", "qemu_started", *(("detect",) if victim else ()))
    deadline = time.monotonic() + LOG_WAIT_S
    seen: dict[str, Any] = {}
    while True:
        events = _get(api, "/v1/events?limit=500") or []
        for e in sorted(events, key=lambda e: e["time"]):
            if e["time"] < t0 - 1.0:
                continue
            if (
                victim
                and "detect" not in seen
                and e["subject"] == victim
                and e["kind"] in ("node.isolated", "node.down")
            ):
                seen["detect"] = e["time"] - t0
                seen["detect_kind"] = e["kind"]
            if "placed" not in seen and e["kind"] == placed_kind and e["subject"] == _vm():
                match = GENERATION_RE.search(e.get("reason", ""))
                if match is None or int(match[1]) == generation:
                    seen["placed"] = e["time"] - t0
        for line in sorted(_log_lines(lab, offsets), key=lambda x: x["time"]):
            if line["generation"] != generation:
                continue
            if line["what"] == "vm.fenced" and "fence" not in seen:
                seen["fence"] = line["time"] - t0
                seen["fenced_by"] = line["node"]
                if "ms" in line:
                    seen["fence_ms"] = int(line["ms"])
            elif line["what"] == "vm.instance.started" and "qemu_started" not in seen:
                seen["qemu_started"] = line["time"] - t0
                seen["owner"] = line["node"]
                seen["accel"] = line.get("accel")
        if all(s in seen for s in wanted) or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def _wait_ready(lab: Lab, api: ApiClient, min_acks: int = 3) -> dict[str, Any]:
    """Until every node is up and the VM runs with its ACKs rising; returns the VM."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: int | None = None
    why = "no answer"
    while time.monotonic() < deadline:
        nodes = _get(api, "/v1/nodes") or []
        vm = _get(api, _vm_path())
        states = {n["name"]: n["state"] for n in nodes}
        if set(states.values()) != {"up"} or len(states) != NODES:
            why = f"nodes {states}"
        elif vm is None or vm["state"] != "running" or not vm["owner"]:
            why = f"VM {vm and vm['state']} ({vm and vm['reason']})"
        else:
            acks = _acks(_console(lab, vm["owner"], vm["generation"]))
            top = max(acks, default=0)
            why = f"VM running on {vm['owner']} with {len(acks)} ACKs"
            if len(acks) >= min_acks and last is not None and top > last:
                return dict(vm)
            last = top if acks else None
        time.sleep(0.3)
    raise VmclusterError(f"not ready after {READY_TIMEOUT_S:g} s: {why}")


def _failover(lab: Lab, nodes: list[str]) -> dict[str, Any]:
    """Crash the VM's owner, time the stages, restart the node, wait until all is well again."""
    api = lab.api()
    vm = _wait_ready(lab, api)
    victim, before = vm["owner"], vm["generation"]
    leader = next((n["name"] for n in _get(api, "/v1/nodes") or [] if n["leader"]), None)
    survivor = next(n for n in nodes if n != victim)
    api = lab.api(via=survivor)
    offsets = _log_sizes(lab, nodes)
    t0 = time.time()
    faults.crash(lab, victim)
    crashed = time.time() - t0
    run: dict[str, Any] = {
        "victim": victim,
        "victim_was_leader": victim == leader,
        "from_generation": before,
        "crash_call_s": round(crashed, 3),
    }
    try:
        first = _poll_first_ack(lab, nodes, before, t0)
        generation = first[0] if first else before + 1
        run["generation"] = generation
        run.update(_stages(lab, api, offsets, t0, generation, "vm.failover", victim))
        if first:
            run["first_ack"] = first[1]
    finally:
        faults.restart(lab, victim)
    _wait_ready(lab, lab.api(via=survivor))
    return _rounded(run)


def _stop(api: ApiClient, vm: dict[str, Any]) -> dict[str, Any]:
    """Stop the VM and wait until it is stopped; returns it."""
    api.post(_vm_path("/stop"))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while vm["state"] != "stopped":
        if time.monotonic() > deadline:
            raise VmclusterError(f"VM {_vm()} did not stop: {vm['state']} ({vm['reason']})")
        time.sleep(0.2)
        vm = _get(api, _vm_path()) or vm
    return vm


def _cold_start(lab: Lab, nodes: list[str]) -> dict[str, Any]:
    """Stop the VM, then start it: the same stages from the start request."""
    api = lab.api()
    vm = _wait_ready(lab, api)
    before = _stop(api, vm)["generation"]
    offsets = _log_sizes(lab, nodes)
    t0 = time.time()
    api.post(_vm_path("/start"))
    run: dict[str, Any] = {"from_generation": before}
    first = _poll_first_ack(lab, nodes, before, t0)
    generation = first[0] if first else before + 1
    run["generation"] = generation
    run.update(_stages(lab, api, offsets, t0, generation, "vm.start", None))
    if first:
        run["first_ack"] = first[1]
    _wait_ready(lab, api)
    return _rounded(run)


def _rounded(run: dict[str, Any]) -> dict[str, Any]:
    """Times to the ms; the stages first, in their order, then the details."""
    keys = [s for s in STAGES if s in run] + [k for k in run if k not in STAGES]
    return {k: round(run[k], 3) if isinstance(run[k], float) else run[k] for k in keys}


def _check(lab: Lab, env: dict[str, str]) -> dict[str, Any]:
    """``vmcluster lab check -o json`` (it exits 1 when a VM is not ok: the JSON says why)."""
    proc = subprocess.run(
        [sys.executable, "-m", "vmcluster", "lab", "check", "--name", lab.name, "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    try:
        vms = json.loads(proc.stdout)
    except ValueError:
        return {"error": (proc.stderr or proc.stdout).strip()[:500], "ok": False}
    return {
        "lost_acks": sum(v["lost_acks"] for v in vms),
        "stale_writes": sum(v["stale_writes"] for v in vms),
        "ok": all(v["ok"] for v in vms),
        "vms": vms,
    }


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
        "values": values,
    }


def _stage_summaries(runs: list[dict[str, Any]], stages: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in stages:
        values = [r[stage] for r in runs if stage in r]
        out[stage] = _summary(values) if values else None
    return out


def _met(summary: dict[str, Any] | None, bound: float, runs: int) -> bool | None:
    """Every run reached the stage within the bound (None: no run, or a run never reached it)."""
    if summary is None or len(summary["values"]) < runs:
        return None
    return bool(summary["max"] <= bound)


def _difference(value: dict[str, Any] | None, reference: dict[str, Any] | None) -> float | None:
    """Median minus the reference's median: what a failover adds to a cold start."""
    if value is None or reference is None:
        return None
    return round(float(value["median"]) - float(reference["median"]), 3)


def _ratio(value: dict[str, Any] | None, reference: dict[str, Any] | float | None) -> float | None:
    if value is None or reference is None:
        return None
    ref = reference if isinstance(reference, float | int) else reference["median"]
    return round(value["median"] / ref, 2) if ref else None


def _new_vm(lab: Lab, cli_env: dict[str, str], name: str, *, on_leader: bool) -> None:
    """Stop the previous run's VM (kept for the checker) and create and start ``name``, on the
    leader's node or on another one (both cases are measured: a crash of the leader's node also
    needs a new leader)."""
    previous = _get(lab.api(), _vm_path())
    if previous is not None and previous["state"] != "stopped":
        _stop(lab.api(), previous)
    _CURRENT["vm"] = name
    nodes = lab.api().get("/v1/nodes")
    leader = next(n["name"] for n in nodes if n["leader"])
    target = leader if on_leader else next(n["name"] for n in nodes if not n["leader"])
    argv = [sys.executable, "-m", "vmcluster", "vm", "create", name, "--memory", VM_MEMORY,
            "--disk", VM_DISK, "--preferred", target, "--start"]  # fmt: skip
    subprocess.run(argv, env=cli_env, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--home",
        type=Path,
        default=DEFAULT_HOME,
        help="data directory with the probe image (default: %(default)s)",
    )
    parser.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/failover.py needs root (it builds a lab)", file=sys.stderr)
        return 2
    home = args.home.expanduser().absolute()
    env = {**os.environ, "VMCLUSTER_HOME": str(home)}
    timings = Timings()
    lab = Lab(DataDir(home), LAB_NAME)
    _log(f"lab {LAB_NAME} up in {home}")
    lab.up(nodes=NODES, arrays=ARRAYS)
    runs: list[dict[str, Any]] = []
    cold: list[dict[str, Any]] = []
    errors: list[str] = []
    check: dict[str, Any] = {}
    try:
        nodes = [n.name for n in lab.plan().nodes]
        info = json.loads(lab.cli_file.read_text())
        cli_env = {
            **env,
            "VMCLUSTER_API": ",".join(info["api"].values()),
            "VMCLUSTER_SECRETS": info["secrets_file"],
        }
        for run in range(args.runs):
            try:
                # A fresh VM per run: the failover threshold (nodes - 1 in 6 h) would otherwise
                # mark the VM failed on the third run, as it should.
                _new_vm(lab, cli_env, f"probe{run + 1}", on_leader=run % 2 == 1)
                _log(f"run {run + 1}/{args.runs}: failover")
                runs.append(_failover(lab, nodes))
                _log(f"run {run + 1}/{args.runs}: {runs[-1]}")
                _log(f"run {run + 1}/{args.runs}: cold start (reference)")
                cold.append(_cold_start(lab, nodes))
                _log(f"run {run + 1}/{args.runs}: {cold[-1]}")
            except VmclusterError as exc:
                errors.append(f"run {run + 1}: {exc}")
                _log(f"run {run + 1}/{args.runs} failed: {exc}")
                break
        # Stopped first: a quiet disk to read.
        vm = _get(lab.api(), _vm_path())
        if vm is not None and vm["state"] != "stopped":
            _stop(lab.api(), vm)
        check = _check(lab, env)
    finally:
        if args.keep:
            _log(f"lab kept: 'VMCLUSTER_HOME={home} vmcluster lab down --name {LAB_NAME}'")
        else:
            lab.down()
    stages = _stage_summaries(runs, STAGES)
    cold_stages = _stage_summaries(cold, COLD_STAGES)
    heartbeat_bound = timings.heartbeat_interval_s * timings.heartbeat_threshold
    met = {
        goal: _met(stages[goal.removesuffix("_s")], bound, len(runs))
        for goal, bound in GOALS.items()
    }
    result = {
        "benchmark": "failover",
        "unit": "s",
        "runs": len(runs),
        "environment": {
            "nodes": NODES,
            "arrays": ARRAYS,
            "runs_asked": args.runs,
            "poll_s": POLL_S,
            "vm": {"memory_mib": int(VM_MEMORY), "disk": VM_DISK},
            "accel": next((r["accel"] for r in runs if r.get("accel")), None),
        },
        "per_run": runs,
        "stages": stages,
        # The cluster's leader fails over only once a survivor leads: after the leader's lease
        # expires (docs/operations.md), so runs whose victim led the cluster are apart.
        "stages_by_victim": {
            role: {"runs": len(subset), "stages": _stage_summaries(subset, STAGES)}
            for role, subset in (
                ("leader", [r for r in runs if r["victim_was_leader"]]),
                ("not_leader", [r for r in runs if not r["victim_was_leader"]]),
            )
        },
        "goals": GOALS,
        "met": met,
        "check": check,
        "reference": {
            "cold_start": {
                "what": "vm stop, then t0 and vm start: the same stages, no detection",
                "per_run": cold,
                "stages": cold_stages,
            },
            "heartbeat_bound_s": heartbeat_bound,
            "lease_ttl_s": timings.lease_ttl_s,
        },
        "ratio": {
            "detect_median_to_heartbeat_bound": _ratio(stages["detect"], heartbeat_bound),
            "first_ack_median_to_cold_start": _ratio(stages["first_ack"], cold_stages["first_ack"]),
        },
        "added_by_failover_s": _difference(stages["first_ack"], cold_stages["first_ack"]),
        "errors": errors,
    }
    print(json.dumps(result, indent=2))
    complete = len(runs) == args.runs and all(all(s in r for s in STAGES) for r in runs)
    return 0 if complete and check.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
