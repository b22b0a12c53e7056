"""Simulated arrays: their LUNs, exports and high-water marks, the guests' writes to them, and
each node's driver of them (over the storage paths, with delays, losses and hangs).

The array behaves as vmcluster's array service does (vmcluster.arrays.driver): a fence at
generation N retires every other export of the LUN and exports N; a generation below the mark
is refused. The data of a LUN is the probe's record area: sequence number -> the generation
that wrote it. ``retire_on_fence = False`` is a planted bug (tests only): the fence then
leaves the older exports live.
"""

import asyncio
from typing import TYPE_CHECKING

from vmcluster.arrays.driver import ArrayStatus, LunInfo, check_growth, export_name
from vmcluster.errors import AlreadyExists, ArrayUnavailable
from vmcluster.sim.model import Lun

if TYPE_CHECKING:
    from vmcluster.sim.model import Host, SimArray, World


class SimArrayDriver:
    """The ArrayDriver of one array as one node reaches it."""

    def __init__(self, world: "World", host: "Host", array: "SimArray") -> None:
        self.world = world
        self.host = host
        self.array = array
        self.name = array.name

    async def _request(self) -> None:
        """Reach the array: a path must be up, and the array up; a hung array never answers."""
        world = self.world
        if not world.reaches_array(self.host, self.array):
            await asyncio.sleep(world.array_connect_timeout_s)
            raise ArrayUnavailable(f"array {self.array.name}: no answer from its service "
                                   "on any path (simulated)")  # fmt: skip
        await asyncio.sleep(world.array_delay())
        while self.array.hung:  # noqa: ASYNC110 - a fault's state, not an event
            await asyncio.sleep(0.1)  # the caller's timeout ends it

    async def _answer(self) -> None:
        await asyncio.sleep(self.world.array_delay())
        if not self.world.reaches_array(self.host, self.array):
            raise ArrayUnavailable(f"array {self.array.name}: the answer was lost (simulated)")

    async def create_lun(self, lun: str, size_bytes: int) -> None:
        await self._request()
        if lun in self.array.luns:
            raise AlreadyExists(f"array {self.array.name}: LUN {lun!r} already exists")
        self.array.luns[lun] = Lun(size_bytes=size_bytes)
        await self._answer()

    async def delete_lun(self, lun: str) -> None:
        await self._request()
        self.array._lun(lun)
        del self.array.luns[lun]
        await self._answer()

    async def resize_lun(self, lun: str, size_bytes: int) -> None:
        await self._request()
        record = self.array._lun(lun)
        if check_growth(self.array.name, lun, record.size_bytes, size_bytes):
            record.size_bytes = size_bytes
        await self._answer()

    async def copy_lun(self, source: str, target: str) -> None:
        await self._request()
        record = self.array._lun(source)
        if target in self.array.luns:
            raise AlreadyExists(f"array {self.array.name}: LUN {target!r} already exists")
        self.array.luns[target] = Lun(size_bytes=record.size_bytes, data=dict(record.data))
        await self._answer()

    async def luns(self) -> list[LunInfo]:
        await self._request()
        found = [LunInfo(name=name, size_bytes=lun.size_bytes, generation=lun.mark)
                 for name, lun in sorted(self.array.luns.items())]  # fmt: skip
        await self._answer()
        return found

    async def fence(self, lun: str, generation: int, *, request_id: str | None = None) -> str:
        await self._request()
        export = self.array.fence(lun, generation)
        self.world.dirty = True
        self.world.note(self.host.name, f"array {self.array.name} fenced {lun} at g{generation}")
        await self._answer()
        return export

    async def exports(self, lun: str | None = None) -> list[str]:
        await self._request()
        found = sorted(export_name(name, g) for name, record in self.array.luns.items()
                       for g in record.exports if lun in (None, name))  # fmt: skip
        await self._answer()
        return found

    async def status(self) -> ArrayStatus:
        await self._request()
        count = sum(len(lun.exports) for lun in self.array.luns.values())
        await self._answer()
        return ArrayStatus(name=self.array.name, luns=len(self.array.luns), exports=count)
