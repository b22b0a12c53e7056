"""An array built from qemu-storage-daemon, driven over its QMP socket.

The daemon keeps its block nodes and exports in memory only, so the array's configuration (LUNs
and their exports) is kept in ``array.json`` beside the LUN files and replayed by :meth:`restore`
after the daemon restarts, as an array's firmware restores its configuration at power-on. LUN
data lives in raw files and survives restarts.

QMP used: ``blockdev-add`` (a raw node over a file), ``block-export-add`` (type nbd),
``block-export-del`` (mode hard cuts connected clients), ``query-block-exports``.

The storage fence: a LUN is exported under a name that carries the placement generation of its
VM, ``<lun>.g<N>``. :meth:`QsdArray.fence` retires every other generation's export with a *hard*
delete (connected clients are cut at once: an old owner that is still alive can no longer read
or write, and its QEMU pauses on the I/O error) and only then exports generation N. A generation
older than the newest one the array has seen is refused, so a stale controller cannot re-open
an old owner's door.
"""

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vmcluster.core.model import check_name
from vmcluster.errors import AlreadyExists, HypervisorError, InvalidState, NotFound
from vmcluster.hypervisor.qmp import QmpSession
from vmcluster.logs import event, get_logger

log = get_logger(__name__)


@dataclass(slots=True, kw_only=True)
class Lun:
    name: str
    size_bytes: int
    exports: list[str] = field(default_factory=list)
    generation: int = 0  # the newest generation fenced in (0: never)


def export_name(lun: str, generation: int) -> str:
    return f"{lun}.g{generation}"


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
    """One qemu-storage-daemon array: its QMP socket and its directory of LUN files."""

    def __init__(self, *, name: str, qmp_socket: Path, directory: Path) -> None:
        self.name = name
        self.qmp_socket = qmp_socket
        self.directory = directory

    @property
    def config_path(self) -> Path:
        return self.directory / "array.json"

    def lun_path(self, lun: str) -> Path:
        return self.directory / "luns" / f"{lun}.raw"

    def _session(self) -> QmpSession:
        return QmpSession(self.qmp_socket, name=f"array {self.name}")

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
        check_name(lun, what="LUN")
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
        async with self._locked():
            config = ArrayConfig.load(self.config_path)
            record = config.luns.get(lun)
            if record is None:
                raise NotFound(f"array {self.name}: no LUN {lun!r}")
            async with self._session() as session:
                live = {str(e["id"]) for e in await session.execute("query-block-exports")}
                for name in record.exports:
                    if name in live:
                        await session.execute("block-export-del", {"id": name, "mode": "hard"})
                        await self._wait_gone(session, name)
                named = await session.execute("query-named-block-nodes", {"flat": True})
                nodes = {str(n.get("node-name")) for n in named}
                if f"lun-{lun}" in nodes:
                    await session.execute("blockdev-del", {"node-name": f"lun-{lun}"})
            del config.luns[lun]
            config.save(self.config_path)
            self.lun_path(lun).unlink(missing_ok=True)
        log.info(event("array.lun.deleted", array=self.name, lun=lun))

    def luns(self) -> dict[str, Lun]:
        return ArrayConfig.load(self.config_path).luns

    async def export(self, lun: str, export_name: str) -> None:
        """Export ``lun`` over NBD as ``export_name`` (writable)."""
        async with self._locked():
            await self._export(lun, export_name)

    async def _export(self, lun: str, export_name: str) -> None:
        config = ArrayConfig.load(self.config_path)
        if lun not in config.luns:
            raise NotFound(f"array {self.name}: no LUN {lun!r}")
        async with self._session() as session:
            await self._add_export(session, lun, export_name)
        config.luns[lun].exports.append(export_name)
        config.save(self.config_path)
        log.info(event("array.export.added", array=self.name, lun=lun, export=export_name))

    async def fence(self, lun: str, generation: int) -> str:
        """Cut every client of ``lun`` except generation ``generation``'s, which is exported.

        Returns the export name. Idempotent for the current generation; InvalidState for an
        older one.
        """
        async with self._locked():
            return await self._fence(lun, generation)

    async def _fence(self, lun: str, generation: int) -> str:
        config = ArrayConfig.load(self.config_path)
        if lun not in config.luns:
            raise NotFound(f"array {self.name}: no LUN {lun!r}")
        record = config.luns[lun]
        if generation < record.generation:
            raise InvalidState(
                f"array {self.name}: LUN {lun} is fenced at generation {record.generation}; "
                f"generation {generation} is stale"
            )
        wanted = export_name(lun, generation)
        async with self._session() as session:
            live = {str(e["id"]) for e in await session.execute("query-block-exports")}
            for old in [e for e in record.exports if e != wanted]:
                if old in live:
                    await session.execute("block-export-del", {"id": old, "mode": "hard"})
                    await self._wait_gone(session, old)
                log.info(event("array.export.retired", array=self.name, lun=lun, export=old))
            if wanted not in live:
                await self._add_export(session, lun, wanted)
        record.exports = [wanted]
        record.generation = generation
        config.save(self.config_path)
        log.info(event("array.fenced", array=self.name, lun=lun, generation=generation))
        return wanted

    async def _wait_gone(self, session: QmpSession, export_id: str) -> None:
        """A hard delete returns at once; the export is gone when it leaves the list."""
        for _ in range(200):
            live = {str(e["id"]) for e in await session.execute("query-block-exports")}
            if export_id not in live:
                return
            await asyncio.sleep(0.01)
        raise HypervisorError(f"array {self.name}: export {export_id} did not go away")

    async def exports(self) -> list[str]:
        async with self._locked(), self._session() as session:
            reply = await session.execute("query-block-exports")
        return sorted(str(e["id"]) for e in reply)

    async def restore(self) -> None:
        """Re-create every configured LUN node and export (after the daemon restarted)."""
        async with self._locked():
            await self._restore()

    async def _restore(self) -> None:
        config = ArrayConfig.load(self.config_path)
        async with self._session() as session:
            for lun in config.luns.values():
                await self._add_node(session, lun.name)
                for export_name in lun.exports:
                    await self._add_export(session, lun.name, export_name)
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
