"""An in-memory array with the semantics of vmcluster.arrays.driver, for tests and the simulator.

Its NBD clients are fake too (:meth:`FakeArray.connect`): a client of an export that the array
retires is cut, as qemu-storage-daemon's hard delete cuts a real one, and writes nothing more.
:meth:`FakeArray.restart` is a power cycle of the array host (clients cut, LUNs, marks and the
current exports kept); ``available = False`` makes every operation raise ArrayUnavailable, as a
client that reaches none of the array's paths does.
"""

import asyncio
from dataclasses import dataclass, field

from vmcluster.arrays.driver import (
    ArrayStatus,
    LunInfo,
    check_generation,
    check_growth,
    check_lun,
    check_size,
    export_name,
)
from vmcluster.errors import AlreadyExists, ArrayUnavailable, InvalidState, NotFound


@dataclass(slots=True, kw_only=True)
class _Lun:
    size_bytes: int
    mark: int = 0
    exports: set[str] = field(default_factory=set)
    blocks: dict[int, bytes] = field(default_factory=dict)  # offset -> data written there


class FakeNbdClient:
    """One connection to an export of a FakeArray."""

    def __init__(self, array: "FakeArray", lun: str, export: str) -> None:
        self.array = array
        self.lun = lun
        self.export = export
        self.connected = True

    def write(self, offset: int, data: bytes) -> bool:
        """Write ``data`` at ``offset``; False (nothing written) once the client is cut."""
        if not self.connected:
            return False
        self.array._luns[self.lun].blocks[offset] = data
        return True

    def read(self, offset: int) -> bytes | None:
        """What was last written at ``offset`` (None: never); None once the client is cut."""
        if not self.connected:
            return None
        return self.array._luns[self.lun].blocks.get(offset, b"")


class FakeArray:
    """An ArrayDriver in memory. One operation at a time (an asyncio lock; each operation yields
    to the loop between its steps, so a missing lock would show as interleaved fences). Driven
    from one event loop at a time, which may change (successive ``asyncio.run``)."""

    def __init__(self, name: str = "a1") -> None:
        self.name = name
        self.available = True
        self._luns: dict[str, _Lun] = {}
        self._clients: list[FakeNbdClient] = []
        self._loop_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    @property
    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._loop_lock is None or self._loop_lock[0] is not loop:
            self._loop_lock = (loop, asyncio.Lock())
        return self._loop_lock[1]

    def _check_available(self) -> None:
        if not self.available:
            raise ArrayUnavailable(f"array {self.name}: no answer on any path (fake)")

    def _lun(self, lun: str) -> _Lun:
        record = self._luns.get(lun)
        if record is None:
            raise NotFound(f"array {self.name}: no LUN {lun!r}")
        return record

    def _cut(self, export: str) -> None:
        for client in self._clients:
            if client.export == export:
                client.connected = False
        self._clients = [c for c in self._clients if c.connected]

    async def create_lun(self, lun: str, size_bytes: int) -> None:
        check_lun(lun)
        check_size(size_bytes)
        self._check_available()
        async with self._lock:
            if lun in self._luns:
                raise AlreadyExists(f"array {self.name}: LUN {lun!r} already exists")
            await asyncio.sleep(0)
            self._luns[lun] = _Lun(size_bytes=size_bytes)

    async def delete_lun(self, lun: str) -> None:
        check_lun(lun)
        self._check_available()
        async with self._lock:
            record = self._lun(lun)
            for export in sorted(record.exports):
                self._cut(export)
                await asyncio.sleep(0)
            del self._luns[lun]

    async def resize_lun(self, lun: str, size_bytes: int) -> None:
        check_lun(lun)
        check_size(size_bytes)
        self._check_available()
        async with self._lock:
            record = self._lun(lun)
            if check_growth(self.name, lun, record.size_bytes, size_bytes):
                await asyncio.sleep(0)
                record.size_bytes = size_bytes

    async def copy_lun(self, source: str, target: str) -> None:
        check_lun(source)
        check_lun(target)
        self._check_available()
        async with self._lock:
            record = self._lun(source)
            if target in self._luns:
                raise AlreadyExists(f"array {self.name}: LUN {target!r} already exists")
            await asyncio.sleep(0)
            self._luns[target] = _Lun(size_bytes=record.size_bytes, blocks=dict(record.blocks))

    async def luns(self) -> list[LunInfo]:
        self._check_available()
        async with self._lock:
            return [LunInfo(name=name, size_bytes=lun.size_bytes, generation=lun.mark)
                    for name, lun in sorted(self._luns.items())]  # fmt: skip

    async def fence(self, lun: str, generation: int, *, request_id: str | None = None) -> str:
        check_lun(lun)
        check_generation(generation)
        self._check_available()
        async with self._lock:
            record = self._lun(lun)
            if generation < record.mark:
                raise InvalidState(f"array {self.name}: LUN {lun} is fenced at generation "
                                   f"{record.mark}; generation {generation} is stale")  # fmt: skip
            wanted = export_name(lun, generation)
            for export in sorted(record.exports - {wanted}):
                self._cut(export)
                record.exports.discard(export)
                await asyncio.sleep(0)
            record.exports.add(wanted)
            record.mark = generation
            return wanted

    async def exports(self, lun: str | None = None) -> list[str]:
        if lun is not None:
            check_lun(lun)
        self._check_available()
        async with self._lock:
            if lun is not None:
                return sorted(self._lun(lun).exports)
            return sorted(e for record in self._luns.values() for e in record.exports)

    async def status(self) -> ArrayStatus:
        self._check_available()
        async with self._lock:
            exports = sum(len(record.exports) for record in self._luns.values())
            return ArrayStatus(name=self.name, luns=len(self._luns), exports=exports)

    # ----- the fake's own controls -----

    def connect(self, export: str) -> FakeNbdClient:
        """An NBD client of ``export``; NotFound if the array does not serve it."""
        for name, record in self._luns.items():
            if export in record.exports:
                client = FakeNbdClient(self, name, export)
                self._clients.append(client)
                return client
        raise NotFound(f"array {self.name}: no export {export!r}")

    def restart(self) -> None:
        """A power cycle: every client is cut; LUNs, their data, marks and exports are kept."""
        for client in self._clients:
            client.connected = False
        self._clients = []
