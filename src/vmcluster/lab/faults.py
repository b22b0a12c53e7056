"""Faults the lab can inject, and their undoing. Every fault is recorded in the lab's state (and
shown by ``lab status``) until it is undone; ``heal`` undoes them all.

- crash HOST: SIGKILL every process in the host's namespace at once (a power cut); links down.
- restart HOST: links up again, the host's processes started again with the same arguments (an
  array host: its daemon, then its service, which restores the daemon's LUNs and exports).
- link HOST NET down|up: the switch port of HOST on NET (the peer sees carrier loss).
- partition A / B: the switch drops IP traffic between A's and B's cluster-network addresses
  (nftables, bridge family); storage paths are untouched.
- freeze / thaw HOST: SIGSTOP / SIGCONT a process of the host (its agent by default).
- agent-restart HOST: stop the host's agent as systemd does (SIGTERM: a planned restart, the
  node handed over; ``--kill``: SIGKILL, as a crash of the agent alone) and start it again.
- slow HOST NET RATE: a token bucket (tbf) on both ends of the link.
"""

import re
import signal
import time
from typing import Any

from vmcluster.errors import InvalidInput, InvalidState, VmclusterError
from vmcluster.hypervisor import process
from vmcluster.lab import netns
from vmcluster.lab.lab import Lab
from vmcluster.lab.plan import CLUSTER_NETWORKS, Host, LabPlan, Network, Role
from vmcluster.lab.procs import Tracked, forget, kill, spawn
from vmcluster.lab.state import LabState, locked
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

RATE_RE = re.compile(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)", re.ASCII)
RESTART_HEALTH_TIMEOUT_S = 30.0
NFT_TABLE = "vmclab"


def describe(fault: dict[str, Any]) -> str:
    kind = fault["kind"]
    if kind == "crash":
        return f"crash {fault['host']}"
    if kind == "link":
        return f"link {fault['host']} {fault['network']} down"
    if kind == "partition":
        return f"partition {' '.join(fault['a'])} / {' '.join(fault['b'])}"
    if kind == "freeze":
        return f"freeze {fault['host']} ({fault['role']})"
    if kind == "slow":
        return f"slow {fault['host']} {fault['network']} {fault['rate']}"
    return str(fault)


def _record(lab: Lab, state: LabState, fault: dict[str, Any]) -> None:
    state.faults.append(fault)
    state.save(lab.state_path)
    log.info(event("lab.fault", lab=lab.name, fault=describe(fault)))


def _drop(lab: Lab, state: LabState, fault: dict[str, Any]) -> None:
    state.faults.remove(fault)
    state.save(lab.state_path)
    log.info(event("lab.fault.undone", lab=lab.name, fault=describe(fault)))


def _find(state: LabState, **match: Any) -> dict[str, Any] | None:
    for fault in state.faults:
        if all(fault.get(k) == v for k, v in match.items()):
            return fault
    return None


def _open(lab: Lab) -> tuple[LabState, LabPlan]:
    state = lab.load()
    if state.status != "up":
        raise InvalidState(f"lab {lab.name} is {state.status}, not up")
    return state, lab.plan(state)


# ----- crash / restart -----


def crash(lab: Lab, host_name: str) -> str:
    with locked(lab.lock_path):
        state, plan = _open(lab)
        host = plan.host(host_name)
        if _find(state, kind="crash", host=host.name):
            raise InvalidState(f"host {host.name} is already crashed")
        # Everything in the host at once, tracked or not (VMs, agents, etcd, arrays).
        victims = [p for p in map(process.identify, netns.pids(host.namespace)) if p is not None]
        for victim in victims:
            process.send_signal(victim, signal.SIGKILL)
        for link in host.links:
            netns.set_link(plan.switch_namespace, link.switch_ifname, up=False)
        for victim in victims:
            process.wait_exit_blocking(victim, 10.0)
        names = []
        for tracked in state.processes_of(host.name):
            names.append(f"{tracked.role} (pid {tracked.pid})")
            state.replace_process(tracked, forget(tracked))
        for fault in [
            f for f in state.faults if f.get("host") == host.name and f["kind"] == "freeze"
        ]:
            state.faults.remove(fault)
        _record(lab, state, {"kind": "crash", "host": host.name, "at": time.time()})
    killed = ", ".join(names) or "no tracked process"
    return f"crashed {host.name}: killed {len(victims)} processes ({killed}); links down"


def restart(lab: Lab, host_name: str) -> str:
    with locked(lab.lock_path):
        state, plan = _open(lab)
        host = plan.host(host_name)
        fault = _find(state, kind="crash", host=host.name)
        if fault is None:
            raise InvalidState(f"host {host.name} is not crashed ('lab fault crash' first)")
        _restart(lab, state, plan, host)
        _drop(lab, state, fault)
    return (
        f"restarted {host.name}: links up, {len(state.processes_of(host.name))} processes started"
    )


def _restart(lab: Lab, state: LabState, plan: LabPlan, host: Host) -> None:
    for link in host.links:
        if not _find(state, kind="link", host=host.name, network=str(link.network)):
            netns.set_link(plan.switch_namespace, link.switch_ifname, up=True)
    for tracked in state.processes_of(host.name):
        if not tracked.alive:
            started = spawn(forget(tracked))
            state.replace_process(tracked, started)
            state.save(lab.state_path)
    if host.role is Role.ARRAY:
        lab.wait_array_ready(host, RESTART_HEALTH_TIMEOUT_S)
    if host.runs_etcd:
        deadline = time.monotonic() + RESTART_HEALTH_TIMEOUT_S
        while not lab.etcd_health(plan, via=host).get(host.name):
            if time.monotonic() > deadline:
                raise VmclusterError(f"etcd on {host.name} is not healthy after restart")
            time.sleep(0.3)


# ----- links -----


def set_link(lab: Lab, host_name: str, network: Network, *, up: bool) -> str:
    with locked(lab.lock_path):
        state, plan = _open(lab)
        host = plan.host(host_name)
        link = host.link(network)
        if _find(state, kind="crash", host=host.name):
            raise InvalidState(
                f"host {host.name} is crashed: 'lab fault restart {host.name}' first"
            )
        fault = _find(state, kind="link", host=host.name, network=str(network))
        netns.set_link(plan.switch_namespace, link.switch_ifname, up=up)
        if up and fault is not None:
            _drop(lab, state, fault)
        elif not up and fault is None:
            _record(lab, state, {"kind": "link", "host": host.name, "network": str(network)})
    return f"link {host.name} {network} {'up' if up else 'down'}"


# ----- partitions -----


def partition(lab: Lab, group_a: list[str], group_b: list[str]) -> str:
    with locked(lab.lock_path):
        state, plan = _open(lab)
        if not group_a or not group_b:
            raise InvalidInput("a partition needs two non-empty groups: partition n1 / n2 n3")
        a = [_cluster_host(plan, name).name for name in group_a]
        b = [_cluster_host(plan, name).name for name in group_b]
        if set(a) & set(b):
            raise InvalidInput(f"host {sorted(set(a) & set(b))[0]} is in both groups")
        _record(lab, state, {"kind": "partition", "a": a, "b": b})
        _apply_partitions(plan, state)
    return f"partitioned {' '.join(a)} / {' '.join(b)} on {', '.join(map(str, CLUSTER_NETWORKS))}"


def _cluster_host(plan: LabPlan, name: str) -> Host:
    host = plan.host(name)
    if not any(n.is_cluster for n in host.networks):
        raise InvalidInput(f"host {host.name} is not on the cluster networks")
    return host


def _apply_partitions(plan: LabPlan, state: LabState) -> None:
    """Make the switch's filter match the recorded partitions exactly."""
    lines = [f"add table bridge {NFT_TABLE}", f"delete table bridge {NFT_TABLE}"]
    rules = []
    for fault in state.faults:
        if fault["kind"] != "partition":
            continue
        a = [plan.host(h).address(n) for h in fault["a"] for n in CLUSTER_NETWORKS]
        b = [plan.host(h).address(n) for h in fault["b"] for n in CLUSTER_NETWORKS]
        rules.append(f"ip saddr {{ {', '.join(a)} }} ip daddr {{ {', '.join(b)} }} drop")
        rules.append(f"ip saddr {{ {', '.join(b)} }} ip daddr {{ {', '.join(a)} }} drop")
    if rules:
        lines += [
            f"table bridge {NFT_TABLE} {{",
            "  chain forward {",
            "    type filter hook forward priority 0; policy accept;",
            *(f"    {rule}" for rule in rules),
            "  }",
            "}",
        ]
    netns.nft(plan.switch_namespace, "\n".join(lines) + "\n")


# ----- freeze / thaw -----


def _processes(state: LabState, host: Host, role: str) -> list[Tracked]:
    found = [p for p in state.processes_of(host.name, role) if p.alive]
    if not found:
        roles = sorted({p.role for p in state.processes_of(host.name) if p.alive})
        raise InvalidState(
            f"host {host.name} runs no {role} process"
            + (f" (it runs: {', '.join(roles)})" if roles else "")
        )
    return found


def freeze(lab: Lab, host_name: str, role: str) -> str:
    with locked(lab.lock_path):
        state, plan = _open(lab)
        host = plan.host(host_name)
        if _find(state, kind="freeze", host=host.name, role=role):
            raise InvalidState(f"{role} on {host.name} is already frozen")
        targets = _processes(state, host, role)
        for tracked in targets:
            kill(tracked, signal.SIGSTOP)
        _record(lab, state, {"kind": "freeze", "host": host.name, "role": role})
    return f"froze {role} on {host.name} (pid {', '.join(str(t.pid) for t in targets)})"


def thaw(lab: Lab, host_name: str, role: str) -> str:
    with locked(lab.lock_path):
        state, plan = _open(lab)
        host = plan.host(host_name)
        fault = _find(state, kind="freeze", host=host.name, role=role)
        if fault is None:
            raise InvalidState(f"{role} on {host.name} is not frozen")
        for tracked in _processes(state, host, role):
            kill(tracked, signal.SIGCONT)
        _drop(lab, state, fault)
    return f"thawed {role} on {host.name}"


AGENT_STOP_WAIT_S = 10.0  # a stopped agent gets this long to hand over and exit


def restart_agent(lab: Lab, host_name: str, *, kill_it: bool = False) -> str:
    """Stop the host's agent (SIGTERM, or SIGKILL with ``kill_it``) and start it again."""
    with locked(lab.lock_path):
        state, plan = _open(lab)
        host = plan.host(host_name)
        if _find(state, kind="crash", host=host.name):
            raise InvalidState(
                f"host {host.name} is crashed: 'lab fault restart {host.name}' first"
            )
        if _find(state, kind="freeze", host=host.name, role="agent"):
            raise InvalidState(
                f"agent on {host.name} is frozen: 'lab fault thaw {host.name}' first"
            )
        (tracked,) = _processes(state, host, "agent")
        proc = tracked.proc
        assert proc is not None
        started = time.monotonic()
        kill(tracked, signal.SIGKILL if kill_it else signal.SIGTERM)
        if not process.wait_exit_blocking(proc, AGENT_STOP_WAIT_S):
            kill(tracked, signal.SIGKILL)
            process.wait_exit_blocking(proc, AGENT_STOP_WAIT_S)
        stopped = time.monotonic() - started
        again = spawn(forget(tracked))
        state.replace_process(tracked, again)
        state.save(lab.state_path)
    how = "killed" if kill_it else "stopped (SIGTERM)"
    return (f"agent on {host.name} {how} in {stopped:.2f} s and started again "
            f"(pid {again.pid})")  # fmt: skip


# ----- slow links -----


def _burst_bytes(rate: str) -> int:
    match = RATE_RE.fullmatch(rate)
    if match is None:
        raise InvalidInput(
            f"invalid rate {rate!r}: use a number and bit, kbit, mbit or gbit (1mbit)"
        )
    scale = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[match.group(2)]
    bits_per_s = float(match.group(1)) * scale
    if bits_per_s < 8000:
        raise InvalidInput(f"invalid rate {rate!r}: at least 8kbit")
    return max(1600, int(bits_per_s / 8 / 100))  # 10 ms worth of traffic, at least a packet


def slow(lab: Lab, host_name: str, network: Network, rate: str) -> str:
    burst = _burst_bytes(rate)
    with locked(lab.lock_path):
        state, plan = _open(lab)
        host = plan.host(host_name)
        link = host.link(network)
        for namespace, ifname in ((host.namespace, link.host_ifname),
                                  (plan.switch_namespace, link.switch_ifname)):  # fmt: skip
            netns.tc(namespace, "qdisc", "replace", "dev", ifname, "root", "tbf",
                     "rate", rate, "burst", str(burst), "latency", "100ms")  # fmt: skip
        old = _find(state, kind="slow", host=host.name, network=str(network))
        if old is not None:
            state.faults.remove(old)
        _record(lab, state, {"kind": "slow", "host": host.name, "network": str(network),
                             "rate": rate})  # fmt: skip
    return f"slowed {host.name} {network} to {rate} both ways"


def _unslow(plan: LabPlan, fault: dict[str, Any]) -> None:
    host = plan.host(fault["host"])
    link = host.link(Network(fault["network"]))
    for namespace, ifname in ((host.namespace, link.host_ifname),
                              (plan.switch_namespace, link.switch_ifname)):  # fmt: skip
        netns.tc(namespace, "qdisc", "del", "dev", ifname, "root", check=False)


# ----- heal -----


def heal(lab: Lab) -> str:
    with locked(lab.lock_path):
        state, plan = _open(lab)
        undone = [describe(f) for f in state.faults]
        for fault in list(state.faults):
            kind = fault["kind"]
            if kind == "link":
                link = plan.host(fault["host"]).link(Network(fault["network"]))
                netns.set_link(plan.switch_namespace, link.switch_ifname, up=True)
            elif kind == "freeze":
                for tracked in state.processes_of(fault["host"], fault["role"]):
                    kill(tracked, signal.SIGCONT)
            elif kind == "slow":
                _unslow(plan, fault)
            if kind != "crash":
                state.faults.remove(fault)
        state.save(lab.state_path)
        _apply_partitions(plan, state)
        for fault in [f for f in state.faults if f["kind"] == "crash"]:
            _restart(lab, state, plan, plan.host(fault["host"]))
            state.faults.remove(fault)
            state.save(lab.state_path)
        log.info(event("lab.healed", lab=lab.name, undone=len(undone)))
    return "healed: " + ("; ".join(undone) if undone else "there were no faults")
