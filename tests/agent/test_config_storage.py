"""The agent config's ``[storage]`` section (StorageSettings): the defaults, the TOML round trip,
one-line errors that name the setting, and the forwarder attachments it leads to."""

import asyncio
from pathlib import Path

import pytest

from vmcluster.agent.config import ArrayAccess, StorageSettings, load_config
from vmcluster.agent.storage import DiskAttacher
from vmcluster.clusterstate.vmrecords import ClusteredVm, DiskPlacement
from vmcluster.core.model import DiskSpec, VmSpec
from vmcluster.core.multipath import Policy
from vmcluster.errors import InvalidInput
from vmcluster.forwarder.upstream import Address
from vmcluster.hypervisor.cmdline import NbdDisk

BASE = """\
cluster = "prod"
node = "n1"
secrets_file = "/etc/vmcluster/secrets.json"
etcd = ["http://10.0.1.11:2379"]
api_socket = "/run/vmcluster/api.sock"

[networks]
cluster1 = "10.0.1.11"

[arrays.a1]
service = ["10.0.11.101:10810", "10.0.12.101:10810"]
nbd = ["10.0.11.101:10809", "10.0.12.101:10809"]
"""


def load(tmp_path: Path, storage: str = "") -> StorageSettings:
    path = tmp_path / "agent.toml"
    path.write_text(BASE + ("\n[storage]\n" + storage if storage else ""))
    return load_config(path).storage


def test_the_defaults_go_through_the_forwarder_with_failover(tmp_path: Path) -> None:
    storage = load(tmp_path)
    assert storage == StorageSettings()
    assert storage.forwarder is True
    assert storage.multipath_policy == "failover"
    assert storage.forwarder_socket == "/run/vmcluster/forwarder.sock"
    assert [storage.path_name(i) for i in range(2)] == ["path1", "path2"]


def test_every_setting_is_read_and_written_back(tmp_path: Path) -> None:
    storage = load(tmp_path, 'forwarder = true\nforwarder_socket = "/run/x/f.sock"\n'
                   'multipath_policy = "round-robin"\npaths = ["storage-a", "storage-b"]\n'
                   "no_path_timeout_s = 7\nprobe_interval_s = 0.2\n"
                   "probe_timeout_s = 0.08\n")  # fmt: skip
    assert storage == StorageSettings(forwarder_socket="/run/x/f.sock",
                                      multipath_policy="round-robin",
                                      paths=("storage-a", "storage-b"), no_path_timeout_s=7,
                                      probe_interval_s=0.2, probe_timeout_s=0.08)  # fmt: skip
    again = tmp_path / "again.toml"
    again.write_text(load_config(tmp_path / "agent.toml").to_toml())
    assert load_config(again).storage == storage


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('multipath_policy = "random"', "storage.multipath_policy 'random'"),
        ("forwarder = 1", "storage.forwarder must be true or false"),
        ('paths = "storage-a"', "storage.paths must be a list"),
        ('paths = ["a", "a"]', "listed twice"),
        ('paths = ["Bad Name"]', "storage path"),
        ('paths = ["path2"]', "not pathN"),
        ('paths = ["a-very-long-storage-path-name-over-32"]', "at most 32"),
        ("no_path_timeout_s = 0", "storage.no_path_timeout_s must be"),
        ("probe_timeout_s = -1", "storage.probe_timeout_s must be"),
        ("probe_interval_s = 100", "storage.probe_interval_s must be"),
        ("nonsense = 1", "nonsense"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        load(tmp_path, text + "\n")
    assert "\n" not in str(info.value)


def clustered(name: str = "web", disks: tuple[str, ...] = ("root",)) -> ClusteredVm:
    spec = VmSpec(name=name, disks=tuple(DiskSpec(name=d, size_bytes=1 << 24) for d in disks))
    return ClusteredVm(spec=spec, storage=tuple(DiskPlacement(disk=d, array="a1",
                                                              lun=f"{name}-{d}")
                                                for d in disks))  # fmt: skip


A1 = ArrayAccess(name="a1", service=("10.0.11.101:10810", "10.0.12.101:10810"),
                 nbd=("10.0.11.101:10809", "10.0.12.101:10809"))  # fmt: skip


def test_each_disk_is_attached_at_its_generation_over_every_portal() -> None:
    storage = StorageSettings(paths=("storage-a", "storage-b"), multipath_policy="round-robin",
                              no_path_timeout_s=7)  # fmt: skip
    attacher = DiskAttacher(node="n1", settings=storage, arrays={"a1": A1})
    specs = attacher.spec(clustered(disks=("root", "data")), 12)
    assert [(s.disk, s.generation, s.export) for s in specs] == [
        ("web.root", 12, "web-root.g12"), ("web.data", 12, "web-data.g12")]  # fmt: skip
    assert specs[0].paths == (("storage-a", Address("10.0.11.101", 10809)),
                              ("storage-b", Address("10.0.12.101", 10809)))  # fmt: skip
    assert specs[0].policy is Policy.ROUND_ROBIN
    assert specs[0].timings.no_path_timeout_s == 7


def test_without_the_forwarder_qemu_goes_to_the_first_portal() -> None:
    attacher = DiskAttacher(node="n1", settings=StorageSettings(forwarder=False),
                            arrays={"a1": A1})  # fmt: skip
    sources = asyncio.run(attacher.attach(clustered(), 3))
    assert sources == (NbdDisk(host="10.0.11.101", port=10809, export="web-root.g3"),)
