"""The block forwarder for real: ``vmcluster forwarder serve`` as its own process, a real
qemu-storage-daemon (a raw file over TCP) or nbdkit as the array, the real NBD clients on the
disk's socket (qemu-io, qemu-img, nbdinfo, nbdcopy, fio), and, for the path faults, a TCP cable
per storage path inside the test that can be cut silently (blackhole) or with a reset.

The array listens on 0.0.0.0, so 127.0.0.1 and 127.0.0.2 are two paths to one export. Data is
checked where it lands: in the daemon's raw file. One forwarder process serves the module's
tests (as one serves a node; it takes seconds to start), and each test detaches what it attached;
tests that stop it, or want ``--loop asyncio``, start their own. Every process is started here and
killed by its own PID at teardown, whatever the outcome.
"""

import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from vmcluster.core.multipath import PathTimings, Policy
from vmcluster.errors import ArrayUnavailable, InvalidState
from vmcluster.forwarder.budget import MAX_PER_DISK_BYTES
from vmcluster.forwarder.client import ForwarderClient
from vmcluster.forwarder.disk import MAX_PAYLOAD_BYTES, DiskSpec
from vmcluster.forwarder.upstream import Address
from vmcluster.hypervisor.qmp import QmpSession

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DISK = "web1.root"
EXPORT = "web1-root.g1"
SIZE = 64 << 20
MIB = 1 << 20
WAIT_S = 15.0  # generous: only so that nothing hangs
# Short reconnect timings for the fault tests (the defaults back off to 2 s).
FAST_RECONNECT = {"reconnect_max_s": 0.5, "connect_timeout_s": 1.0}
# Every attach here waits 0.5 s for a probe, not the default 50 ms: on a loaded host (load average
# 4-8 on 2 CPUs) a process now and then gets no CPU for 50 ms, and the forwarder then takes live
# paths for dead (both at once: one daemon serves both), which makes exact path-state assertions
# flaky. The detection itself is the same at any timeout.
PROBE_TIMINGS = {"probe_timeout_s": 0.5}
EIO_TEXT = "Input/output error"


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install -y {tool})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def _random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def tool(*argv: str | Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a real client to completion (subprocess kills it, by its PID, on timeout)."""
    args = [str(a) for a in argv]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout


# ----- processes -----


class Processes:
    """The programs one test starts; each is stopped by its own PID at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)  # fmt: skip
        self._procs.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for _name, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    holder = Processes(tmp_path)
    try:
        yield holder
    finally:
        holder.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for log in sorted(tmp_path.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-6000:]}")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short name: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="vmc-fwd-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    pytest.fail(f"{what} does not listen on port {port} within {WAIT_S:g} s")


# ----- the array -----


@dataclass(frozen=True)
class Array:
    port: int
    raw: Path | None = None
    qmp: Path | None = None
    export: str = EXPORT

    def address(self, host: str = "127.0.0.1") -> str:
        return f"{host}:{self.port}"

    def two_paths(self) -> dict[str, str]:
        return {"a": self.address("127.0.0.1"), "b": self.address("127.0.0.2")}

    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{self.export}"


@pytest.fixture
def qsd(tmp_path: Path, procs: Processes, short_dir: Path) -> Array:
    """A qemu-storage-daemon exporting a 64 MiB raw file (discard punches holes), with QMP."""
    _need("qemu-storage-daemon")
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(SIZE)
    qmp, port = short_dir / "qmp.sock", _free_port()
    proc = procs.start("qsd", [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=disk0,filename={raw},discard=unmap",
        "--nbd-server", f"addr.type=inet,addr.host=0.0.0.0,addr.port={port}",
        "--export", f"type=nbd,id=exp0,node-name=disk0,name={EXPORT},writable=on",
        "--chardev", f"socket,id=qmp,path={qmp},server=on,wait=off",
        "--monitor", "chardev=qmp",
    ])  # fmt: skip
    _wait_listening(port, proc, "qemu-storage-daemon")
    return Array(port=port, raw=raw, qmp=qmp)


def _nbdkit(procs: Processes, *args: str) -> Array:
    _need("nbdkit")
    port = _free_port()
    proc = procs.start("nbdkit", ["nbdkit", "--exit-with-parent", "-f", "-p", str(port), *args])
    _wait_listening(port, proc, "nbdkit")
    return Array(port=port, export="mem.g1")  # nbdkit serves any name: one of generation 1


# ----- the forwarder -----


@dataclass
class Forwarder:
    ctl: Path
    run_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_from: int = 0  # the shared forwarder: this test's part of its log starts here

    def client(self) -> ForwarderClient:
        return ForwarderClient(self.ctl)

    def log(self) -> str:
        with self.log_path.open("rb") as f:
            f.seek(self.log_from)
            return f.read().decode(errors="replace")

    def attach(self, paths: dict[str, str], **how: Any) -> dict[str, Any]:
        return asyncio.run(self.client().attach(spec(paths, **how)))

    def status(self) -> list[dict[str, Any]]:
        return asyncio.run(self.client().status())

    def disk(self) -> dict[str, Any]:
        (disk,) = self.status()
        return disk

    def wait_for(self, what: str, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Poll the disk's status until ``condition`` holds."""
        deadline = time.monotonic() + WAIT_S
        while True:
            disk = self.disk()
            if condition(disk):
                return disk
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} within {WAIT_S:g} s: {json.dumps(disk)}")
            time.sleep(0.01)


def spec(paths: dict[str, str], *, export: str = EXPORT, generation: int = 1,
         policy: str = "failover", timings: dict[str, float] | None = None,
         ) -> DiskSpec:  # fmt: skip
    return DiskSpec(disk=DISK, generation=generation, export=export,
                    paths=tuple((n, Address.parse(a)) for n, a in paths.items()),
                    policy=Policy(policy),
                    timings=PathTimings(**{**PROBE_TIMINGS, **(timings or {})}))  # fmt: skip


def _start_forwarder(procs: Processes, directory: Path, loop: str) -> Forwarder:
    ctl, run_dir = directory / "ctl.sock", directory / "run"
    proc = procs.start("forwarder", [
        sys.executable, "-m", "vmcluster", "forwarder", "serve",
        "--socket", str(ctl), "--run-dir", str(run_dir), "--loop", loop,
    ])  # fmt: skip
    deadline = time.monotonic() + WAIT_S * 2  # the CLI imports the agent: seconds on a busy host
    while not ctl.exists():
        assert proc.poll() is None, f"the forwarder exited with {proc.returncode}"
        assert time.monotonic() < deadline, "the forwarder's control socket never appeared"
        time.sleep(0.02)
    return Forwarder(ctl=ctl, run_dir=run_dir, proc=proc, log_path=procs.log_dir / "forwarder.log")


@pytest.fixture(scope="module")
def shared_forwarder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forwarder]:
    """One forwarder process for the module's tests, as one serves every disk of a node (it
    takes seconds to start)."""
    holder = Processes(tmp_path_factory.mktemp("forwarder"))
    directory = Path(tempfile.mkdtemp(prefix="vmc-fwd-"))
    try:
        yield _start_forwarder(holder, directory, "uvloop")
    finally:
        holder.stop_all()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def forwarder(request: pytest.FixtureRequest, shared_forwarder: Forwarder, procs: Processes,
              short_dir: Path) -> Iterator[Forwarder]:  # fmt: skip
    """The module's forwarder with no disk attached, or (parametrized with a ``--loop``) a
    forwarder of this test's own. Whatever the test attached is detached afterwards, and the
    forwarder must have survived the test."""
    loop = getattr(request, "param", None)
    if loop is None:
        fwd = shared_forwarder
        fwd.log_from = fwd.log_path.stat().st_size
    else:
        fwd = _start_forwarder(procs, short_dir, loop)
    assert fwd.status() == [], "a disk is left from an earlier test"
    try:
        yield fwd
    finally:
        report = getattr(request.node, "rep_call", None)
        if loop is None and report is not None and report.failed:
            print(f"--- forwarder.log (this test's part)\n{fwd.log()[-8000:]}")
        if loop is None:
            assert fwd.proc.poll() is None, f"the forwarder died: {fwd.log()[-2000:]}"
            for disk in fwd.status():
                asyncio.run(fwd.client().detach(disk["disk"], disk["generation"]))


def nbd_uri(disk: dict[str, Any], export: str = EXPORT) -> str:
    return f"nbd+unix:///{export}?socket={disk['socket']}"


def _path(disk: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [p for p in disk["paths"] if p["name"] == name]
    return found


def _states(disk: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["state"] for p in disk["paths"]}


# ----- the watch stream, read synchronously -----


class Watch:
    """``{"op": "watch"}`` on the control socket; the socket buffers what the test has not read."""

    def __init__(self, ctl: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.connect(str(ctl))
        self._sock.sendall(b'{"op":"watch"}\n')
        self._buf = b""
        self.initial = self._next(time.monotonic() + WAIT_S)

    def _next(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError("the forwarder closed the watch")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        record: dict[str, Any] = json.loads(line)
        return record

    def until(self, what: str, condition: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Every event up to and including the first that meets ``condition``."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                record = self._next(deadline)
            except TimeoutError:
                pytest.fail(f"no {what} within {WAIT_S:g} s; events: {seen}")
            seen.append(record)
            if condition(record):
                return seen

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


def _path_event(path: str, state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == "path.changed" and e["path"] == path and e["state"] == state


# ----- a cable per path -----

_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset(transport: asyncio.BaseTransport | None) -> None:
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class _Link:
    """One TCP connection through the cable: the forwarder's side and the array's side."""

    def __init__(self) -> None:
        self.down: asyncio.Transport | None = None
        self.up: asyncio.Transport | None = None
        self.alive = True  # False: blackholed; what arrives is dropped, the sockets stay open
        self.early = bytearray()  # from the forwarder before the array's side is connected
        # held (a link that is down, then up again): what arrives is kept, each way, and
        # delivered when the cable is restored, as a sender's kernel retransmits it then;
        # unless the sender reset its socket (its kernel dropped it)
        self.held: dict[str, bytearray] | None = None
        self.ended: set[str] = set()  # sides that closed gracefully while held
        self.sides: list[_Side] = []

    def close(self) -> None:
        for t in (self.down, self.up):
            if t is not None and not t.is_closing():
                t.close()


class _Side(asyncio.Protocol):
    def __init__(self, relay: "_Relay", link: _Link, which: str) -> None:
        self.relay, self.link, self.which = relay, link, which

    def _peer(self) -> asyncio.Transport | None:
        return self.link.up if self.which == "down" else self.link.down

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.link.sides.append(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a wire adds no Nagle delay of its own
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.which == "up":
            self.link.up = transport
            if self.link.early:
                transport.write(bytes(self.link.early))
                self.link.early.clear()
            return
        self.link.down = transport
        self.relay.accepted(self.link)

    def data_received(self, data: bytes) -> None:
        if not self.link.alive:
            return
        if self.link.held is not None:
            self.link.held[self.which] += data
            self.relay.caught += len(data)
            return
        peer = self._peer()
        if peer is None:
            self.link.early += data
        elif not peer.is_closing():
            peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        held = self.link.held
        if held is not None and exc is None:  # a FIN waits behind what its sender sent
            self.link.ended.add(self.which)
            return
        if held is not None:  # a reset: the sender's kernel dropped what it had not delivered
            held[self.which].clear()
        self.relay.links.discard(self.link)
        self.link.close()

    def release(self) -> None:
        """Deliver what was held for the peer, then its sender's FIN if there was one."""
        held, peer = self.link.held, self._peer()
        assert held is not None
        if peer is not None and not peer.is_closing() and held[self.which]:
            peer.write(bytes(held[self.which]))
        if self.which in self.link.ended and peer is not None:
            peer.close()

    def pause_writing(self) -> None:  # our side is full: stop reading the other
        peer = self._peer()
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self._peer()
        if peer is not None and not peer.is_closing():
            peer.resume_reading()


class _Relay:
    """The cable's inside (in the cable's process): its links and its mode."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "pass"
        self.caught = 0  # bytes a hold kept, delivered later or dropped
        self.links: set[_Link] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def accepted(self, link: _Link) -> None:
        self.links.add(link)
        if self.mode == "reset":
            _reset(link.down)
        elif self.mode in ("blackhole", "hold"):  # held: a SYN into a dead link, unanswered
            link.alive = False
        else:
            task = asyncio.get_running_loop().create_task(self._connect_up(link))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _connect_up(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _Side(self, link, "up"), *self.target)
        except OSError:
            _reset(link.down)

    def set(self, mode: str) -> tuple[int, int]:
        """Take ``mode``; the bytes delivered from held links (restored to pass), and the bytes
        every hold caught."""
        self.mode = mode
        delivered = 0
        for link in list(self.links):
            if mode == "blackhole":
                link.alive = False
            elif mode == "reset":
                _reset(link.down)
                _reset(link.up)
            elif mode == "hold":
                link.held = {"down": bytearray(), "up": bytearray()}
            elif link.held is not None:  # pass again: the held links come back
                delivered += sum(map(len, link.held.values()))
                for side in link.sides:
                    side.release()
                link.held = None
                if link.ended:
                    self.links.discard(link)
        return delivered, self.caught


async def _relay_until_closed(control: Connection, target: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    relay = _Relay(target)
    server = await loop.create_server(lambda: _Side(relay, _Link(), "down"), "127.0.0.1", 0)
    control.send(server.sockets[0].getsockname()[1])
    closed = asyncio.Event()

    def command() -> None:
        try:
            mode = control.recv()
        except EOFError:
            mode = "stop"
        if mode == "stop":
            loop.remove_reader(control.fileno())
            closed.set()
            return
        delivered, caught = relay.set(mode)
        control.send(f"ok {delivered} {caught}")

    loop.add_reader(control.fileno(), command)
    await closed.wait()
    server.close()
    for link in list(relay.links):
        _reset(link.down)
        _reset(link.up)


def _cable_process(control: Connection, target: tuple[str, int]) -> None:
    asyncio.run(_relay_until_closed(control, target))


class Cable:
    """A TCP relay for one storage path (forwarder -> cable -> array), in a process of its own
    (forked: no import time, and its own GIL, so that nothing in the test delays a probe).

    ``cut("blackhole")``: nothing passes any more, every socket stays open (a silent cut), and
    new connections are accepted and then hear nothing. ``cut("reset")``: every connection is
    closed with a RST, and new ones at once. ``cut("hold")``: a link down that comes back: what
    each side sends is kept and delivered on ``restore()``, as TCP retransmits it then (a side
    that resets its socket meanwhile loses what it sent; one that closes gracefully has it
    delivered, then its FIN). ``restore()``: new connections pass again; blackholed ones stay
    dead (their streams lost bytes)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._control, child = multiprocessing.get_context("fork").Pipe()
        self._proc = multiprocessing.get_context("fork").Process(
            target=_cable_process, args=(child, (target_host, target_port)), daemon=True
        )
        self._child = child
        self.port = 0

    def __enter__(self) -> "Cable":
        self._proc.start()
        self._child.close()
        assert self._control.poll(WAIT_S), "the cable did not start"
        self.port = int(self._control.recv())
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._control.send("stop")
        self._control.close()
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()  # by its PID
            self._proc.join(timeout=5)
        self._proc.close()

    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self, how: str) -> None:
        assert how in ("blackhole", "reset", "hold")
        self._command(how)

    def restore(self) -> tuple[int, int]:
        """Pass again; the bytes a ``hold`` kept that are now delivered, and all it caught
        (delivered, or dropped with a socket its sender reset)."""
        return self._command("pass")

    def _command(self, mode: str) -> tuple[int, int]:
        self._control.send(mode)
        assert self._control.poll(WAIT_S), f"the cable did not take {mode}"
        answer = str(self._control.recv()).split()
        assert answer[0] == "ok", answer
        return int(answer[1]), int(answer[2])


@pytest.fixture
def cables(qsd: Array) -> Iterator[dict[str, Cable]]:
    """Path a through 127.0.0.1 and path b through 127.0.0.2, each through its own cable."""
    with Cable("127.0.0.1", qsd.port) as a, Cable("127.0.0.2", qsd.port) as b:
        yield {"a": a, "b": b}


def _paths(cables: dict[str, Cable]) -> dict[str, str]:
    return {name: cable.address() for name, cable in cables.items()}


def _start_writer(procs: Processes, tmp_path: Path, disk: dict[str, Any], size: int,
                  rate: str = "12M") -> tuple[subprocess.Popen[bytes], bytes]:  # fmt: skip
    """qemu-img convert of a random file into the disk, rate-limited so that it lasts ~2 s."""
    data = _random_bytes(size, seed=size)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    proc = procs.start("writer", ["qemu-img", "convert", "-n", "-W", "-m", "8", "-r", rate,
                                  "-f", "raw", "-O", "raw", str(src), nbd_uri(disk)])  # fmt: skip
    return proc, data


def _writer_succeeded(procs: Processes, proc: subprocess.Popen[bytes]) -> None:
    assert proc.wait(timeout=WAIT_S * 2) == 0, procs.log("writer")
    assert procs.log("writer").strip() == "", procs.log("writer")


def _landed(array: Array, data: bytes, offset: int = 0) -> None:
    """``data`` is exactly what the array's raw file holds at ``offset``."""
    assert array.raw is not None
    with array.raw.open("rb") as f:
        f.seek(offset)
        found = f.read(len(data))
    if found != data:
        first = next(i for i, (x, y) in enumerate(zip(found, data, strict=False)) if x != y)
        pytest.fail(f"the raw file differs from what was written at byte {offset + first}")


# ----- attach and what clients see -----


@pytest.mark.parametrize("forwarder", ["uvloop", "asyncio"], indirect=True)
def test_attach_then_qemu_io_patterns_land_in_the_raw_file(qsd: Array, forwarder: Forwarder,
                                                           tmp_path: Path) -> None:  # fmt: skip
    _need("qemu-io")
    disk = forwarder.attach(qsd.two_paths())
    assert disk["state"] == "active"
    assert disk["size_bytes"] == SIZE
    assert Path(disk["socket"]).exists()
    assert os.stat(disk["socket"]).st_mode & 0o777 == 0o600
    uri = nbd_uri(disk)
    _ok(tool("qemu-io", "-f", "raw",
             "-c", "write -P 0xa5 0 1M",
             "-c", "write -f -P 0x3c 1M 64k",          # FUA
             "-c", "write -P 0x77 4M 1M", "-c", "write -z 4M 512k",
             "-c", "write -P 0x11 6M 1M", "-c", "discard 6M 1M",
             "-c", "flush",
             "-c", "read -P 0xa5 0 1M", "-c", "read -P 0x3c 1M 64k",
             "-c", "read -P 0 4M 512k", "-c", "read -P 0x77 4608k 512k",
             "-c", "read -P 0 6M 1M", uri))  # fmt: skip
    _landed(qsd, b"\xa5" * MIB)
    _landed(qsd, b"\x3c" * (64 << 10), 1 * MIB)
    _landed(qsd, b"\0" * (512 << 10) + b"\x77" * (512 << 10), 4 * MIB)
    _landed(qsd, b"\0" * MIB, 6 * MIB)
    bad = tool("qemu-io", "-f", "raw", "-c", "read -P 0x99 0 4k", uri)
    assert bad.returncode != 0
    assert "Pattern verification failed" in bad.stdout + bad.stderr

    disk = forwarder.disk()
    assert disk["stats"]["failed"] == 0
    assert disk["stats"]["bytes_written"] >= 3 * MIB
    assert _states(disk) == {"a": "up", "b": "up"}

    assert asyncio.run(forwarder.client().detach(DISK, 1)) is True
    assert not Path(disk["socket"]).exists()
    assert forwarder.status() == []
    assert asyncio.run(forwarder.client().detach(DISK, 1)) is False


def test_nbdinfo_shows_the_arrays_export_with_its_payload_capped(
    qsd: Array, forwarder: Forwarder
) -> None:
    _need("nbdinfo")
    disk = forwarder.attach(qsd.two_paths())
    (mine,) = json.loads(_ok(tool("nbdinfo", "--json", nbd_uri(disk))))["exports"]
    (array,) = json.loads(_ok(tool("nbdinfo", "--json", qsd.uri())))["exports"]
    assert mine["export-name"] == EXPORT
    assert mine["export-size"] == SIZE
    assert "base:allocation" in mine["contexts"]
    for flag in ("is_read_only", "can_flush", "can_fua", "can_trim", "can_zero",
                 "can_multi_conn", "can_fast_zero", "can_cache"):  # fmt: skip
        assert mine[flag] == array[flag], flag
    assert mine["is_read_only"] is False
    assert mine["can_flush"]
    assert mine["can_trim"]
    assert mine["can_zero"]
    assert mine["block_size_minimum"] == array["block_size_minimum"]
    assert mine["block_size_preferred"] == array["block_size_preferred"]
    assert mine["block_size_maximum"] == min(array["block_size_maximum"], 2 * MIB)
    assert _ok(tool("nbdinfo", "--size", nbd_uri(disk))).strip() == str(SIZE)

    listed = json.loads(_ok(tool("nbdinfo", "--list", "--json", nbd_uri(disk))))
    assert [e["export-name"] for e in listed["exports"]] == [EXPORT]


def test_nbdinfo_map_after_writes_matches_the_array(qsd: Array, forwarder: Forwarder) -> None:
    _need("nbdinfo", "qemu-io")
    disk = forwarder.attach(qsd.two_paths())
    uri = nbd_uri(disk)
    before = json.loads(_ok(tool("nbdinfo", "--map", "--json", uri)))
    assert before == [{"offset": 0, "length": SIZE, "type": 3, "description": "hole,zero"}]
    _ok(tool("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", "-c", "write -P 0x43 8M 2M",
             "-c", "discard 9M 1M", "-c", "flush", uri))  # fmt: skip
    mine = json.loads(_ok(tool("nbdinfo", "--map", "--json", uri)))
    array = json.loads(_ok(tool("nbdinfo", "--map", "--json", qsd.uri())))
    assert mine == array
    assert mine[0] == {"offset": 0, "length": MIB, "type": 0, "description": "data"}
    data = [(e["offset"], e["length"]) for e in mine if e["type"] == 0]
    assert (8 * MIB, MIB) in data
    totals = _ok(tool("nbdinfo", "--map", "--totals", uri))
    assert "data" in totals


def test_qemu_img_info_convert_in_and_out_and_compare(qsd: Array, forwarder: Forwarder,
                                                      tmp_path: Path) -> None:  # fmt: skip
    _need("qemu-img")
    disk = forwarder.attach(qsd.two_paths())
    uri = nbd_uri(disk)
    info = json.loads(_ok(tool("qemu-img", "info", "--output=json", "-f", "raw", uri)))
    assert info["virtual-size"] == SIZE
    src = tmp_path / "in.raw"
    src.write_bytes(_random_bytes(16 * MIB, seed=1))
    _ok(tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri))
    _landed(qsd, src.read_bytes())
    out = tmp_path / "out.raw"
    _ok(tool("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out))
    assert out.stat().st_size == SIZE
    _ok(tool("qemu-img", "compare", "-f", "raw", "-F", "raw", out, uri))
    assert qsd.raw is not None
    _ok(tool("qemu-img", "compare", "-f", "raw", "-F", "raw", out, qsd.raw))
    same = tool("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
    assert same.returncode == 0, same.stdout  # the 16 MiB, and the rest reads as zeros


def test_nbdcopy_both_ways_over_several_connections(qsd: Array, forwarder: Forwarder,
                                                    tmp_path: Path) -> None:  # fmt: skip
    _need("nbdcopy")
    disk = forwarder.attach(qsd.two_paths(), policy="round-robin")
    uri = nbd_uri(disk)
    data = _random_bytes(SIZE, seed=2)
    src, out = tmp_path / "in.raw", tmp_path / "out.raw"
    src.write_bytes(data)
    _ok(tool("nbdcopy", "--connections=4", "--requests=16", src, uri))
    _landed(qsd, data)
    _ok(tool("nbdcopy", "--connections=4", uri, out))
    assert out.read_bytes() == data
    disk = forwarder.disk()
    assert disk["stats"]["failed"] == 0
    assert disk["stats"]["bytes_written"] == SIZE
    assert disk["stats"]["bytes_read"] >= SIZE


def test_fio_nbd_engine_verifies_what_it_wrote(qsd: Array, forwarder: Forwarder) -> None:
    _need("fio")
    engines = tool("fio", "--enghelp").stdout.split()
    if "nbd" not in engines:
        pytest.skip("this fio has no nbd ioengine (fio --enghelp)")
    disk = forwarder.attach(qsd.two_paths(), policy="round-robin")
    result = tool("fio", "--name=fwd", "--ioengine=nbd", f"--uri={nbd_uri(disk)}",
                  "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=16",
                  "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
                  "--output-format=json")  # fmt: skip
    output = _ok(result)
    report = json.loads(output[output.index("{") :])  # after "fio: connected to NBD server"
    (job,) = report["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * MIB
    assert job["read"]["io_bytes"] == 8 * MIB  # the verify pass
    assert forwarder.disk()["stats"]["failed"] == 0


@pytest.mark.parametrize("forwarder", ["uvloop"], indirect=True)  # its own: this one stops
def test_sigterm_detaches_every_disk_and_exits_cleanly(qsd: Array, forwarder: Forwarder) -> None:
    disk = forwarder.attach(qsd.two_paths())
    forwarder.proc.send_signal(signal.SIGTERM)
    assert forwarder.proc.wait(timeout=WAIT_S) == 0, forwarder.log()
    assert not Path(disk["socket"]).exists()
    assert not forwarder.ctl.exists()
    assert "forwarder.stopped" in forwarder.log()


# ----- path faults -----


@pytest.mark.parametrize("how", ["blackhole", "reset"])
def test_path_cut_under_a_writer_loses_nothing_and_the_path_comes_back(
    how: str, cables: dict[str, Cable], qsd: Array, forwarder: Forwarder, procs: Processes,
    tmp_path: Path,
) -> None:  # fmt: skip
    _need("qemu-img")
    forwarder.attach(_paths(cables), timings=FAST_RECONNECT)
    disk = forwarder.wait_for("both paths up", lambda d: _states(d) == {"a": "up", "b": "up"})
    with Watch(forwarder.ctl) as watch:
        _cut_under_a_writer(how, cables, qsd, forwarder, procs, tmp_path, disk, watch)


def _cut_under_a_writer(how: str, cables: dict[str, Cable], qsd: Array, forwarder: Forwarder,
                        procs: Processes, tmp_path: Path, disk: dict[str, Any],
                        watch: Watch) -> None:  # fmt: skip
    writer, data = _start_writer(procs, tmp_path, disk, 24 * MIB)
    forwarder.wait_for("4 MiB written", lambda d: d["stats"]["bytes_written"] >= 4 * MIB)
    assert writer.poll() is None, "the writer finished before the cut: slow it down"
    cables["a"].cut(how)

    _writer_succeeded(procs, writer)
    _landed(qsd, data)
    disk = forwarder.disk()
    assert disk["state"] == "active"
    assert _states(disk) == {"a": "down", "b": "up"}
    assert disk["stats"]["failed"] == 0
    assert f"forwarder.path.down disk={DISK} path=a" in forwarder.log()

    cables["a"].restore()
    events = watch.until("path a up again", _path_event("a", "up"))
    a_states = [e["state"] for e in events if e.get("path") == "a"]
    assert a_states == ["down", "standby", "up"], events
    assert not [e for e in events if e.get("event") == "disk.changed"], events
    assert _states(forwarder.disk()) == {"a": "up", "b": "up"}


def test_both_paths_cut_requests_wait_and_complete_when_one_returns(
    cables: dict[str, Cable], qsd: Array, forwarder: Forwarder, procs: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    _need("qemu-img")
    timings = {**FAST_RECONNECT, "no_path_timeout_s": 15}
    disk = forwarder.attach(_paths(cables), timings=timings)
    writer, data = _start_writer(procs, tmp_path, disk, 24 * MIB)
    forwarder.wait_for("4 MiB written", lambda d: d["stats"]["bytes_written"] >= 4 * MIB)
    cables["a"].cut("blackhole")
    cables["b"].cut("blackhole")
    waiting = forwarder.wait_for(
        "waiting with requests queued", lambda d: d["state"] == "waiting" and d["waiting"] > 0
    )
    assert _states(waiting) == {"a": "down", "b": "down"}
    assert writer.poll() is None, "the writer must wait, not fail"

    cables["b"].restore()
    _writer_succeeded(procs, writer)
    _landed(qsd, data)
    disk = forwarder.disk()
    assert disk["state"] == "active"
    assert disk["stats"]["failed"] == 0
    assert _path(disk, "b")["state"] in ("standby", "up")


def test_with_no_path_a_busy_writer_is_held_back_at_the_disks_share(
    cables: dict[str, Cable], qsd: Array, forwarder: Forwarder, procs: Processes, tmp_path: Path,
) -> None:  # fmt: skip
    # Requests that wait keep their data (to be sent when a path returns): the disk stops
    # reading its client at its share of the budget, so that memory stays bounded.
    _need("qemu-img")
    disk = forwarder.attach(_paths(cables), timings={**FAST_RECONNECT, "no_path_timeout_s": 15})
    cables["a"].cut("blackhole")
    cables["b"].cut("blackhole")
    forwarder.wait_for("waiting", lambda d: d["state"] == "waiting")
    writer, data = _start_writer(procs, tmp_path, disk, 48 * MIB, rate="1G")  # unthrottled
    held = forwarder.wait_for("the client paused", lambda d: d["paused"])
    time.sleep(0.5)  # the writer still pushes: nothing more is taken
    later = forwarder.disk()
    assert later["paused"]
    # The only busy disk: its share is the cap. Past it, what the same socket read completes
    # still goes in (the request that crossed it, and one whose payload that read finished).
    share, largest = MAX_PER_DISK_BYTES, MAX_PAYLOAD_BYTES
    assert share < later["in_flight_bytes"] <= share + 2 * largest, later
    assert later["in_flight_bytes"] == held["in_flight_bytes"]
    assert writer.poll() is None, "the writer must wait, not fail"

    cables["b"].restore()
    _writer_succeeded(procs, writer)
    _landed(qsd, data)
    done = forwarder.disk()
    assert not done["paused"]
    assert done["in_flight_bytes"] == 0
    assert done["stats"]["failed"] == 0


def test_no_path_for_longer_than_no_path_timeout_is_an_io_error(
    cables: dict[str, Cable], qsd: Array, forwarder: Forwarder,
) -> None:  # fmt: skip
    _need("qemu-io")
    disk = forwarder.attach(_paths(cables), timings={**FAST_RECONNECT, "no_path_timeout_s": 1})
    uri = nbd_uri(disk)
    cables["a"].cut("reset")
    cables["b"].cut("reset")
    forwarder.wait_for("waiting", lambda d: d["state"] == "waiting")

    started = time.monotonic()
    result = tool("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", uri, timeout=WAIT_S)
    elapsed = time.monotonic() - started
    assert f"write failed: {EIO_TEXT}" in result.stdout + result.stderr, result
    assert elapsed >= 1.0, f"failed after {elapsed:.2f} s, before no_path_timeout_s"
    assert forwarder.disk()["stats"]["failed"] >= 1
    assert "no storage path for 1 s" in forwarder.log()

    cables["a"].restore()
    cables["b"].restore()
    forwarder.wait_for("active again", lambda d: d["state"] == "active")
    _ok(tool("qemu-io", "-f", "raw", "-c", "write -P 0x78 0 64k", "-c", "read -P 0x78 0 64k",
             uri))  # fmt: skip
    _landed(qsd, b"\x78" * (64 << 10))


# ----- fencing and refused attaches -----


async def _delete_export(qsd: Array) -> None:
    """What the array's storage fence does: delete this generation's export, hard."""
    assert qsd.qmp is not None
    async with QmpSession(qsd.qmp, name="qsd") as qmp:
        await qmp.execute("block-export-del", {"id": "exp0", "mode": "hard"})


def _fenced_disk(qsd: Array, forwarder: Forwarder) -> dict[str, Any]:
    disk = forwarder.attach(qsd.two_paths())
    _ok(tool("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 64k", nbd_uri(disk)))
    asyncio.run(_delete_export(qsd))
    forwarder.wait_for("fenced", lambda d: d["state"] == "fenced")
    return disk


def test_a_deleted_export_fences_the_disk_in_status_and_watch(
    qsd: Array, forwarder: Forwarder
) -> None:
    _need("qemu-io")
    disk = forwarder.attach(qsd.two_paths())
    _ok(tool("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 64k", nbd_uri(disk)))

    async def fence_while_watching() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        stream = forwarder.client().watch()
        try:
            first = await anext(stream)
            assert first["ok"] is True
            assert [d["state"] for d in first["disks"]] == ["active"]
            await _delete_export(qsd)
            async with asyncio.timeout(WAIT_S):
                async for record in stream:
                    events.append(record)
                    if record.get("event") == "disk.changed" and record["state"] == "fenced":
                        break
        finally:
            await stream.aclose()
        return events

    events = asyncio.run(fence_while_watching())
    assert events[-1]["disk"] == DISK
    assert "fenced" in events[-1]["reason"]
    disk = forwarder.disk()
    assert disk["state"] == "fenced"
    for path in disk["paths"]:
        assert path["state"] == "down"
        assert path["reason"].startswith("fenced:"), path
    assert f"forwarder.disk.fenced disk={DISK}" in forwarder.log()
    _landed(qsd, b"\x61" * (64 << 10))  # what was acknowledged before the fence stays


def test_io_on_a_fenced_disk_fails_with_eio_at_once(qsd: Array, forwarder: Forwarder) -> None:
    _need("qemu-io")
    disk = _fenced_disk(qsd, forwarder)
    # Fixed (failed before): a request submitted after the fence waited no_path_timeout_s
    # (20 s) and then failed as "no storage path", instead of failing with EIO at once.
    try:
        result = tool("qemu-io", "-f", "raw", "-c", "read 0 4k", nbd_uri(disk), timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("a read on the fenced disk got no answer within 5 s (it waits "
                    "no_path_timeout_s instead of failing with EIO at once)")  # fmt: skip
    assert f"read failed: {EIO_TEXT}" in result.stdout + result.stderr, result


def test_reattach_of_a_fenced_generation_answers_fenced(qsd: Array, forwarder: Forwarder) -> None:
    _need("qemu-io")
    _fenced_disk(qsd, forwarder)
    assert asyncio.run(forwarder.client().detach(DISK, 1)) is True
    with pytest.raises(InvalidState, match="fenced"):
        forwarder.attach(qsd.two_paths())
    assert forwarder.status() == []


def test_reattach_of_a_still_attached_fenced_generation_answers_fenced(
    qsd: Array, forwarder: Forwarder
) -> None:
    _need("qemu-io")
    _fenced_disk(qsd, forwarder)
    # Fixed (failed before): the idempotent attach of a generation attached but fenced answered
    # ok with the fenced disk's status, and the agent would have handed QEMU a dead socket.
    with pytest.raises(InvalidState, match="fenced"):
        forwarder.attach(qsd.two_paths())


def test_attach_of_an_unknown_export_is_fenced(qsd: Array, forwarder: Forwarder) -> None:
    with pytest.raises(InvalidState, match=r"fenced"):
        forwarder.attach(qsd.two_paths(), export="web1-root.g9", generation=9)
    assert forwarder.status() == []
    assert "forwarder.attach.failed" in forwarder.log()


def test_attach_with_no_reachable_path_is_array_unavailable(forwarder: Forwarder) -> None:
    closed = _free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ArrayUnavailable, match=r"no path reached export") as raised:
        forwarder.attach({"a": f"127.0.0.1:{closed}", "b": f"127.0.0.2:{closed}"})
    assert "a: " in str(raised.value)
    assert "b: " in str(raised.value)
    assert time.monotonic() - started < 5.0
    assert forwarder.status() == []


# ----- hostile input -----


def _exchange(ctl: Path, *lines: bytes) -> list[dict[str, Any]]:
    """Send raw lines on one control connection; one answer line each."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT_S)
        sock.connect(str(ctl))
        reader = sock.makefile("rb")
        answers = []
        for line in lines:
            sock.sendall(line)
            answers.append(json.loads(reader.readline()))
        reader.close()
        return answers


def test_malformed_control_requests_get_one_line_invalid_answers(forwarder: Forwarder) -> None:
    attach = {"op": "attach", "disk": DISK, "generation": 1, "export": EXPORT,
              "paths": [{"name": "a", "address": "127.0.0.1:10809"}]}  # fmt: skip

    def line(obj: object) -> bytes:
        return json.dumps(obj).encode() + b"\n"

    bad = [
        (b"hello\n", "not JSON"),
        (b"[1, 2]\n", "JSON object"),
        (line({"op": "explode"}), "unknown control op"),
        (line({**attach, "export": ""}), "export"),
        (line({**attach, "generation": 0}), "generation"),
        (line({**attach, "disk": "Web 1"}), "disk"),
        (line({**attach, "paths": [{"name": "a", "address": "nohost"}]}), "HOST:PORT"),
        (line({**attach, "paths": []}), "paths"),
        (line({**attach, "policy": "random"}), "policy"),
        (line({**attach, "timings": {"probe_timeout_s": -1}}), "more than 0"),
        (
            b'{"op": "attach", "disk": "web1.root", "generation": 1, "export": "web1-root.g1", '
            b'"paths": [{"name": "a", "address": "127.0.0.1:1"}], '
            b'"timings": {"probe_timeout_s": NaN}}\n',
            "more than 0",
        ),
        (line({**attach, "timings": {"probe_timeout_s": 10**400}}), "control request"),
        (line({**attach, "export": "web1-root.g7"}), "not generation 1's"),
        (line({**attach, "timings": {"warp_s": 1}}), "unknown timing"),
        (line({"op": "detach", "disk": DISK, "generation": 1, "force": True}), "unknown field"),
    ]
    answers = _exchange(forwarder.ctl, *(raw for raw, _ in bad), b'{"op": "status"}\n')
    for (raw, fragment), answer in zip(bad, answers, strict=False):
        assert answer["ok"] is False, raw
        assert answer["kind"] == "invalid", (raw, answer)
        assert fragment in answer["error"], (raw, answer)
        assert "\n" not in answer["error"]
    assert answers[-1]["ok"] is True  # the connection still serves
    assert answers[-1]["disks"] == []

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT_S)
        sock.connect(str(forwarder.ctl))
        sock.sendall(b"x" * (70 * 1024) + b"\n")
        reader = sock.makefile("rb")
        answer = json.loads(reader.readline())
        assert answer == {"ok": False, "kind": "invalid", "error": "control request too long"}
        assert reader.read() == b""  # then it hangs up
        reader.close()
    assert forwarder.proc.poll() is None
    assert forwarder.status() == []


NBDMAGIC, IHAVEOPT, REQUEST_MAGIC = b"NBDMAGIC", b"IHAVEOPT", 0x25609513
FIXED_NEWSTYLE_NO_ZEROES = struct.pack(">I", 3)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the forwarder hung up after {len(data)} of {size} bytes"
        data += chunk
    return data


def _nbd_socket(socket_path: str, timeout_s: float = WAIT_S) -> socket.socket:
    """Connected to the disk's socket, its greeting read."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(timeout_s)
    sock.connect(socket_path)
    assert _recv_exactly(sock, 18)[:16] == NBDMAGIC + IHAVEOPT
    return sock


def _export_name(sock: socket.socket) -> None:
    """The oldest handshake: NBD_OPT_EXPORT_NAME, answered with the size and flags."""
    name = EXPORT.encode()
    sock.sendall(FIXED_NEWSTYLE_NO_ZEROES + IHAVEOPT + struct.pack(">II", 1, len(name)) + name)
    assert struct.unpack(">Q", _recv_exactly(sock, 10)[:8])[0] == SIZE


def _dropped(sock: socket.socket) -> bool:
    """True if the forwarder closes (or resets) the connection; what it sends first is read."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _huge_option(sock: socket.socket) -> None:
    sock.sendall(FIXED_NEWSTYLE_NO_ZEROES + IHAVEOPT + struct.pack(">II", 7, 0xFFFF_FFF0))


def _garbage(sock: socket.socket) -> None:
    sock.sendall(FIXED_NEWSTYLE_NO_ZEROES + random.Random(3).randbytes(64))


def _huge_write(sock: socket.socket) -> None:
    _export_name(sock)
    sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, 1, 0, 256 * MIB))


def test_hostile_nbd_clients_are_dropped_while_a_writer_keeps_going(
    qsd: Array, forwarder: Forwarder, procs: Processes, tmp_path: Path
) -> None:
    _need("qemu-img")
    disk = forwarder.attach(qsd.two_paths())
    writer, data = _start_writer(procs, tmp_path, disk, 16 * MIB, rate="8M")
    forwarder.wait_for("the writer connected", lambda d: d["stats"]["bytes_written"] > 0)
    for hostile in (_garbage, _huge_option, _huge_write):
        with _nbd_socket(disk["socket"]) as sock:
            hostile(sock)
            assert _dropped(sock), f"{hostile.__name__}: not dropped"
    assert writer.poll() is None, "the writer finished before the hostile clients were done"
    _writer_succeeded(procs, writer)
    _landed(qsd, data)
    assert forwarder.proc.poll() is None
    log = forwarder.log()
    assert log.count("forwarder.client.protocol-error") == 3, log
    assert "too large" in log
    final = forwarder.wait_for("no clients left", lambda d: d["clients"] == 0)
    assert final["state"] == "active"
    assert final["stats"]["failed"] == 0


def test_unknown_client_flags_are_dropped_before_any_option(
    qsd: Array, forwarder: Forwarder
) -> None:
    disk = forwarder.attach(qsd.two_paths())
    with _nbd_socket(disk["socket"], timeout_s=2) as sock:
        sock.sendall(struct.pack(">I", 0xFFFF_FFFF) + IHAVEOPT + struct.pack(">II", 3, 0))
        # The NBD spec: a server MUST drop a client that sets unknown client flags. (A regression
        # test: `~` of an IntFlag keeps only its defined bits in Python 3.11, so a check written
        # `flags & ~ClientFlag(...)` let every flag through.)
        answer = sock.recv(64)
        assert answer == b"", f"answered an option after unknown client flags: {answer!r}"


def test_unknown_command_flags_are_refused_at_the_forwarder(
    qsd: Array, forwarder: Forwarder
) -> None:
    disk = forwarder.attach(qsd.two_paths())
    with _nbd_socket(disk["socket"]) as sock:
        _export_name(sock)
        before = forwarder.disk()["stats"]["requests"]
        sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0x80, 0, 7, 0, 512))  # READ, flag 1<<7
        magic, error, cookie = struct.unpack(">IIQ", _recv_exactly(sock, 16))
        assert (magic, error, cookie) == (0x67446698, 22, 7)  # EINVAL, however it came about
        sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 8, 0, 512))
        assert struct.unpack(">IIQ", _recv_exactly(sock, 16)) == (0x67446698, 0, 8)
        _recv_exactly(sock, 512)
    # Refused by the forwarder's codec, not passed on to the array (a regression test, as for
    # the client flags: `flags & ~CmdFlag(...)` let undefined bits through).
    assert forwarder.disk()["stats"]["requests"] == before + 1, "the bad request went upstream"
    assert "forwarder.request.refused" in forwarder.log()


# ----- nbdkit as the array -----


def _writes_per_connection(log: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in log.splitlines():
        words = line.split()
        if len(words) > 3 and words[2].startswith("connection=") and words[3] == "Write":
            counts[words[2]] = counts.get(words[2], 0) + 1
    return counts


@pytest.mark.parametrize(("policy", "carriers"), [("failover", 1), ("round-robin", 2)])
def test_nbdkit_memory_round_trip_and_the_policy_spreads_writes(
    policy: str, carriers: int, forwarder: Forwarder, procs: Processes, tmp_path: Path
) -> None:  # fmt: skip
    _need("nbdcopy")
    log = tmp_path / "nbdkit-requests.txt"
    array = _nbdkit(procs, "--filter=log", "memory", "64M", f"logfile={log}")
    disk = forwarder.attach(array.two_paths(), export=array.export, policy=policy)
    assert disk["size_bytes"] == SIZE
    uri = nbd_uri(disk, array.export)
    data = _random_bytes(8 * MIB, seed=4)
    src, out = tmp_path / "in.raw", tmp_path / "out.raw"
    src.write_bytes(data)
    _ok(tool("nbdcopy", "--connections=1", src, uri))
    _ok(tool("nbdcopy", "--connections=1", uri, out))
    assert out.read_bytes()[: len(data)] == data
    assert out.read_bytes()[len(data) :] == bytes(SIZE - len(data))
    writes = _writes_per_connection(log.read_text())
    assert len(writes) == carriers, writes  # data connections only: probes are reads
    assert sum(writes.values()) >= 4


def test_nbdkit_write_errors_reach_the_client_without_failing_a_path(
    forwarder: Forwarder, procs: Processes, tmp_path: Path
) -> None:  # fmt: skip
    _need("qemu-io")
    trigger = tmp_path / "fail-writes"
    trigger.touch()
    array = _nbdkit(procs, "--filter=error", "memory", "64M", "error-pwrite=EIO",
                    "error-pwrite-rate=100%", f"error-pwrite-file={trigger}")  # fmt: skip
    disk = forwarder.attach(array.two_paths(), export=array.export)
    uri = nbd_uri(disk, array.export)
    failed = tool("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64k", uri)
    assert f"write failed: {EIO_TEXT}" in failed.stdout + failed.stderr, failed
    disk = forwarder.disk()
    assert _states(disk) == {"a": "up", "b": "up"}
    assert [p["failures"] for p in disk["paths"]] == [0, 0]
    assert disk["stats"]["resent"] == 0

    trigger.unlink()
    _ok(tool("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64k", "-c", "read -P 0x55 0 64k",
             uri))  # fmt: skip
