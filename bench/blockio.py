"""Block I/O through the forwarder, against today's direct NBD and qsd's own unix socket.

One run, one array: a qemu-storage-daemon in a network namespace of its own (vmcb-array)
exports one raw file (--lun-mib, default 256 MiB, filled with 0x5a first; ``cache.direct=off``
as arrays/qsd.py adds its LUNs, so the array serves from its page cache) on 0.0.0.0:10809. The
host reaches it over two veth pairs, the two storage paths: p1 (vmcb-n1 10.253.1.1 <-> vmcb-a1
10.253.1.2) and p2 (vmcb-n2 10.253.2.1 <-> vmcb-a2 10.253.2.2).

Throughput and IOPS: ``qemu-img bench -t none --image-opts driver=nbd,...``. Per load the
targets take turns run by run (the order rotating with each repeat), so that a change in the
host's load falls on all of them; each figure is the median of --repeats runs, after one
calibration run per target that sizes its count to about --seconds:

- seq_write, seq_read: 1 MiB requests, 4 in flight (-d 4), sequential (step 1 MiB), in MiB/s;
- rand_{read,write}_d{1,32}: 4 KiB requests, 1 and 32 in flight, in IOPS. qemu-img bench has no
  random pattern: the offset advances by a fixed stride (-S) of K blocks modulo the export, K odd
  and about 0.618 of the export's blocks, so each pass hits every block once and each request
  lands far from the one before: strided, not random.

Targets, all on the same file:

- direct_tcp: qemu-img -> the array's qsd over TCP on p1 (today's path, the reference);
- qsd_unix: qemu-img -> qsd's own unix-socket NBD server (the best any path can do). One qsd
  has one NBD server (a second --nbd-server is refused, "NBD server already running"), so a
  second qsd in the same namespace exports the same file on a unix socket (see Array);
- uvloop, asyncio: qemu-img -> ``vmcluster forwarder serve --loop L`` (its disk's unix socket)
  -> the array's qsd over TCP, both paths given, policy failover (p1 carries the I/O);
- uvloop_malloc_default: the same with ``--malloc default`` (glibc's own malloc thresholds:
  what forwarder/heap.py gives);
- relay: qemu-img -> socat (a byte relay in C, unix socket to TCP over p1) -> qsd: what one more
  process in the path costs on this host, whatever it does (left out without socat).

The failover stall: a writer of our own (protocols/nbdclient over the forwarder's unix socket,
--stall-depth 4 KiB writes in flight, each timestamped) writes the blocks in order, each holding
its sequence number. For each kind in --cut-kinds, --cuts times: the active path (the first up
path: p1 once it is back from the last cut) is cut, restored after --hold-s, and the bench waits
until the forwarder uses it again (failback). ``link``: ``ip link set vmcb-n1 down`` on the node
side (routes go; no reset reaches the array); ``nft``: everything in and out of vmcb-a1 dropped
in the array's namespace (the silent cut). Per cut, the stall: the longest latency of a request
in flight between the cut and the restore; also the forwarder's path-down event after the cut,
the longest pause between two replies, and the longest latency around the failback. At the end
the writer waits for every reply, flushes, and the file is read back: every block must hold its
last write. Requests lost (no reply), errored, or wrong must be 0.

Redirected I/O: two more forwarders stand for coordinators: each relays (forwarder/relay.py) to
the array over a third path, p3 (vmcb-n3 10.253.3.1 <-> vmcb-a3), which no cut touches. The
target ``redirected``: a disk of the uvloop forwarder whose only direct path never connects, so
that its I/O goes through its redirected path to the first coordinator's relay (qemu-img ->
forwarder -> relay -> qsd: one hop more than ``uvloop``, its reference). Then --cuts cycles,
with our writer at --stall-depth: p1 and p2 cut (to redirected), the redirected path moved to
the other coordinator's relay after --hold-s (a coordinator move, as the agent's retarget does
it), p1 back after --hold-s (to direct once trusted), then p2. The stalls: the longest latency
of a request in flight in each step's window; every block is read back at the end.

Memory: per request size (64 KiB, 1 MiB) a fresh forwarder (uvloop) with --disks disks (exports
of 64 MiB files of their own) and one ``qemu-img bench -w -d 32`` on each, all at once for
--memory-s seconds (then SIGTERM to each writer); the forwarder's VmRSS (/proc/PID/status) every
20 ms while all of them run, its peak, and VmHWM; apart, the VmRSS of a python that only
imports the forwarder's modules, and one that imports vmcluster.cli.main (what ``serve`` runs).

Goals (the forwarder with uvloop, its default; the asyncio loop's in met_asyncio): >= 90 % of
direct on seq read and write and on depth-1 read and write, >= 50 % of unix at depth 32 (read
and write); stall <= 100 ms on every cut; 0 requests lost, errored or wrong; peak RSS <= 64 MiB;
redirected >= 70 % of direct throughput and >= 50 % of its IOPS, a mode change's stall
<= 200 ms, a coordinator move's <= 500 ms, 0 redirected requests lost.
A missed goal is reported in "met", not in the exit status. Exits 1 if a check fails (lost,
errored or wrong data, a process that died) or a step cannot run, 2 without root or tools.
Everything it creates (namespace, veths, processes by PID, files) goes in finally blocks.

    sudo .venv/bin/python bench/blockio.py [--quick] [-o FILE] [--repeats 3] [--seconds 2]
        [--cuts 5] [--cut-kinds link,nft] [--hold-s 2] [--stall-depth 4] [--disks 8]
        [--memory-s 4] [--lun-mib 256]
"""

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import vmcluster
from vmcluster.core.multipath import PathTimings
from vmcluster.errors import VmclusterError
from vmcluster.forwarder.client import ForwarderClient
from vmcluster.forwarder.disk import DiskSpec
from vmcluster.forwarder.upstream import Address
from vmcluster.lab import netns
from vmcluster.protocols.nbdclient import ClientConnection, Negotiated, Reply
from vmcluster.protocols.nbdwire import Cmd, NbdError

MIB = 1 << 20
KIB = 1 << 10
BLOCK = 4096
PREFIX = "vmcb-"
NETNS = f"{PREFIX}array"
NFT_TABLE = f"{PREFIX}cut"
NBD_PORT = 10809
GENERATION = 1
EXPORT = f"lun0.g{GENERATION}"  # an export of one generation, as the fence names them
MEMORY_LUN_MIB = 64
MEMORY_SIZES = (64 * KIB, MIB)
MEMORY_DEPTH = 32
FILL_BYTE = 0x5A
WRITE_PATTERN = 0xA5  # qemu-img bench --pattern: the same non-zero data on every target
SEQ_DEPTH = 4
CUT_KINDS = ("link", "nft")
STEADY_S = 0.5  # before each cut, and after each failback
STEADY_TRIES = 10
PATH_WAIT_S = 30.0
REPLY_WAIT_S = PathTimings().no_path_timeout_s + 10.0
FLUSH_COOKIE = 1 << 62
RSS_POLL_S = 0.02
FORWARDER_START_S = 60.0
RUN_RE = re.compile(r"Run completed in ([0-9.]+) seconds")
VMCLUSTER = Path(sys.executable).parent / "vmcluster"
TOOLS = ("ip", "qemu-img", "qemu-storage-daemon")
# The forwarder's variants and the relay, each against direct and unix.
COMPARED = ("uvloop", "asyncio", "uvloop_malloc_default", "relay")
RELAY_BUFFER = 256 * 1024  # socat's per-read buffer (its default, 8 KiB, costs it throughput)
GOALS = {
    "seq_write_vs_direct": 0.9,
    "seq_read_vs_direct": 0.9,
    "rand_read_d1_vs_direct": 0.9,
    "rand_write_d1_vs_direct": 0.9,
    "rand_read_d32_vs_unix": 0.5,
    "rand_write_d32_vs_unix": 0.5,
    "failover_stall_ms": 100.0,
    "failover_requests_lost": 0,
    "forwarder_rss_mib": 64.0,
    # redirected I/O (through a coordinator's relay) against the node's own direct forwarder
    "redirected_seq_write_vs_direct": 0.7,
    "redirected_seq_read_vs_direct": 0.7,
    "redirected_rand_read_d1_vs_direct": 0.5,
    "redirected_rand_write_d1_vs_direct": 0.5,
    "redirected_rand_read_d32_vs_direct": 0.5,
    "redirected_rand_write_d32_vs_direct": 0.5,
    "mode_change_stall_ms": 200.0,
    "coordinator_move_stall_ms": 500.0,
    "redirect_requests_lost": 0,
}


def _log(message: str) -> None:
    print(f"bench/blockio: {message}", file=sys.stderr, flush=True)


class BenchFailed(Exception):
    """A step could not run, or a process died: the figures would not mean what they say."""


# ----- the array: a namespace, two paths, qemu-storage-daemon -----


@dataclass(frozen=True, slots=True)
class StoragePath:
    name: str
    node_if: str  # the host's end of the veth pair
    array_if: str  # the array namespace's end
    subnet: str  # the first three octets of its /24

    @property
    def node_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def array_ip(self) -> str:
        return f"{self.subnet}.2"

    @property
    def address(self) -> Address:
        return Address(self.array_ip, NBD_PORT)


PATHS = (
    StoragePath("p1", f"{PREFIX}n1", f"{PREFIX}a1", "10.253.1"),
    StoragePath("p2", f"{PREFIX}n2", f"{PREFIX}a2", "10.253.2"),
)
# The coordinators' own path to the array (their relays use it): cutting p1 and p2 leaves it.
COORDINATOR_PATH = StoragePath("p3", f"{PREFIX}n3", f"{PREFIX}a3", "10.253.3")
ALL_PATHS = (*PATHS, COORDINATOR_PATH)
DEAD = Address("127.0.0.1", 9)  # nothing listens: a direct path that never connects


def _link_exists(ifname: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", ifname], capture_output=True,
                          check=False).returncode == 0  # fmt: skip


def _delete_link(ifname: str) -> None:
    if _link_exists(ifname):
        netns.ip(None, "link", "delete", ifname, check=False)


def _check_free() -> None:
    """Refuse to start over anything of the same names or subnets (an earlier run's leftovers
    are not ours to remove: the fix is named)."""
    if netns.exists(NETNS):
        raise BenchFailed(f"network namespace {NETNS} exists (an earlier run?): remove it with "
                          f"`ip netns delete {NETNS}`")  # fmt: skip
    for p in ALL_PATHS:
        if _link_exists(p.node_if):
            raise BenchFailed(f"link {p.node_if} exists (an earlier run?): remove it with "
                              f"`ip link delete {p.node_if}`")  # fmt: skip
    addresses = json.loads(netns.ip(None, "-j", "-4", "addr", "show") or "[]")
    for link in addresses:
        for info in link.get("addr_info", []):
            if any(str(info.get("local", "")).startswith(p.subnet + ".") for p in ALL_PATHS):
                raise BenchFailed(f"{info['local']} on {link['ifname']} overlaps the bench's "
                                  "storage subnets 10.253.1-3.0/24")  # fmt: skip


def _stop(proc: "subprocess.Popen[bytes]", timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL: one process this bench started, by its PID."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def _spawn(
    stack: contextlib.ExitStack, argv: list[str], log_path: Path
) -> "subprocess.Popen[bytes]":
    log: IO[bytes] = stack.enter_context(log_path.open("ab"))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    stack.callback(_stop, proc)
    return proc


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _qsd_argv(files: dict[str, Path], server: str, *, locking: bool) -> list[str]:
    """qemu-storage-daemon exporting every file (a raw node over it, ``cache.direct=off`` as
    arrays/qsd.py adds LUNs) under its own name, writable, on ``server`` (--nbd-server)."""
    argv = ["qemu-storage-daemon"]
    lock = "" if locking else ",file.locking=off"
    for name, path in files.items():
        argv += ["--blockdev", f"driver=raw,node-name={name},file.driver=file,"
                 f"file.filename={path},cache.direct=off{lock}"]  # fmt: skip
    argv += ["--nbd-server", server]
    for name in files:
        argv += ["--export", f"type=nbd,id={name},node-name={name},name={name},writable=on"]
    return argv


class Array:
    """The array's namespace, its two paths and its daemons: the array's qsd (TCP, every
    export) and a second qsd on the same LUN file for qsd's own unix-socket server.

    One qsd has one NBD server (a second --nbd-server is refused: "NBD server already
    running"); switching the one daemon over QMP (nbd-server-stop, nbd-server-start on a unix
    socket, every block-export-add again) works too, but then the targets cannot take turns
    run by run, which this busy host needs. The second daemon opens the file with
    ``file.locking=off`` (the first holds QEMU's write lock); both go through the same page
    cache, and only one of them has I/O at a time."""

    def __init__(self, stack: contextlib.ExitStack, work: Path, luns: dict[str, int]) -> None:
        self.work = work
        self.files = {name: work / f"{name}.raw" for name in luns}
        self.unix_path = work / "qsd-nbd.sock"
        self.log_path = work / "qsd.log"
        self.unix_log_path = work / "qsd-unix.log"
        stack.callback(netns.delete, NETNS)  # written down before it exists, as the lab does
        netns.add(NETNS)
        for p in ALL_PATHS:
            stack.callback(_delete_link, p.node_if)
            netns.ip(None, "link", "add", p.node_if, "type", "veth", "peer", "name", p.array_if,
                     "netns", NETNS)  # fmt: skip
            netns.ip(None, "addr", "add", f"{p.node_ip}/24", "dev", p.node_if)
            netns.ip(None, "link", "set", p.node_if, "up")
            netns.ip(NETNS, "addr", "add", f"{p.array_ip}/24", "dev", p.array_if)
            netns.ip(NETNS, "link", "set", p.array_if, "up")
        for name, mib in luns.items():
            with self.files[name].open("wb") as f:
                if name == EXPORT:
                    chunk = bytes([FILL_BYTE]) * MIB
                    for _ in range(mib):
                        f.write(chunk)
                else:
                    f.truncate(mib * MIB)
        tcp = f"addr.type=inet,addr.host=0.0.0.0,addr.port={NBD_PORT}"
        argv = ["ip", "netns", "exec", NETNS, *_qsd_argv(self.files, tcp, locking=True)]
        self.proc = _spawn(stack, argv, self.log_path)  # ip netns exec execs: this is qsd's PID
        unix = f"addr.type=unix,addr.path={self.unix_path}"
        lun = {EXPORT: self.files[EXPORT]}
        argv = ["ip", "netns", "exec", NETNS, *_qsd_argv(lun, unix, locking=False)]
        self.unix_proc = _spawn(stack, argv, self.unix_log_path)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        targets: list[tuple[int, Any]] = [(socket.AF_INET, (p.array_ip, NBD_PORT))
                                          for p in ALL_PATHS]  # fmt: skip
        targets.append((socket.AF_UNIX, str(self.unix_path)))
        for family, address in targets:
            while True:
                self.check_alive()
                try:
                    with socket.socket(family, socket.SOCK_STREAM) as sock:
                        sock.settimeout(1.0)
                        sock.connect(address)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise BenchFailed(f"qemu-storage-daemon does not answer on {address}: "
                                          f"{_tail(self.log_path)}") from None  # fmt: skip
                    time.sleep(0.05)

    def check_alive(self) -> None:
        for proc, log_path in ((self.proc, self.log_path), (self.unix_proc, self.unix_log_path)):
            if proc.poll() is not None:
                raise BenchFailed(f"qemu-storage-daemon exited ({proc.returncode}): "
                                  f"{_tail(log_path)}")  # fmt: skip

    def tcp_opts(self, export: str, path: StoragePath = PATHS[0]) -> str:
        return (f"driver=nbd,server.type=inet,server.host={path.array_ip},"
                f"server.port={NBD_PORT},export={export}")  # fmt: skip

    def unix_opts(self, export: str) -> str:
        return _unix_opts(self.unix_path, export)


def _mem(index: int) -> str:
    """The export of the memory figure's disk ``index``."""
    return f"mem{index}.g{GENERATION}"


def _unix_opts(path: Path | str, export: str) -> str:
    return f"driver=nbd,server.type=unix,server.path={path},export={export}"


# ----- the forwarder -----


def _spec(disk: str, export: str) -> DiskSpec:
    return DiskSpec(disk=disk, generation=GENERATION, export=export,
                    paths=tuple((p.name, p.address) for p in PATHS))  # fmt: skip


class Forwarder:
    def __init__(self, proc: "subprocess.Popen[bytes]", ctl: Path, log_path: Path) -> None:
        self.proc, self.ctl, self.log_path = proc, ctl, log_path
        self.start_s = 0.0  # from the spawn to the control socket

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_started(self) -> None:
        """Until the control socket exists (ForwarderClient waits only START_WAIT_S for it, and
        ``vmcluster forwarder serve`` imports the whole CLI first: seconds on a busy host)."""
        started = time.monotonic()
        while not self.ctl.is_socket():
            self.check_alive()
            if time.monotonic() - started > FORWARDER_START_S:
                raise BenchFailed(f"the forwarder made no control socket {self.ctl} within "
                                  f"{FORWARDER_START_S:g} s")  # fmt: skip
            time.sleep(0.02)
        self.start_s = round(time.monotonic() - started, 2)
        _log(f"  forwarder pid {self.pid} up after {self.start_s} s")

    def attach(self, disk: str, export: str, spec: DiskSpec | None = None) -> str:
        """The disk's NBD socket."""
        answer = asyncio.run(ForwarderClient(self.ctl).attach(spec or _spec(disk, export)))
        return str(answer["socket"])

    def relay(self, listen: Address) -> Address:
        """Relay other forwarders' redirected I/O to the array over the coordinators' path."""
        arrays = {"a1": [str(COORDINATOR_PATH.address)]}
        asyncio.run(ForwarderClient(self.ctl).relay([str(listen)], arrays))
        return listen

    def bytes_written(self) -> int:
        disks = asyncio.run(ForwarderClient(self.ctl).status())
        return sum(int(d["stats"]["bytes_written"]) for d in disks)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchFailed(f"the forwarder exited ({self.proc.returncode}): "
                              f"{_tail(self.log_path)}")  # fmt: skip


@contextlib.contextmanager
def _forwarder(work: Path, loop: str, tag: str, malloc: str = "tuned") -> Iterator[Forwarder]:
    ctl, run_dir, log_path = work / f"fwd-{tag}.sock", work / f"fwd-{tag}", work / f"fwd-{tag}.log"
    # As the lab and systemd start it: the forwarder alone, not the whole CLI.
    argv = [sys.executable, "-m", "vmcluster.forwarder", "--socket", str(ctl), "--run-dir",
            str(run_dir), "--loop", loop, "--malloc", malloc]  # fmt: skip
    with contextlib.ExitStack() as stack:
        fwd = Forwarder(_spawn(stack, argv, log_path), ctl, log_path)
        try:
            fwd.wait_started()
            yield fwd
            fwd.check_alive()
        except BaseException:
            _log(f"forwarder ({loop}) log, last lines:\n{_tail(log_path)}")
            raise


def _redirected_spec(disk: str, relay: Address, direct: tuple[tuple[str, Address], ...]
                     ) -> DiskSpec:  # fmt: skip
    return DiskSpec(
        disk=disk,
        generation=GENERATION,
        export=EXPORT,
        paths=(*direct, ("r1", relay)),
        relays=("r1",),
        relay_array="a1",
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _relay(stack: contextlib.ExitStack, work: Path) -> str | None:
    """socat between a unix socket and the array over p1, one child per connection: the cost
    of a hop alone. None without socat (the target is left out)."""
    if shutil.which("socat") is None:
        _log("  socat not installed: no relay target")
        return None
    path = work / "relay.sock"
    argv = ["socat", "-b", str(RELAY_BUFFER), f"UNIX-LISTEN:{path},fork",
            f"TCP:{PATHS[0].array_ip}:{NBD_PORT},nodelay"]  # fmt: skip
    proc = _spawn(stack, argv, work / "relay.log")
    deadline = time.monotonic() + 10
    while not path.is_socket():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchFailed(f"socat made no socket {path}: {_tail(work / 'relay.log')}")
        time.sleep(0.02)
    return str(path)


def _status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of /proc/PID/status, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


# ----- qemu-img bench -----


@dataclass(frozen=True, slots=True)
class Load:
    name: str
    size: int
    depth: int
    write: bool
    step: int | None  # None: sequential (the step is the size)
    first_count: int  # the calibration run's

    @property
    def unit(self) -> str:
        return "MiB/s" if self.step is None else "IOPS"

    def rate(self, count: int, seconds: float) -> float:
        seconds = max(seconds, 0.001)
        return count * self.size / MIB / seconds if self.step is None else count / seconds


def _stride_blocks(blocks: int) -> int:
    """About 0.618 of the export, and coprime with its blocks: a pass visits every block."""
    step = int(blocks * 0.618) | 1
    while math.gcd(step, blocks) != 1:
        step += 2
    return step


def _loads(lun_bytes: int, quick: bool) -> list[Load]:
    step = _stride_blocks(lun_bytes // BLOCK) * BLOCK
    small, large = (64, 8) if quick else (400, 32)
    return [
        Load("seq_write", MIB, SEQ_DEPTH, True, None, large),
        Load("seq_read", MIB, SEQ_DEPTH, False, None, large),
        Load("rand_read_d1", BLOCK, 1, False, step, small),
        Load("rand_write_d1", BLOCK, 1, True, step, small),
        Load("rand_read_d32", BLOCK, 32, False, step, small),
        Load("rand_write_d32", BLOCK, 32, True, step, small),
    ]


def _qemu_img_bench(opts: str, load: Load, count: int, timeout_s: float) -> float:
    """One run: its seconds, as qemu-img bench reports them (the I/O only, not the open)."""
    argv = ["qemu-img", "bench", "-t", "none", "-s", str(load.size), "-d", str(load.depth),
            "-c", str(count)]  # fmt: skip
    if load.step is not None:
        argv += ["-S", str(load.step)]
    if load.write:
        argv += ["-w", f"--pattern={WRITE_PATTERN}"]
    argv += ["--image-opts", opts]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise BenchFailed(f"qemu-img bench {load.name} on {opts}: no end within "
                          f"{timeout_s:g} s") from None  # fmt: skip
    match = RUN_RE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        detail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise BenchFailed(f"qemu-img bench {load.name} on {opts}: {detail}")
    return float(match[1])


def _measure(targets: dict[str, str], loads: list[Load], seconds: float, repeats: int,
             ) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per load, every target in turn, run by run (the order rotates with each repeat), so
    that a change in the host's load falls on all of them: {target: {load: figure}}."""
    out: dict[str, dict[str, Any]] = {name: {} for name in targets}
    names = list(targets)
    for load in loads:
        counts = {}
        for name, opts in targets.items():  # calibration, and warm-up
            first = _qemu_img_bench(opts, load, load.first_count, 120.0)
            wanted = round(load.first_count * seconds / max(first, 0.001))
            counts[name] = max(8, min(5_000_000, wanted))
        runs: dict[str, list[float]] = {name: [] for name in targets}
        for repeat in range(repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                timeout_s = 120.0 + 30 * seconds
                runs[name].append(_qemu_img_bench(targets[name], load, counts[name], timeout_s))
        for name in targets:
            rates = [round(load.rate(counts[name], s), 1) for s in runs[name]]
            out[name][load.name] = {
                "value": statistics.median(rates), "unit": load.unit, "values": rates,
                "count": counts[name], "seconds": runs[name], "size_bytes": load.size,
                "depth": load.depth,
                "step_bytes": load.step if load.step is not None else load.size,
            }  # fmt: skip
        medians = ", ".join(f"{n} {out[n][load.name]['value']}" for n in targets)
        _log(f"  {load.name} ({load.unit}): {medians}")
    return out


# ----- the failover stall: a writer of our own -----


def _block(seq: int, offset: int) -> bytes:
    return struct.pack("<QQ", seq, offset) * (BLOCK // 16)


class Writer(asyncio.Protocol):
    """Writes 4 KiB blocks in order (wrapping at the export's end), ``depth`` in flight, block
    ``seq % blocks`` holding ``_block(seq, offset)``; each request's send and reply time."""

    def __init__(self, export: str, blocks: int, depth: int) -> None:
        loop = asyncio.get_running_loop()
        self.codec = ClientConnection(export)
        self.blocks, self.depth = blocks, depth
        self.starts: list[float] = []
        self.ends: list[float | None] = []
        self.errors: dict[int, int] = {}
        self.in_flight = 0
        self.running = False
        self.ready: asyncio.Future[None] = loop.create_future()
        self.flushed: asyncio.Future[int] | None = None
        self.idle = asyncio.Event()
        self.lost: str | None = None
        self.closing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        try:
            events = self.codec.receive_data(data)
        except NbdError as exc:
            self._end(f"protocol error from the forwarder: {exc}")
            return
        for ev in events:
            if isinstance(ev, Negotiated) and not self.ready.done():
                self.ready.set_result(None)
            elif isinstance(ev, Reply):
                self._reply(ev, now)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"connection lost: {exc}" if exc else "the forwarder closed the connection")

    def _end(self, reason: str) -> None:
        if self.closing:
            return
        if self.lost is None:
            self.lost = reason
        self.running = False
        self.idle.set()
        for future in (self.ready, self.flushed):
            if future is not None and not future.done():
                future.set_exception(BenchFailed(f"stall writer: {reason}"))
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closing = True
        self.running = False
        if self.transport is not None:
            self.transport.close()

    def _reply(self, reply: Reply, now: float) -> None:
        if reply.cookie == FLUSH_COOKIE:
            if self.flushed is not None and not self.flushed.done():
                self.flushed.set_result(reply.error)
            return
        seq = reply.cookie - 1
        self.ends[seq] = now
        if reply.error:
            self.errors[seq] = reply.error
        self.in_flight -= 1
        if self.running:
            self._submit()
        elif not self.in_flight:
            self.idle.set()

    def _submit(self) -> None:
        seq = len(self.starts)
        offset = (seq % self.blocks) * BLOCK
        self.starts.append(time.monotonic())
        self.ends.append(None)
        self.codec.request(Cmd.WRITE, offset, BLOCK, data=_block(seq, offset), cookie=seq + 1)
        self.in_flight += 1

    def _flush(self) -> None:
        out = self.codec.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def start(self) -> None:
        self.running = True
        for _ in range(self.depth):
            self._submit()
        self._flush()

    async def stop(self, timeout_s: float) -> None:
        """Send no more; wait (up to ``timeout_s``) for every reply, then flush."""
        self.running = False
        if self.in_flight:
            self.idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self.idle.wait()
        if self.lost is None and not self.in_flight:
            self.flushed = asyncio.get_running_loop().create_future()
            self.codec.request(Cmd.FLUSH, cookie=FLUSH_COOKIE)
            self._flush()
            try:
                async with asyncio.timeout(timeout_s):
                    error = await self.flushed
            except TimeoutError:
                raise BenchFailed(f"stall writer: no answer to its flush within "
                                  f"{timeout_s:g} s") from None  # fmt: skip
            if error:
                raise BenchFailed(f"stall writer: flush failed with error {error}")


async def _run(*argv: str, stdin: str | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode != 0:
        raise BenchFailed(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")


def _nft_drop(path: StoragePath) -> str:
    return (f"table inet {NFT_TABLE} {{\n"
            f"  chain input {{ type filter hook input priority -10; iifname \"{path.array_if}\" "
            "drop; }\n"
            f"  chain output {{ type filter hook output priority -10; oifname "
            f"\"{path.array_if}\" drop; }}\n}}\n")  # fmt: skip


async def _cut(kind: str, path: StoragePath, *, down: bool) -> None:
    if kind == "link":
        await _run("ip", "link", "set", path.node_if, "down" if down else "up")
    elif down:
        await _run("ip", "netns", "exec", NETNS, "nft", "-f", "-", stdin=_nft_drop(path))
    else:
        await _run("ip", "netns", "exec", NETNS, "nft", "delete", "table", "inet", NFT_TABLE)


async def _paths(client: ForwarderClient, disk: str) -> list[dict[str, Any]]:
    for status in await client.status():
        if status["disk"] == disk:
            return list(status["paths"])
    raise BenchFailed(f"the forwarder lost disk {disk}")


async def _wait_all_up(client: ForwarderClient, disk: str, fwd: Forwarder) -> float:
    """Until every path of ``disk`` is up (a restored path: reconnected, then trusted again)."""
    deadline = time.monotonic() + PATH_WAIT_S
    while time.monotonic() < deadline:
        fwd.check_alive()
        if all(p["state"] == "up" for p in await _paths(client, disk)):
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise BenchFailed(f"disk {disk}: paths not all up within {PATH_WAIT_S:g} s: "
                      f"{await _paths(client, disk)}")  # fmt: skip


async def _watch(client: ForwarderClient, into: list[dict[str, Any]]) -> None:
    async for record in client.watch():
        if record.get("event") == "path.changed":
            # the event's wall clock on this process's monotonic one
            into.append({**record, "at_mono": record["at"] - time.time() + time.monotonic()})


Window = dict[str, Any]


async def _steady_active(client: ForwarderClient, disk: str, fwd: Forwarder) -> StoragePath:
    """Every path up, and still up STEADY_S later: the active one (the first, as the failover
    policy chooses)."""
    for _ in range(STEADY_TRIES):
        await _wait_all_up(client, disk, fwd)
        await asyncio.sleep(STEADY_S)
        states = await _paths(client, disk)
        if all(s["state"] == "up" for s in states):
            return next(p for p in PATHS if p.name == states[0]["name"])
        _log(f"  a path went down with no cut: {states}")
    raise BenchFailed(f"disk {disk}: paths not steady for {STEADY_S:g} s in {STEADY_TRIES} tries")


async def _stall_run(
    fwd: Forwarder, blocks: int, kinds: list[str], cuts: int, hold_s: float, depth: int
) -> tuple[Writer, list[Window], list[dict[str, Any]]]:
    disk = "stall"
    client = ForwarderClient(fwd.ctl)
    sock = (await client.attach(_spec(disk, EXPORT)))["socket"]
    loop = asyncio.get_running_loop()
    events: list[dict[str, Any]] = []
    watcher = asyncio.create_task(_watch(client, events))
    _, writer = await loop.create_unix_connection(lambda: Writer(EXPORT, blocks, depth), sock)
    windows: list[Window] = []
    try:
        async with asyncio.timeout(10):
            await writer.ready
        writer.start()
        for kind in kinds:
            for _ in range(cuts):
                active = await _steady_active(client, disk, fwd)
                cut_at, cut_wall = time.monotonic(), time.time()
                await _cut(kind, active, down=True)
                cut_done_at, cut_done_wall = time.monotonic(), time.time()
                await asyncio.sleep(hold_s)
                restore_at, restore_wall = time.monotonic(), time.time()
                await _cut(kind, active, down=False)
                restore_done_wall = time.time()
                back_at = await _wait_all_up(client, disk, fwd)
                await asyncio.sleep(STEADY_S)
                windows.append({"kind": kind, "path": active.name, "cut_at": cut_at,
                                "cut_wall": cut_wall, "cut_done_at": cut_done_at,
                                "cut_done_wall": cut_done_wall, "restore_at": restore_at,
                                "restore_wall": restore_wall,
                                "restore_done_wall": restore_done_wall, "back_at": back_at,
                                "end_at": time.monotonic()})  # fmt: skip
                _log(
                    f"  cut {len(windows)} ({kind}, {active.name}): back after "
                    f"{back_at - restore_at:.2f} s; {len(writer.starts)} requests so far"
                )
                if writer.lost is not None:
                    raise BenchFailed(f"stall writer: {writer.lost}")
        await writer.stop(REPLY_WAIT_S)
    finally:
        writer.close()
        watcher.cancel()
        await asyncio.wait([watcher])
    await client.detach(disk, GENERATION)
    return writer, windows, events


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _since_ms(at: float | None, since: float) -> float | None:
    return None if at is None else _ms(at - since)


def _summary_ms(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"count": len(values), "median": _ms(statistics.median(ordered)), "p99": _ms(p99),
            "max": _ms(ordered[-1])}  # fmt: skip


def _overlapping(writer: Writer, start: float, end: float) -> list[float]:
    """Latencies of the requests in flight at some time in [start, end) (unanswered ones up to
    ``end``)."""
    lo = bisect_left(writer.starts, start - REPLY_WAIT_S)
    hi = bisect_left(writer.starts, end)
    out = []
    for i in range(lo, hi):
        done = writer.ends[i]
        if done is None or done > start:
            out.append((done if done is not None else end) - writer.starts[i])
    return out


def _longest_pause(ends: list[float], start: float, end: float) -> float:
    """The longest time in [start, end] with no reply (``ends`` sorted)."""
    lo, hi = bisect_left(ends, start), bisect_left(ends, end)
    marks = [start, *ends[lo:hi], end]
    return max(b - a for a, b in itertools.pairwise(marks))


def _first_event(events: list[dict[str, Any]], path: str, state: str, after_wall: float,
                 ) -> float | None:  # fmt: skip
    times = [e["at"] for e in events if e.get("path") == path and e.get("state") == state
             and e["at"] >= after_wall - 0.005]  # fmt: skip
    return min(times) if times else None


def _verify(path: Path, total: int, blocks: int) -> list[int]:
    """Blocks that do not hold their last write."""
    wrong = []
    with path.open("rb") as f:
        for b in range(min(total, blocks)):
            last = b + blocks * ((total - 1 - b) // blocks)
            if f.read(BLOCK) != _block(last, b * BLOCK):
                wrong.append(b)
    return wrong


def _stall(array: Array, work: Path, lun_bytes: int, args: argparse.Namespace) -> dict[str, Any]:
    with _forwarder(work, "uvloop", "stall") as fwd:
        run = _stall_run(fwd, lun_bytes // BLOCK, args.cut_kinds, args.cuts, args.hold_s,
                         args.stall_depth)  # fmt: skip
        writer, windows, events = asyncio.run(run)
    array.check_alive()
    ends = sorted(t for t in writer.ends if t is not None)
    per_cut = []
    for w in windows:
        down = _first_event(events, w["path"], "down", w["cut_wall"])
        standby = _first_event(events, w["path"], "standby", w["restore_wall"])
        up = _first_event(events, w["path"], "up", w["restore_wall"])
        in_cut = _overlapping(writer, w["cut_at"], w["restore_at"])
        around_back = _overlapping(writer, w["restore_at"], w["end_at"])
        pause = _longest_pause(ends, w["cut_at"], w["restore_at"])
        per_cut.append(
            {
                "kind": w["kind"],
                "path": w["path"],
                "stall_ms": _ms(max(in_cut, default=0.0)),
                "requests_in_window": len(in_cut),
                "longest_reply_pause_ms": _ms(pause),
                "cut_command_ms": _ms(w["cut_done_at"] - w["cut_at"]),
                "path_down_after_cut_ms": _since_ms(down, w["cut_done_wall"]),
                "reconnected_after_restore_ms": _since_ms(standby, w["restore_wall"]),
                "failback_after_restore_ms": _since_ms(up, w["restore_wall"]),
                "failback_stall_ms": _ms(max(around_back, default=0.0)),
            }
        )
    latencies = [e - s for s, e in zip(writer.starts, writer.ends, strict=True) if e is not None]
    windows_spans = [(w["cut_at"], w["end_at"]) for w in windows]
    steady = [e - s for s, e in zip(writer.starts, writer.ends, strict=True) if e is not None
              and not any(s < b and e > a for a, b in windows_spans)]  # fmt: skip
    spurious = []
    for ev in events:
        caused = any(ev["path"] == w["path"] and w["cut_wall"] - 0.005 <= ev["at"]
                     <= w["restore_done_wall"] + 0.1 for w in windows)  # fmt: skip
        if ev["state"] == "down" and not caused:
            near = _overlapping(writer, ev["at_mono"] - 0.2, ev["at_mono"] + 0.5)
            spurious.append({"path": ev["path"], "reason": ev["reason"],
                             "at_s": round(ev["at_mono"] - writer.starts[0], 3),
                             "longest_latency_near_ms": _ms(max(near, default=0.0))})  # fmt: skip
    total = len(writer.starts)
    lost = sum(1 for e in writer.ends if e is None)
    wrong = _verify(array.files[EXPORT], total, lun_bytes // BLOCK) if writer.lost is None else []
    stalls = [c["stall_ms"] for c in per_cut]
    return {
        "what": f"4 KiB writes at depth {args.stall_depth} through the forwarder (uvloop), "
        f"the active path cut {args.cuts} times per kind, restored after {args.hold_s:g} s",
        "kinds": {
            "link": f"ip link set <node veth> down / up (on the host: {PATHS[0].node_if})",
            "nft": f"nft drop of everything in and out of the array's veth "
            f"({PATHS[0].array_if}) in {NETNS}, then the table deleted",
        },
        "stall_ms": {
            "max": max(stalls, default=None),
            "median": statistics.median(stalls) if stalls else None,
        },
        "per_cut": per_cut,
        "latency_ms": _summary_ms(latencies),
        "steady_latency_ms": _summary_ms(steady),
        "spurious_path_downs": spurious,
        "requests": total,
        "requests_lost": lost,
        "requests_errored": len(writer.errors),
        "blocks_wrong": len(wrong),
        "blocks_checked": min(total, lun_bytes // BLOCK),
        "writer_lost_connection": writer.lost,
        "elapsed_s": round((ends[-1] - writer.starts[0]) if ends else 0.0, 1),
    }


# ----- redirected I/O: the mode changes and the coordinator move -----


async def _watch_routes(client: ForwarderClient, into: list[dict[str, Any]]) -> None:
    async for record in client.watch():
        if record.get("event") == "route.changed":
            into.append({**record, "at_mono": record["at"] - time.time() + time.monotonic()})


async def _until_route(events: list[dict[str, Any]], route: str, after: float,
                       fwd: Forwarder) -> float:  # fmt: skip
    deadline = time.monotonic() + PATH_WAIT_S
    while time.monotonic() < deadline:
        fwd.check_alive()
        for ev in events:
            if ev["route"] == route and ev["at_mono"] >= after - 0.005:
                return float(ev["at_mono"])
        await asyncio.sleep(0.01)
    raise BenchFailed(f"the disk's route did not become {route} within {PATH_WAIT_S:g} s")


async def _redirect_run(node: Forwarder, relays: tuple[Address, Address], blocks: int,
                        cycles: int, hold_s: float, depth: int,
                        ) -> tuple[Writer, list[Window]]:  # fmt: skip
    """Per cycle: both direct paths cut (to redirected), the coordinator moved (the relay
    path retargeted to the other coordinator), a direct path back (to direct)."""
    disk = "redirect"
    client = ForwarderClient(node.ctl)
    spec = _redirected_spec(disk, relays[0], tuple((p.name, p.address) for p in PATHS))
    sock = (await client.attach(spec))["socket"]
    events: list[dict[str, Any]] = []
    watcher = asyncio.create_task(_watch_routes(client, events))
    loop = asyncio.get_running_loop()
    _, writer = await loop.create_unix_connection(lambda: Writer(EXPORT, blocks, depth), sock)
    windows: list[Window] = []
    target = 0
    try:
        async with asyncio.timeout(10):
            await writer.ready
        writer.start()
        for _ in range(cycles):
            await _wait_all_up(client, disk, node)
            await asyncio.sleep(STEADY_S)
            cut_at = time.monotonic()
            for path in PATHS:
                await _cut("link", path, down=True)
            redirected_at = await _until_route(events, "redirected", cut_at, node)
            await asyncio.sleep(hold_s)
            target = 1 - target
            moved_at = time.monotonic()
            await client.retarget(disk, GENERATION, [("r1", str(relays[target]))])
            await asyncio.sleep(hold_s)
            restore_at = time.monotonic()
            await _cut("link", PATHS[0], down=False)
            direct_at = await _until_route(events, "direct", restore_at, node)
            await asyncio.sleep(STEADY_S)
            await _cut("link", PATHS[1], down=False)
            windows.append({"cut_at": cut_at, "redirected_at": redirected_at,
                            "moved_at": moved_at, "restore_at": restore_at,
                            "direct_at": direct_at, "end_at": time.monotonic()})  # fmt: skip
            _log(
                f"  cycle {len(windows)}: redirected after {redirected_at - cut_at:.3f} s, "
                f"direct again {direct_at - restore_at:.2f} s after a path came back"
            )
            if writer.lost is not None:
                raise BenchFailed(f"redirect writer: {writer.lost}")
        await writer.stop(REPLY_WAIT_S)
    finally:
        writer.close()
        watcher.cancel()
        await asyncio.wait([watcher])
        for path in PATHS:
            with contextlib.suppress(BenchFailed):
                await _cut("link", path, down=False)
    await client.detach(disk, GENERATION)
    return writer, windows


def _redirect(array: Array, work: Path, coordinators: tuple[Forwarder, Forwarder],
              relays: tuple[Address, Address], lun_bytes: int,
              args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    with _forwarder(work, "uvloop", "redirect") as node:
        run = _redirect_run(node, relays, lun_bytes // BLOCK, args.cuts, args.hold_s,
                            args.stall_depth)  # fmt: skip
        writer, windows = asyncio.run(run)
    for fwd in coordinators:
        fwd.check_alive()
    array.check_alive()
    cycles = []
    for w in windows:
        # each change's window: from it until the next step (or the end)
        to_redirected = _overlapping(writer, w["cut_at"], w["moved_at"])
        moved = _overlapping(writer, w["moved_at"], w["restore_at"])
        to_direct = _overlapping(writer, w["restore_at"], w["end_at"])
        cycles.append({
            "to_redirected_stall_ms": _ms(max(to_redirected, default=0.0)),
            "redirected_after_cut_ms": _ms(w["redirected_at"] - w["cut_at"]),
            "coordinator_move_stall_ms": _ms(max(moved, default=0.0)),
            "to_direct_stall_ms": _ms(max(to_direct, default=0.0)),
            "direct_after_restore_ms": _ms(w["direct_at"] - w["restore_at"]),
        })  # fmt: skip
    total = len(writer.starts)
    lost = sum(1 for e in writer.ends if e is None)
    wrong = _verify(array.files[EXPORT], total, lun_bytes // BLOCK) if writer.lost is None else []
    mode = [max(c["to_redirected_stall_ms"], c["to_direct_stall_ms"]) for c in cycles]
    moves = [c["coordinator_move_stall_ms"] for c in cycles]
    return {
        "what": f"4 KiB writes at depth {args.stall_depth} through a node's forwarder with "
        "paths p1, p2 and a redirected path r1 to a coordinator's forwarder (its relay reaches "
        f"the array over p3), {args.cuts} cycle(s): p1 and p2 cut (ip link down), after "
        f"{args.hold_s:g} s r1 moved to the other coordinator's relay, after {args.hold_s:g} s "
        "p1 back, then p2",
        "mode_change_stall_ms": max(mode, default=None),
        "coordinator_move_stall_ms": max(moves, default=None),
        "per_cycle": cycles,
        "requests": total,
        "requests_lost": lost,
        "requests_errored": len(writer.errors),
        "blocks_wrong": len(wrong),
        "writer_lost_connection": writer.lost,
    }


# ----- the forwarder's memory -----


def _memory(work: Path, disks: int, size: int, seconds: float) -> dict[str, Any]:
    with _forwarder(work, "uvloop", f"mem{size // KIB}k") as fwd, contextlib.ExitStack() as stack:
        start_kib = _status_kib(fwd.pid)["VmRSS"]
        sockets = [fwd.attach(f"mem{i}", _mem(i)) for i in range(disks)]
        idle_kib = _status_kib(fwd.pid)["VmRSS"]
        before = fwd.bytes_written()
        writers = []
        for i, sock in enumerate(sockets):
            argv = ["qemu-img", "bench", "-w", "-t", "none", "-s", str(size), "-d",
                    str(MEMORY_DEPTH), "-c", "100000000", f"--pattern={WRITE_PATTERN}",
                    "--image-opts", _unix_opts(sock, _mem(i))]  # fmt: skip
            writers.append(_spawn(stack, argv, work / f"mem-writer{i}.log"))
        started = time.monotonic()
        samples: list[int] = []
        while time.monotonic() - started < seconds:
            fwd.check_alive()
            ended = [i for i, w in enumerate(writers) if w.poll() is not None]
            if ended:
                raise BenchFailed(f"memory writer {ended[0]} exited early: "
                                  f"{_tail(work / f'mem-writer{ended[0]}.log')}")  # fmt: skip
            samples.append(_status_kib(fwd.pid)["VmRSS"])
            time.sleep(RSS_POLL_S)
        busy_s = time.monotonic() - started
        written = fwd.bytes_written() - before
        for w in writers:
            _stop(w)
        fwd.check_alive()
        status = _status_kib(fwd.pid)
    return {
        "request_bytes": size, "depth": MEMORY_DEPTH, "disks": disks,
        "peak_rss_mib": round(max(samples) / KIB, 1),
        "median_rss_mib": round(statistics.median(samples) / KIB, 1),
        "rss_at_start_mib": round(start_kib / KIB, 1),
        "idle_rss_mib": round(idle_kib / KIB, 1),
        "hwm_mib": round(status["VmHWM"] / KIB, 1),
        "samples": len(samples), "busy_s": round(busy_s, 2),
        "written_mib_per_s": round(written / MIB / busy_s, 1),
    }  # fmt: skip


IMPORTS = ("uvloop, vmcluster.forwarder.service", "vmcluster.cli.main")


def _imports_rss_mib(modules: str) -> float:
    code = f"import {modules}\nprint(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout  # fmt: skip
    match = re.search(r"VmRSS:\s+(\d+) kB", out)
    assert match is not None
    return round(int(match[1]) / KIB, 1)


# ----- the result -----


def _ratios(figure: dict[str, Any], reference: dict[str, Any]) -> dict[str, float | None]:
    return {name: (round(figure[name]["value"] / reference[name]["value"], 3)
                   if reference[name]["value"] else None) for name in figure}  # fmt: skip


def _goal(threshold: float, measured: float | None, compare: str, what: str) -> dict[str, Any]:
    if measured is None:
        met = False
    elif compare == ">=":
        met = measured >= threshold
    elif compare == "<=":
        met = measured <= threshold
    else:
        met = measured == threshold
    return {"threshold": threshold, "compare": compare, "measured": measured, "met": met,
            "what": what}  # fmt: skip


def _io_goals(ratio: dict[str, dict[str, float | None]], loop: str) -> dict[str, Any]:
    """The throughput and IOPS goals: ``<load>_vs_<direct|unix>`` in GOALS."""
    goals = {}
    for name, threshold in GOALS.items():
        load, sep, target = name.partition("_vs_")
        if sep and not name.startswith("redirected_"):
            goals[name] = _goal(threshold, ratio[f"vs_{target}"][load], ">=",
                                f"forwarder ({loop}) / {target}, {load}")  # fmt: skip
    return goals


def _environment(args: argparse.Namespace, lun_mib: int) -> dict[str, Any]:
    def version(tool: str) -> str:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
        return out.stdout.splitlines()[0] if out.stdout else "unknown"

    import uvloop

    return {
        "cpus": os.cpu_count(),
        "qemu_img": version("qemu-img"),
        "qemu_storage_daemon": version("qemu-storage-daemon"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": getattr(uvloop, "__version__", "unknown"),
        "quick": args.quick,
        "repeats": args.repeats,
        "seconds_per_run": args.seconds,
        "array": {
            "namespace": NETNS,
            "lun_mib": lun_mib,
            "file": f"raw, filled with {FILL_BYTE:#x} first; blockdev driver=raw over "
            "driver=file with cache.direct=off (page cache on the array side, as arrays/qsd.py)",
            "paths": {
                p.name: {
                    "node": f"{p.node_if} {p.node_ip}/24",
                    "array": f"{p.array_if} {p.array_ip}/24",
                }
                for p in ALL_PATHS
            },
            "unix": "a second qsd on the same file (file.locking=off), NBD on a unix socket: one "
            "qsd has one NBD server",
        },
        "qemu_img_bench": "-t none --image-opts driver=nbd,...; writes with "
        f"--pattern={WRITE_PATTERN}; per load the targets take turns run by run (the order "
        "rotates); the median of the repeats, after one calibration run per target",
        "patterns": {
            "seq": f"1 MiB requests, depth {SEQ_DEPTH}, sequential (step 1 MiB)",
            "rand": "4 KiB requests, depth 1 and 32; qemu-img bench has no random pattern: "
            f"a fixed stride -S of {_stride_blocks(lun_mib * MIB // BLOCK)} blocks modulo the "
            "export (odd: every block once per pass)",
        },
        "forwarder_timings": dataclasses.asdict(PathTimings()),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "code": str(Path(vmcluster.__file__).resolve().parent),
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny counts, one run each, one cut, 2 disks (the smoke test)",
    )
    parser.add_argument("-o", "--output", type=Path, help="also write the JSON here")
    parser.add_argument("--repeats", type=int, help="runs per figure (default: 3; quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per run (default: 2; quick 0.1)")
    parser.add_argument("--cuts", type=int, help="cuts per kind (default: 5; quick 1)")
    parser.add_argument("--cut-kinds", help="link, nft or both (default: link,nft; quick link)")
    parser.add_argument("--hold-s", type=float, help="seconds a path stays cut (default: 2; "
                        "quick 0.5)")  # fmt: skip
    parser.add_argument(
        "--stall-depth",
        type=int,
        default=4,
        help="the stall writer's requests in flight (default: %(default)s)",
    )
    parser.add_argument("--disks", type=int, help="busy disks for the memory figure "
                        "(default: 8; quick 2)")  # fmt: skip
    parser.add_argument("--memory-s", type=float, help="seconds all of them write (default: 4; "
                        "quick 1)")  # fmt: skip
    parser.add_argument("--lun-mib", type=int, help="the export's size (default: 256; quick 64)")
    args = parser.parse_args(argv)
    defaults = {"repeats": (3, 1), "seconds": (2.0, 0.1), "cuts": (5, 1), "hold_s": (2.0, 0.5),
                "disks": (8, 2), "memory_s": (4.0, 1.0), "lun_mib": (256, 64),
                "cut_kinds": (",".join(CUT_KINDS), "link")}  # fmt: skip
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.cut_kinds = [k.strip() for k in str(args.cut_kinds).split(",") if k.strip()]
    if not args.cut_kinds or set(args.cut_kinds) - set(CUT_KINDS):
        parser.error(f"--cut-kinds: a comma-separated list of {', '.join(CUT_KINDS)}")
    if min(args.repeats, args.cuts, args.disks, args.stall_depth, args.lun_mib) < 1:
        parser.error("--repeats, --cuts, --disks, --stall-depth and --lun-mib at least 1")
    if min(args.seconds, args.hold_s, args.memory_s) <= 0:
        parser.error("--seconds, --hold-s and --memory-s must be positive")
    return args


def _run_all(args: argparse.Namespace, work: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    started = time.monotonic()
    environment = _environment(args, args.lun_mib)
    lun_bytes = args.lun_mib * MIB
    luns = {EXPORT: args.lun_mib, **{_mem(i): MEMORY_LUN_MIB for i in range(args.disks)}}
    _log(f"array: {NETNS}, {len(luns)} exports, paths {', '.join(p.name for p in PATHS)}")
    array = Array(stack, work, luns)
    loads = _loads(lun_bytes, args.quick)
    coordinators = (stack.enter_context(_forwarder(work, "uvloop", "coordinator1")),
                    stack.enter_context(_forwarder(work, "uvloop", "coordinator2")))  # fmt: skip
    relays = (coordinators[0].relay(Address("127.0.0.1", _free_port())),
              coordinators[1].relay(Address("127.0.0.1", _free_port())))  # fmt: skip
    with (
        _forwarder(work, "uvloop", "uvloop") as fast,
        _forwarder(work, "asyncio", "asyncio") as slow,
        _forwarder(work, "uvloop", "uvloop-malloc", malloc="default") as untuned,
    ):
        redirected = _redirected_spec("redirected", relays[0], (("dead", DEAD),))
        targets = {
            "direct_tcp": array.tcp_opts(EXPORT),
            "qsd_unix": array.unix_opts(EXPORT),
            "uvloop": _unix_opts(fast.attach("bench", EXPORT), EXPORT),
            "asyncio": _unix_opts(slow.attach("bench", EXPORT), EXPORT),
            "uvloop_malloc_default": _unix_opts(untuned.attach("bench", EXPORT), EXPORT),
            "redirected": _unix_opts(fast.attach("redirected", EXPORT, redirected), EXPORT),
        }
        relay = _relay(stack, work)
        if relay is not None:
            targets["relay"] = _unix_opts(relay, EXPORT)
        _log(f"throughput and IOPS: {', '.join(targets)} in turn, {args.repeats} runs each")
        measured = _measure(targets, loads, args.seconds, args.repeats)
        for name, fwd in (("uvloop", fast), ("asyncio", slow), ("uvloop_malloc_default", untuned)):
            measured[name]["rss_mib_after"] = round(_status_kib(fwd.pid)["VmRSS"] / KIB, 1)
            measured[name]["forwarder_start_s"] = fwd.start_s
    array.check_alive()
    _log(f"failover stall: {args.cuts} cuts of each of {', '.join(args.cut_kinds)}")
    stall = _stall(array, work, lun_bytes, args)
    _log(f"redirected I/O: {args.cuts} cycle(s) of cut, coordinator move, path back")
    redirect = _redirect(array, work, coordinators, relays, lun_bytes, args)
    memory: dict[str, Any] = {}
    for size in MEMORY_SIZES:
        _log(f"memory: {args.disks} disks, qemu-img bench -w -d {MEMORY_DEPTH} -s {size}")
        memory[f"{size // KIB}k"] = _memory(work, args.disks, size, args.memory_s)
    peak = max(m["peak_rss_mib"] for m in memory.values())
    memory["imports_rss_mib"] = {
        "what": "VmRSS of a python that only imports (no forwarder running): what the process "
        "costs before any disk; `vmcluster forwarder serve` imports vmcluster.cli.main",
        **{module: _imports_rss_mib(module) for module in IMPORTS},
    }
    array.check_alive()

    ratio = {name: {"vs_direct": _ratios(_io(measured[name]), measured["direct_tcp"]),
                    "vs_unix": _ratios(_io(measured[name]), measured["qsd_unix"])}
             for name in COMPARED if name in measured}  # fmt: skip
    ratio["redirected"] = {"vs_direct": _ratios(_io(measured["redirected"]), measured["uvloop"])}
    goals = _io_goals(ratio["uvloop"], "uvloop")
    for load in (
        "seq_write",
        "seq_read",
        "rand_read_d1",
        "rand_write_d1",
        "rand_read_d32",
        "rand_write_d32",
    ):
        name = f"redirected_{load}_vs_direct"
        goals[name] = _goal(GOALS[name], ratio["redirected"]["vs_direct"][load], ">=",
                            f"redirected (through a coordinator's relay) / the node's "
                            f"forwarder direct, {load}")  # fmt: skip
    redirect_lost = (redirect["requests_lost"] + redirect["requests_errored"]
                     + redirect["blocks_wrong"])  # fmt: skip
    goals["mode_change_stall_ms"] = _goal(
        GOALS["mode_change_stall_ms"],
        redirect["mode_change_stall_ms"],
        "<=",
        "the longest request latency when a node goes redirected and when it returns to direct",
    )
    goals["coordinator_move_stall_ms"] = _goal(
        GOALS["coordinator_move_stall_ms"],
        redirect["coordinator_move_stall_ms"],
        "<=",
        "the longest request latency of a redirected node when its coordinator moves",
    )
    goals["redirect_requests_lost"] = _goal(GOALS["redirect_requests_lost"], redirect_lost, "==",
                                            "redirect writer requests lost + errored + blocks "
                                            "read back wrong")  # fmt: skip
    lost = stall["requests_lost"] + stall["requests_errored"] + stall["blocks_wrong"]
    goals["failover_stall_ms"] = _goal(GOALS["failover_stall_ms"], stall["stall_ms"]["max"],
                                       "<=", "the longest request latency around a path cut, "
                                       "over every cut")  # fmt: skip
    goals["failover_requests_lost"] = _goal(GOALS["failover_requests_lost"], lost, "==",
                                            "stall writer requests lost + errored + blocks "
                                            "read back wrong")  # fmt: skip
    goals["forwarder_rss_mib"] = _goal(GOALS["forwarder_rss_mib"], peak, "<=",
                                       f"peak VmRSS, {args.disks} disks busy at depth "
                                       f"{MEMORY_DEPTH}, 64 KiB and 1 MiB requests")  # fmt: skip
    met = {name: goal["met"] for name, goal in goals.items()}
    met["all"] = all(met.values())
    met_asyncio = {n: g["met"] for n, g in _io_goals(ratio["asyncio"], "asyncio").items()}
    lost += redirect_lost
    environment["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    environment["elapsed_s"] = round(time.monotonic() - started, 1)
    return {
        "benchmark": "blockio",
        "unit": {"seq": "MiB/s", "rand": "IOPS", "latency": "ms", "memory": "MiB"},
        "goals": goals,
        "met": met,
        "met_asyncio": met_asyncio,
        "figure": {
            "forwarder_uvloop": measured["uvloop"],
            "forwarder_asyncio": measured["asyncio"],
            "forwarder_uvloop_malloc_default": measured["uvloop_malloc_default"],
            "forwarder_redirected": {
                "what": "qemu-img -> the forwarder (uvloop) -> its redirected path -> a "
                "coordinator's forwarder (relay) -> qsd over p3; its direct path never connects",
                **measured["redirected"],
            },
            "failover_stall": stall,
            "redirect": redirect,
            "memory": memory,
        },
        "reference": {
            "direct_tcp": {
                "what": "qemu-img -> qsd over TCP (p1), today's path",
                **measured["direct_tcp"],
            },
            "qsd_unix": {
                "what": "qemu-img -> qsd's own unix-socket NBD server",
                **measured["qsd_unix"],
            },
            "relay": {
                "what": f"qemu-img -> socat -b {RELAY_BUFFER} (a byte relay in C: unix socket "
                "to TCP p1 with TCP_NODELAY, no NBD parsing, no TCP_QUICKACK, so depth 32 meets "
                "the delayed-ACK stall) -> qsd: what one more process between QEMU and the "
                "array costs on this host, whatever it does",
                **measured.get("relay", {"skipped": "socat is not installed"}),
            },
        },
        "ratio": ratio,
        "environment": environment,
        "checks_passed": lost == 0
        and stall["writer_lost_connection"] is None
        and redirect["writer_lost_connection"] is None,
    }


def _io(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if isinstance(v, dict)}


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every finally: cleanup runs


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if os.geteuid() != 0:
        print("bench/blockio.py needs root (a network namespace, veths, nft)", file=sys.stderr)
        return 2
    tools = [*TOOLS, *(("nft",) if "nft" in args.cut_kinds else ())]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing or not VMCLUSTER.exists():
        print(f"bench/blockio.py needs {', '.join(missing or [str(VMCLUSTER)])}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        _check_free()
        with contextlib.ExitStack() as stack:
            work = Path(tempfile.mkdtemp(prefix=PREFIX))
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            result = _run_all(args, work, stack)
    except (BenchFailed, VmclusterError) as exc:
        _log(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt as exc:
        _log(f"interrupted ({exc or 'SIGINT'}); what it made is removed")
        return 130
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    if not result["met"]["all"]:
        _log("a goal was missed: see met")
    return 0 if result["checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
