"""Redirected I/O for real: two forwarder processes, one array (qemu-storage-daemon). The node's
forwarder reaches the array over two direct paths (each through a cable that can be cut) and
over a redirected path to the coordinator's forwarder, whose relay carries it to the array. Data
is checked in the daemon's raw file; the fence is the array's (a hard export delete)."""

import asyncio
import contextlib
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from tests.forwarder.test_forwarder_real import (
    DISK,
    EXPORT,
    FAST_RECONNECT,
    MIB,
    PROBE_TIMINGS,
    WAIT_S,
    Array,
    Cable,
    Forwarder,
    Processes,
    Watch,
    _delete_export,
    _free_port,
    _landed,
    _need,
    _ok,
    _start_forwarder,
    _start_writer,
    _writer_succeeded,
    nbd_uri,
    tool,
)

from vmcluster.core.multipath import PathTimings, Policy
from vmcluster.forwarder.disk import DiskSpec
from vmcluster.forwarder.relay import preamble
from vmcluster.forwarder.upstream import Address

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def _pair(procs: Processes, short_dir: Path, qsd: Array,
          array: str | None = None) -> tuple[Forwarder, Forwarder, str]:  # fmt: skip
    """The coordinator's forwarder, relaying to the array (at ``array``, default the daemon's
    own address), and the node's; the relay's address."""
    (short_dir / "coordinator").mkdir()
    (short_dir / "node").mkdir()
    coordinator = _start_forwarder(procs, short_dir / "coordinator", "uvloop")
    node = _start_forwarder(procs, short_dir / "node", "uvloop")
    relay = f"127.0.0.3:{_free_port()}"
    arrays = {"a1": [array or qsd.address()]}
    status = asyncio.run(coordinator.client().relay([relay], arrays))
    assert status["listen"] == [relay]
    return coordinator, node, relay


def _spec(direct: dict[str, str], relay: str) -> DiskSpec:
    paths = [*((n, Address.parse(a)) for n, a in direct.items()), ("r1", Address.parse(relay))]
    return DiskSpec(disk=DISK, generation=1, export=EXPORT, paths=tuple(paths),
                    policy=Policy.FAILOVER, relays=("r1",), relay_array="a1",
                    timings=PathTimings(**{**PROBE_TIMINGS, **FAST_RECONNECT}))  # fmt: skip


def test_with_both_paths_cut_io_goes_through_the_coordinator_and_comes_back(
    qsd: Array, cables: dict[str, Cable], procs: Processes, short_dir: Path, tmp_path: Path
) -> None:
    _need("qemu-img")
    coordinator, node, relay = _pair(procs, short_dir, qsd)
    direct = {name: cable.address() for name, cable in cables.items()}
    asyncio.run(node.client().attach(_spec(direct, relay)))
    # the relay may connect first: the disk is redirected until a direct path is up
    disk = node.wait_for("direct", lambda d: d["route"] == "direct")
    with Watch(node.ctl) as watch:
        writer, data = _start_writer(procs, tmp_path, disk, 24 * MIB)
        node.wait_for("4 MiB written", lambda d: d["stats"]["bytes_written"] >= 4 * MIB)
        assert writer.poll() is None, "the writer finished before the cut: slow it down"
        cables["a"].cut("blackhole")
        cables["b"].cut("blackhole")
        watch.until("redirected", lambda e: e.get("route") == "redirected")
        _writer_succeeded(procs, writer)
        _landed(qsd, data)
        redirected = node.disk()
        assert (redirected["state"], redirected["route"]) == ("active", "redirected")
        assert redirected["stats"]["failed"] == 0
        carried = asyncio.run(coordinator.client().status())
        assert carried == [], "the coordinator attached nothing: it only relays"

        cables["b"].restore()
        watch.until("direct again", lambda e: e.get("route") == "direct")
    writer, data = _start_writer(procs, tmp_path, disk, 4 * MIB, rate="1G")
    _writer_succeeded(procs, writer)
    _landed(qsd, data)
    back = node.disk()
    assert back["route"] == "direct"
    assert {p["name"]: p["state"] for p in back["paths"]}["b"] == "up"


def test_a_redirected_node_cannot_write_after_its_generation_is_fenced(
    qsd: Array, cables: dict[str, Cable], procs: Processes, short_dir: Path
) -> None:
    _need("qemu-io")
    _coordinator, node, relay = _pair(procs, short_dir, qsd)
    cables["a"].cut("blackhole")
    cables["b"].cut("blackhole")
    direct = {name: cable.address() for name, cable in cables.items()}
    disk = asyncio.run(node.client().attach(_spec(direct, relay)))
    assert disk["route"] == "redirected", "attached through the relay alone"
    _ok(tool("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 64k", nbd_uri(disk)))
    _landed(qsd, b"\x61" * 65536)

    asyncio.run(_delete_export(qsd))  # the failover's fence at the array
    node.wait_for("fenced", lambda d: d["state"] == "fenced")
    result = tool("qemu-io", "-f", "raw", "-c", "write -P 0x62 0 64k", nbd_uri(disk))
    assert result.returncode != 0 or "error" in (result.stdout + result.stderr).lower()
    _landed(qsd, b"\x61" * 65536)  # nothing of the old generation landed after the fence


def test_the_relay_refuses_what_is_not_a_relay_request(
    qsd: Array, procs: Processes, short_dir: Path
) -> None:
    coordinator, _node, relay = _pair(procs, short_dir, qsd)
    host, port = relay.split(":")
    for sent in (preamble("a9"), b"GET / HTTP/1.0\r\n\r\n", b"x" * 300):
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(sent)
            conn.settimeout(5)
            with contextlib.suppress(ConnectionResetError):  # refused with a reset: as good
                assert conn.recv(100) == b"", f"{sent[:20]!r} was relayed"
    status = asyncio.run(coordinator.client().relay([relay], {"a1": [qsd.address()]}))
    assert status["refused"] == 3
    assert status["relayed"] == 0


def _state(disk: dict[str, Any], path: str) -> str:
    return str({p["name"]: p["state"] for p in disk["paths"]}[path])


def test_a_write_held_in_a_relay_whose_array_link_was_cut_never_lands_over_newer_ones(
    qsd: Array, cables: dict[str, Cable], procs: Processes, short_dir: Path
) -> None:
    """The coordinator's link to the array goes down under a redirected writer and comes back
    later. The node gives the relayed path up and sends its writes another way; newer writes
    to the same block land. What the relay had sent into the dead link must not land after
    them when the link returns (the relay resets its array side: with a plain close, its
    kernel delivered the old write then, over the newer ones: a lost acknowledged write)."""
    _need("qemu-io")
    _coordinator, node, relay = _pair(procs, short_dir, qsd, array=cables["b"].address())
    cables["a"].cut("blackhole")  # the node's own path: down from the start
    disk = asyncio.run(node.client().attach(_spec({"a": cables["a"].address()}, relay)))
    assert disk["route"] == "redirected"
    count = 400
    commands = []
    for version in range(1, count + 1):  # one block, rewritten: each write after the last
        commands += ["-c", f"write -P {version % 250 + 1} 0 4k", "-c", "sleep 5"]
        if version == 10:  # the link goes down in this pause: the next write is sent into it
            commands += ["-c", "sleep 60"]
    writer = procs.start("writer", ["qemu-io", "-f", "raw", *commands, nbd_uri(disk)])
    node.wait_for("ten writes", lambda d: d["stats"]["bytes_written"] >= 10 * 4096)
    cables["b"].cut("hold")  # the coordinator's link to the array goes down
    node.wait_for("the relayed path given up", lambda d: _state(d, "r1") == "down")
    cables["a"].restore()  # the node's own path comes back: the writes go on there
    assert writer.wait(timeout=WAIT_S * 4) == 0, procs.log("writer")
    acked = [line for line in procs.log("writer").splitlines() if line.startswith("wrote ")]
    assert len(acked) == count
    _, caught = cables["b"].restore()  # the coordinator's link comes back
    assert caught >= 4096, f"no write was caught in the cut link ({caught} bytes)"
    time.sleep(1.0)  # for anything the relay still held to land
    _landed(qsd, bytes([count % 250 + 1]) * 4096)  # the last acknowledged version
