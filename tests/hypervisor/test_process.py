"""vmcluster.hypervisor.process with real, short-lived processes that each test starts itself.

Every process started here is killed (by its PID, through its Popen) and reaped by the fixture,
and a daemonized one is killed by the PID it wrote; nothing else is ever signalled.
"""

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmcluster.errors import HypervisorError, MissingDependency
from vmcluster.hypervisor import process
from vmcluster.hypervisor.process import (
    ProcessId,
    identify,
    is_alive,
    launch_daemon,
    send_signal,
    wait_exit,
)

pytestmark = pytest.mark.timeout(10)

Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start a child process (default: ``sleep 30``); killed and reaped after the test."""
    children: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            list(argv) or ["sleep", "30"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        children.append(child)
        return child

    yield start
    for child in children:
        # Popen.kill() signals only a child it has not reaped yet, so never a recycled pid.
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        child.wait(timeout=5)


def proc_stat(pid: int) -> tuple[str, int]:
    """(state, starttime) of ``pid`` read straight from /proc, as an independent oracle."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    after_comm = raw[raw.rindex(") ") + 2 :].split(" ")
    return after_comm[0], int(after_comm[22 - 3])


def wait_until(predicate: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


# ---- identify / is_alive --------------------------------------------------------------------


def test_identify_a_live_process(spawn: Spawn) -> None:
    child = spawn()
    ident = identify(child.pid)
    assert ident is not None
    assert ident.pid == child.pid
    assert ident.start_ticks == proc_stat(child.pid)[1]
    # start_ticks is clock ticks since boot: the process started just now.
    btime = next(
        int(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    started_at = btime + ident.start_ticks / os.sysconf("SC_CLK_TCK")
    assert abs(started_at - time.time()) < 5
    assert identify(child.pid) == ident  # stable
    assert is_alive(ident)


def test_identify_a_process_whose_name_holds_spaces_and_parens(
    spawn: Spawn, tmp_path: Path
) -> None:
    odd = tmp_path / "x) S 1 (y"  # comm becomes "x) S 1 (y": a naive split misreads the fields
    shutil.copy("/usr/bin/sleep", odd)
    child = spawn(str(odd), "30")
    wait_until(lambda: Path(f"/proc/{child.pid}/comm").read_text().strip() == odd.name)
    ident = identify(child.pid)
    assert ident == ProcessId(pid=child.pid, start_ticks=proc_stat(child.pid)[1])
    assert is_alive(ident)


def test_identify_a_reaped_pid_is_none(spawn: Spawn) -> None:
    child = spawn("true")
    child.wait(timeout=5)
    assert identify(child.pid) is None


def test_a_zombie_is_not_alive(spawn: Spawn) -> None:
    child = spawn()
    ident = identify(child.pid)
    assert ident is not None
    os.kill(child.pid, signal.SIGKILL)  # our own, still unreaped child
    wait_until(lambda: proc_stat(child.pid)[0] == "Z")  # exited, not yet reaped
    assert identify(child.pid) is None
    assert not is_alive(ident)
    assert send_signal(ident, signal.SIGTERM) is False
    assert asyncio.run(wait_exit(ident, timeout_s=1)) is True
    assert child.wait(timeout=5) == -signal.SIGKILL


# ---- send_signal ------------------------------------------------------------------------------


def test_wrong_start_ticks_is_another_process_and_is_never_signalled(spawn: Spawn) -> None:
    child = spawn()
    real = identify(child.pid)
    assert real is not None
    impostor = ProcessId(pid=child.pid, start_ticks=real.start_ticks - 1)  # pid reused
    assert not is_alive(impostor)
    assert send_signal(impostor, signal.SIGTERM) is False
    assert send_signal(impostor, signal.SIGKILL) is False
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.3)  # the real process got nothing
    assert is_alive(real)
    assert asyncio.run(wait_exit(impostor, timeout_s=2)) is True  # "it" is gone, at once


def test_send_signal_sigterm_ends_the_process(spawn: Spawn) -> None:
    child = spawn()
    ident = identify(child.pid)
    assert ident is not None
    assert send_signal(ident, signal.SIGTERM) is True
    assert child.wait(timeout=5) == -signal.SIGTERM


def test_send_signal_to_a_reaped_process_is_false(spawn: Spawn) -> None:
    child = spawn()
    ident = identify(child.pid)
    assert ident is not None
    child.kill()
    child.wait(timeout=5)
    assert send_signal(ident, signal.SIGTERM) is False


# ---- wait_exit --------------------------------------------------------------------------------


def test_wait_exit_returns_true_soon_after_the_process_exits(spawn: Spawn) -> None:
    child = spawn()
    ident = identify(child.pid)
    assert ident is not None

    async def scenario() -> float:
        asyncio.get_running_loop().call_later(0.2, child.kill)
        started = time.monotonic()
        assert await wait_exit(ident, timeout_s=5) is True
        return time.monotonic() - started

    elapsed = asyncio.run(scenario())
    assert 0.15 <= elapsed < 1.5
    assert child.wait(timeout=5) == -signal.SIGKILL


def test_wait_exit_returns_false_on_timeout_while_the_process_lives(spawn: Spawn) -> None:
    child = spawn()
    ident = identify(child.pid)
    assert ident is not None

    async def scenario() -> tuple[bool, float]:
        started = time.monotonic()
        exited = await wait_exit(ident, timeout_s=0.3)
        return exited, time.monotonic() - started

    exited, elapsed = asyncio.run(scenario())
    assert exited is False
    assert 0.25 <= elapsed < 2.0
    assert child.poll() is None
    assert is_alive(ident)


def test_wait_exit_of_a_reaped_process_is_immediately_true(spawn: Spawn) -> None:
    child = spawn("true")
    ident = ProcessId(pid=child.pid, start_ticks=0)
    child.wait(timeout=5)
    started = time.monotonic()
    assert asyncio.run(wait_exit(ident, timeout_s=3)) is True
    assert time.monotonic() - started < 1.0


# ---- launch_daemon ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        ("qemu-system-x86_64: -foo: invalid option", "-foo: invalid option"),
        (
            # QEMU's warnings come first; its error is the last line; -msg timestamp=on
            "qemu-system-x86_64: warning: host doesn't support requested feature\n"
            "2026-11-24T15:40:00.000000Z qemu-system-x86_64: -blockdev node-name=d0: "
            "Could not open '/x.qcow2': No such file or directory\n\n",
            "-blockdev node-name=d0: Could not open '/x.qcow2': No such file or directory",
        ),
    ],
)
def test_launch_daemon_reports_qemus_error_line(tmp_path: Path, stderr: str, expected: str) -> None:
    (tmp_path / "stderr.txt").write_text(stderr)
    qemu = write_script(tmp_path / "qemu", f'cat "{tmp_path / "stderr.txt"}" >&2\nexit 1\n')
    pidfile = tmp_path / "qemu.pid"
    with pytest.raises(HypervisorError) as caught:
        launch_daemon([str(qemu), "-foo", "-pidfile", str(pidfile)], pidfile, what="VM web1")
    message = str(caught.value)
    assert "VM web1" in message
    assert message.endswith(expected)
    assert "qemu-system-x86_64:" not in message
    assert "warning" not in message


def test_launch_daemon_without_stderr_reports_the_exit_code(tmp_path: Path) -> None:
    qemu = write_script(tmp_path / "qemu", "exit 3\n")
    pidfile = tmp_path / "qemu.pid"
    with pytest.raises(HypervisorError, match=r"VM web1.*exit code 3"):
        launch_daemon([str(qemu)], pidfile, what="VM web1")


def test_launch_daemon_returns_the_daemons_identity(tmp_path: Path) -> None:
    # Stands in for "qemu-system-x86_64 ... -pidfile PATH -daemonize": the daemon (a sleep in
    # its own session, off our pipes) lives on after the command returns 0.
    qemu = write_script(
        tmp_path / "qemu",
        'while [ $# -gt 0 ]; do [ "$1" = -pidfile ] && pidfile=$2; shift; done\n'
        "setsid sleep 30 </dev/null >/dev/null 2>&1 &\n"
        'echo $! > "$pidfile"\n'
        "exit 0\n",
    )
    pidfile = tmp_path / "qemu.pid"
    started = time.monotonic()
    ident = launch_daemon([str(qemu), "-pidfile", str(pidfile), "-daemonize"], pidfile, what="x")
    try:
        assert time.monotonic() - started < 5  # did not wait for the daemon
        assert ident.pid == int(pidfile.read_text())
        # (the forked shell may still be on its way to exec'ing sleep: same process, same ident)
        wait_until(lambda: Path(f"/proc/{ident.pid}/comm").read_text().strip() == "sleep")
        assert ident == identify(ident.pid)
        assert is_alive(ident)
    finally:
        if identify(ident.pid) == ident:
            os.kill(ident.pid, signal.SIGKILL)  # the sleep this test started, by its pid
    assert asyncio.run(wait_exit(ident, timeout_s=5)) is True
    assert not is_alive(ident)


def test_launch_daemon_ignores_a_stale_pidfile(tmp_path: Path) -> None:
    pidfile = tmp_path / "qemu.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # a live process, from an earlier run
    qemu = write_script(tmp_path / "qemu", "exit 0\n")  # "started" but wrote no pid file
    with pytest.raises(HypervisorError, match=r"VM web1: .*no pid file"):
        launch_daemon([str(qemu)], pidfile, what="VM web1")


def test_launch_daemon_when_the_daemon_died_at_once(tmp_path: Path) -> None:
    qemu = write_script(
        tmp_path / "qemu",
        f'sleep 0 & pid=$!\nwait $pid\necho $pid > "{tmp_path / "qemu.pid"}"\nexit 0\n',
    )
    with pytest.raises(HypervisorError, match=r"VM web1: .*exited"):
        launch_daemon([str(qemu)], tmp_path / "qemu.pid", what="VM web1")


def test_launch_daemon_that_never_returns_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "LAUNCH_TIMEOUT_S", 0.5)
    qemu = write_script(tmp_path / "qemu", "exec sleep 30\n")
    started = time.monotonic()
    with pytest.raises(HypervisorError, match=r"VM web1: .*did not finish starting"):
        launch_daemon([str(qemu)], tmp_path / "qemu.pid", what="VM web1")
    assert time.monotonic() - started < 3


def test_launch_daemon_with_a_missing_binary(tmp_path: Path) -> None:
    missing = tmp_path / "qemu-system-x86_64"
    with pytest.raises(MissingDependency) as caught:
        launch_daemon([str(missing), "-daemonize"], tmp_path / "qemu.pid", what="VM web1")
    assert str(missing) in str(caught.value)
