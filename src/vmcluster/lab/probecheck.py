"""``vmcluster lab check``: every probe VM's consoles (every instance, every node) against its
disk as the array holds it. The rules are in :mod:`vmcluster.guest.check`.

Consoles are read from the nodes' data directories in the lab (also of nodes that crashed: a
crashed host keeps its disk), the disk from the LUN file at the array. The list of VMs and their
LUNs comes from the cluster's API; VMs whose spec cannot be read are skipped with a note.
"""

from pathlib import Path
from typing import Any

from vmcluster.agent.hosting import console_logs
from vmcluster.guest.check import ConsoleLog, VmCheck, check_vm
from vmcluster.lab.lab import Lab


def node_consoles(lab: Lab, vm: str) -> list[ConsoleLog]:
    """Every console log of ``vm`` on every node of the lab."""
    logs = []
    for host in lab.plan().nodes:
        vm_dir = lab.host_dir(host.name) / "data" / "vms" / vm
        for generation, path in sorted(console_logs(vm_dir).items()):
            text = path.read_bytes().decode("utf-8", "replace")
            logs.append(ConsoleLog(node=host.name, generation=generation, text=text))
    return logs


def lun_file(lab: Lab, array: str, lun: str) -> Path:
    return lab.host_dir(array) / "luns" / f"{lun}.raw"


def check_lab(lab: Lab, vms: list[dict[str, Any]]) -> list[VmCheck]:
    """Check each VM of ``vms`` (as ``GET /v1/vms`` gives them) that has a disk."""
    results = []
    for vm in sorted(vms, key=lambda v: v["name"]):
        if not vm.get("disks"):
            continue
        first = vm["disks"][0]
        path = lun_file(lab, first["array"], first["lun"])
        # Consoles first: an ACK printed after the disk was read would look lost; a record
        # written after the consoles were read is merely not acknowledged yet.
        consoles = node_consoles(lab, vm["name"])
        disk = path.read_bytes() if path.exists() else b""
        results.append(check_vm(vm["name"], consoles, disk))
    return results
