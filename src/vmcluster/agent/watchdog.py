"""The node's watchdog: kills the node's VMs when the agent stops renewing its promise.

The agent's self-fence kills its VMs once its lease is no longer known valid; an agent that hangs
(or dies) cannot. The watchdog is a separate small process, started by the agent when it first
runs a VM and left running on its own session, that enforces the same deadline from outside:

    <run_dir>/watchdog.json   {"deadline": <CLOCK_BOOTTIME seconds>, "instances":
                               [{"pid": P, "start_ticks": T}, ...], "agent_pid": A}

The agent rewrites the file (atomically) whenever its lease is renewed or its instances change,
with ``deadline = valid_until - self_fence_margin_s / 2`` (the agent's own self-fence acts half a
margin earlier; the watchdog is the backstop). When the boot-time clock passes the deadline
the watchdog SIGKILLs every listed instance that is still the same process (pid and start time),
logs it, and keeps watching. With a resiliency period R (``resiliency_s``) it SIGSTOPs them at the
deadline and SIGKILLs them at ``deadline + R``; a renewed deadline before then leaves them to the
agent, which resumes those it still owns. The file is the only interface: a restarted agent
simply takes over by writing it, and a second watchdog is never started while the first is alive
(pidfile).

An agent that dies (killed, crashed) with its deadline still ahead is handed over by the
watchdog, on the terms the agent wrote into the file (``handover``: etcd's endpoints, its lease
and incarnation, the VMs it runs; clusterstate/handover.py): the node's alive key moves onto a
restart lease, the node shows Restarting, its VMs run on, and the deadline becomes the restart
lease's end (less half the margin). The agent's next run takes the node back as after a planned
restart. The hand-over runs in a thread: the deadline keeps being enforced meanwhile. Writers
of the file hold ``watchdog.lock``.
"""

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from vmcluster.clusterstate.etcdgateway import EtcdGateway, GatewayError
from vmcluster.clusterstate.handover import DeadAgentTerms, hand_over_dead_agent
from vmcluster.clusterstate.store import Commit, Entry, StoreUnavailable
from vmcluster.hypervisor import process

T = TypeVar("T")

CHECK_S = 0.05  # until the agent's state says otherwise (timings.watchdog_check_s)


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Verdict(StrEnum):
    KEEP = "keep"  # the deadline is ahead: the agent looks after its VMs
    FREEZE = "freeze"  # past it, within the resiliency period
    KILL = "kill"  # past it and the resiliency period


def verdict(now: float, deadline: float, resiliency_s: float) -> Verdict:
    """What the watchdog does to the listed instances at ``now`` (the simulator's watchdog
    asks the same)."""
    if now < deadline:
        return Verdict.KEEP
    return Verdict.KILL if now >= deadline + resiliency_s else Verdict.FREEZE


def state_path(run_dir: Path) -> Path:
    return run_dir / "watchdog.json"


def pid_path(run_dir: Path) -> Path:
    return run_dir / "watchdog.pid"


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Held by every writer of the state file (the agent, the watchdog's hand-over)."""
    fd = os.open(run_dir / "watchdog.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _replace(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


_ME: list[process.ProcessId] = []


def _agent() -> process.ProcessId:
    """This process (the agent), as the watchdog sees it."""
    if not _ME:
        me = process.identify(os.getpid())
        assert me is not None
        _ME.append(me)
    return _ME[0]


def write_state(
    run_dir: Path,
    deadline: float,
    instances: list[process.ProcessId],
    *,
    resiliency_s: float = 0,
    check_s: float = CHECK_S,
    launching: Sequence[tuple[str, str, int]] = (),
    handover: dict[str, Any] | None = None,
    agent: process.ProcessId | None = None,
) -> None:
    """``launching``: (pid file, vm, generation) of QEMU processes being launched, whose pid
    the agent does not know yet; the watchdog finds them by their pid file. ``handover``: the
    terms of a hand-over if the agent dies (:func:`handover_terms`), or None: none. ``agent``:
    the agent process (default: this one)."""
    agent = agent or _agent()
    data = {
        "deadline": deadline, "agent_pid": agent.pid, "agent_start_ticks": agent.start_ticks,
        "resiliency_s": resiliency_s, "check_s": check_s,
        "instances": [{"pid": p.pid, "start_ticks": p.start_ticks} for p in instances],
        "launching": [{"pidfile": f, "vm": vm, "generation": g} for f, vm, g in launching],
    }  # fmt: skip
    if handover is not None:
        data["handover"] = handover
    with _locked(run_dir):
        _replace(state_path(run_dir), data)


def handover_terms(
    terms: DeadAgentTerms, *, etcd: Sequence[str], timeout_s: float, margin_s: float
) -> dict[str, Any]:
    """The ``handover`` part of the state file."""
    return terms.to_json() | {"etcd": list(etcd), "timeout_s": timeout_s, "margin_s": margin_s}


def tighten(run_dir: Path, deadline: float) -> list[process.ProcessId] | None:
    """Bring the state file's deadline forward to ``deadline`` (never later), and return the
    instances it lists (None: no state file). A starting agent calls it before it claims its
    node: whatever deadline an earlier run left (a restart lease's, say) then ends with the
    new lease."""
    if not state_path(run_dir).exists():
        return None  # no watchdog was ever told anything here
    with _locked(run_dir):
        data = _read(state_path(run_dir))
        if data is None:
            return None
        try:
            current = float(data.get("deadline", 0.0))
        except (TypeError, ValueError):
            current = float("inf")
        if current > deadline:
            data["deadline"] = deadline
            _replace(state_path(run_dir), data)
    return _instances(data)


def running(run_dir: Path) -> process.ProcessId | None:
    """The live watchdog of ``run_dir``, if any."""
    try:
        data = json.loads(pid_path(run_dir).read_text())
        proc = process.ProcessId(pid=int(data["pid"]), start_ticks=int(data["start_ticks"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return proc if process.is_alive(proc) else None


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} {message}", flush=True)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def watch(run_dir: Path) -> None:
    me = process.identify(os.getpid())
    assert me is not None
    pid_path(run_dir).write_text(json.dumps({"pid": me.pid, "start_ticks": me.start_ticks}))
    _log(f"watchdog.started run_dir={run_dir}")
    done: set[process.ProcessId] = set()
    frozen: set[process.ProcessId] = set()
    handing = HandOver(run_dir)
    check_s = CHECK_S
    while True:
        time.sleep(check_s)
        data = _read(state_path(run_dir))
        if data is None:
            continue
        with contextlib.suppress(TypeError, ValueError):
            check_s = min(1.0, max(0.005, float(data.get("check_s", CHECK_S))))
        deadline = float(data.get("deadline", 0.0))
        resiliency = float(data.get("resiliency_s", 0.0))
        action = verdict(boottime(), deadline, resiliency)
        if action is Verdict.KEEP:
            frozen.clear()  # renewed: the agent resumes what it still owns
            handing.look(data)
            continue
        kill = action is Verdict.KILL
        for proc in _instances(data):
            if proc in done:
                continue
            if kill:
                if process.send_signal(proc, signal.SIGKILL):
                    _log(
                        f'watchdog.fenced pid={proc.pid} reason="agent did not renew its deadline"'
                    )
                done.add(proc)
            elif proc not in frozen:
                if process.send_signal(proc, signal.SIGSTOP):
                    _log(f"watchdog.frozen pid={proc.pid} resiliency_s={resiliency:g}")
                frozen.add(proc)


class HandOver:
    """The hand-over of a dead agent's node (see the module), at most one at a time, once per
    agent and lease unless etcd did not answer (then again, while the deadline is ahead)."""

    RETRY_S = 0.5

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._thread: threading.Thread | None = None
        self._settled: set[tuple[int, int, int]] = set()  # (agent pid, start, lease)
        self._next_try = 0.0

    def look(self, data: dict[str, Any]) -> None:
        """Called with the state while its deadline is ahead."""
        if self._thread is not None and self._thread.is_alive():
            return
        spec = data.get("handover")
        terms = DeadAgentTerms.from_json(spec)
        if terms is None or not isinstance(spec, dict):
            return
        try:
            agent = process.ProcessId(pid=int(data["agent_pid"]),
                                      start_ticks=int(data["agent_start_ticks"]))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return
        attempt = (agent.pid, agent.start_ticks, terms.lease)
        if attempt in self._settled or time.monotonic() < self._next_try:
            return
        if process.is_alive(agent):
            return
        self._thread = threading.Thread(target=self._run, args=(data, spec, terms, attempt),
                                        name="handover", daemon=True)  # fmt: skip
        self._thread.start()

    def _run(self, data: dict[str, Any], spec: dict[str, Any], terms: DeadAgentTerms,
             attempt: tuple[int, int, int]) -> None:  # fmt: skip
        _log(f"watchdog.handover.begin agent_pid={attempt[0]} node={terms.node}")
        try:
            gateway = EtcdGateway([str(e) for e in spec.get("etcd", [])],
                                  timeout_s=float(spec.get("timeout_s", 0.5)))  # fmt: skip
            margin = float(spec.get("margin_s", 1.0))
        except (TypeError, ValueError):
            self._settled.add(attempt)
            return
        try:
            sent = self._hand_over(gateway, terms)
        except GatewayError as exc:
            self._next_try = time.monotonic() + self.RETRY_S
            _log(f'watchdog.handover.failed node={terms.node} reason="{exc}"')
            return
        self._settled.add(attempt)
        if sent is None:
            return
        deadline = sent + terms.grace_s - margin / 2
        with _locked(self.run_dir):
            current = _read(state_path(self.run_dir))
            if (
                current is None
                or current.get("deadline") != data.get("deadline")
                or (current.get("agent_pid") != data.get("agent_pid"))
            ):
                _log(f"watchdog.handover.overtaken node={terms.node}")  # a new run wrote it
                return
            current["deadline"] = deadline
            _replace(state_path(self.run_dir), current)
        _log(f"watchdog.handed_over node={terms.node} grace_s={terms.grace_s}")

    def _hand_over(self, gateway: EtcdGateway, terms: DeadAgentTerms) -> float | None:
        """The restart lease's start (boot-time clock), or None if the terms no longer hold.
        GatewayError: etcd did not answer."""
        try:
            sent, outcome = asyncio.run(hand_over_dead_agent(
                _GatewayStore(gateway), terms, clock=boottime, wall=time.time))  # fmt: skip
        except StoreUnavailable as exc:
            raise GatewayError(str(exc)) from None
        if sent is None:
            _log(f'watchdog.handover.refused node={terms.node} reason="{outcome}"')
        return sent


class _GatewayStore:
    """The gateway as the hand-over's store (blocking: it runs in the hand-over's thread)."""

    def __init__(self, gateway: EtcdGateway) -> None:
        self.gateway = gateway

    @staticmethod
    def _call(fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except GatewayError as exc:
            raise StoreUnavailable(str(exc)) from None

    async def get(self, key: str) -> Entry | None:
        return self._call(self.gateway.get, key)

    async def grant_lease(self, ttl_s: int) -> int:
        return self._call(self.gateway.grant_lease, ttl_s)

    async def commit(self, commit: Commit) -> bool:
        return self._call(self.gateway.commit, commit)

    async def revoke_lease(self, lease_id: int) -> None:
        self._call(self.gateway.revoke_lease, lease_id)


def _instances(data: dict[str, Any]) -> list[process.ProcessId]:
    """The listed instances, and the QEMU processes being launched that already run."""
    found = []
    for entry in data.get("instances", []):
        try:
            found.append(process.ProcessId(pid=int(entry["pid"]),
                                           start_ticks=int(entry["start_ticks"])))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            continue
    for entry in data.get("launching", []):
        try:
            proc = process.qemu_from_pidfile(
                Path(entry["pidfile"]), str(entry["vm"]), int(entry["generation"])
            )
        except (KeyError, TypeError, ValueError):
            continue
        if proc is not None:
            found.append(proc)
    return found


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vmcluster.agent.watchdog RUN_DIR")
    watch(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
