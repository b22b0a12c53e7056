"""A QEMU whose start is cancelled while it launches (the agent stopping) runs on: it is put on
record for the next run to adopt, and the watchdog keeps covering it meanwhile, so that it is
still killed if the node's lease ends before anyone takes it over."""

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tests.agent.test_hosting_adopt import _fake_qemu
from tests.support import kill_by_pid

from vmcluster.agent import hosting
from vmcluster.agent.config import AgentConfig, VmSettings
from vmcluster.agent.hosting import VmHost
from vmcluster.agent.lease import QuorumState
from vmcluster.agent.watchdog import state_path
from vmcluster.agent.watchdoglink import WatchdogLink
from vmcluster.hypervisor import process


def test_a_qemu_launched_while_its_start_is_cancelled_stays_covered_by_the_watchdog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _fake_qemu("web", 3)
    try:
        proc = process.identify(fake.pid)
        assert proc is not None
        launched = asyncio.Event()

        def slow_launch(argv: list[str], pidfile: Path, *, what: str) -> process.ProcessId:
            time.sleep(0.5)  # QEMU's own start, in a thread
            return proc

        monkeypatch.setattr(hosting, "Launch", lambda **kwargs: None)
        monkeypatch.setattr(hosting, "build_argv", lambda launch, binary: ["qemu"])
        monkeypatch.setattr(hosting, "qemu_binary", lambda: "qemu")
        monkeypatch.setattr(process, "launch_daemon", slow_launch)
        run_dir = tmp_path / "run"
        settings = VmSettings(run_dir=str(run_dir), accel="tcg")
        host = VmHost(node="n1", data_dir=tmp_path / "data", settings=settings, arrays={},
                      on_exit=lambda instance: None)  # fmt: skip
        config = AgentConfig(cluster="c", node="n1", secrets_file="/unused",
                             networks={"cluster1": "127.0.0.1"}, etcd=("http://unused:2379",),
                             data_dir=str(tmp_path / "data"), vms=settings,
                             api_socket=str(tmp_path / "api.sock"))  # fmt: skip
        quorum = QuorumState(has_quorum=True, valid_until=time.monotonic() + 3600)
        link = WatchdogLink(config=config, host=host, quorum=quorum)
        # The watchdog process itself is not started here: its state file is what counts.
        monkeypatch.setattr(WatchdogLink, "_start", lambda self, run_dir: fake)

        async def scenario() -> None:
            vm: Any = SimpleNamespace(spec=SimpleNamespace(name="web"))
            image: Any = SimpleNamespace(kernel="k", initrd="i")
            pidfile = host.vm_dir("web") / "g3.pid"
            pidfile.parent.mkdir(parents=True)
            start = asyncio.create_task(host._launch(
                vm, 3, image, (), pidfile, run_dir / "web.g3.qmp", lambda: True))  # fmt: skip
            while ("web", 3) not in host.launching:  # noqa: ASYNC110 - a short wait
                await asyncio.sleep(0.01)
            launched.set()
            start.cancel()  # the agent stops while QEMU starts
            with pytest.raises(asyncio.CancelledError):
                await start
            assert host.instances == {}
            assert ("web", 3) not in host.launching
            link.tell()  # as after the agent's close

        run_dir.mkdir()
        asyncio.run(scenario())
        state = json.loads(state_path(run_dir).read_text())
        watched = [(i["pid"], i["start_ticks"]) for i in state["instances"]]
        assert (proc.pid, proc.start_ticks) in watched, state
        record = json.loads((host.vm_dir("web") / "g3.json").read_text())
        assert record["pid"] == proc.pid  # on record for the next run to adopt
    finally:
        kill_by_pid(fake.pid)
        fake.wait(timeout=10)
