"""Processes the lab runs inside its namespaces: started detached, tracked by pid + start time.

A process is started as ``setsid -f ip netns exec NS sh -c 'echo $$ > PIDFILE; exec CMD'``: it
leaves our process tree at once (no zombies, no child to reap, it outlives ``lab up``), and the
pid file gives the pid of CMD itself (``exec`` keeps the shell's pid).
"""

import contextlib
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmcluster.errors import VmclusterError
from vmcluster.hypervisor import process
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

SPAWN_TIMEOUT_S = 10.0
STOP_WAIT_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Tracked:
    """A process the lab started: enough to recognise it, stop it, and start it again."""

    role: str  # etcd, array, agent, ...
    host: str
    argv: tuple[str, ...]
    namespace: str
    log_path: str
    pidfile: str
    pid: int | None = None
    start_ticks: int | None = None

    @property
    def proc(self) -> process.ProcessId | None:
        if self.pid is None or self.start_ticks is None:
            return None
        return process.ProcessId(pid=self.pid, start_ticks=self.start_ticks)

    @property
    def alive(self) -> bool:
        proc = self.proc
        return proc is not None and process.is_alive(proc)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["argv"] = list(self.argv)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Tracked":
        return cls(**{**data, "argv": tuple(data["argv"])})


def spawn(tracked: Tracked) -> Tracked:
    """Start ``tracked`` in its namespace; returns it with its pid and start time."""
    pidfile = Path(tracked.pidfile)
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    Path(tracked.log_path).parent.mkdir(parents=True, exist_ok=True)
    script = 'echo $$ > "$0"; exec "$@"'
    argv = ["setsid", "-f", "ip", "netns", "exec", tracked.namespace, "sh", "-c", script,
            str(pidfile), *tracked.argv]  # fmt: skip
    with open(tracked.log_path, "ab") as log_file:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                       check=True, timeout=SPAWN_TIMEOUT_S)  # fmt: skip
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(pidfile.read_text().strip())
            # The pid file is written by the shell just before it execs the command.
            ident = process.identify(pid)
            if ident is None:
                raise VmclusterError(
                    f"{tracked.role} on {tracked.host} exited at once: see {tracked.log_path}"
                )
            log.info(event("lab.process.started", role=tracked.role, host=tracked.host, pid=pid))
            return Tracked(**{**asdict(tracked), "argv": tracked.argv, "pid": pid,
                              "start_ticks": ident.start_ticks})  # fmt: skip
        time.sleep(0.01)
    raise VmclusterError(
        f"{tracked.role} on {tracked.host} did not start within {SPAWN_TIMEOUT_S:g} s"
    )


def kill(tracked: Tracked, sig: signal.Signals = signal.SIGKILL) -> bool:
    """Signal the tracked process if it is still the same process; False if it was gone."""
    proc = tracked.proc
    return proc is not None and process.send_signal(proc, sig)


def kill_and_wait(tracked: Tracked) -> None:
    proc = tracked.proc
    if proc is None or not process.send_signal(proc, signal.SIGKILL):
        return
    if not process.wait_exit_blocking(proc, STOP_WAIT_S):
        raise VmclusterError(f"{tracked.role} on {tracked.host} (pid {proc.pid}) did not die")
    log.info(event("lab.process.killed", role=tracked.role, host=tracked.host, pid=proc.pid))


def forget(tracked: Tracked) -> Tracked:
    return Tracked(**{**asdict(tracked), "argv": tracked.argv, "pid": None, "start_ticks": None})
