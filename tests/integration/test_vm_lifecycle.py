"""Real QEMU (TCG on hosts where KVM does not boot): the probe guest boots, acknowledges durable
writes, stops gracefully, is seen crashed after kill -9, and continues its sequence on restart
with no acknowledged write lost."""

import asyncio
import time
import urllib.request
from pathlib import Path

import pytest
from tests.support import kill_by_pid, run_cli

from vmcluster.core.model import DiskSpec, NicMode, NicSpec, VmSpec, VmState, default_mac
from vmcluster.core.units import MIB
from vmcluster.guest import record
from vmcluster.hypervisor import process
from vmcluster.local.host import LocalHost, wait_for_ack
from vmcluster.paths import DataDir

pytestmark = pytest.mark.integration

BOOT_TIMEOUT_S = 120  # generous: TCG on a loaded 2-core machine


def _spec(name: str, *, nic: bool = False) -> VmSpec:
    return VmSpec(
        name=name,
        memory_mib=128,
        disks=(DiskSpec(name="disk0", size_bytes=64 * MIB),),
        nics=(NicSpec(mode=NicMode.USER, mac=default_mac(name, 0)),) if nic else (),
    )


def _acks(path: Path) -> list[int]:
    return record.acked_sequences(path.read_text(errors="replace"))


def _disk_records(host: LocalHost, name: str) -> dict[int, record.Record]:
    data = host.disk_file(name, "disk0").read_bytes()
    return {r.seq: r for r in record.read_records(data)}


def _console(host: LocalHost, name: str, boot: int | None = None) -> Path:
    path = host.console_log(name, boot)
    assert path is not None
    return path


def test_probe_boots_acks_serves_http_and_powers_off(home: DataDir) -> None:
    host = LocalHost(home)
    host.create(_spec("lc-http", nic=True))
    status = asyncio.run(host.start("lc-http"))
    assert status.state is VmState.RUNNING
    assert status.accel in ("kvm", "tcg")
    assert status.pid is not None
    qemu = process.identify(status.pid)
    assert qemu is not None
    console = _console(host, "lc-http")

    first = asyncio.run(wait_for_ack(console, 3, BOOT_TIMEOUT_S))
    later = asyncio.run(wait_for_ack(console, first + 5, 60))
    assert later >= first + 5
    acks = _acks(console)
    assert acks == list(range(1, len(acks) + 1)), "ACKs rise one by one from 1"

    # The guest's HTTP server, reached through the user-mode NIC's forwarded port.
    (url,) = status.http_urls
    body = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read().decode()
            if "seq=" in body and not body.strip().endswith("seq="):
                break
        except OSError:
            pass
        time.sleep(0.5)
    assert "name=lc-http" in body
    served_seq = int(body.strip().rsplit("seq=", 1)[1])
    assert served_seq >= 1

    stopped = asyncio.run(host.stop("lc-http", timeout_s=60))
    assert stopped.state is VmState.STOPPED
    assert stopped.detail == "stopped (powered off)"
    assert "power button pressed" in console.read_text()
    assert not process.is_alive(qemu)

    # Every ACK the guest printed is on disk.
    on_disk = _disk_records(host, "lc-http")
    assert set(_acks(console)) <= set(on_disk)


def test_kill9_is_detected_and_restart_continues_the_sequence(home: DataDir) -> None:
    host = LocalHost(home)
    host.create(_spec("lc-crash"))
    first = asyncio.run(host.start("lc-crash"))
    assert first.pid is not None
    console1 = _console(host, "lc-crash", 1)
    asyncio.run(wait_for_ack(console1, 5, BOOT_TIMEOUT_S))

    kill_by_pid(first.pid)  # a QEMU crash
    deadline = time.monotonic() + 30
    while host.is_running("lc-crash") and time.monotonic() < deadline:
        time.sleep(0.1)

    # A fresh `vmcluster` process (no memory of the launch) sees the truth.
    listed = run_cli("vm", "list", "--local", "-o", "json")
    assert listed.code == 0, listed.err
    (entry,) = listed.json()  # type: ignore[misc]
    assert entry["name"] == "lc-crash"
    assert entry["state"] == "crashed"
    assert entry["pid"] is None

    acks1 = _acks(console1)
    assert acks1, "the first instance acknowledged writes"
    before = _disk_records(host, "lc-crash")
    assert set(acks1) <= set(before), "no acknowledged write lost by the crash"
    highest_before = max(before)

    second = asyncio.run(host.start("lc-crash"))
    assert second.boot == 2
    assert second.generation == 2
    console2 = _console(host, "lc-crash", 2)
    asyncio.run(wait_for_ack(console2, highest_before + 5, BOOT_TIMEOUT_S))
    assert f"resuming after seq {highest_before}" in console2.read_text()
    acks2 = _acks(console2)
    assert acks2[0] == highest_before + 1, "the sequence continues from what is on disk"

    stopped = asyncio.run(host.stop("lc-crash", force=True))
    assert stopped.state is VmState.STOPPED

    after = _disk_records(host, "lc-crash")
    assert set(acks1) | set(acks2) <= set(after), "no acknowledged write lost (I2)"
    assert all(after[s].generation == 1 for s in acks1)
    assert all(after[s].generation == 2 for s in acks2)
