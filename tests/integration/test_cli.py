"""The ``vmcluster`` command as a user runs it: output formats, and bad input answered with one
line naming the thing and the problem, a non-zero exit code, and nothing half-created."""

import os
from pathlib import Path

import pytest
from tests.support import CliResult, run_cli

from vmcluster.paths import DataDir


def _one_line_error(result: CliResult, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.err


def _vm_dirs(home: DataDir) -> list[str]:
    return sorted(p.name for p in home.vms.iterdir()) if home.vms.exists() else []


def test_create_list_show_delete_round_trip(empty_home: DataDir) -> None:
    created = run_cli(
        "vm", "create", "--local", "web1", "--memory", "256", "--vcpus", "2", "--disk", "1G"
    )
    assert created.code == 0, created.err
    assert "created VM web1" in created.out

    listed = run_cli("vm", "list", "--local", "-o", "json")
    assert listed.code == 0
    (vm,) = listed.json()  # type: ignore[misc]
    assert vm["name"] == "web1"
    assert vm["state"] == "stopped"
    assert vm["memory_mib"] == 256
    assert vm["vcpus"] == 2
    assert vm["disks"] == [{"name": "disk0", "size_bytes": 1 << 30, "size": "1G"}]
    disk = empty_home.vms / "web1" / "disk0.raw"
    assert disk.stat().st_size == 1 << 30
    assert disk.stat().st_blocks == 0, "disks are sparse"

    table = run_cli("vm", "list", "--local")
    assert table.code == 0
    assert "web1" in table.out
    assert "stopped" in table.out

    shown = run_cli("vm", "show", "--local", "web1", "-o", "json")
    assert shown.json()["name"] == "web1"  # type: ignore[index]
    assert "memory:      256 MiB" in run_cli("vm", "show", "--local", "web1").out

    deleted = run_cli("vm", "delete", "--local", "web1")
    assert deleted.code == 0
    assert _vm_dirs(empty_home) == []
    assert run_cli("vm", "list", "--local", "-o", "json").json() == []


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["vm", "create", "--local", "Bad_Name"], ["invalid VM name 'Bad_Name'"]),
        (["vm", "create", "--local", "-x"], ["No such option"]),
        (["vm", "create", "--local", "ok1", "--disk", "10Q"], ["invalid disk size '10Q'"]),
        (["vm", "create", "--local", "ok1", "--disk", "1K"], ["disk disk0", "too small"]),
        (["vm", "create", "--local", "ok1", "--disk", "100T"], ["disk disk0", "too large"]),
        (["vm", "create", "--local", "ok1", "--memory", "0"], ["memory (MiB) 0 is out of range"]),
        (["vm", "create", "--local", "ok1", "--memory", "lots"], ["invalid memory size 'lots'"]),
        (["vm", "create", "--local", "ok1", "--vcpus", "0"], ["vcpus 0 is out of range"]),
        (["vm", "create", "--local", "ok1", "--image", "No/Such"], ["invalid image name"]),
        (["vm", "create", "--local", "ok1", "--probe-interval", "1"], ["probe interval (ms) 1"]),
        (["vm", "create", "--local", "ok1", "--priority", "high"], ["--priority is for clustered"]),
        (["vm", "create", "ok1", "--nic", "user"], ["--nic needs --local"]),
    ],
)
def test_invalid_create_is_refused_and_creates_nothing(
    empty_home: DataDir, args: list[str], fragments: list[str]
) -> None:
    result = run_cli(*args)
    assert result.code == 2, result
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in result.err
    assert _vm_dirs(empty_home) == []


def test_duplicate_name_is_refused_and_the_first_vm_is_intact(empty_home: DataDir) -> None:
    assert run_cli("vm", "create", "--local", "dup1", "--memory", "128").code == 0
    _one_line_error(
        run_cli("vm", "create", "--local", "dup1", "--memory", "512"), 4, "VM 'dup1' already exists"
    )
    assert run_cli("vm", "show", "--local", "dup1", "-o", "json").json()["memory_mib"] == 128  # type: ignore[index]
    assert _vm_dirs(empty_home) == ["dup1"]


@pytest.mark.parametrize("verb", ["show", "start", "stop", "delete", "console"])
def test_unknown_vm(empty_home: DataDir, verb: str) -> None:
    _one_line_error(run_cli("vm", verb, "--local", "ghost"), 3, "VM 'ghost' does not exist")


def test_start_without_image_says_how_to_build_it(empty_home: DataDir) -> None:
    assert run_cli("vm", "create", "--local", "noimg").code == 0
    _one_line_error(
        run_cli("vm", "start", "--local", "noimg"),
        3,
        "image 'probe' is not built",
        "vmcluster image build",
    )
    assert run_cli("vm", "show", "--local", "noimg", "-o", "json").json()["state"] == "stopped"  # type: ignore[index]


def test_start_without_qemu_names_the_missing_program(home: DataDir, tmp_path: Path) -> None:
    assert run_cli("vm", "create", "--local", "noqemu").code == 0
    bare = tmp_path / "bin"
    bare.mkdir()
    result = run_cli("vm", "start", "--local", "noqemu", env={"PATH": str(bare)})
    _one_line_error(result, 6, "qemu-system-x86_64 not found")
    assert run_cli("vm", "show", "--local", "noqemu", "-o", "json").json()["state"] == "stopped"  # type: ignore[index]


def test_stop_and_console_of_a_never_started_vm(empty_home: DataDir) -> None:
    assert run_cli("vm", "create", "--local", "idle1").code == 0
    _one_line_error(run_cli("vm", "stop", "--local", "idle1"), 5, "VM 'idle1' is not running")
    _one_line_error(run_cli("vm", "console", "--local", "idle1"), 3, "never been started")


def test_image_list_empty_then_built(empty_home: DataDir, probe_image: object) -> None:
    assert run_cli("image", "list", "-o", "json").json() == []
    empty_home.images.mkdir()
    (empty_home.images / "probe").symlink_to(probe_image.path)  # type: ignore[attr-defined]
    (image,) = run_cli("image", "list", "-o", "json").json()  # type: ignore[misc]
    assert image["name"] == "probe"
    assert image["kernel_version"].endswith("-cloud-amd64")
    assert "virtio_blk" in image["modules"]
    assert image["modules"].index("virtio_ring") < image["modules"].index("virtio")


@pytest.mark.integration
def test_running_vm_refuses_second_start_and_delete(home: DataDir) -> None:
    assert run_cli("vm", "create", "--local", "busy1", "--disk", "16M").code == 0
    started = run_cli("vm", "start", "--local", "busy1")
    assert started.code == 0, started.err
    assert "started VM busy1" in started.out
    try:
        _one_line_error(
            run_cli("vm", "start", "--local", "busy1"), 5, "VM 'busy1' is already running"
        )
        _one_line_error(
            run_cli("vm", "delete", "--local", "busy1"), 5, "VM 'busy1' is running", "stop it"
        )
        shown = run_cli("vm", "show", "--local", "busy1", "-o", "json").json()
        assert shown["state"] == "running"  # type: ignore[index]
        assert os.path.exists(f"/proc/{shown['pid']}")  # type: ignore[index]
    finally:
        stopped = run_cli("vm", "stop", "--local", "busy1", "--force")
    assert stopped.code == 0, stopped.err
    assert run_cli("vm", "delete", "--local", "busy1").code == 0
    assert _vm_dirs(home) == []


@pytest.mark.integration
def test_console_follow_ends_when_the_vm_stops(home: DataDir) -> None:
    assert run_cli("vm", "create", "--local", "con1", "--disk", "16M").code == 0
    assert run_cli("vm", "start", "--local", "con1").code == 0
    # A power-off request in the background; --follow must return once QEMU has exited.
    import subprocess

    from tests.support import VMCLUSTER

    stopper = subprocess.Popen([VMCLUSTER, "vm", "stop", "--local", "con1", "--timeout", "60"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        followed = run_cli("vm", "console", "--local", "con1", "--follow", timeout=120)
    finally:
        stopper.wait(timeout=120)
    assert followed.code == 0
    assert stopper.returncode == 0
    shown = run_cli("vm", "show", "--local", "con1", "-o", "json").json()
    assert shown["state"] == "stopped"  # type: ignore[index]
    assert shown["detail"] == "stopped (powered off)", "the guest handled the power button"  # type: ignore[index]
    assert "power button pressed" in followed.out
