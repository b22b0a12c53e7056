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
"""

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmcluster.hypervisor import process

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


def write_state(
    run_dir: Path,
    deadline: float,
    instances: list[process.ProcessId],
    *,
    resiliency_s: float = 0,
    check_s: float = CHECK_S,
    launching: Sequence[tuple[str, str, int]] = (),
) -> None:
    """``launching``: (pid file, vm, generation) of QEMU processes being launched, whose pid
    the agent does not know yet; the watchdog finds them by their pid file."""
    path = state_path(run_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "deadline": deadline, "agent_pid": os.getpid(), "resiliency_s": resiliency_s,
        "check_s": check_s,
        "instances": [{"pid": p.pid, "start_ticks": p.start_ticks} for p in instances],
        "launching": [{"pidfile": f, "vm": vm, "generation": g} for f, vm, g in launching],
    }))  # fmt: skip
    os.replace(tmp, path)


def tighten(run_dir: Path, deadline: float) -> list[process.ProcessId] | None:
    """Bring the state file's deadline forward to ``deadline`` (never later), and return the
    instances it lists (None: no state file). A starting agent calls it before it claims its
    node: whatever deadline an earlier run left (a restart lease's, say) then ends with the
    new lease."""
    data = _read(state_path(run_dir))
    if data is None:
        return None
    try:
        current = float(data.get("deadline", 0.0))
    except (TypeError, ValueError):
        current = float("inf")
    if current > deadline:
        data["deadline"] = deadline
        path = state_path(run_dir)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
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
