"""QEMU processes: launching them detached, recognising them later, signalling and reaping.

QEMU is started with ``-daemonize``: the launching command returns only once QEMU has set up every
device and socket (or failed, with its error on stderr), and QEMU then lives on its own, so that
the CLI or the agent can exit or restart without touching running VMs. A process is identified by
its pid *and* its start time (``/proc/<pid>/stat`` field 22), so a recycled pid is never mistaken
for the VM's QEMU.
"""

import asyncio
import contextlib
import os
import select
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmcluster.errors import HypervisorError, MissingDependency
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

LAUNCH_TIMEOUT_S = 30.0
INSTALL_HINT = "install QEMU (apt-get install qemu-system-x86) or run 'make setup'"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessId:
    """A process, robust against pid reuse."""

    pid: int
    start_ticks: int


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # Field 2 (comm) is in parentheses and may hold spaces: split after its closing paren.
    return raw[raw.rindex(")") + 2 :].split()


def identify(pid: int) -> ProcessId | None:
    """The identity of a live process, or None if there is none (or only a zombie)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return ProcessId(pid=pid, start_ticks=int(fields[19]))


def is_alive(proc: ProcessId) -> bool:
    return identify(proc.pid) == proc


def is_stopped(proc: ProcessId) -> bool:
    """Whether ``proc`` is alive and stopped by a signal (SIGSTOP: state T)."""
    fields = _stat_fields(proc.pid)
    return fields is not None and fields[0] == "T" and int(fields[19]) == proc.start_ticks


@contextlib.contextmanager
def _pidfd(proc: ProcessId) -> Iterator[int | None]:
    """A pidfd pinning ``proc``, or None if ``proc`` has exited (or its pid was reused).

    The identity is checked after the pidfd is opened: the pidfd pins one exact process, so a pid
    reused between the check and the use of the pidfd cannot be affected.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        yield None
        return
    try:
        yield fd if is_alive(proc) else None
    finally:
        os.close(fd)


def send_signal(proc: ProcessId, sig: signal.Signals) -> bool:
    """Signal ``proc`` if it is still the same process; False if it is gone."""
    with _pidfd(proc) as fd:
        if fd is None:
            return False
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            return False
        return True


async def wait_exit(proc: ProcessId, timeout_s: float | None) -> bool:
    """Wait until ``proc`` has exited; True if it did within ``timeout_s``."""
    with _pidfd(proc) as fd:
        if fd is None:
            return True
        loop = asyncio.get_running_loop()
        exited = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(fd, on_exit)
        try:
            async with asyncio.timeout(timeout_s):
                await exited
        except TimeoutError:
            return not is_alive(proc)
        finally:
            loop.remove_reader(fd)
        return True


def wait_exit_blocking(proc: ProcessId, timeout_s: float) -> bool:
    """Like :func:`wait_exit`, for callers without an event loop."""
    with _pidfd(proc) as fd:
        if fd is None:
            return True
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(int(timeout_s * 1000))) or not is_alive(proc)


def launch_daemon(argv: list[str], pidfile: Path, *, what: str) -> ProcessId:
    """Run a daemonizing QEMU command line and return the daemon's identity.

    Raises HypervisorError with QEMU's own error line when it refuses to start.
    """
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=LAUNCH_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as exc:
        raise MissingDependency(f"{argv[0]} not found: {INSTALL_HINT}") from exc
    except subprocess.TimeoutExpired as exc:
        raise HypervisorError(
            f"{what}: QEMU did not finish starting in {LAUNCH_TIMEOUT_S:g} s"
        ) from exc
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit code {proc.returncode}"
        raise HypervisorError(f"{what}: QEMU failed to start: {_strip_qemu_prefix(detail)}")
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise HypervisorError(f"{what}: QEMU started but wrote no pid file") from exc
    ident = identify(pid)
    if ident is None:
        raise HypervisorError(f"{what}: QEMU exited right after starting")
    log.debug(event("qemu.launched", what=what, pid=pid))
    return ident


def _strip_qemu_prefix(line: str) -> str:
    # "2026-11-24T15:40:00.000000Z qemu-system-x86_64: -blockdev ...: Could not open ..."
    for marker in ("qemu-system-x86_64: ", "qemu-storage-daemon: "):
        if marker in line:
            return line.split(marker, 1)[1]
    return line


def qemu_from_pidfile(pidfile: Path, vm: str, generation: int) -> ProcessId | None:
    """The live QEMU named by ``pidfile`` if it runs generation ``generation`` of ``vm``."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if f"guest={vm},debug-threads=on".encode() not in cmdline:
        return None
    if not any(f"vmcluster.gen={generation} ".encode() in arg for arg in cmdline):
        return None
    return identify(pid)
