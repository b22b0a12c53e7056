"""The array-driver interface: what the cluster needs of a storage array, and its rules.

An array holds LUNs (raw block devices) and exports them over NBD. The storage fence lives here:
a LUN is exported under a name that carries the placement generation of its VM,
``<lun>.g<N>`` (:func:`export_name`), and :meth:`ArrayDriver.fence` makes generation N the only
export of the LUN, cutting the clients of every other one at once.

Rules every implementation keeps (tests/arrays/test_driver_conformance.py checks them on each):

- One operation at a time: the array carries out one request after the other, never two
  interleaved, whoever sends them (two leaders, two paths, a retry).
- The high-water mark: each LUN has one, the highest generation it was fenced at (0 for a new
  LUN). It only grows, survives restarts of the array (its daemon and its service), and a fence
  below it is refused with InvalidState; nothing below it is ever exported again.
- Errors, each one line that names the array and the LUN:
  InvalidInput (a bad name, size or generation: nothing was done), NotFound (no such LUN),
  AlreadyExists (a LUN of that name exists), InvalidState (a stale generation),
  ArrayUnavailable (retryable: the array did not answer; the request may have been carried out
  or not). Implementations raise the same messages, so a message means the same whichever
  driver reported it.
- Safe to repeat: a fence is idempotent at the mark, and a resize to the size a LUN has does
  nothing; a repeated delete reports NotFound and a repeated create or copy AlreadyExists (a
  client that retries one request over another path sends the same request id, and the
  service answers it once: see vmcluster.arrays.service).
"""

import re
from dataclasses import dataclass
from typing import Protocol

from vmcluster.core.model import NAME_RE, NAME_RULE, check_name
from vmcluster.errors import InvalidInput

SECTOR_BYTES = 512
MIN_LUN_BYTES = SECTOR_BYTES
MAX_LUN_BYTES = 64 * 1024**4  # 64 TiB, the largest VM disk (core.model.MAX_DISK_BYTES)
MAX_GENERATION = 10**18 - 1  # export names carry at most 18 digits
GENERATION_NAME_RE = re.compile(rf"(?P<lun>{NAME_RE.pattern})\.g(?P<generation>[0-9]{{1,18}})")


@dataclass(frozen=True, slots=True, kw_only=True)
class LunInfo:
    """One LUN as its array reports it."""

    name: str
    size_bytes: int
    generation: int  # the high-water mark: the highest generation fenced (0: never fenced)


@dataclass(frozen=True, slots=True, kw_only=True)
class ArrayStatus:
    """An array that answers, and what it holds."""

    name: str
    luns: int
    exports: int  # exports the array serves now, of any LUN


def export_name(lun: str, generation: int) -> str:
    return f"{lun}.g{generation}"


RESIZING_SUFFIX = ".resizing"


def resizing_marker(export: str) -> str:
    """The export an array serves while ``export`` is made again to grow its LUN: a client
    refused ``export`` that finds this one open is not fenced, only early, and tries again."""
    return export + RESIZING_SUFFIX


def parse_export_name(name: str) -> tuple[str, int] | None:
    """``(lun, generation)`` for a generation's export name ``<lun>.g<N>``, else None."""
    match = GENERATION_NAME_RE.fullmatch(name)
    if match is None:
        return None
    return match["lun"], int(match["generation"])


def shown(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters: input quoted in an error stays one short
    line whatever was sent."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_lun(lun: object) -> str:
    """``lun`` if it is a valid LUN name, else InvalidInput."""
    if not isinstance(lun, str) or len(lun) > 63:
        raise InvalidInput(f"invalid LUN name {shown(lun)}: {NAME_RULE}")
    return check_name(lun, what="LUN")


def check_size(size_bytes: object) -> int:
    """``size_bytes`` if it is a valid LUN size, else InvalidInput."""
    if (
        isinstance(size_bytes, int)
        and not isinstance(size_bytes, bool)
        and MIN_LUN_BYTES <= size_bytes <= MAX_LUN_BYTES
        and size_bytes % SECTOR_BYTES == 0
    ):
        return size_bytes
    raise InvalidInput(f"invalid LUN size {shown(size_bytes)}: a whole number of bytes, a multiple "
                       f"of {SECTOR_BYTES}, up to 64 TiB")  # fmt: skip


def check_growth(array: str, lun: str, current: int, size_bytes: int) -> bool:
    """Whether ``lun`` (``current`` bytes) must grow to ``size_bytes``: False if it has that
    size, InvalidInput if ``size_bytes`` is smaller."""
    if size_bytes < current:
        raise InvalidInput(f"array {array}: LUN {lun} has {current} bytes; a LUN only grows "
                           f"(asked for {size_bytes})")  # fmt: skip
    return size_bytes > current


def check_generation(generation: object) -> int:
    """``generation`` if it is a valid placement generation (1 and up), else InvalidInput."""
    if (
        isinstance(generation, int)
        and not isinstance(generation, bool)
        and 1 <= generation <= MAX_GENERATION
    ):
        return generation
    raise InvalidInput(f"invalid generation {shown(generation)}: a whole number from 1 to "
                       f"{MAX_GENERATION}")  # fmt: skip


class ArrayDriver(Protocol):
    """An array, as the cluster drives it. Every method follows the rules of this module."""

    name: str

    async def create_lun(self, lun: str, size_bytes: int) -> None:
        """A new LUN of ``size_bytes`` (zeros), not exported, its mark 0. AlreadyExists if the
        name is taken."""
        ...

    async def delete_lun(self, lun: str) -> None:
        """Cut every client of ``lun``, remove its exports and delete its data. NotFound if
        there is no such LUN."""
        ...

    async def luns(self) -> list[LunInfo]:
        """Every LUN, sorted by name, with its size and its high-water mark."""
        ...

    async def resize_lun(self, lun: str, size_bytes: int) -> None:
        """Grow ``lun`` to ``size_bytes`` (the new part reads as zeros); nothing if it has that
        size already; InvalidInput if it is larger (a LUN never shrinks: data would be lost).
        Clients connected now keep the size they were told."""
        ...

    async def copy_lun(self, source: str, target: str) -> None:
        """A new LUN ``target`` holding ``source``'s data as it is at this moment (consistent
        even while clients write to ``source``), of its size, not exported, its mark 0.
        NotFound if there is no ``source``, AlreadyExists if ``target`` is taken; a copy that
        fails leaves no ``target`` behind."""
        ...

    async def fence(self, lun: str, generation: int, *, request_id: str | None = None) -> str:
        """Make ``<lun>.g<generation>`` the only export of ``lun`` and return that name: every
        other export of the LUN is removed and its clients cut before this returns, and the
        mark becomes ``generation``. InvalidState if ``generation`` is below the mark (nothing
        is exported then); idempotent at the mark. NotFound if there is no such LUN."""
        ...

    async def exports(self, lun: str | None = None) -> list[str]:
        """The names of the exports served now (of ``lun`` only, if given), sorted. NotFound if
        ``lun`` is given and there is no such LUN."""
        ...

    async def status(self) -> ArrayStatus:
        """The array's counts; ArrayUnavailable (or the daemon's error) if it does not answer."""
        ...
