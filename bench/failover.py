"""Failover time per fault kind: fault the node that runs a probe VM and time until it is back.

Prints one JSON object. Fault kinds (--kinds, default all, in this order):

- crash: ``lab fault crash`` of the VM's owner (3 nodes);
- freeze: ``lab fault freeze`` of the owner's agent (SIGSTOP: its QEMU, etcd and watchdog run on);
- cut: the owner's links on cluster1 and cluster2 down (``lab fault link``), storage intact;
- witness-member: 2 nodes and a witness, crash of the owner, the node that does not lead;
- witness-leader: 2 nodes and a witness, crash of the owner, the leader's node.

The 3-node kinds alternate the owner between a node that does not lead (odd runs) and the
leader's node (even runs); ``victim_was_leader`` says which. Each topology gets a lab of its own
(one after the other, both named bfailover) and a fresh VM per run (the failover threshold is
per VM). Per run, from the fault (t0, the wall clock right before it is injected): detect (the
event node.isolated or node.down of the victim, whichever is first; the leader stamps it when it
commits it, so it may come after placed), fence (the leader's agent log line vm.fenced of the
new generation), placed (the event vm.failover, or vm.start of a VM that was pending first),
qemu_started (the new owner's log line vm.instance.started of the new generation), first_ack
(the first ACK on the new instance's console, polled every 20 ms); then the fault is undone,
the cluster waited for, the VM stopped, and at the end every VM of the lab checked (``vmcluster
lab check -o json``): lost_acks and stale_writes per run. Per kind: min/median/max, and whether
every run met the goals (issue 9: QEMU started elsewhere within 2 s, first new ACK within 5 s,
no lost ACK, no stale write).

The reference, measured in each lab before its failovers: a cold start of the same VM shape
(stopped, then started; t0 right before the start request) timed by the same stages, so
first_ack minus the cold start's first_ack is what detection and fencing add; and the
configured detection bounds (heartbeat interval x threshold; lease TTL). Unclean exits are
forgotten before each run (the quarantine record), so that the bench never quarantines a node.
Exits 1 if a run missed a stage or the checker found lost ACKs or stale writes (a missed goal is
reported in "met", not in the exit status).

    sudo .venv/bin/python bench/failover.py [--kinds crash,freeze,cut,witness-member,
        witness-leader] [--runs 2] [--cold-runs 2] [--home DIR] [--logs DIR]

--runs is per kind; --home is the data directory (default: the repository's .cache/test-home,
which the tests fill with the probe image and the accelerator verdict); --logs DIR keeps a copy
of every host's logs (agent, etcd, watchdog) per lab, since ``lab down`` removes them.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import vmcluster
from vmcluster.agent.config import Timings
from vmcluster.clusterstate.keys import Keys
from vmcluster.errors import VmclusterError
from vmcluster.guest.record import acked_sequences
from vmcluster.lab import faults, netns
from vmcluster.lab.lab import Lab
from vmcluster.lab.plan import CLUSTER_NETWORKS
from vmcluster.paths import DataDir

POLL_S = 0.02
LAB_NAME = "bfailover"
_CURRENT = {"vm": "probe1"}  # the VM of the current run


def _vm() -> str:
    return _CURRENT["vm"]


VM_MEMORY = "128"
VM_DISK = "64M"
ARRAYS = 2
STAGES = ("detect", "fence", "placed", "qemu_started", "first_ack")
COLD_STAGES = ("fence", "placed", "qemu_started", "first_ack")
GOALS = {"qemu_started_s": 2.0, "first_ack_s": 5.0, "lost_acks": 0, "stale_writes": 0}  # issue 9
STAGE_TIMEOUT_S = 60.0  # from t0 to the first ACK
LOG_WAIT_S = 5.0  # after the first ACK, for events and log lines still on their way
READY_TIMEOUT_S = 120.0
DEFAULT_HOME = Path(__file__).resolve().parent.parent / ".cache" / "test-home"
LOG_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (vm\.fenced|vm\.instance\.started) "
    r"vm=(\S+) generation=(\d+)(.*)$"
)
GENERATION_RE = re.compile(r"\[generation (\d+)\]")


def _links(lab: Lab, host: str, *, up: bool) -> None:
    for network in CLUSTER_NETWORKS:
        faults.set_link(lab, host, network, up=up)


@dataclass(frozen=True, slots=True)
class Kind:
    what: str
    witness: bool  # 2 nodes and a witness (else 3 nodes)
    owner: str  # where the VM runs: "leader", "member" (not the leader) or "alternate"
    inject: Callable[[Lab, str], object]
    undo: Callable[[Lab, str], object]


KINDS = {
    "crash": Kind("lab fault crash of the VM's owner, 3 nodes", False, "alternate",
                  faults.crash, faults.restart),
    "freeze": Kind("lab fault freeze of the owner's agent (SIGSTOP), 3 nodes", False, "alternate",
                   lambda lab, h: faults.freeze(lab, h, "agent"),
                   lambda lab, h: faults.thaw(lab, h, "agent")),
    "cut": Kind("the owner's links on cluster1 and cluster2 down, storage intact, 3 nodes", False,
                "alternate", lambda lab, h: _links(lab, h, up=False),
                lambda lab, h: _links(lab, h, up=True)),
    "witness-member": Kind("2 nodes + witness: crash of the owner, which does not lead", True,
                           "member", faults.crash, faults.restart),
    "witness-leader": Kind("2 nodes + witness: crash of the owner, the leader's node", True,
                           "leader", faults.crash, faults.restart),
}  # fmt: skip


def _log(message: str) -> None:
    print(f"bench/failover: {message}", file=sys.stderr, flush=True)


def _vm_path(suffix: str = "") -> str:
    return f"/v1/vms/{quote(_vm(), safe='')}{suffix}"


def _get(api: Any, path: str) -> Any:
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
    api: Any,
    offsets: dict[str, int],
    t0: float,
    generation: int,
    placed_kinds: tuple[str, ...],
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
            if "placed" not in seen and e["kind"] in placed_kinds and e["subject"] == _vm():
                match = GENERATION_RE.search(e.get("reason", ""))
                if match is None or int(match[1]) == generation:
                    seen["placed"] = e["time"] - t0
                    seen["placed_reason"] = e.get("reason", "")
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


def _wait_ready(lab: Lab, api: Any, nodes: int, min_acks: int = 3) -> dict[str, Any]:
    """Until every node is up and the VM runs with its ACKs rising; returns the VM."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: int | None = None
    why = "no answer"
    while time.monotonic() < deadline:
        states = {n["name"]: n["state"] for n in _get(api, "/v1/nodes") or []}
        vm = _get(api, _vm_path())
        if set(states.values()) != {"up"} or len(states) != nodes:
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


def _forget_exits(lab: Lab, via: str) -> None:
    """Drop the leader's record of unclean exits: every run makes one, and three on a node
    within an hour would quarantine it (core/quarantine.py), which is not what is measured."""
    namespace = lab.plan().host(via).namespace
    netns.run(["ip", "netns", "exec", namespace, "etcdctl", "--endpoints",
               "http://127.0.0.1:2379", "del", Keys(lab.name).quarantine])  # fmt: skip


def _failover(lab: Lab, nodes: list[str], kind: Kind) -> dict[str, Any]:
    """Fault the VM's owner, time the stages, undo the fault, wait until all is well again, stop
    the VM (for the checker)."""
    vm = _wait_ready(lab, lab.api(), len(nodes))
    victim, before = vm["owner"], vm["generation"]
    leader = next((n["name"] for n in _get(lab.api(), "/v1/nodes") or [] if n["leader"]), None)
    survivor = next(n for n in nodes if n != victim)
    # Only a survivor's agent: a frozen agent's socket takes a request and never answers, and a
    # client asking every agent in turn would wait its 10 s read timeout there first.
    api = lab.api(via=survivor)
    _forget_exits(lab, survivor)
    offsets = _log_sizes(lab, nodes)
    t0 = time.time()
    kind.inject(lab, victim)
    run: dict[str, Any] = {
        "vm": _vm(),
        "victim": victim,
        "victim_was_leader": victim == leader,
        "from_generation": before,
        "fault_call_s": round(time.time() - t0, 3),
        "t0": datetime.datetime.fromtimestamp(t0).isoformat(sep=" ", timespec="milliseconds"),
    }
    try:
        first = _poll_first_ack(lab, nodes, before, t0)
        generation = first[0] if first else before + 1
        run["generation"] = generation
        # vm.start: a VM that nobody could take at first (pending) is started later
        placed = ("vm.failover", "vm.start")
        run.update(_stages(lab, api, offsets, t0, generation, placed, victim))
        if first:
            run["first_ack"] = first[1]
    finally:
        kind.undo(lab, victim)
    _stop(api, _wait_ready(lab, api, len(nodes)))
    return _rounded(run)


def _stop(api: Any, vm: dict[str, Any]) -> dict[str, Any]:
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
    """Stop the VM, then start it: the same stages from the start request; stopped again."""
    api = lab.api()
    vm = _wait_ready(lab, api, len(nodes))
    before = _stop(api, vm)["generation"]
    offsets = _log_sizes(lab, nodes)
    t0 = time.time()
    api.post(_vm_path("/start"))
    run: dict[str, Any] = {"vm": _vm(), "from_generation": before}
    first = _poll_first_ack(lab, nodes, before, t0)
    generation = first[0] if first else before + 1
    run["generation"] = generation
    run.update(_stages(lab, api, offsets, t0, generation, ("vm.start",), None))
    if first:
        run["first_ack"] = first[1]
    _stop(api, _wait_ready(lab, api, len(nodes)))
    return _rounded(run)


def _rounded(run: dict[str, Any]) -> dict[str, Any]:
    """Times to the ms; the stages first, in their order, then the details."""
    keys = [s for s in STAGES if s in run] + [k for k in run if k not in STAGES]
    return {k: round(run[k], 3) if isinstance(run[k], float) else run[k] for k in keys}


def _check(lab: Lab, env: dict[str, str], vms: list[str]) -> dict[str, dict[str, Any]]:
    """``vmcluster lab check -o json`` of ``vms`` (it exits 1 when a VM is not ok: the JSON says
    why): VM -> verdict, or {"error": ...} for each VM when it gave no JSON."""
    argv = [sys.executable, "-m", "vmcluster", "lab", "check", "--name", lab.name, "-o", "json"]
    proc = subprocess.run([*argv, *(a for vm in vms for a in ("--vm", vm))], env=env,
                          capture_output=True, text=True, check=False, timeout=120)  # fmt: skip
    try:
        return {v["vm"]: v for v in json.loads(proc.stdout)}
    except ValueError:
        error = (proc.stderr or proc.stdout).strip()[:500]
        return {vm: {"error": error} for vm in vms}


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


def _median(summary: dict[str, Any] | None) -> float | None:
    return None if summary is None else float(summary["median"])


def _new_vm(lab: Lab, cli_env: dict[str, str], name: str, *, on_leader: bool) -> None:
    """Create and start ``name`` on the leader's node or on another one."""
    _CURRENT["vm"] = name
    nodes = lab.api().get("/v1/nodes")
    leader = next(n["name"] for n in nodes if n["leader"])
    target = leader if on_leader else next(n["name"] for n in nodes if not n["leader"])
    argv = [sys.executable, "-m", "vmcluster", "vm", "create", name, "--memory", VM_MEMORY,
            "--disk", VM_DISK, "--preferred", target, "--start"]  # fmt: skip
    subprocess.run(argv, env=cli_env, check=True, stdout=subprocess.DEVNULL)


def _keep_logs(lab: Lab, target: Path) -> None:
    """Copy every host's logs (agent, etcd, array, watchdog) to ``target``/<host>/."""
    for path in [*lab.dir.glob("*/*.log"), *lab.dir.glob("*/data/watchdog.log")]:
        host = path.relative_to(lab.dir).parts[0]
        (target / host).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / host / path.name)


def _bench_lab(home: Path, env: dict[str, str], witness: bool, kinds: list[str],
               args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """One lab (3 nodes, or 2 and a witness): its cold starts, then the runs of ``kinds``."""
    topology = "2 nodes + witness" if witness else "3 nodes"
    lab = Lab(DataDir(home), LAB_NAME)
    _log(f"lab {LAB_NAME} up ({topology}) in {home}")
    lab.up(nodes=2 if witness else 3, arrays=ARRAYS, witness=witness)
    out: dict[str, Any] = {"topology": topology, "cold": [], "runs": {k: [] for k in kinds},
                           "errors": []}  # fmt: skip
    try:
        nodes = [n.name for n in lab.plan().nodes]
        info = json.loads(lab.cli_file.read_text())
        cli_env = {**env, "VMCLUSTER_API": ",".join(info["api"].values()),
                   "VMCLUSTER_SECRETS": info["secrets_file"]}  # fmt: skip
        for run in range(args.cold_runs):
            try:
                _new_vm(lab, cli_env, f"cold{run + 1}", on_leader=False)
                out["cold"].append(_cold_start(lab, nodes))
                _log(f"{topology}: cold start {run + 1}/{args.cold_runs}: {out['cold'][-1]}")
            except (VmclusterError, subprocess.CalledProcessError) as exc:
                out["errors"].append(f"cold start {run + 1}: {exc}")
                _log(f"{topology}: cold start {run + 1} failed: {exc}")
        for kind in kinds:
            owner = KINDS[kind].owner
            for run in range(args.runs):
                on_leader = owner == "leader" or (owner == "alternate" and run % 2 == 1)
                try:
                    _new_vm(lab, cli_env, f"{kind}{run + 1}", on_leader=on_leader)
                    _log(f"{kind} {run + 1}/{args.runs}: fault")
                    out["runs"][kind].append(_failover(lab, nodes, KINDS[kind]))
                    _log(f"{kind} {run + 1}/{args.runs}: {out['runs'][kind][-1]}")
                except (VmclusterError, subprocess.CalledProcessError) as exc:
                    out["errors"].append(f"{kind} run {run + 1}: {exc}")
                    _log(f"{kind} {run + 1}/{args.runs} failed: {exc}")
                    break  # the next kind may still work
        runs = [r for rs in out["runs"].values() for r in rs]
        checked = _check(lab, env, [r["vm"] for r in runs + out["cold"]])
        for r in runs + out["cold"]:
            verdict = checked.get(r["vm"], {"error": "not checked"})
            r["lost_acks"] = verdict.get("lost_acks")
            r["stale_writes"] = verdict.get("stale_writes")
            if "error" in verdict:
                r["check_error"] = verdict["error"]
    finally:
        if args.logs:
            _keep_logs(lab, args.logs / ("witness" if witness else "three"))
        lab.down()
    return out


def _kind_result(kind: str, runs: list[dict[str, Any]], cold: dict[str, Any]) -> dict[str, Any]:
    """One kind's figure: its stages, the checker's verdict, the goals met, and what it adds to
    the cold start of its lab (``cold``: that start's stage summaries)."""
    stages = _stage_summaries(runs, STAGES)
    lost = [r["lost_acks"] for r in runs]
    stale = [r["stale_writes"] for r in runs]
    checked = bool(runs) and None not in lost + stale
    ack, cold_ack = _median(stages["first_ack"]), _median(cold["first_ack"])
    added = None if ack is None or cold_ack is None else round(ack - cold_ack, 3)
    return {
        "what": KINDS[kind].what,
        "runs": len(runs),
        "qemu_started_s": stages["qemu_started"],
        "first_ack_s": stages["first_ack"],
        "lost_acks": sum(lost) if checked else None,
        "stale_writes": sum(stale) if checked else None,
        "met": {
            "qemu_started_s": _met(stages["qemu_started"], GOALS["qemu_started_s"], len(runs)),
            "first_ack_s": _met(stages["first_ack"], GOALS["first_ack_s"], len(runs)),
            "lost_acks": sum(lost) == 0 if checked else None,
            "stale_writes": sum(stale) == 0 if checked else None,
        },
        "added_by_failover_s": added,
        "earlier_stages": {s: stages[s] for s in ("detect", "fence", "placed")},
        "per_run": runs,
    }


def _ratio(value: dict[str, Any] | None, reference: dict[str, Any] | None) -> float | None:
    """Median over the reference's median."""
    top, bottom = _median(value), _median(reference)
    return None if top is None or not bottom else round(top / bottom, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="fault kinds, comma-separated (default: %(default)s)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=2, help="runs per kind (default: 2)")
    parser.add_argument("--cold-runs", type=int, default=2,
                        help="cold starts per lab, the reference (default: 2)")  # fmt: skip
    home_help = "data directory with the probe image (default: %(default)s)"
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help=home_help)
    parser.add_argument("--logs", type=Path, help="copy every lab's logs here before lab down")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds or args.runs < 1 or args.cold_runs < 1:
        parser.error(f"--kinds from {', '.join(KINDS)} (not {', '.join(unknown)}); "
                     "--runs and --cold-runs at least 1")  # fmt: skip
    if os.geteuid() != 0:
        print("bench/failover.py needs root (it builds a lab)", file=sys.stderr)
        return 2
    home = args.home.expanduser().absolute()
    env = {**os.environ, "VMCLUSTER_HOME": str(home)}
    timings = Timings()
    labs = [
        _bench_lab(home, env, witness, [k for k in kinds if KINDS[k].witness == witness], args)
        for witness in (False, True)
        if any(KINDS[k].witness == witness for k in kinds)
    ]
    figure, cold, ratio = {}, {}, {}
    for lab in labs:
        stages = _stage_summaries(lab["cold"], COLD_STAGES)
        cold[lab["topology"]] = {"per_run": lab["cold"], "stages": stages}
        for kind, runs in lab["runs"].items():
            figure[kind] = _kind_result(kind, runs, stages)
            ratio[kind] = {
                f"{s}_median_to_cold_start": _ratio(figure[kind][f"{s}_s"], stages[s])
                for s in ("qemu_started", "first_ack")
            }
    accel = next((r["accel"] for f in figure.values() for r in f["per_run"] if r.get("accel")),
                 None)  # fmt: skip
    result = {
        "benchmark": "failover",
        "unit": "s",
        "goals": GOALS,
        "figure": figure,
        "reference": {
            "cold_start": {"what": "vm stop, then t0 and vm start: same stages", **cold},
            "heartbeat_bound_s": timings.heartbeat_interval_s * timings.heartbeat_threshold,
            "lease_ttl_s": timings.lease_ttl_s,
        },
        "ratio": ratio,
        "environment": {
            "topologies": {lab["topology"]: list(lab["runs"]) for lab in labs},
            "arrays": ARRAYS,
            "runs_per_kind": args.runs,
            "cold_runs_per_lab": args.cold_runs,
            "cpus": os.cpu_count(),
            "poll_s": POLL_S,
            "vm": {"memory_mib": int(VM_MEMORY), "disk": VM_DISK},
            "accel": accel,
            "code": str(Path(vmcluster.__file__).parent),
        },
        "errors": [e for lab in labs for e in lab["errors"]],
    }
    print(json.dumps(result, indent=2))
    runs = [r for f in figure.values() for r in f["per_run"]]
    complete = all(f["runs"] == args.runs for f in figure.values()) and all(
        all(s in r for s in STAGES) for r in runs
    )
    clean = all(r["lost_acks"] == 0 and r["stale_writes"] == 0 for r in runs)
    return 0 if complete and clean and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
