"""QmpSession against a fake QEMU monitor (tests/fakes/qmp_server.py) over a real unix socket."""

import asyncio
import contextlib
import gc
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncGenerator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError
from tests.fakes.qmp_server import QEMU_VERSION, FakeQmpServer

from vmcluster.errors import HypervisorError
from vmcluster.hypervisor.qmp import QemuEvent, QmpSession, RunStatus

pytestmark = pytest.mark.timeout(10)

VM = "web1"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run(coro), failing the test if asyncio reported any error on the way.

    Catches "Task exception was never retrieved", "Task was destroyed but it is pending" and
    errors in callbacks, which asyncio only logs.
    """
    reported: list[dict[str, Any]] = []

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        return await coro

    try:
        result = asyncio.run(main())
    finally:
        gc.collect()  # abandoned tasks report their unretrieved exceptions when collected
    assert not reported, f"asyncio reported: {[ctx.get('message') for ctx in reported]}"
    return result


@pytest.fixture
def sock() -> Iterator[Path]:
    """A socket path short enough for AF_UNIX (pytest's tmp_path can exceed 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="vmc-qmp-"))
    try:
        yield directory / "qmp.sock"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def events_of(session: QmpSession) -> AsyncGenerator[QemuEvent, None]:
    return session.events()


async def next_event(events: AsyncGenerator[QemuEvent, None], timeout_s: float = 2.0) -> QemuEvent:
    async with asyncio.timeout(timeout_s):
        return await anext(events)


async def all_events(session: QmpSession) -> list[QemuEvent]:
    return [qemu_event async for qemu_event in session.events()]


@pytest.mark.parametrize(
    ("qemu_status", "running"),
    [("running", True), ("paused", False), ("io-error", False), ("inmigrate", False)],
)
def test_connect_then_status_reports_qemus_run_state(
    sock: Path, qemu_status: str, running: bool
) -> None:
    async def scenario() -> None:
        async with FakeQmpServer(sock, status=qemu_status) as qemu:
            session = QmpSession(sock, name=VM)
            await session.connect(timeout_s=2)
            try:
                assert session.connected
                assert await session.status() == RunStatus(status=qemu_status, running=running)
                qemu.status = "running"
                assert await session.status() == RunStatus(status="running", running=True)
            finally:
                await session.close()
            assert [msg["execute"] for msg in qemu.received] == [
                "qmp_capabilities",
                "query-status",
                "query-status",
            ]

    run(scenario())


def test_execute_returns_the_commands_return_value(sock: Path) -> None:
    async def scenario() -> None:
        async with FakeQmpServer(sock) as qemu:
            qemu.reply_with("query-block", [{"device": "vda", "locked": False}])
            async with QmpSession(sock, name=VM) as session:
                assert await session.execute("query-version") == QEMU_VERSION
                assert await session.execute("query-block") == [{"device": "vda", "locked": False}]
                await session.execute("stop", {})
                assert (await session.status()).status == "paused"

    run(scenario())


def test_unknown_command_raises_hypervisor_error_naming_vm_and_command(sock: Path) -> None:
    async def scenario() -> None:
        async with FakeQmpServer(sock), QmpSession(sock, name=VM) as session:
            with pytest.raises(HypervisorError) as caught:
                await session.execute("no-such-command")
            message = str(caught.value)
            assert VM in message
            assert "no-such-command" in message
            assert "has not been found" in message  # QEMU's own reason
            assert isinstance(caught.value.__cause__, ExecuteError)
            # The session survives a failed command.
            assert (await session.status()).running

    run(scenario())


def test_command_error_reply_carries_qemus_description(sock: Path) -> None:
    async def scenario() -> None:
        async with FakeQmpServer(sock) as qemu, QmpSession(sock, name=VM) as session:
            qemu.fail_with("blockdev-del", "Node 'disk0' is busy: node is used as backing hd")
            with pytest.raises(HypervisorError, match=r"web1.*blockdev-del.*is busy"):
                await session.execute("blockdev-del", {"node-name": "disk0"})
            assert qemu.received[-1]["arguments"] == {"node-name": "disk0"}

    run(scenario())


def test_command_without_answer_times_out_with_hypervisor_error(sock: Path) -> None:
    async def scenario() -> None:
        async with FakeQmpServer(sock) as qemu, QmpSession(sock, name=VM) as session:
            qemu.ignore("query-migrate")
            started = time.monotonic()
            with pytest.raises(HypervisorError) as caught:
                await session.execute("query-migrate", timeout_s=0.3)
            elapsed = time.monotonic() - started
            assert 0.25 <= elapsed < 2.0
            assert VM in str(caught.value)
            assert "query-migrate" in str(caught.value)
            assert isinstance(caught.value.__cause__, TimeoutError)
            # A later command still gets its own answer.
            assert await session.status() == RunStatus(status="running", running=True)

    run(scenario())


def test_connect_without_server_retries_then_raises_within_its_timeout(sock: Path) -> None:
    async def scenario() -> None:
        session = QmpSession(sock, name=VM)
        started = time.monotonic()
        with pytest.raises(HypervisorError) as caught:
            await session.connect(timeout_s=0.4)
        elapsed = time.monotonic() - started
        assert 0.35 <= elapsed < 2.0  # kept trying until the timeout, not longer
        assert VM in str(caught.value)
        assert str(sock) in str(caught.value)
        assert not session.connected
        await session.close()

    run(scenario())


def test_connect_to_stale_socket_retries_then_raises(sock: Path) -> None:
    """The socket file of a QEMU that died: connecting is refused, not 'not found'."""

    async def scenario() -> None:
        session = QmpSession(sock, name=VM)
        started = time.monotonic()
        with pytest.raises(HypervisorError, match=VM):
            await session.connect(timeout_s=0.4)
        assert 0.35 <= time.monotonic() - started < 2.0

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock))  # bound, never listening: ECONNREFUSED
        run(scenario())


def test_connect_succeeds_when_server_appears_while_retrying(sock: Path) -> None:
    async def scenario() -> None:
        qemu = FakeQmpServer(sock, status="paused")

        async def start_late() -> None:
            await asyncio.sleep(0.3)
            await qemu.start()

        starter = asyncio.create_task(start_late())
        session = QmpSession(sock, name=VM)
        try:
            started = time.monotonic()
            await session.connect(timeout_s=3)
            assert time.monotonic() - started >= 0.25
            assert await session.status() == RunStatus(status="paused", running=False)
        finally:
            await session.close()
            await starter
            await qemu.stop()

    run(scenario())


def test_connect_to_a_silent_server_times_out(sock: Path) -> None:
    """A QEMU that accepts the connection but never greets (wedged) is a timeout too."""

    async def scenario() -> None:
        async with FakeQmpServer(sock, greet=False) as qemu:
            session = QmpSession(sock, name=VM)
            started = time.monotonic()
            with pytest.raises(HypervisorError, match=VM):
                await session.connect(timeout_s=0.3)
            assert time.monotonic() - started < 2.0
            assert not session.connected
            await session.close()
            await qemu.wait_for_clients(0)

    run(scenario())


def test_events_arrive_as_qemu_events_with_name_data_and_timestamp(sock: Path) -> None:
    io_error = {
        "device": "",
        "node-name": "disk0",
        "operation": "write",
        "action": "stop",
        "nospace": True,
        "reason": "No space left on device",
    }

    async def scenario() -> None:
        async with FakeQmpServer(sock) as qemu, QmpSession(sock, name=VM) as session:
            sent = await qemu.emit("BLOCK_IO_ERROR", io_error, timestamp=(1_700_000_000, 250_000))
            assert sent == 1
            assert await qemu.emit("STOP", timestamp=(1_700_000_001, 5)) == 1  # no "data"
            async with contextlib.aclosing(events_of(session)) as events:
                first = await next_event(events)
                second = await next_event(events)
            assert first == QemuEvent(
                name="BLOCK_IO_ERROR", data=io_error, timestamp=1_700_000_000.25
            )
            assert second.name == "STOP"
            assert second.data == {}
            assert second.timestamp == pytest.approx(1_700_000_001.000005, abs=1e-6)

    run(scenario())


def test_events_iterator_ends_when_the_server_closes_the_connection(sock: Path) -> None:
    async def scenario() -> None:
        async with FakeQmpServer(sock) as qemu, QmpSession(sock, name=VM) as session:
            seen: list[QemuEvent] = []
            first_seen = asyncio.Event()

            async def consume() -> None:
                async for qemu_event in session.events():
                    seen.append(qemu_event)
                    first_seen.set()

            consumer = asyncio.create_task(consume())
            await qemu.emit("RESUME")
            async with asyncio.timeout(2):
                await first_seen.wait()
            await qemu.drop()  # QEMU crashed
            async with asyncio.timeout(2):
                await consumer  # ends by itself, without error
            assert [e.name for e in seen] == ["RESUME"]
            assert not session.connected

    run(scenario())


def test_powerdown_then_events_show_powerdown_and_shutdown_and_end(sock: Path) -> None:
    async def scenario() -> None:
        # The guest takes a moment to power off after the ACPI button, as a real one does.
        async with FakeQmpServer(sock, shutdown_delay_s=0.05) as qemu:
            async with QmpSession(sock, name=VM) as session:
                await session.powerdown()
                async with asyncio.timeout(2):
                    seen = await all_events(session)
                assert [e.name for e in seen] == ["POWERDOWN", "SHUTDOWN"]
                assert seen[1].data == {"guest": True, "reason": "guest-shutdown"}
                assert not session.connected
            assert qemu.exited

    run(scenario())


def test_events_sent_right_before_qemu_exits_are_not_lost(sock: Path) -> None:
    """A guest panic with -action panic=shutdown: GUEST_PANICKED, SHUTDOWN, exit, back to back."""

    async def scenario() -> None:
        async with FakeQmpServer(sock) as qemu, QmpSession(sock, name=VM) as session:
            consumer = asyncio.create_task(all_events(session))
            await asyncio.sleep(0.05)  # the consumer is waiting for events
            await qemu.emit("GUEST_PANICKED", {"action": "pause"})
            await qemu.emit("SHUTDOWN", {"guest": True, "reason": "guest-panic"})
            await qemu.drop()
            async with asyncio.timeout(2):
                seen = await consumer
            assert [e.name for e in seen] == ["GUEST_PANICKED", "SHUTDOWN"]

    run(scenario())


def test_close_is_safe_after_the_server_went_away_and_twice(sock: Path) -> None:
    async def scenario() -> None:
        async with FakeQmpServer(sock) as qemu:
            session = QmpSession(sock, name=VM)
            await session.connect(timeout_s=2)
            await qemu.drop()
            async with asyncio.timeout(2):
                assert await all_events(session) == []  # wait until it noticed the hang-up
            with pytest.raises(HypervisorError, match=r"web1.*query-status"):
                await session.status()
            await session.close()
            await session.close()
            assert not session.connected
            with pytest.raises(HypervisorError, match=r"web1.*query-status"):
                await session.status()

    run(scenario())


def test_close_right_after_the_server_dropped_us(sock: Path) -> None:
    """close() while the library may not even have read the hang-up yet."""

    async def scenario() -> None:
        async with FakeQmpServer(sock) as qemu:
            session = QmpSession(sock, name=VM)
            await session.connect(timeout_s=2)
            await qemu.drop()
            await session.close()
            await session.close()
            assert not session.connected

    run(scenario())


def test_close_of_a_never_connected_session_is_a_no_op() -> None:
    async def scenario() -> None:
        session = QmpSession(Path("/nonexistent/qmp.sock"), name=VM)
        await session.close()
        assert not session.connected

    run(scenario())


def test_async_with_connects_and_disconnects(sock: Path) -> None:
    async def scenario() -> None:
        async with FakeQmpServer(sock) as qemu:
            async with QmpSession(sock, name=VM) as session:
                assert session.connected
                assert qemu.client_count == 1
                assert (await session.status()).running
            assert not session.connected
            await qemu.wait_for_clients(0)

    run(scenario())


def test_async_with_disconnects_when_the_body_raises(sock: Path) -> None:
    async def scenario() -> None:
        async with FakeQmpServer(sock) as qemu:
            session = QmpSession(sock, name=VM)
            with pytest.raises(RuntimeError, match="boom"):
                async with session:
                    raise RuntimeError("boom")
            assert not session.connected
            await qemu.wait_for_clients(0)

    run(scenario())
