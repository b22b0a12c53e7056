"""Shared volumes in a lab, with real QEMU (TCG), real forwarders and real link faults: probe VMs
on one shared volume on two nodes at once; one node loses one storage path (direct on the other),
then both (redirected through the coordinator), then gets one back (direct again); the
coordinator loses its own paths while that node is redirected through it (the coordinator moves
and the redirected node follows); disk operations from every node; a running VM's disk grown
(the guest sees the new size). The probe checker ends each
test: zero lost ACKs, zero stale writes."""

import time
from typing import Any

from tests.integration.test_lab_multipath import (
    _acks,
    _check_probe,
    _cli,
    _events,
    _running,
    _until,
    _vm,
    _writes_on,
    lab,
)
from tests.support import run_cli

from vmcluster.lab.lab import Lab

__all__ = ["lab"]  # the fixture


def _volume(name: str, via: str | None = None) -> dict[str, Any]:
    args = ("volume", "show", name, "-o", "json", *(("--via", via) if via else ()))
    found = _cli(*args).json()
    assert isinstance(found, dict)
    return found


def _mode(volume: str, node: str, mode: str, via: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = _until(lambda: (v := _volume(volume, via))["nodes"][node]["mode"]
                                    == mode and v, what=f"{node} {mode} on {volume}")  # fmt: skip
    return result


def _link(lab: Lab, node: str, network: str, state: str) -> None:
    _cli("lab", "fault", "link", node, network, state, "--name", lab.name)


def test_vms_on_a_shared_volume_ride_out_the_loss_of_their_paths_and_of_the_coordinators(
    lab: Lab,
) -> None:
    _cli("volume", "create", "vol1", "--array", "a1", "--size", "256M")
    _until(lambda: _volume("vol1")["coordinator"], what="vol1 has a coordinator")
    for i, node in enumerate(
        ("n1", "n2", "n3"), start=1
    ):  # through the coordinator from every node
        _cli("disk", "create", f"vol1/p{i}", "--size", "16M", "--via", node)
    _until(lambda: len(_volume("vol1")["disk_list"]) == 3, what="three disks")
    assert run_cli("disk", "create", "vol1/big", "--size", "1G").err.strip() == (
        "error: volume vol1 has 208M free; disk big needs 1G"
    )

    coordinator = _volume("vol1")["coordinator"]
    others = [n for n in ("n1", "n2", "n3") if n != coordinator]
    x, y = others  # x: the node that will lose its paths; y: the next coordinator
    vms = {}
    for name, disk, node in (("sv1", "vol1/p1", x), ("sv2", "vol1/p2", y)):
        _cli("vm", "create", name, "--memory", "128", "--disk", disk, "--preferred", node,
             "--start")  # fmt: skip
    for name in ("sv1", "sv2"):
        vms[name] = _running(name)
    sv1, sv2 = vms["sv1"], vms["sv2"]
    assert sv1["owner"] == x
    assert sv1["disks"][0]["volume_disk"] == "vol1/p1"
    _writes_on(lab, sv1, 5)
    assert _volume("vol1")["nodes"][x]["mode"] == "direct"

    # one path down: direct on the other
    _link(lab, x, "storage-a", "down")
    _writes_on(lab, sv1)
    assert _volume("vol1")["nodes"][x]["mode"] == "direct"

    # both down: redirected through the coordinator, and the guest writes on
    _link(lab, x, "storage-b", "down")
    _mode("vol1", x, "redirected")
    _writes_on(lab, sv1)
    assert any(e["subject"] == f"{x}/sv1.disk0" for e in _events("disk.redirected"))

    # the coordinator loses its own paths: the volume moves to y, x follows it
    for network in ("storage-a", "storage-b"):
        _link(lab, coordinator, network, "down")
    _until(lambda: _volume("vol1")["coordinator"] == y, what="the coordinator moved to y")
    moved_at = _acks(lab, sv1)
    time.sleep(3)
    _writes_on(lab, sv1)
    assert _acks(lab, sv1) > moved_at
    for network in ("storage-a", "storage-b"):
        _link(lab, coordinator, network, "up")

    # a disk operation through the new coordinator, asked of the node with no path
    _cli("disk", "snapshot", "vol1/p3", "s3", "--via", x)
    _until(lambda: any(d["name"] == "s3" for d in _volume("vol1")["disk_list"]), what="s3")

    # a path back: direct again
    _link(lab, x, "storage-a", "up")
    _mode("vol1", x, "direct")
    _writes_on(lab, sv1)
    assert any(e["subject"] == f"{x}/sv1.disk0" for e in _events("disk.direct"))

    # the same instances all along: no I/O error reached either guest
    for name, before in vms.items():
        now = _vm(name)
        assert (now["owner"], now["generation"]) == (before["owner"], before["generation"])
    assert "vm.instance.lost-disk" not in (lab.host_dir(x) / "agent.log").read_text()
    _link(lab, x, "storage-b", "up")
    for name in vms:
        _cli("vm", "stop", name)
    _check_probe(lab)
    del sv2


def test_the_coordinators_node_crashes_and_the_vms_elsewhere_never_stop(lab: Lab) -> None:
    _cli("volume", "create", "vol2", "--array", "a2", "--size", "128M")
    coordinator = _until(lambda: _volume("vol2")["coordinator"], what="vol2 has a coordinator")
    x = next(n for n in ("n1", "n2", "n3") if n != coordinator)
    _cli("disk", "create", "vol2/q1", "--size", "16M", "--via", x)
    _until(lambda: _volume("vol2")["disks"] == 1, what="q1 made")
    _cli("vm", "create", "sv3", "--memory", "128", "--disk", "vol2/q1", "--preferred", x,
         "--start")  # fmt: skip
    sv3 = _running("sv3")
    assert sv3["owner"] == x
    _writes_on(lab, sv3, 5)

    _cli("lab", "fault", "crash", coordinator, "--name", lab.name)
    moved = _until(lambda: (c := _volume("vol2", x)["coordinator"]) not in (None, coordinator)
                   and c, what="the coordinator moved off the crashed node")  # fmt: skip
    assert moved != coordinator
    _writes_on(lab, sv3)
    _cli("disk", "create", "vol2/q2", "--size", "8M", "--via", x)
    _cli("disk", "resize", "vol2/q2", "--size", "16M", "--via", x)
    _cli("disk", "clone", "vol2/q2", "vol2/q3", "--via", x)
    _cli("disk", "delete", "vol2/q3", "--via", x)
    disks = {d["name"]: d["size_bytes"] for d in _volume("vol2", x)["disk_list"]}
    assert disks == {"q1": 16 << 20, "q2": 16 << 20}
    events = [e for e in _events("volume.coordinator") if e["subject"] == "vol2"]
    # moved as soon as the crashed node looked isolated or down (its lease, not yet expired,
    # lets it write nothing: every coordinator commit compares the volume's coordinator term)
    assert any(f": {coordinator} is " in e["reason"] for e in events), events

    # the running VM's disk grown through the new coordinator: the guest is told, and writes on
    console = lab.host_dir(x) / "data" / "vms" / "sv3" / f"g{sv3['generation']}.console"
    _cli("disk", "resize", "vol2/q1", "--size", "24M", "--via", x)
    _until(lambda: f"disk size now {(24 << 20) // 512} sectors" in console.read_text("utf-8",
           "replace"), what="the guest to see q1 grown")  # fmt: skip
    _writes_on(lab, sv3)
    assert {d["name"]: d["size_bytes"] for d in _volume("vol2")["disk_list"]}["q1"] == 24 << 20
    assert any(e["subject"] == f"{x}/sv3.disk0" for e in _events("disk.grown"))
    assert "vm.disk.grown vm=sv3" in (lab.host_dir(x) / "agent.log").read_text()

    now = _vm("sv3")
    assert (now["owner"], now["generation"]) == (x, sv3["generation"]), "the VM never stopped"
    _cli("lab", "fault", "heal", "--name", lab.name)
    _cli("vm", "stop", "sv3")
    _check_probe(lab)
