"""An array built from qemu-storage-daemon, driven over its QMP socket, on the array host.

Nodes never use this driver: they reach an array through its service over the storage networks
(vmcluster.arrays.service wraps a QsdArray; vmcluster.arrays.client is the nodes' driver). The
QMP socket and the directory are the array host's own.

The daemon keeps its block nodes and exports in memory only, so the array's configuration (LUNs
and their exports) is kept in ``array.json`` beside the LUN files and replayed by :meth:`restore`
after the daemon restarts, as an array's firmware restores its configuration at power-on. LUN
data lives in raw files and survives restarts.

QMP used: ``blockdev-add`` (a raw node over a file), ``block_resize`` (a LUN grows),
``blockdev-backup`` with sync full (a copy, consistent at its start while clients write: the
job's copy-before-write filter saves old data before it is overwritten), ``query-jobs`` and
``job-dismiss``, ``block-export-add`` (type nbd),
``block-export-del`` (mode hard cuts connected clients), ``query-block-exports``,
``query-named-block-nodes``.

The storage fence: a LUN is exported under a name that carries the placement generation of its
VM, ``<lun>.g<N>``. :meth:`QsdArray.fence` retires every other export of the LUN with a *hard*
delete (connected clients are cut at once: an old owner that is still alive can no longer read
or write, and its QEMU pauses on the I/O error) and only then exports generation N.

The daemon's truth, not the file's: which exports a LUN has is what the daemon reports, never what
``array.json`` lists (another driver, with another copy of that file, may have added some). An
export belongs to a LUN when it serves the LUN's block node, any other node over the LUN's file,
or when its id is a generation name of the LUN (``<lun>.g<N>``, whatever node it serves). The
fence checks again after exporting N, so that fences through two drivers that interleave leave
the newer generation alone (the daemon's QMP monitor serves one connection at a time, so two
sessions on one monitor never interleave; drivers on two monitors, or a future driver that
reconnects between steps, can). ``array.json`` is rewritten afterwards to follow the daemon.

Generations only grow: each LUN has a high-water mark, the highest generation fenced or seen at
the daemon. It is the maximum of ``array.json``'s mark and every generation the daemon reports for
the LUN: a daemon that reports a higher generation raises it, one that reports less (or nothing,
after a restart) never lowers it. A fence below the mark is refused, so a stale controller cannot
re-open an old owner's door, and :meth:`restore` does not re-export a generation below it.
"""

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NoReturn

from vmcluster.arrays.driver import (
    RESIZING_SUFFIX,
    ArrayStatus,
    LunInfo,
    check_generation,
    check_growth,
    check_lun,
    check_size,
    export_name,
    parse_export_name,
    resizing_marker,
)
from vmcluster.errors import (
    AlreadyExists,
    ArrayUnavailable,
    HypervisorError,
    InvalidInput,
    InvalidState,
    NotFound,
)
from vmcluster.hypervisor.qmp import QmpSession
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

FENCE_ROUNDS = 10  # retire-export-check rounds before a fence gives up on exports that keep moving
QMP_CONNECT_TIMEOUT_S = 10.0  # the daemon may still be starting


@dataclass(slots=True, kw_only=True)
class Lun:
    name: str
    size_bytes: int
    exports: list[str] = field(default_factory=list)
    generation: int = 0  # high-water mark: the highest generation fenced or seen (0: never)


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveExport:
    """One export as the daemon reports it (``query-block-exports``)."""

    id: str
    node: str
    shutting_down: bool  # hard-deleted, its clients being cut: gone soon, never live again

    def generation(self, lun: str) -> int | None:
        """The generation of ``lun`` this export carries in its id, if any."""
        parsed = parse_export_name(self.id)
        return parsed[1] if parsed is not None and parsed[0] == lun else None


def high_water_mark(record: Lun, live: list[LiveExport]) -> int:
    """The mark of ``record``: never below the stored one, raised by what the daemon reports."""
    seen = (e.generation(record.name) for e in live)
    return max([record.generation, *(g for g in seen if g is not None)])


@dataclass(slots=True, kw_only=True)
class ArrayConfig:
    luns: dict[str, Lun] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "ArrayConfig":
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(luns={k: Lun(**v) for k, v in data.get("luns", {}).items()})

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"luns": {k: asdict(v) for k, v in self.luns.items()}}, indent=2))
        os.replace(tmp, path)


class QsdArray:
    """One qemu-storage-daemon array: its QMP socket and its directory of LUN files. It runs on
    the array host (the array service wraps it: vmcluster.arrays.service); it is an
    :class:`~vmcluster.arrays.driver.ArrayDriver` itself.

    One operation at a time: each holds an exclusive lock on the directory (``array.lock``)."""

    def __init__(self, *, name: str, qmp_socket: Path, directory: Path,
                 connect_timeout_s: float = QMP_CONNECT_TIMEOUT_S) -> None:  # fmt: skip
        self.name = name
        self.qmp_socket = qmp_socket
        self.directory = directory
        self.connect_timeout_s = connect_timeout_s

    @property
    def config_path(self) -> Path:
        return self.directory / "array.json"

    def lun_path(self, lun: str) -> Path:
        return self.directory / "luns" / f"{lun}.raw"

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[QmpSession]:
        """A QMP session with the daemon; ArrayUnavailable if it does not answer (retryable)."""
        session = QmpSession(self.qmp_socket, name=f"array {self.name}")
        try:
            try:
                await session.connect(self.connect_timeout_s)
            except HypervisorError as exc:
                raise ArrayUnavailable(f"array {self.name}: qemu-storage-daemon does not answer "
                                       f"on {self.qmp_socket}") from exc  # fmt: skip
            yield session
        finally:
            await session.close()

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """One configuration change at a time, across processes (the array's controller)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "array.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    async def create_lun(self, lun: str, size_bytes: int) -> None:
        check_lun(lun)
        check_size(size_bytes)
        async with self._locked():
            await self._create_lun(lun, size_bytes)

    async def _create_lun(self, lun: str, size_bytes: int) -> None:
        config = ArrayConfig.load(self.config_path)
        if lun in config.luns:
            raise AlreadyExists(f"array {self.name}: LUN {lun!r} already exists")
        path = self.lun_path(lun)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("xb") as f:
            f.truncate(size_bytes)
        try:
            async with self._session() as session:
                await self._add_node(session, lun)
        except BaseException:
            path.unlink()
            raise
        config.luns[lun] = Lun(name=lun, size_bytes=size_bytes)
        config.save(self.config_path)
        log.info(event("array.lun.created", array=self.name, lun=lun, size_bytes=size_bytes))

    async def delete_lun(self, lun: str) -> None:
        """Cut every client, remove the exports and the block node, and delete the LUN's data."""
        check_lun(lun)
        async with self._locked():
            config = ArrayConfig.load(self.config_path)
            record = config.luns.get(lun)
            if record is None:
                raise NotFound(f"array {self.name}: no LUN {lun!r}")
            async with self._session() as session:
                for export in await self._lun_exports(session, lun):
                    await self._retire(session, lun, export)
                named = await session.execute("query-named-block-nodes", {"flat": True})
                nodes = {str(n.get("node-name")) for n in named}
                if f"lun-{lun}" in nodes:
                    await session.execute("blockdev-del", {"node-name": f"lun-{lun}"})
            del config.luns[lun]
            config.save(self.config_path)
            self.lun_path(lun).unlink(missing_ok=True)
        log.info(event("array.lun.deleted", array=self.name, lun=lun))

    async def resize_lun(self, lun: str, size_bytes: int) -> None:
        check_lun(lun)
        check_size(size_bytes)
        async with self._locked():
            config = ArrayConfig.load(self.config_path)
            record = config.luns.get(lun)
            if record is None:
                raise NotFound(f"array {self.name}: no LUN {lun!r}")
            if not check_growth(self.name, lun, record.size_bytes, size_bytes):
                return
            async with self._session() as session:
                # An NBD export does not let its node be resized: its exports are retired for
                # the resize (their clients cut: they reconnect, and are told the new size)
                # and made again under the same names. Meanwhile a marker export says so
                # (driver.resizing_marker), so that a client refused in that moment knows it
                # is not fenced. The array's lock keeps fences out until the exports are back.
                live = [e for e in await self._lun_exports(session, lun) if not e.shutting_down]
                try:
                    await self._mark_resizing(session, lun, [e.id for e in live])
                    for export in live:
                        await self._retire(session, lun, export)
                    try:
                        await session.execute("block_resize", {"node-name": f"lun-{lun}",
                                                               "size": size_bytes})  # fmt: skip
                    finally:
                        for export in live:
                            await self._add_export(session, lun, export.id)
                finally:
                    await self._unmark_resizing(session, lun)
            record.size_bytes = size_bytes
            config.save(self.config_path)
        log.info(event("array.lun.resized", array=self.name, lun=lun, size_bytes=size_bytes))

    async def _mark_resizing(self, session: QmpSession, lun: str, exports: list[str]) -> None:
        node = f"resizing-{lun}"
        nodes = await session.execute("query-named-block-nodes", {"flat": True})
        if node not in {str(n.get("node-name")) for n in nodes}:
            await session.execute("blockdev-add", {"driver": "null-co", "node-name": node,
                                                   "size": 512, "read-zeroes": True})  # fmt: skip
        have = {e.id for e in await self._live_exports(session)}
        for export in exports:
            marker = resizing_marker(export)
            if marker not in have:
                await session.execute("block-export-add", {
                    "type": "nbd", "id": marker, "node-name": node, "name": marker,
                    "writable": False})  # fmt: skip

    async def _unmark_resizing(self, session: QmpSession, lun: str, *, node_too: bool = True,
                               ) -> None:  # fmt: skip
        """Remove ``lun``'s resizing markers (and their node, if ``node_too`` or any was
        found)."""
        node = f"resizing-{lun}"
        found = False
        for export in await self._live_exports(session):
            if export.node == node and not export.shutting_down:
                found = True
                await session.execute("block-export-del", {"id": export.id, "mode": "hard"})
                await self._wait_gone(session, export.id)
        if node_too or found:
            with contextlib.suppress(HypervisorError):  # not there: nothing to remove
                await session.execute("blockdev-del", {"node-name": node})

    async def copy_lun(self, source: str, target: str) -> None:
        """A new LUN ``target`` with ``source``'s data at this moment: a full backup job from
        the source's node to the target's. The array does nothing else until it is done."""
        check_lun(source)
        check_lun(target)
        async with self._locked():
            config = ArrayConfig.load(self.config_path)
            record = config.luns.get(source)
            if record is None:
                raise NotFound(f"array {self.name}: no LUN {source!r}")
            await self._create_lun(target, record.size_bytes)
            try:
                async with self._session() as session:
                    await self._backup(session, source, target)
            except BaseException:
                await self._drop_new(target)
                raise
        log.info(event("array.lun.copied", array=self.name, source=source, lun=target))

    async def _backup(self, session: QmpSession, source: str, target: str) -> None:
        job = f"copy-{target}"
        await session.execute("blockdev-backup", {
            "job-id": job, "device": f"lun-{source}", "target": f"lun-{target}",
            "sync": "full", "auto-dismiss": False,
        })  # fmt: skip
        try:
            while True:
                jobs = {str(j.get("id")): j for j in await session.execute("query-jobs")}
                status = jobs.get(job, {}).get("status")
                if status in ("concluded", None):
                    break
                await asyncio.sleep(0.02)
            error = jobs.get(job, {}).get("error")
            if error:
                raise HypervisorError(f"array {self.name}: the copy of LUN {source} to {target} "
                                      f"failed: {error}")  # fmt: skip
        finally:
            with contextlib.suppress(HypervisorError):
                await session.execute("job-dismiss", {"id": job})

    async def _drop_new(self, lun: str) -> None:
        """Remove a LUN just made, unexported (a copy that failed)."""
        config = ArrayConfig.load(self.config_path)
        with contextlib.suppress(HypervisorError, ArrayUnavailable):
            async with self._session() as session:
                await session.execute("blockdev-del", {"node-name": f"lun-{lun}"})
        config.luns.pop(lun, None)
        config.save(self.config_path)
        self.lun_path(lun).unlink(missing_ok=True)

    def records(self) -> dict[str, Lun]:
        """The LUNs as ``array.json`` holds them (the array host's own view, no daemon)."""
        return ArrayConfig.load(self.config_path).luns

    async def luns(self) -> list[LunInfo]:
        async with self._locked():
            config = ArrayConfig.load(self.config_path)
        return [LunInfo(name=lun.name, size_bytes=lun.size_bytes, generation=lun.generation)
                for lun in sorted(config.luns.values(), key=lambda lun: lun.name)]  # fmt: skip

    async def export(self, lun: str, export_name: str) -> None:
        """Export ``lun`` over NBD as ``export_name`` (writable), a name that is not a
        generation's (``<lun>.g<N>``: those are :meth:`fence`'s)."""
        async with self._locked():
            await self._export(lun, export_name)

    async def _export(self, lun: str, export_name: str) -> None:
        if parse_export_name(export_name) is not None:
            raise InvalidInput(f"array {self.name}: export name {export_name!r} is a generation's; "
                               f"only fence exports a generation")  # fmt: skip
        if export_name.endswith(RESIZING_SUFFIX):
            raise InvalidInput(f"array {self.name}: export name {export_name!r} ends in "
                               f"{RESIZING_SUFFIX!r}, which marks a disk being grown")  # fmt: skip
        config = ArrayConfig.load(self.config_path)
        if lun not in config.luns:
            raise NotFound(f"array {self.name}: no LUN {lun!r}")
        async with self._session() as session:
            await self._add_export(session, lun, export_name)
        config.luns[lun].exports.append(export_name)
        config.save(self.config_path)
        log.info(event("array.export.added", array=self.name, lun=lun, export=export_name))

    async def fence(self, lun: str, generation: int, *, request_id: str | None = None) -> str:
        """Cut every client of ``lun`` except generation ``generation``'s, which is exported.

        Every export of the LUN the daemon reports, other than ``<lun>.g<generation>``, is
        retired. Returns the export name. Idempotent for the LUN's high-water mark; InvalidState
        below it (the mark raised by what the daemon reports is stored all the same).
        """
        check_lun(lun)
        check_generation(generation)
        async with self._locked():
            return await self._fence(lun, generation)

    async def _fence(self, lun: str, generation: int) -> str:
        config = ArrayConfig.load(self.config_path)
        record = config.luns.get(lun)
        if record is None:
            raise NotFound(f"array {self.name}: no LUN {lun!r}")
        wanted = export_name(lun, generation)
        async with self._session() as session:
            # A resize's markers left by a daemon or service that died mid-way: gone, so that
            # no forwarder of a retired generation waits on them
            await self._unmark_resizing(session, lun, node_too=False)
            for _ in range(FENCE_ROUNDS):
                live = await self._lun_exports(session, lun)
                mark = high_water_mark(record, live)
                if generation < mark:
                    await self._refuse(session, config, record, live, mark, generation)
                mine = next((e for e in live if e.id == wanted), None)
                others = [e for e in live if e.id != wanted]
                if not others and mine is not None and not mine.shutting_down:
                    break  # checked after the last change: generation N alone is exported
                for other in others:
                    await self._retire(session, lun, other)
                if mine is not None and mine.shutting_down:
                    await self._wait_gone(session, wanted)
                    mine = None
                if mine is None:
                    await self._add_export_once(session, lun, wanted)
            else:
                raise HypervisorError(
                    f"array {self.name}: the exports of LUN {lun} kept changing during the fence "
                    f"of generation {generation}; retry it"
                )
        record.exports = [wanted]
        record.generation = generation
        config.save(self.config_path)
        log.info(event("array.fenced", array=self.name, lun=lun, generation=generation))
        return wanted

    async def _refuse(self, session: QmpSession, config: ArrayConfig, record: Lun,
                      live: list[LiveExport], mark: int, generation: int) -> NoReturn:  # fmt: skip
        """Refuse a fence of ``generation`` below ``mark``: retire only that generation's export
        (stale: a fence through another driver that lost a race leaves it behind), store the
        mark as the daemon raised it, and raise InvalidState."""
        wanted = export_name(record.name, generation)
        for export in live:
            if export.id == wanted:
                await self._retire(session, record.name, export)
        record.exports = sorted(e.id for e in live if e.id != wanted)
        if mark > record.generation:
            log.info(event("array.mark.raised", array=self.name, lun=record.name,
                           stored=record.generation, seen=mark))  # fmt: skip
        record.generation = mark
        config.save(self.config_path)
        raise InvalidState(
            f"array {self.name}: LUN {record.name} is fenced at generation {mark}; "
            f"generation {generation} is stale"
        )

    async def _live_exports(self, session: QmpSession) -> list[LiveExport]:
        reply = await session.execute("query-block-exports")
        return [LiveExport(id=str(e["id"]), node=str(e.get("node-name", "")),
                           shutting_down=bool(e.get("shutting-down", False)))
                for e in reply]  # fmt: skip

    async def _lun_exports(self, session: QmpSession, lun: str) -> list[LiveExport]:
        """Every export of ``lun`` the daemon has: on its node, on any other node over its
        file, or named as one of its generations."""
        nodes = {f"lun-{lun}"}
        path = self.lun_path(lun)
        for node in await session.execute("query-named-block-nodes", {"flat": True}):
            if _same_file(str(node.get("file", "")), path):
                nodes.add(str(node.get("node-name")))
        return [e for e in await self._live_exports(session)
                if e.node in nodes or e.generation(lun) is not None]  # fmt: skip

    async def _retire(self, session: QmpSession, lun: str, export: LiveExport) -> None:
        """Delete ``export`` with mode hard (its clients are cut) and wait until it is gone."""
        if not export.shutting_down:
            try:
                await session.execute("block-export-del", {"id": export.id, "mode": "hard"})
            except HypervisorError:
                # Another driver may have retired it in between: that is no failure.
                now = {e.id: e for e in await self._live_exports(session)}
                if export.id in now and not now[export.id].shutting_down:
                    raise
        await self._wait_gone(session, export.id)
        log.info(event("array.export.retired", array=self.name, lun=lun, export=export.id))

    async def _add_export_once(self, session: QmpSession, lun: str, name: str) -> None:
        """Export ``name``, unless a fence of the same generation through another driver just
        did (the export is then there, on the LUN's node)."""
        try:
            await self._add_export(session, lun, name)
        except HypervisorError:
            now = {e.id: e for e in await self._live_exports(session)}
            there = now.get(name)
            if there is None or there.shutting_down or there.node != f"lun-{lun}":
                raise

    async def _wait_gone(self, session: QmpSession, export_id: str) -> None:
        """A hard delete returns at once; the export is gone when it leaves the list."""
        for _ in range(200):
            live = {str(e["id"]) for e in await session.execute("query-block-exports")}
            if export_id not in live:
                return
            await asyncio.sleep(0.01)
        raise HypervisorError(f"array {self.name}: export {export_id} did not go away")

    async def exports(self, lun: str | None = None) -> list[str]:
        """The exports the daemon serves (of ``lun`` only, if given), sorted; exports being
        cut (hard-deleted, their clients being disconnected) are left out."""
        if lun is not None:
            check_lun(lun)
        async with self._locked(), self._session() as session:
            if lun is None:
                live = await self._live_exports(session)
            else:
                if lun not in ArrayConfig.load(self.config_path).luns:
                    raise NotFound(f"array {self.name}: no LUN {lun!r}")
                live = await self._lun_exports(session, lun)
        return sorted(e.id for e in live if not e.shutting_down
                      and not e.id.endswith(RESIZING_SUFFIX))  # fmt: skip

    async def status(self) -> ArrayStatus:
        async with self._locked(), self._session() as session:
            live = await self._live_exports(session)
            luns = len(ArrayConfig.load(self.config_path).luns)
        return ArrayStatus(
            name=self.name,
            luns=luns,
            exports=sum(not e.shutting_down and not e.id.endswith(RESIZING_SUFFIX) for e in live),
        )

    async def restore_if_forgotten(self) -> bool:
        """:meth:`restore` if the daemon lacks the block node of a configured LUN (it restarted
        and remembers nothing); whether it did. One query when nothing is missing."""
        async with self._locked():
            config = ArrayConfig.load(self.config_path)
            if not config.luns:
                return False
            async with self._session() as session:
                named = await session.execute("query-named-block-nodes", {"flat": True})
            nodes = {str(n.get("node-name")) for n in named}
            if all(f"lun-{lun}" in nodes for lun in config.luns):
                return False
            log.info(event("array.daemon.forgot", array=self.name))
            await self._restore()
            return True

    async def restore(self) -> None:
        """Re-create every configured LUN node and export (after the daemon restarted)."""
        async with self._locked():
            await self._restore()

    async def _restore(self) -> None:
        """Adds what the daemon lacks, never a generation below the LUN's mark: a copy of
        array.json older than the daemon's exports must not re-open an old owner's door."""
        config = ArrayConfig.load(self.config_path)
        async with self._session() as session:
            named = await session.execute("query-named-block-nodes", {"flat": True})
            nodes = {str(n.get("node-name")) for n in named}
            for lun in config.luns.values():
                if f"lun-{lun.name}" not in nodes:
                    await self._add_node(session, lun.name)
                live = await self._lun_exports(session, lun.name)
                lun.generation = high_water_mark(lun, live)
                present = {e.id for e in live}
                for name in lun.exports:
                    parsed = parse_export_name(name)
                    if name in present:
                        continue
                    if parsed is not None and parsed[1] < lun.generation:
                        log.info(event("array.export.stale", array=self.name, lun=lun.name,
                                       export=name, mark=lun.generation))  # fmt: skip
                        continue
                    await self._add_export(session, lun.name, name)
                lun.exports = sorted(e.id for e in await self._lun_exports(session, lun.name))
        config.save(self.config_path)
        log.info(event("array.restored", array=self.name, luns=len(config.luns)))

    async def _add_node(self, session: QmpSession, lun: str) -> None:
        await session.execute(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": f"lun-{lun}",
                "file": {"driver": "file", "filename": str(self.lun_path(lun))},
                "cache": {"direct": False, "no-flush": False},
            },
        )

    async def _add_export(self, session: QmpSession, lun: str, export_name: str) -> None:
        await session.execute(
            "block-export-add",
            {"type": "nbd", "id": export_name, "node-name": f"lun-{lun}", "name": export_name,
             "writable": True},
        )  # fmt: skip


def _same_file(filename: str, path: Path) -> bool:
    """Whether a block node's ``file`` (as the daemon reports it) is the LUN file ``path``."""
    if filename == str(path):
        return True
    if not filename.startswith("/"):
        return False  # json:{...} and protocol URLs name no plain file
    try:
        return os.path.samefile(filename, path)
    except OSError:
        return False
