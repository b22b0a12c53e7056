"""The single-host VM store: all-or-nothing creates and deletes, serialised changes."""

import threading
import time
from pathlib import Path

import pytest

from vmcluster.core.model import DiskSpec, VmSpec
from vmcluster.core.units import MIB
from vmcluster.errors import AlreadyExists, NotFound, VmclusterError
from vmcluster.local.store import Desired, Runtime, VmStore


def _spec(name: str) -> VmSpec:
    return VmSpec(name=name, disks=(DiskSpec(name="disk0", size_bytes=4 * MIB),))


def _nothing(_: Path) -> None:
    pass


def test_create_then_load(tmp_path: Path) -> None:
    store = VmStore(tmp_path / "vms")
    store.create(_spec("a1"), _nothing)
    assert store.names() == ["a1"]
    assert store.exists("a1")
    assert store.load_spec("a1") == _spec("a1")
    assert store.load_runtime("a1") == Runtime()


def test_failed_prepare_leaves_nothing_behind(tmp_path: Path) -> None:
    store = VmStore(tmp_path / "vms")

    def explode(vm_dir: Path) -> None:
        (vm_dir / "disk0.raw").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.create(_spec("a1"), explode)
    assert store.names() == []
    assert list((tmp_path / "vms").iterdir()) == []


def test_duplicate_create_keeps_the_first(tmp_path: Path) -> None:
    store = VmStore(tmp_path / "vms")
    store.create(_spec("a1"), _nothing)
    store.save_runtime("a1", Runtime(desired=Desired.RUNNING, boot=3))
    with pytest.raises(AlreadyExists, match="VM 'a1' already exists"):
        store.create(_spec("a1"), lambda d: (d / "marker").touch())
    assert store.load_runtime("a1").boot == 3
    assert not (tmp_path / "vms" / "a1" / "marker").exists()
    assert [p.name for p in (tmp_path / "vms").iterdir()] == ["a1"]


def test_concurrent_creates_of_one_name_have_one_winner(tmp_path: Path) -> None:
    store = VmStore(tmp_path / "vms")
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def slow_prepare(vm_dir: Path) -> None:
        barrier.wait(timeout=10)  # every thread is inside create() before any renames

    def attempt() -> None:
        try:
            store.create(_spec("race"), slow_prepare)
            outcomes.append("created")
        except AlreadyExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(outcomes) == ["created"] + ["exists"] * 7
    assert store.names() == ["race"]
    assert [p.name for p in (tmp_path / "vms").iterdir()] == ["race"]


def test_runtime_round_trip(tmp_path: Path) -> None:
    store = VmStore(tmp_path / "vms")
    store.create(_spec("a1"), _nothing)
    runtime = Runtime(
        desired=Desired.RUNNING, boot=2, generation=2, pid=42, start_ticks=7, accel="tcg",
        http_ports=(8080,), started_at=1.5, stop_reason=None,
    )  # fmt: skip
    store.save_runtime("a1", runtime)
    assert store.load_runtime("a1") == runtime


def test_delete_and_unknown_names(tmp_path: Path) -> None:
    store = VmStore(tmp_path / "vms")
    store.create(_spec("a1"), _nothing)
    with store.lock("a1"):
        store.delete("a1")
    assert store.names() == []
    assert list((tmp_path / "vms").iterdir()) == []
    for call in (store.load_spec, store.load_runtime):
        with pytest.raises(NotFound, match="VM 'a1' does not exist"):
            call("a1")
    with pytest.raises(NotFound), store.lock("a1"):
        pass


def test_lock_serialises_and_sees_a_delete_made_while_waiting(tmp_path: Path) -> None:
    store = VmStore(tmp_path / "vms")
    store.create(_spec("a1"), _nothing)
    waited: list[BaseException | None] = []
    entered = threading.Event()

    def second() -> None:
        entered.set()
        try:
            with store.lock("a1"):
                waited.append(None)
        except NotFound as exc:
            waited.append(exc)

    with store.lock("a1"):
        thread = threading.Thread(target=second)
        thread.start()
        entered.wait(timeout=5)
        time.sleep(0.2)
        assert waited == [], "the second locker waits"
        store.delete("a1")
    thread.join(timeout=5)
    assert len(waited) == 1
    assert isinstance(waited[0], NotFound)


def test_corrupt_state_is_reported_with_its_path(tmp_path: Path) -> None:
    store = VmStore(tmp_path / "vms")
    store.create(_spec("a1"), _nothing)
    (tmp_path / "vms" / "a1" / "state.json").write_text("{not json")
    with pytest.raises(VmclusterError, match=r"VM 'a1': its state file .*state.json is corrupt"):
        store.load_runtime("a1")
