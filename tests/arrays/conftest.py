"""A real qemu-storage-daemon for array tests, an NBD client that holds its connection, and the
harnesses of the driver conformance suite (one per ArrayDriver: FakeArray, QsdArray on a real
daemon, ServiceArray over a real array service with a real daemon behind it, and ServiceArray over
the service's code on a FakeArray in a thread)."""

import asyncio
import contextlib
import http.client
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
from aiohttp import web

from vmcluster.arrays.client import ServiceArray
from vmcluster.arrays.driver import ArrayDriver
from vmcluster.arrays.fake import FakeArray, FakeNbdClient
from vmcluster.arrays.qsd import QsdArray
from vmcluster.arrays.service import ArrayService
from vmcluster.arrays.serviceconfig import ServiceConfig


@dataclass
class Daemon:
    array: QsdArray
    port: int
    argv: list[str]
    proc: subprocess.Popen[bytes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_daemon(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill a process this test started, by its pid, and reap it."""
    proc.kill()
    proc.wait(timeout=10)


@contextlib.contextmanager
def running_daemon(directory: Path) -> Iterator[Daemon]:
    run_dir = Path(tempfile.mkdtemp(prefix="vmc-qsd-"))  # short: unix socket paths are limited
    qmp = run_dir / "qmp.sock"
    port = _free_port()
    argv = ["qemu-storage-daemon", "--chardev", f"socket,id=qmp,path={qmp},server=on,wait=off",
            "--monitor", "chardev=qmp",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"]  # fmt: skip
    holder = Daemon(array=QsdArray(name="a1", qmp_socket=qmp, directory=directory,
                                   connect_timeout_s=1.0),
                    port=port, argv=argv, proc=start_daemon(argv))  # fmt: skip
    try:
        yield holder
    finally:
        stop(holder.proc)
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path / "a1") as holder:
        yield holder


class NbdClient:
    """qemu-io holding one NBD connection open, driven one command at a time (it reads its next
    command only after printing its prompt again)."""

    PROMPT = b"qemu-io> "

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "raw", url],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)  # fmt: skip
        self.output = b""
        self.prompts = 0
        self._read_until_prompt()

    def _read_until_prompt(self, timeout_s: float = 30) -> str:
        assert self.proc.stdout is not None
        start = len(self.output)
        self.prompts += 1
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while self.output.count(self.PROMPT) < self.prompts and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.output += chunk
        return self.output[start:].decode(errors="replace")

    def run(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n".encode())
        self.proc.stdin.flush()
        return self._read_until_prompt()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ----- the conformance suite's harnesses -----


class Client(Protocol):
    """An NBD client holding one connection to one export, writing and reading 4 KiB blocks."""

    def write(self, offset: int, pattern: int) -> bool:
        """Whether the write went through."""
        ...

    def reads(self, offset: int, pattern: int) -> bool:
        """Whether the block at ``offset`` reads back as ``pattern`` (0: never written)."""
        ...


@dataclass
class QemuIoClient:
    nbd: NbdClient

    def write(self, offset: int, pattern: int) -> bool:
        return "wrote 4096/4096 bytes" in self.nbd.run(f"write -P {pattern:#x} {offset} 4k")

    def reads(self, offset: int, pattern: int) -> bool:
        out = self.nbd.run(f"read -P {pattern:#x} {offset} 4k")
        return "read 4096/4096 bytes" in out and "Pattern verification failed" not in out


@dataclass
class FakeClient:
    fake: FakeNbdClient

    def write(self, offset: int, pattern: int) -> bool:
        return self.fake.write(offset, bytes([pattern]) * 4096)

    def reads(self, offset: int, pattern: int) -> bool:
        data = self.fake.read(offset)
        if data is None:  # cut
            return False
        return data == bytes([pattern]) * 4096 or (pattern == 0 and data == b"")


class Harness(Protocol):
    """One ArrayDriver implementation over one array, and what the suite does around it."""

    kind: str
    driver: ArrayDriver

    def second_driver(self) -> ArrayDriver:
        """Another client of the same array (another leader, over the other path)."""
        ...

    def client(self, export: str) -> contextlib.AbstractContextManager[Client]: ...

    async def restart_service(self) -> None:
        """The array's management side restarts (its service; for a driver without one, the
        driver itself: a new object over the same array)."""
        ...

    async def stop_daemon(self) -> None:
        """The array's data side dies (its clients are cut, its exports forgotten)."""
        ...

    async def start_daemon(self) -> None:
        """... and comes back (its configuration restored by the array host)."""
        ...


@dataclass
class FakeHarness:
    kind: str = "fake"
    driver: FakeArray = field(default_factory=FakeArray)

    def second_driver(self) -> ArrayDriver:
        return self.driver  # one array: whoever reaches it reaches this object

    @contextlib.contextmanager
    def client(self, export: str) -> Iterator[Client]:
        yield FakeClient(self.driver.connect(export))

    async def restart_service(self) -> None:
        pass  # no service: its state is the array's

    async def stop_daemon(self) -> None:
        self.driver.restart()
        self.driver.available = False

    async def start_daemon(self) -> None:
        self.driver.available = True


@dataclass
class QsdHarness:
    daemon: Daemon
    kind: str = "qsd"

    @property
    def driver(self) -> QsdArray:
        return self.daemon.array

    def second_driver(self) -> ArrayDriver:
        a = self.daemon.array
        return QsdArray(name=a.name, qmp_socket=a.qmp_socket, directory=a.directory,
                        connect_timeout_s=a.connect_timeout_s)  # fmt: skip

    @contextlib.contextmanager
    def client(self, export: str) -> Iterator[Client]:
        nbd = NbdClient(f"nbd://127.0.0.1:{self.daemon.port}/{export}")
        try:
            yield QemuIoClient(nbd)
        finally:
            nbd.close()

    async def restart_service(self) -> None:
        a = self.daemon.array
        self.daemon.array = QsdArray(name=a.name, qmp_socket=a.qmp_socket, directory=a.directory,
                                     connect_timeout_s=a.connect_timeout_s)  # fmt: skip

    async def stop_daemon(self) -> None:
        await asyncio.to_thread(stop, self.daemon.proc)

    async def start_daemon(self) -> None:
        self.daemon.proc = start_daemon(self.daemon.argv)
        await self.daemon.array.restore()  # the array host's own restore, as the service does


SERVICE_READY_TIMEOUT_S = 20.0


@dataclass
class Service:
    """``vmcluster array serve`` as a real process on two loopback addresses (two paths)."""

    daemon: Daemon
    config_path: Path
    log_path: Path
    addresses: tuple[str, ...]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmcluster", "array", "serve", "--config",
                 str(self.config_path)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        self.wait_ready()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self) -> None:
        """Until GET /v1/status answers 200 on every address (the daemon restored)."""
        assert self.proc is not None
        deadline = time.monotonic() + SERVICE_READY_TIMEOUT_S
        waiting = list(self.addresses)
        while waiting:
            assert self.proc.poll() is None, f"the array service exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"the array service is not ready:\n{self.log()}"
            if http_request(waiting[0], "GET", "/v1/status")[0] == 200:
                waiting.pop(0)
            else:
                time.sleep(0.05)


def http_request(address: str, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, object]:  # fmt: skip
    """One raw HTTP request: (status, decoded JSON body); (0, reason) if nothing answered."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
    except OSError as exc:
        return 0, str(exc)
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")


@contextlib.contextmanager
def running_service(daemon: Daemon, tmp_path: Path) -> Iterator[Service]:
    port = _free_port()
    addresses = (f"127.0.0.1:{port}", f"127.0.0.2:{port}")
    config = ServiceConfig(array="a1", directory=str(daemon.array.directory),
                           qmp_socket=str(daemon.array.qmp_socket), listen=addresses)  # fmt: skip
    config_path = tmp_path / "array-service.toml"
    config_path.write_text(config.to_toml())
    service = Service(daemon=daemon, config_path=config_path,
                      log_path=tmp_path / "array-service.log", addresses=addresses)  # fmt: skip
    try:
        service.start()
        yield service
    finally:
        service.stop()


@dataclass
class ServiceHarness:
    service: Service
    kind: str = "service"

    @property
    def driver(self) -> ServiceArray:
        return ServiceArray(name="a1", addresses=self.service.addresses)

    def second_driver(self) -> ArrayDriver:
        return ServiceArray(name="a1", addresses=self.service.addresses[::-1])  # the other path

    @contextlib.contextmanager
    def client(self, export: str) -> Iterator[Client]:
        nbd = NbdClient(f"nbd://127.0.0.1:{self.service.daemon.port}/{export}")
        try:
            yield QemuIoClient(nbd)
        finally:
            nbd.close()

    async def restart_service(self) -> None:
        def restart() -> None:
            self.service.stop()
            self.service.start()

        await asyncio.to_thread(restart)

    async def stop_daemon(self) -> None:
        await asyncio.to_thread(stop, self.service.daemon.proc)

    async def start_daemon(self) -> None:
        self.service.daemon.proc = start_daemon(self.service.daemon.argv)  # the service restores


class ThreadedService:
    """The array service's code (ArrayService) over a FakeArray, in a thread with its own event
    loop, on two loopback addresses: the service and its client without a daemon (fast)."""

    def __init__(self, fake: FakeArray) -> None:
        self.fake = fake
        port = _free_port()
        self.addresses = (f"127.0.0.1:{port}", f"127.0.0.2:{port}")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def start(self) -> None:
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_until_complete,
                                        args=(self._serve(ready),), daemon=True)  # fmt: skip
        self._thread.start()
        assert ready.wait(10), "the in-process array service did not start"

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        runner = web.AppRunner(ArrayService(self.fake).app(), access_log=None)
        await runner.setup()
        try:
            for address in self.addresses:
                host, _, port = address.rpartition(":")
                await web.TCPSite(runner, host, int(port), reuse_address=True).start()
            ready.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        stopping = self._stopping
        assert stopping is not None
        self._loop.call_soon_threadsafe(stopping.set)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None


@dataclass
class ThreadedServiceHarness:
    service: ThreadedService
    kind: str = "service-fake"

    @property
    def driver(self) -> ServiceArray:
        return ServiceArray(name="a1", addresses=self.service.addresses)

    def second_driver(self) -> ArrayDriver:
        return ServiceArray(name="a1", addresses=self.service.addresses[::-1])

    @contextlib.contextmanager
    def client(self, export: str) -> Iterator[Client]:
        yield FakeClient(self.service.fake.connect(export))

    async def restart_service(self) -> None:
        await asyncio.to_thread(self.service.stop)
        await asyncio.to_thread(self.service.start)

    async def stop_daemon(self) -> None:
        self.service.fake.restart()
        self.service.fake.available = False  # the service answers 503

    async def start_daemon(self) -> None:
        self.service.fake.available = True


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """A real array service (two loopback addresses) over a real daemon."""
    with running_daemon(tmp_path / "a1") as holder, running_service(holder, tmp_path) as svc:
        yield svc


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service for a module's tests that change nothing (input the service refuses)."""
    tmp_path = tmp_path_factory.mktemp("service")
    with running_daemon(tmp_path / "a1") as holder, running_service(holder, tmp_path) as svc:
        yield svc


@pytest.fixture(
    params=[
        "fake",
        "service-fake",
        pytest.param("qsd", marks=pytest.mark.integration),
        pytest.param("service", marks=pytest.mark.integration),
    ]
)
def array(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """Each ArrayDriver in turn, over a fresh array."""
    if request.param == "fake":
        yield FakeHarness()
        return
    if request.param == "service-fake":
        threaded = ThreadedService(FakeArray())
        threaded.start()
        try:
            yield ThreadedServiceHarness(threaded)
        finally:
            threaded.stop()
        return
    with running_daemon(tmp_path / "a1") as holder:
        if request.param == "qsd":
            yield QsdHarness(holder)
            return
        with running_service(holder, tmp_path) as svc:
            yield ServiceHarness(svc)
