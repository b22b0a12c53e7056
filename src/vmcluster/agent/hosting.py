"""The QEMU instances of clustered VMs on this node: start, stop, kill, watch, adopt.

One instance is one (VM, generation): its disks are the arrays' NBD exports of that generation
(``<lun>.g<N>``), so an instance of a retired generation has no way to reach the disks. Files per
VM under ``<data_dir>/vms/<vm>/``:

    g<N>.console   the serial console of generation N (kept: the probe checker reads them)
    g<N>.pid       QEMU's pid file
    g<N>.json      pid + start time, so a restarted agent re-adopts the instance

QEMU runs detached (``-daemonize``) and a restarted agent re-adopts it; but an agent that is away
longer than the heartbeat timeout (1 s) leaves its node Isolated, so its VMs fail over (fenced)
and the old instances are killed (docs/operations.md). The agent
watches each instance with a pidfd (exit) and a QMP session (a guest that powers itself off).
"""

import asyncio
import contextlib
import hashlib
import json
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vmcluster.agent.config import ArrayAccess, StorageSettings, VmSettings
from vmcluster.agent.storage import DiskAttacher
from vmcluster.clusterstate.vmrecords import ClusteredVm
from vmcluster.errors import HypervisorError, VmclusterError
from vmcluster.guest.image import ImageInfo, get_image
from vmcluster.hypervisor import process
from vmcluster.hypervisor.accel import choose_accel, qemu_binary
from vmcluster.hypervisor.cmdline import (
    DISK_CACHE,
    Accel,
    DiskSource,
    Launch,
    build_argv,
    disk_file,
)
from vmcluster.hypervisor.qmp import QmpSession
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

KILL_WAIT_S = 10.0
POWERDOWN_REPEAT_S = 2.0
SOCKET_PATH_MAX = 100
GROW_WAIT_S = 5.0  # for the forwarder to serve a grown disk at its new size


@dataclass(slots=True, kw_only=True)
class LocalInstance:
    vm: str
    generation: int
    proc: process.ProcessId
    qmp_socket: Path
    console_log: Path
    started_at: float
    stop_requested: bool = False  # an orderly stop (or a retired generation) asked for
    fenced: bool = False  # killed by the self-fence: a crash as far as HA is concerned
    guest_powered_off: bool = False
    lost_disk: bool = False  # an I/O error stopped the guest: killed, reported crashed
    session: QmpSession | None = None  # the one QMP connection (QEMU's monitor takes one client)
    disk_sizes: dict[str, int] = field(default_factory=dict)  # disk -> its size in QEMU
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
        storage: StorageSettings | None = None,
        relays: Callable[[str], tuple[tuple[str, str], ...]] | None = None,
    ) -> None:
        self.node = node
        self.data_dir = data_dir
        self.settings = settings
        self.arrays = arrays
        self.on_exit = on_exit
        self.disks = DiskAttacher(node=node, settings=storage or StorageSettings(), arrays=arrays,
                                  relays=relays)  # fmt: skip
        self.instances: dict[tuple[str, int], LocalInstance] = {}
        self.launching: dict[tuple[str, int], Path] = {}  # (vm, generation) -> QEMU's pid file
        # QEMU launched while its start was cancelled (the agent stopping): on record for the
        # next start or run to take over, and covered by the watchdog meanwhile.
        self.unwatched: dict[tuple[str, int], process.ProcessId] = {}
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
        return console_logs(self.vm_dir(vm))

    # ----- start -----

    def accel(self) -> Accel:
        if self._accel is None:
            if self.settings.accel == "auto":
                image = get_image(Path(self.settings.images_dir), "probe")
                self._accel = choose_accel(self.data_dir / "accel.json", image).accel
            else:
                self._accel = Accel(self.settings.accel)
        return self._accel

    async def start(
        self, vm: ClusteredVm, generation: int, may_launch: Callable[[], bool] = lambda: True
    ) -> LocalInstance | None:
        """Launch generation ``generation`` of ``vm`` on its arrays' exports of that generation;
        returns once QEMU runs the guest (HypervisorError otherwise, with nothing left behind).
        ``may_launch`` is asked just before QEMU is launched (the lease must still be known
        valid then, not only when the start was decided): None if it says no."""
        spec = vm.spec
        image = get_image(Path(self.settings.images_dir), spec.image)
        for placement in vm.storage:
            if placement.array not in self.arrays:
                raise VmclusterError(
                    f"VM {spec.name}: node {self.node} has no access to array {placement.array}"
                )
        vm_dir = self.vm_dir(spec.name)
        vm_dir.mkdir(parents=True, exist_ok=True)
        pidfile = vm_dir / f"g{generation}.pid"
        running = process.qemu_from_pidfile(pidfile, spec.name, generation)
        if running is not None:
            # A QEMU of this very generation already runs (an agent died while starting it):
            # take it over rather than start a second writer on the same export.
            log.warning(event("vm.instance.found", vm=spec.name, generation=generation,
                              pid=running.pid))  # fmt: skip
            return await self._register(spec.name, generation, running, time.time())
        socket_path = self._qmp_socket(spec.name, generation)
        socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        socket_path.unlink(missing_ok=True)
        disks = await self.disks.attach(vm, generation)
        instance = None
        try:
            instance = await self._launch(vm, generation, image, disks, pidfile, socket_path,
                                          may_launch)  # fmt: skip
            return instance
        finally:
            # Detached again unless a QEMU uses them (one launched, even if this task was
            # cancelled meanwhile, keeps its disks: it is adopted or killed, then released).
            launched = instance is not None or process.qemu_from_pidfile(
                pidfile, spec.name, generation) is not None  # fmt: skip
            if not launched:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.release_disks(spec.name, generation))

    async def _launch(
        self, vm: ClusteredVm, generation: int, image: ImageInfo, disks: tuple[DiskSource, ...],
        pidfile: Path, socket_path: Path, may_launch: Callable[[], bool],
    ) -> LocalInstance | None:  # fmt: skip
        spec = vm.spec
        launch = Launch(
            spec=spec, kernel=image.kernel, initrd=image.initrd, disk_files=disks,
            qmp_socket=socket_path, console_log=self.console_log(spec.name, generation),
            pidfile=pidfile, accel=await asyncio.to_thread(self.accel), generation=generation,
        )  # fmt: skip
        argv = build_argv(launch, qemu_binary())
        key = (spec.name, generation)
        self.launching[key] = pidfile
        try:
            if not may_launch():
                return None
            # QEMU's own start (it connects to the arrays) must not stall the agent's
            # heartbeats; once launched it must be recorded even if this task is cancelled.
            launching = asyncio.ensure_future(
                asyncio.to_thread(process.launch_daemon, argv, pidfile, what=f"VM {spec.name}")
            )
            started_at = time.time()
            try:
                proc = await asyncio.shield(launching)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    launched = await launching
                    self.unwatched[key] = launched
                    self._save(spec.name, generation, launched, started_at)
                raise
            instance = await self._register(spec.name, generation, proc, started_at)
        finally:
            self.launching.pop(key, None)  # from here on the watchdog knows it by its pid
        log.info(event("vm.instance.started", vm=spec.name, generation=generation, pid=proc.pid,
                       accel=launch.accel))  # fmt: skip
        return instance

    async def _register(
        self, vm: str, generation: int, proc: process.ProcessId, started_at: float
    ) -> LocalInstance:
        """Record and watch a launched QEMU; it must answer QMP and run, else it is killed."""
        instance = LocalInstance(vm=vm, generation=generation, proc=proc,
                                 qmp_socket=self._qmp_socket(vm, generation),
                                 console_log=self.console_log(vm, generation),
                                 started_at=started_at)  # fmt: skip
        session = QmpSession(instance.qmp_socket, name=vm)
        try:
            self._save(vm, generation, proc, started_at)
            await session.connect()
            status = await session.status()
            if not status.running:
                raise HypervisorError(f"VM {vm}: QEMU started but is {status.status}")
        except BaseException:
            await session.close()
            process.send_signal(proc, signal.SIGKILL)
            await process.wait_exit(proc, KILL_WAIT_S)
            self._forget(instance)
            self.unwatched.pop(instance.key, None)
            raise
        self.instances[instance.key] = instance
        self.unwatched.pop(instance.key, None)  # watched as an instance from here on
        instance.session = session
        with contextlib.suppress(HypervisorError):  # (unknown sizes: nothing is grown)
            instance.disk_sizes = await _disk_sizes(session)
        self._watch(instance, session)
        return instance

    def _forget(self, instance: LocalInstance) -> None:
        self.instances.pop(instance.key, None)
        (self.vm_dir(instance.vm) / f"g{instance.generation}.json").unlink(missing_ok=True)
        instance.qmp_socket.unlink(missing_ok=True)

    def _save(self, vm: str, generation: int, proc: process.ProcessId, started_at: float) -> None:
        path = self.vm_dir(vm) / f"g{generation}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": proc.pid, "start_ticks": proc.start_ticks,
                                   "started_at": started_at}))  # fmt: skip
        tmp.replace(path)

    async def adopt(
        self, owned: Callable[[tuple[str, int]], bool] = lambda key: False
    ) -> list[LocalInstance]:
        """Instances left running by an earlier agent on this node: those it recorded
        (``g<N>.json``) and those it launched but died before recording (QEMU's pid file, with
        the VM's name and generation checked in the process's command line). Those found frozen
        (by the watchdog) are resumed first if ``owned`` says they are still this node's to
        run; the others do not answer QMP and are killed."""
        found: dict[tuple[str, int], tuple[process.ProcessId, float]] = {}
        for path in sorted(self.data_dir.glob("vms/*/g*.pid")):
            vm, generation = path.parent.name, _generation_of(path)
            proc = None if generation is None else process.qemu_from_pidfile(path, vm, generation)
            if proc is not None and generation is not None:
                found[(vm, generation)] = (proc, 0.0)
        for path in sorted(self.data_dir.glob("vms/*/g*.json")):
            generation = _generation_of(path)
            try:
                data = json.loads(path.read_text())
                proc = process.ProcessId(pid=int(data["pid"]), start_ticks=int(data["start_ticks"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if generation is None or not process.is_alive(proc):
                path.unlink(missing_ok=True)
                continue
            found[(path.parent.name, generation)] = (proc, float(data.get("started_at", 0.0)))
        adopted: list[LocalInstance] = []
        for (vm, generation), (proc, started_at) in sorted(found.items()):
            if owned((vm, generation)) and process.is_stopped(proc):
                process.send_signal(proc, signal.SIGCONT)
                log.warning(event("vm.instance.resumed", vm=vm, generation=generation))
            try:
                instance = await self._register(vm, generation, proc, started_at)
            except HypervisorError as exc:  # it did not answer: killed by _register
                log.warning(event("vm.instance.unadoptable", vm=vm, generation=generation,
                                  reason=str(exc)))  # fmt: skip
                continue
            log.warning(event("vm.instance.adopted", vm=vm, generation=generation, pid=proc.pid))
            adopted.append(instance)
        detached = await self.disks.collect(i.key for i in adopted)
        if detached:
            log.warning(event("vm.disks.collected", count=detached))
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
        self._forget(instance)
        log.info(event("vm.instance.exited", vm=instance.vm, generation=instance.generation,
                       requested=instance.stop_requested,
                       guest_powered_off=instance.guest_powered_off))  # fmt: skip
        try:
            self.on_exit(instance)  # first: the end is known before anything else may await
        finally:
            await self.release_disks(instance.vm, instance.generation)

    async def release_disks(self, vm: str, generation: int) -> None:
        """Detach (vm, generation)'s disks unless a QEMU of it runs or is being started here."""
        key = (vm, generation)
        if key in self.instances or key in self.launching or key in self.unwatched:
            return
        await self.disks.release(vm, generation)

    async def _read_events(self, instance: LocalInstance, session: QmpSession) -> None:
        with contextlib.suppress(HypervisorError):
            async for qemu_event in session.events():
                data = qemu_event.data
                if qemu_event.name == "SHUTDOWN" and data.get("guest"):
                    instance.guest_powered_off = True
                elif qemu_event.name == "BLOCK_IO_ERROR" and not instance.stop_requested:
                    # The disk is gone (fenced, or the array lost it): the guest is paused and
                    # cannot go on. Kill it and report a crash, so that the leader restarts the
                    # VM at a new generation (with a new fence) instead of leaving it paused.
                    instance.lost_disk = True
                    log.warning(event("vm.instance.lost-disk", vm=instance.vm,
                                      generation=instance.generation,
                                      reason=str(data.get("reason", ""))))  # fmt: skip
                    process.send_signal(instance.proc, signal.SIGKILL)
                elif qemu_event.name in ("STOP", "RESUME"):
                    log.warning(event("vm.instance.qemu-event", vm=instance.vm,
                                      generation=instance.generation, qemu_event=qemu_event.name,
                                      reason=str(data.get("reason", ""))))  # fmt: skip

    # ----- stop -----

    async def grow_disk(self, instance: LocalInstance, disk: str, size_bytes: int) -> None:
        """Give the running guest ``disk`` at ``size_bytes``, which the array has grown: once
        the forwarder serves it at that size, a second NBD connection is opened to it, QEMU's
        disk node is switched over to it (its requests drained first) and grown; the guest is
        told. QEMU's NBD client cannot grow the connection it has."""
        session = instance.session
        if session is None or not session.connected:
            raise HypervisorError(f"VM {instance.vm}: no QMP connection to grow disk {disk}")
        served = None
        deadline = time.monotonic() + GROW_WAIT_S
        while time.monotonic() < deadline:
            served = await self.disks.served(instance.vm, disk, instance.generation)
            if served is None:
                raise HypervisorError(f"VM {instance.vm}: disk {disk} is not served by the "
                                      "forwarder: it cannot grow while the VM runs")  # fmt: skip
            if served[1] >= size_bytes:
                break
            await asyncio.sleep(0.1)
        if served is None or served[1] < size_bytes:
            raise HypervisorError(f"VM {instance.vm}: the forwarder does not serve disk {disk} "
                                  f"at {size_bytes} bytes yet")  # fmt: skip
        node = f"disk-{disk}"
        child = f"{node}-{size_bytes}"
        nodes = await session.execute("query-named-block-nodes", {"flat": True})
        names = {str(n.get("node-name")) for n in nodes}
        if child not in names:
            await session.execute("blockdev-add", {**disk_file(served[0]), "node-name": child})
        await session.execute("blockdev-reopen", {"options": [
            {"driver": "raw", "node-name": node, "file": child, "cache": DISK_CACHE}]})  # fmt: skip
        for old in sorted(names - {child}):
            if old.startswith(f"{node}-") and old[len(node) + 1 :].isdigit():  # an earlier grow's
                with contextlib.suppress(HypervisorError):
                    await session.execute("blockdev-del", {"node-name": old})
        await session.execute("block_resize", {"node-name": node, "size": size_bytes})
        instance.disk_sizes[disk] = size_bytes
        log.info(event("vm.disk.grown", vm=instance.vm, generation=instance.generation,
                       disk=disk, size_bytes=size_bytes))  # fmt: skip

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

    def is_frozen(self, instance: LocalInstance) -> bool:
        """Stopped by a signal (SIGSTOP: the self-fence's or the watchdog's freeze)."""
        return process.is_stopped(instance.proc)

    def kill_now(self, instances: Iterable[LocalInstance]) -> int:
        """SIGKILL these instances at once, without waiting (the self-fence). Returns how many."""
        count = 0
        for instance in instances:
            instance.fenced = True
            count += process.send_signal(instance.proc, signal.SIGKILL)
        return count

    async def stop(self, instance: LocalInstance, timeout_s: float) -> str:
        """Press the power button until the guest powers off; kill it after ``timeout_s``.

        The button is pressed over the instance's own QMP session: QEMU's monitor socket serves
        one client at a time, and the watcher holds it."""
        instance.stop_requested = True
        deadline = time.monotonic() + timeout_s
        session = instance.session
        if session is not None:
            with contextlib.suppress(HypervisorError):
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


async def _disk_sizes(session: QmpSession) -> dict[str, int]:
    """disk -> the size QEMU gives the guest, from its block nodes ``disk-<name>``."""
    sizes = {}
    for block in await session.execute("query-block"):
        inserted = block.get("inserted") or {}
        node = str(inserted.get("node-name", ""))
        if node.startswith("disk-"):
            sizes[node.removeprefix("disk-")] = int(inserted["image"]["virtual-size"])
    return sizes


def console_logs(vm_dir: Path) -> dict[int, Path]:
    """generation -> console log in a VM's directory (``g<N>.console``)."""
    found = {}
    for path in vm_dir.glob("g*.console"):
        generation = _generation_of(path)
        if generation is not None:
            found[generation] = path
    return found


def _generation_of(path: Path) -> int | None:
    """``g12.pid`` -> 12."""
    try:
        return int(path.name[1:].split(".")[0])
    except ValueError:
        return None
