"""Single-host VM management: create, start, stop, delete and observe VMs on this machine.

The truth about a VM is observed, never assumed: its QEMU is alive only if the recorded pid still
names the same process (pid + start time), and its run state comes from QMP. A VM that should run
but whose QEMU is gone is shown as crashed.
"""

import asyncio
import contextlib
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmcluster.core.model import NicMode, VmSpec, VmState
from vmcluster.core.units import format_size
from vmcluster.errors import HypervisorError, InvalidState, VmclusterError
from vmcluster.guest.image import get_image
from vmcluster.guest.record import acked_sequences
from vmcluster.hypervisor import process
from vmcluster.hypervisor.accel import choose_accel, qemu_binary
from vmcluster.hypervisor.cmdline import Launch, build_argv
from vmcluster.hypervisor.qmp import QmpSession
from vmcluster.local.store import Desired, Runtime, VmStore
from vmcluster.logs import event, get_logger
from vmcluster.paths import DataDir

log = get_logger(__name__)

STOP_TIMEOUT_S = 30.0
KILL_WAIT_S = 10.0
OBSERVE_QMP_TIMEOUT_S = 2.0
POWERDOWN_REPEAT_S = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class VmStatus:
    """A VM as observed now."""

    spec: VmSpec
    state: VmState
    detail: str
    pid: int | None
    boot: int
    generation: int
    accel: str | None
    http_urls: tuple[str, ...]
    started_at: float | None
    console_log: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "state": str(self.state),
            "detail": self.detail,
            "pid": self.pid,
            "boot": self.boot,
            "generation": self.generation,
            "accel": self.accel,
            "vcpus": self.spec.vcpus,
            "memory_mib": self.spec.memory_mib,
            "disks": [
                {"name": d.name, "size_bytes": d.size_bytes, "size": format_size(d.size_bytes)}
                for d in self.spec.disks
            ],
            "nics": [{"mode": str(n.mode), "mac": n.mac} for n in self.spec.nics],
            "http": list(self.http_urls),
            "image": self.spec.image,
            "started_at": self.started_at,
            "console_log": self.console_log,
        }


class LocalHost:
    """The VMs of this machine."""

    def __init__(self, data: DataDir) -> None:
        self.data = data
        self.store = VmStore(data.vms)

    # ----- queries -----

    def disk_file(self, name: str, disk: str) -> Path:
        return self.store.vm_dir(name) / f"{disk}.raw"

    def console_log(self, name: str, boot: int | None = None) -> Path | None:
        """The console log of instance ``boot`` (default: the latest); None before any start."""
        runtime = self.store.load_runtime(name)
        boot = runtime.boot if boot is None else boot
        if boot < 1 or boot > runtime.boot:
            return None
        return self.store.vm_dir(name) / f"console.{boot}.log"

    async def status(self, name: str) -> VmStatus:
        spec = self.store.load_spec(name)
        runtime = self.store.load_runtime(name)
        state, detail, pid = await self._observe(name, runtime)
        log_path = self.console_log(name)
        return VmStatus(
            spec=spec,
            state=state,
            detail=detail,
            pid=pid,
            boot=runtime.boot,
            generation=runtime.generation,
            accel=runtime.accel if pid else None,
            http_urls=tuple(f"http://127.0.0.1:{p}/cgi-bin/status" for p in runtime.http_ports)
            if pid
            else (),
            started_at=runtime.started_at if pid else None,
            console_log=str(log_path) if log_path else None,
        )

    async def list(self) -> list[VmStatus]:
        found = []
        for name in self.store.names():
            try:
                found.append(await self.status(name))
            except VmclusterError as exc:  # deleted meanwhile, or corrupt: say so, list the rest
                log.warning(event("vm.list.skipped", vm=name, reason=str(exc)))
        return found

    def is_running(self, name: str) -> bool:
        return self._live_process(self.store.load_runtime(name)) is not None

    def _live_process(self, runtime: Runtime) -> process.ProcessId | None:
        if runtime.pid is None or runtime.start_ticks is None:
            return None
        proc = process.ProcessId(pid=runtime.pid, start_ticks=runtime.start_ticks)
        return proc if process.is_alive(proc) else None

    async def _observe(self, name: str, runtime: Runtime) -> tuple[VmState, str, int | None]:
        proc = self._live_process(runtime)
        if proc is None:
            if runtime.desired is Desired.RUNNING:
                return VmState.CRASHED, "QEMU exited without being stopped by vmcluster", None
            reason = f"stopped ({runtime.stop_reason})" if runtime.stop_reason else "never started"
            return VmState.STOPPED, reason, None
        if runtime.desired is Desired.STOPPED:
            return VmState.STOPPING, "a stop is in progress", proc.pid
        session = QmpSession(self._qmp_socket(name), name=name)
        try:
            await session.connect(timeout_s=OBSERVE_QMP_TIMEOUT_S)
            status = await session.status()
        except HypervisorError as exc:
            return VmState.RUNNING, f"QMP did not answer: {exc}", proc.pid
        finally:
            await session.close()
        if status.running:
            return VmState.RUNNING, "", proc.pid
        if status.status in ("inmigrate", "prelaunch"):
            return VmState.STARTING, status.status, proc.pid
        if status.status == "shutdown":
            return VmState.STOPPING, "the guest shut down", proc.pid
        return VmState.PAUSED, status.status, proc.pid

    # ----- changes -----

    def create(self, spec: VmSpec) -> VmStatus:
        def make_disks(vm_dir: Path) -> None:
            for disk in spec.disks:
                path = vm_dir / f"{disk.name}.raw"
                with path.open("xb") as f:
                    f.truncate(disk.size_bytes)  # sparse: takes no space until written

        self.store.create(spec, make_disks)
        log.info(event("vm.created", vm=spec.name))
        return VmStatus(
            spec=spec, state=VmState.STOPPED, detail="never started", pid=None, boot=0,
            generation=0, accel=None, http_urls=(), started_at=None, console_log=None,
        )  # fmt: skip

    async def start(self, name: str) -> VmStatus:
        with self.store.lock(name):
            spec = self.store.load_spec(name)
            runtime = self.store.load_runtime(name)
            proc = self._live_process(runtime)
            if proc is not None:
                raise InvalidState(f"VM {name!r} is already running (QEMU pid {proc.pid})")
            image = get_image(self.data.images, spec.image)
            qemu = qemu_binary()
            accel = choose_accel(self.data.accel_file, image)
            vm_dir = self.store.vm_dir(name)
            disks = tuple(self.disk_file(name, d.name) for d in spec.disks)
            for disk in disks:
                if not disk.exists():
                    raise VmclusterError(f"VM {name!r}: its disk file {disk} is missing")
            boot, generation = runtime.boot + 1, runtime.generation + 1
            socket_path = self._qmp_socket(name)
            socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
            http_ports = tuple(_free_port() for n in spec.nics if n.mode is NicMode.USER)
            launch = Launch(
                spec=spec,
                kernel=image.kernel,
                initrd=image.initrd,
                disk_files=disks,
                qmp_socket=socket_path,
                console_log=vm_dir / f"console.{boot}.log",
                pidfile=vm_dir / "qemu.pid",
                accel=accel.accel,
                generation=generation,
                http_ports=http_ports,
            )
            log.info(event("vm.starting", vm=name, boot=boot, accel=accel.accel,
                           accel_reason=accel.reason))  # fmt: skip
            proc = process.launch_daemon(
                build_argv(launch, qemu), launch.pidfile, what=f"VM {name}"
            )
            runtime = runtime.evolve(
                desired=Desired.RUNNING, boot=boot, generation=generation, pid=proc.pid,
                start_ticks=proc.start_ticks, accel=str(accel.accel), http_ports=http_ports,
                started_at=time.time(), stopped_at=None, stop_reason=None,
            )  # fmt: skip
            self.store.save_runtime(name, runtime)
            try:
                async with QmpSession(socket_path, name=name) as session:
                    status = await session.status()
                if not status.running:
                    raise HypervisorError(f"VM {name}: QEMU started but is {status.status}")
            except HypervisorError:
                await self._kill(proc)
                self.store.save_runtime(
                    name, runtime.evolve(desired=Desired.STOPPED, pid=None, start_ticks=None,
                                         stopped_at=time.time(), stop_reason="failed to start")
                )  # fmt: skip
                raise
            log.info(event("vm.started", vm=name, pid=proc.pid, boot=boot, accel=accel.accel))
        return await self.status(name)

    async def stop(
        self, name: str, *, force: bool = False, timeout_s: float = STOP_TIMEOUT_S
    ) -> VmStatus:
        with self.store.lock(name):
            runtime = self.store.load_runtime(name)
            proc = self._live_process(runtime)
            if proc is None:
                if runtime.desired is Desired.RUNNING:  # crashed: record that it is now stopped
                    self.store.save_runtime(
                        name, runtime.evolve(desired=Desired.STOPPED, pid=None, start_ticks=None,
                                             stopped_at=time.time(), stop_reason="crashed")
                    )  # fmt: skip
                    log.info(event("vm.stopped", vm=name, how="was-crashed"))
                    return await self.status(name)
                raise InvalidState(f"VM {name!r} is not running")
            self.store.save_runtime(name, runtime.evolve(desired=Desired.STOPPED))
            how = "forced" if force else await self._graceful_stop(name, proc, timeout_s)
            if force:
                await self._kill(proc)
            self.store.save_runtime(
                name, runtime.evolve(desired=Desired.STOPPED, pid=None, start_ticks=None,
                                     stopped_at=time.time(), stop_reason=how)
            )  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                self._qmp_socket(name).unlink()
            log.info(event("vm.stopped", vm=name, how=how))
        return await self.status(name)

    async def _graceful_stop(self, name: str, proc: process.ProcessId, timeout_s: float) -> str:
        """Press the power button until the guest powers off; kill QEMU after ``timeout_s``.

        A guest still booting has no handler for the button yet and loses the press, so the
        button is pressed again every POWERDOWN_REPEAT_S.
        """
        deadline = time.monotonic() + timeout_s
        try:
            async with QmpSession(self._qmp_socket(name), name=name) as session:
                while (remaining := deadline - time.monotonic()) > 0:
                    await session.powerdown()
                    if await process.wait_exit(proc, min(remaining, POWERDOWN_REPEAT_S)):
                        return "powered off"
        except HypervisorError as exc:
            if not process.is_alive(proc):  # it powered off while we pressed again
                return "powered off"
            log.warning(event("vm.stop.powerdown-failed", vm=name, reason=str(exc)))
        else:
            log.warning(event("vm.stop.timeout", vm=name, seconds=timeout_s))
        await self._kill(proc)
        return "killed after the guest did not power off"

    async def _kill(self, proc: process.ProcessId) -> None:
        process.send_signal(proc, signal.SIGKILL)
        if not await process.wait_exit(proc, KILL_WAIT_S):
            raise HypervisorError(f"QEMU pid {proc.pid} did not exit after SIGKILL")

    def delete(self, name: str) -> None:
        with self.store.lock(name):
            runtime = self.store.load_runtime(name)
            proc = self._live_process(runtime)
            if proc is not None:
                raise InvalidState(
                    f"VM {name!r} is running: stop it first (vmcluster vm stop {name})"
                )
            self.store.delete(name)
        with contextlib.suppress(OSError):  # the socket directory, once no VM uses it
            self.data.runtime.rmdir()
        log.info(event("vm.deleted", vm=name))

    def _qmp_socket(self, name: str) -> Path:
        return self.data.runtime / f"{name}.qmp"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_ack(console: Path, minimum: int, timeout_s: float) -> int:
    """Wait until the console shows ``ACK n`` with n >= minimum; return the highest seen."""
    async with asyncio.timeout(timeout_s):
        while True:
            with contextlib.suppress(FileNotFoundError):
                text = await asyncio.to_thread(console.read_text, errors="replace")
                acks = acked_sequences(text)
                if acks and max(acks) >= minimum:
                    return max(acks)
            await asyncio.sleep(0.1)
