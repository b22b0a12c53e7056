"""Shared fixtures: a built guest image (once per session), a fresh data directory per test,
the real ``vmcluster`` command, and a guard that no QEMU outlives its test."""

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmcluster.guest.image import ImageInfo, build_image
from vmcluster.hypervisor import process
from vmcluster.hypervisor.accel import choose_accel
from vmcluster.paths import DataDir

REPO = Path(__file__).resolve().parent.parent
SHARED_HOME = REPO / ".cache" / "test-home"


@pytest.fixture(scope="session")
def shared_home() -> DataDir:
    """A data directory that keeps the built image (and the accelerator verdict) across runs."""
    return DataDir(SHARED_HOME)


@pytest.fixture(scope="session")
def probe_image(shared_home: DataDir) -> ImageInfo:
    return build_image(shared_home.images)


@pytest.fixture(scope="session")
def accel_file(shared_home: DataDir, probe_image: ImageInfo) -> Path:
    choose_accel(shared_home.accel_file, probe_image)
    return shared_home.accel_file


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DataDir]:
    """A fresh data directory with no image; $VMCLUSTER_HOME points at it."""
    home = DataDir(tmp_path / "home")
    home.root.mkdir()
    monkeypatch.setenv("VMCLUSTER_HOME", str(home.root))
    yield home
    _kill_leftovers(home)


@pytest.fixture
def home(empty_home: DataDir, probe_image: ImageInfo, accel_file: Path) -> DataDir:
    """A fresh data directory that can run VMs: the session's image and accelerator verdict."""
    empty_home.images.mkdir()
    (empty_home.images / probe_image.name).symlink_to(Path(probe_image.path))
    shutil.copyfile(accel_file, empty_home.accel_file)
    return empty_home


def _kill_leftovers(home: DataDir) -> None:
    """Kill (by recorded PID) any QEMU a test left running, then fail the test if there was one."""
    leftovers = []
    for state in home.vms.glob("*/state.json"):
        data = json.loads(state.read_text())
        if data.get("pid") and data.get("start_ticks"):
            proc = process.ProcessId(pid=data["pid"], start_ticks=data["start_ticks"])
            if process.send_signal(proc, signal.SIGKILL):
                leftovers.append(f"{state.parent.name} (pid {proc.pid})")
    shutil.rmtree(home.runtime, ignore_errors=True)
    assert not leftovers, f"test left QEMU running: {', '.join(leftovers)}"


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole suite, no process may still run from a test's directory."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    survivors = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if base in cmdline and "pytest" not in cmdline:
            survivors.append(f"{proc_dir.name}: {cmdline[:120]}")
    assert not survivors, "processes outlived the test suite:\n" + "\n".join(survivors)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
