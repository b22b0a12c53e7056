"""ServiceArray: the ArrayDriver that nodes use, a client of an array's service (arrays/service.py)
over the storage networks.

Each request tries the array's service addresses (one per storage network: both paths) one
after the other, starting with the one that answered last, each within CONNECT_TIMEOUT_S to
connect and REQUEST_TIMEOUT_S in all; two paths stay within the leader's fence timeout per
array (5 s). An answer from the service is final, an error too (NotFound, InvalidState, ...:
the other path would give the same); only a path that does not answer (refused, timed out,
cut, not the service, or the service of another array) makes it try the next. When no path
answers: ArrayUnavailable, naming the array and what each path did.

A request that changes something carries one request id over every path it is tried on, so
the service carries it out once even when the first path's answer was lost after the service
had received it (vmcluster.arrays.service).
"""

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import aiohttp

from vmcluster.arrays.driver import (
    ArrayStatus,
    LunInfo,
    check_generation,
    check_lun,
    check_size,
)
from vmcluster.arrays.wire import (
    ARRAY_HEADER,
    REQUEST_ID_HEADER,
    WRONG_ARRAY,
    error_of_kind,
    split_address,
)
from vmcluster.core.model import check_name
from vmcluster.errors import ArrayUnavailable, InvalidInput
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

CONNECT_TIMEOUT_S = 0.5
REQUEST_TIMEOUT_S = 2.0
COPY_BYTES_PER_S = 20 * 1024 * 1024  # the slowest copy rate a copy's timeout allows for
MAX_ANSWER_BYTES = 1024 * 1024

_last_answered: dict[str, str] = {}  # array -> the address that answered last (this process)


class _PathFailed(Exception):
    """One address did not answer as the array's service; the reason is the message."""


class ServiceArray:
    """Array ``name``'s service at ``addresses`` (HOST:PORT, one per storage network)."""

    def __init__(
        self,
        *,
        name: str,
        addresses: Sequence[str],
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        check_name(name, what="array")
        if not addresses:
            raise InvalidInput(f"array {name}: no service address")
        for address in addresses:
            split_address(address, where=f"array {name}: service")
        self.name = name
        self.addresses = tuple(addresses)
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s

    # ----- the driver -----

    async def create_lun(self, lun: str, size_bytes: int) -> None:
        body = {"name": check_lun(lun), "size_bytes": check_size(size_bytes)}
        await self._call("POST", "/v1/luns", body=body, changes=True)

    async def delete_lun(self, lun: str) -> None:
        await self._call("DELETE", f"/v1/luns/{check_lun(lun)}", changes=True)

    async def resize_lun(self, lun: str, size_bytes: int) -> None:
        body = {"size_bytes": check_size(size_bytes)}
        await self._call("POST", f"/v1/luns/{check_lun(lun)}/resize", body=body, changes=True)

    async def copy_lun(self, source: str, target: str) -> None:
        """The array copies while the request waits: the timeout grows with the LUN (each try
        on another path joins the copy under way, by its request id)."""
        sizes = {lun.name: lun.size_bytes for lun in await self.luns()}
        timeout = self.request_timeout_s + sizes.get(check_lun(source), 0) / COPY_BYTES_PER_S
        await self._call("POST", f"/v1/luns/{source}/copy", body={"target": check_lun(target)},
                         changes=True, timeout_s=timeout)  # fmt: skip

    async def luns(self) -> list[LunInfo]:
        answer = await self._call("GET", "/v1/luns")
        try:
            return [LunInfo(name=str(x["name"]), size_bytes=int(x["size_bytes"]),
                            generation=int(x["generation"])) for x in answer["luns"]]  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            self._garbled("GET /v1/luns", exc)

    async def fence(self, lun: str, generation: int, *, request_id: str | None = None) -> str:
        """``request_id``: the same for every retry of one decision, so that a retry joins the
        fence already under way at the service instead of queueing another."""
        path = f"/v1/luns/{check_lun(lun)}/fence"
        answer = await self._call("POST", path, body={"generation": check_generation(generation)},
                                  changes=True, request_id=request_id)  # fmt: skip
        export = answer.get("export")
        if not isinstance(export, str):
            self._garbled(f"POST {path}", answer)
        return export

    async def exports(self, lun: str | None = None) -> list[str]:
        query = {} if lun is None else {"lun": check_lun(lun)}
        answer = await self._call("GET", "/v1/exports", query=query)
        exports = answer.get("exports")
        if not isinstance(exports, list) or not all(isinstance(e, str) for e in exports):
            self._garbled("GET /v1/exports", answer)
        return exports

    async def status(self) -> ArrayStatus:
        answer = await self._call("GET", "/v1/status")
        try:
            return ArrayStatus(name=str(answer["name"]), luns=int(answer["luns"]),
                               exports=int(answer["exports"]))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            self._garbled("GET /v1/status", exc)

    # ----- the paths -----

    def _garbled(self, request: str, detail: object) -> NoReturn:
        raise ArrayUnavailable(f"array {self.name}: the service's answer to {request} is not "
                               f"understood ({str(detail)[:80]})")  # fmt: skip

    def _order(self) -> list[str]:
        last = _last_answered.get(self.name)
        if last not in self.addresses:
            return list(self.addresses)
        return [last, *(a for a in self.addresses if a != last)]

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        changes: bool = False,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        headers = {ARRAY_HEADER: self.name}
        if changes:
            headers[REQUEST_ID_HEADER] = request_id or uuid.uuid4().hex
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.request_timeout_s,
                                        sock_connect=self.connect_timeout_s)  # fmt: skip
        failures = []
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            for address in self._order():
                try:
                    answer = await self._one(session, address, method, path, body, query,
                                             headers)  # fmt: skip
                except _PathFailed as exc:
                    failures.append(f"{address} {exc}")
                    log.info(event("array.path.failed", array=self.name, address=address,
                                   request=f"{method} {path}", reason=str(exc)))  # fmt: skip
                    continue
                _last_answered[self.name] = address
                return answer
        raise ArrayUnavailable(f"array {self.name}: no answer from its service "
                               f"({'; '.join(failures)})")  # fmt: skip

    async def _one(
        self,
        session: aiohttp.ClientSession,
        address: str,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        query: Mapping[str, str] | None,
        headers: Mapping[str, str],
    ) -> dict[str, Any]:
        """The service's answer over ``address``: its data, or its error raised; _PathFailed
        if this address does not answer as the array's service."""
        host, port = split_address(address, where=f"array {self.name}: service")
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
        try:
            async with session.request(method, url, json=body, params=query,
                                       headers=headers) as response:  # fmt: skip
                status, chunks, size = response.status, [], 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > MAX_ANSWER_BYTES:
                        raise _PathFailed("answered more than 1 MiB: not an array service")
                    chunks.append(chunk)
                raw = b"".join(chunks)
        except aiohttp.ConnectionTimeoutError:
            raise _PathFailed(f"cannot connect within {self.connect_timeout_s:g} s") from None
        except TimeoutError:
            raise _PathFailed(f"did not answer within {self.request_timeout_s:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            errno = exc.os_error.errno
            reason = os.strerror(errno) if errno else type(exc.os_error).__name__
            raise _PathFailed(f"cannot connect ({reason})") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _PathFailed(f"failed ({type(exc).__name__})") from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise _PathFailed(f"answered HTTP {status} without JSON: not an array service")
        if status < 300:
            return data
        kind, message = data.get("kind"), data.get("error")
        if not isinstance(message, str) or not message:
            raise _PathFailed(f"answered HTTP {status} without an error message")
        if kind == WRONG_ARRAY:
            raise _PathFailed(f"serves another array ({message})")
        raise error_of_kind(kind)(message.splitlines()[0][:500])
