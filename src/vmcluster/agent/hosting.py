"""The QEMU instances of clustered VMs on this node: start, stop, kill, watch, adopt.

One instance is one (VM, generation): its disks are the arrays' NBD exports of that generation
(``<lun>.g<N>``), so an instance of a retired generation has no way to reach the disks. Files per
VM under ``<data_dir>/vms/<vm>/``:

    g<N>.console   the serial console of generation N (kept: the probe checker reads them)
    g<N>.pid       QEMU's pid file
    g<N>.json      pid + start time, so a restarted agent re-adopts the instance

QEMU runs detached (``-daemonize``): an agent restart does not touch running VMs. The agent
watches each instance with a pidfd (exit) and a QMP session (a guest that powers itself off).
"""

import asyncio
import contextlib
import hashlib
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmcluster.agent.config import ArrayAccess, VmSettings
from vmcluster.clusterstate.vmrecords import ClusteredVm
from vmcluster.errors import HypervisorError, VmclusterError
from vmcluster.guest.image import get_image
from vmcluster.hypervisor import process
from vmcluster.hypervisor.accel import choose_accel, qemu_binary
from vmcluster.hypervisor.cmdline import Accel, Launch, NbdDisk, build_argv
from vmcluster.hypervisor.qmp import QmpSession
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

KILL_WAIT_S = 10.0
POWERDOWN_REPEAT_S = 2.0
SOCKET_PATH_MAX = 100


@dataclass(slots=True, kw_only=True)
class LocalInstance:
    vm: str
    generation: int
    proc: process.ProcessId
    qmp_socket: Path
    console_log: Path
    started_at: float
    stop_requested: bool = False
    guest_powered_off: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list["asyncio.Task[None]"] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int]:
        return (self.vm, self.generation)


class VmHost:
    """This node's instances. ``on_exit`` is called (in the loop) when an instance's QEMU exits."""

    def __init__(
        self,
        *,
        node: str,
        data_dir: Path,
        settings: VmSettings,
        arrays: dict[str, ArrayAccess],
        on_exit: Callable[[LocalInstance], None],
    ) -> None:
        self.node = node
        self.data_dir = data_dir
        self.settings = settings
        self.arrays = arrays
        self.on_exit = on_exit
        self.instances: dict[tuple[str, int], LocalInstance] = {}
        self._accel: Accel | None = None

    # ----- files -----

    def vm_dir(self, vm: str) -> Path:
        return self.data_dir / "vms" / vm

    def console_log(self, vm: str, generation: int) -> Path:
        return self.vm_dir(vm) / f"g{generation}.console"

    def _qmp_socket(self, vm: str, generation: int) -> Path:
        run_dir = Path(self.settings.run_dir)
        path = run_dir / f"{vm}.g{generation}.qmp"
        if len(str(path)) > SOCKET_PATH_MAX:
            path = run_dir / f"{hashlib.sha256(vm.encode()).hexdigest()[:12]}.g{generation}.qmp"
        return path

    def consoles(self, vm: str) -> dict[int, Path]:
        """generation -> console log, for every instance of ``vm`` this node ran."""
        found = {}
        for path in self.vm_dir(vm).glob("g*.console"):
            with contextlib.suppress(ValueError):
                found[int(path.name[1:].split(".")[0])] = path
        return found

    # ----- start -----

    def accel(self) -> Accel:
        if self._accel is None:
            if self.settings.accel == "auto":
                image = get_image(Path(self.settings.images_dir), "probe")
                self._accel = choose_accel(self.data_dir / "accel.json", image).accel
            else:
                self._accel = Accel(self.settings.accel)
        return self._accel

    async def start(self, vm: ClusteredVm, generation: int) -> LocalInstance:
        """Launch generation ``generation`` of ``vm`` on its arrays' exports of that generation;
        returns once QEMU runs the guest (HypervisorError otherwise, with nothing left behind)."""
        spec = vm.spec
        image = get_image(Path(self.settings.images_dir), spec.image)
        disks = []
        for placement in vm.storage:
            array = self.arrays.get(placement.array)
            if array is None:
                raise VmclusterError(
                    f"VM {spec.name}: node {self.node} has no access to array {placement.array}"
                )
            host, port = array.portal(0)
            disks.append(NbdDisk(host=host, port=port, export=f"{placement.lun}.g{generation}"))
        vm_dir = self.vm_dir(spec.name)
        vm_dir.mkdir(parents=True, exist_ok=True)
        socket_path = self._qmp_socket(spec.name, generation)
        socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        socket_path.unlink(missing_ok=True)
        launch = Launch(
            spec=spec, kernel=image.kernel, initrd=image.initrd, disk_files=tuple(disks),
            qmp_socket=socket_path, console_log=self.console_log(spec.name, generation),
            pidfile=vm_dir / f"g{generation}.pid", accel=await asyncio.to_thread(self.accel),
            generation=generation,
        )  # fmt: skip
        argv = build_argv(launch, qemu_binary())
        # QEMU's own start (it connects to the arrays) must not stall the agent's heartbeats.
        proc = await asyncio.to_thread(
            process.launch_daemon, argv, launch.pidfile, what=f"VM {spec.name}"
        )
        instance = LocalInstance(vm=spec.name, generation=generation, proc=proc,
                                 qmp_socket=socket_path, console_log=launch.console_log,
                                 started_at=time.time())  # fmt: skip
        self._save(instance)
        self.instances[instance.key] = instance
        try:
            session = QmpSession(socket_path, name=spec.name)
            await session.connect()
            status = await session.status()
            if not status.running:
                await session.close()
                raise HypervisorError(f"VM {spec.name}: QEMU started but is {status.status}")
        except HypervisorError:
            await self.kill(instance)
            raise
        self._watch(instance, session)
        log.info(event("vm.instance.started", vm=spec.name, generation=generation, pid=proc.pid,
                       accel=launch.accel))  # fmt: skip
        return instance

    def _save(self, instance: LocalInstance) -> None:
        path = self.vm_dir(instance.vm) / f"g{instance.generation}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": instance.proc.pid,
                                   "start_ticks": instance.proc.start_ticks,
                                   "started_at": instance.started_at}))  # fmt: skip
        tmp.replace(path)

    def adopt(self) -> list[LocalInstance]:
        """Instances left running by an earlier agent on this node."""
        adopted = []
        for path in sorted(self.data_dir.glob("vms/*/g*.json")):
            vm = path.parent.name
            try:
                generation = int(path.stem[1:])
                data = json.loads(path.read_text())
                proc = process.ProcessId(pid=int(data["pid"]), start_ticks=int(data["start_ticks"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not process.is_alive(proc):
                path.unlink(missing_ok=True)
                continue
            instance = LocalInstance(vm=vm, generation=generation, proc=proc,
                                     qmp_socket=self._qmp_socket(vm, generation),
                                     console_log=self.console_log(vm, generation),
                                     started_at=float(data.get("started_at", 0.0)))  # fmt: skip
            self.instances[instance.key] = instance
            self._watch(instance, None)
            log.warning(event("vm.instance.adopted", vm=vm, generation=generation, pid=proc.pid))
            adopted.append(instance)
        return adopted

    # ----- watch -----

    def _watch(self, instance: LocalInstance, session: QmpSession | None) -> None:
        reader = None
        if session is not None:
            reader = asyncio.create_task(self._read_events(instance, session))
            instance.tasks.append(reader)
        instance.tasks.append(asyncio.create_task(self._wait_exit(instance, session, reader)))

    async def _wait_exit(
        self,
        instance: LocalInstance,
        session: QmpSession | None,
        reader: "asyncio.Task[None] | None",
    ) -> None:
        await process.wait_exit(instance.proc, None)
        if reader is not None:  # the last events (SHUTDOWN) arrive as QEMU hangs up
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), 2.0)
        if session is not None:
            await session.close()
        instance.exited.set()
        self.instances.pop(instance.key, None)
        (self.vm_dir(instance.vm) / f"g{instance.generation}.json").unlink(missing_ok=True)
        instance.qmp_socket.unlink(missing_ok=True)
        log.info(event("vm.instance.exited", vm=instance.vm, generation=instance.generation,
                       requested=instance.stop_requested,
                       guest_powered_off=instance.guest_powered_off))  # fmt: skip
        self.on_exit(instance)

    async def _read_events(self, instance: LocalInstance, session: QmpSession) -> None:
        with contextlib.suppress(HypervisorError):
            async for qemu_event in session.events():
                data = qemu_event.data
                if qemu_event.name == "SHUTDOWN" and data.get("guest"):
                    instance.guest_powered_off = True
                elif qemu_event.name in ("STOP", "BLOCK_IO_ERROR", "RESUME"):
                    log.warning(event("vm.instance.qemu-event", vm=instance.vm,
                                      generation=instance.generation, qemu_event=qemu_event.name,
                                      reason=str(data.get("reason", ""))))  # fmt: skip

    # ----- stop -----

    async def kill(self, instance: LocalInstance) -> None:
        instance.stop_requested = True
        process.send_signal(instance.proc, signal.SIGKILL)
        if not await process.wait_exit(instance.proc, KILL_WAIT_S):
            raise HypervisorError(
                f"VM {instance.vm}: QEMU pid {instance.proc.pid} survived SIGKILL"
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_WAIT_S):
                await instance.exited.wait()

    def signal_all(self, sig: signal.Signals) -> int:
        """Send ``sig`` to every instance (SIGSTOP / SIGCONT: the self-fence's freeze)."""
        return sum(1 for i in self.instances.values() if process.send_signal(i.proc, sig))

    def signal(self, instance: LocalInstance, sig: signal.Signals) -> bool:
        return process.send_signal(instance.proc, sig)

    def kill_now(self) -> int:
        """SIGKILL every instance at once, without waiting (the self-fence). Returns how many."""
        for instance in self.instances.values():
            instance.stop_requested = True
            process.send_signal(instance.proc, signal.SIGKILL)
        return len(self.instances)

    async def stop(self, instance: LocalInstance, timeout_s: float) -> str:
        """Press the power button until the guest powers off; kill it after ``timeout_s``."""
        instance.stop_requested = True
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(HypervisorError):
            async with QmpSession(instance.qmp_socket, name=instance.vm) as session:
                while (remaining := deadline - time.monotonic()) > 0:
                    await session.powerdown()
                    if await process.wait_exit(instance.proc, min(remaining, POWERDOWN_REPEAT_S)):
                        break
        if process.is_alive(instance.proc):
            await self.kill(instance)
            return "killed after the guest did not power off"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_WAIT_S):
                await instance.exited.wait()
        return "powered off"

    async def close(self) -> None:
        for instance in list(self.instances.values()):
            for task in instance.tasks:
                task.cancel()
