"""Finding a node's QEMU processes again: by the agent's record or by QEMU's own pid file, only
if the process's command line names the VM and the generation; one that does not answer QMP is
killed rather than left running unknown."""

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support import kill_by_pid

from vmcluster.agent.config import VmSettings
from vmcluster.agent.hosting import VmHost
from vmcluster.hypervisor import process


def _fake_qemu(vm: str, generation: int) -> subprocess.Popen[bytes]:
    """A process whose command line looks like a vmcluster QEMU's (it answers no QMP)."""
    append = f"console=ttyS0 vmcluster.name={vm} vmcluster.gen={generation} x"
    argv = [sys.executable, "-c", "import time; time.sleep(60)",
            "-name", f"guest={vm},debug-threads=on", "-append", append]  # fmt: skip
    proc = subprocess.Popen(argv)
    # Until the child has exec'd, /proc shows the parent's command line: wait for its own.
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + 10
    while f"guest={vm}".encode() not in cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


@pytest.fixture
def fake() -> Iterator[subprocess.Popen[bytes]]:
    proc = _fake_qemu("web", 3)
    try:
        yield proc
    finally:
        kill_by_pid(proc.pid)
        proc.wait(timeout=10)


def test_a_pid_file_counts_only_for_the_same_vm_and_generation(
    tmp_path: Path, fake: subprocess.Popen[bytes]
) -> None:
    pidfile = tmp_path / "g3.pid"
    pidfile.write_text(f"{fake.pid}\n")
    found = process.qemu_from_pidfile(pidfile, "web", 3)
    assert found == process.identify(fake.pid)
    assert process.qemu_from_pidfile(pidfile, "web", 4) is None
    assert process.qemu_from_pidfile(pidfile, "db", 3) is None
    pidfile.write_text("not a pid\n")
    assert process.qemu_from_pidfile(pidfile, "web", 3) is None


def test_an_instance_found_by_its_pid_file_that_does_not_answer_is_killed(
    tmp_path: Path, fake: subprocess.Popen[bytes]
) -> None:
    vm_dir = tmp_path / "data" / "vms" / "web"
    vm_dir.mkdir(parents=True)
    (vm_dir / "g3.pid").write_text(f"{fake.pid}\n")
    host = VmHost(node="n1", data_dir=tmp_path / "data",
                  settings=VmSettings(run_dir=str(tmp_path / "run")), arrays={},
                  on_exit=lambda instance: None)  # fmt: skip
    started = time.monotonic()
    adopted = asyncio.run(host.adopt())
    assert adopted == []
    assert fake.wait(timeout=10) == -9  # never left running unknown
    assert host.instances == {}
    assert not (vm_dir / "g3.json").exists()
    assert time.monotonic() - started < 30  # the QMP connect timeout (10 s), not a hang


def test_a_stale_record_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    vm_dir = tmp_path / "data" / "vms" / "web"
    vm_dir.mkdir(parents=True)
    record = vm_dir / "g2.json"
    record.write_text('{"pid": 999999999, "start_ticks": 1, "started_at": 0}')
    host = VmHost(node="n1", data_dir=tmp_path / "data",
                  settings=VmSettings(run_dir=str(tmp_path / "run")), arrays={},
                  on_exit=lambda instance: None)  # fmt: skip
    assert asyncio.run(host.adopt()) == []
    assert not record.exists()
