"""The array service: runs on the array host beside qemu-storage-daemon and owns the array's state.

Nodes reach an array only through this service, over the storage networks (one address per
network: both paths), as a SAN's management API; no node shares a directory, a socket or a lock
with the array. The service wraps the host's QsdArray (its own QMP socket and directory, whose
``array.json`` holds the LUNs, their exports and each LUN's high-water mark) and carries out one
operation at a time, whichever path or client it comes from.

HTTP, JSON in and out (``vmcluster.arrays.client.ServiceArray`` is the nodes' client)::

    GET    /v1/status                      {"name", "luns", "exports"}
    GET    /v1/luns                        {"luns": [{"name", "size_bytes", "generation"}]}
    POST   /v1/luns                        {"name", "size_bytes"} -> 201 the new LUN
    DELETE /v1/luns/{lun}                  {"deleted": lun}
    POST   /v1/luns/{lun}/fence            {"generation"} -> {"export", "generation"}
    GET    /v1/exports[?lun=NAME]          {"exports": [...]}

Errors are ``{"error": "<one line>", "kind": "<kind>"}``: 400 invalid_input (a bad name, size,
generation, body or query; nothing was done), 404 not_found, 409 already_exists or
invalid_state (a stale generation), 413 invalid_input (a body over MAX_BODY_BYTES), 421
wrong_array (``X-Array`` names another array: a client configured with this address for another
array), 503 unavailable (the daemon does not answer; retryable), 500 a bug.

Input is checked before anything is done: names follow the object-name rule, a body is one flat
JSON object of at most MAX_BODY_BYTES with exactly the fields the request takes (their JSON
types checked, ``true`` is no number), only the documented query parameters, each once.

Retries over the other path: a request that changes something may carry ``X-Request-Id``; the
service remembers the outcome of the last MAX_REMEMBERED such requests and answers a repeat with
it (waiting for the first if it is still under way), so a request sent over both paths is
carried out once. (In memory: after a restart of the service a repeated create reports
AlreadyExists and a repeated delete NotFound, as the driver's rules allow.) A request is never
abandoned half-way because its client went away.

The daemon's configuration is restored (QsdArray.restore) when the service starts, and again
whenever the daemon is found to have forgotten it (it restarted): before every operation and
every WATCH_INTERVAL_S, so the exports come back even if no node asks anything.

No authentication yet: the storage networks are trusted (mutual TLS is in DESIGN.md section 14).
"""

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from vmcluster.arrays.driver import (
    ArrayDriver,
    LunInfo,
    check_generation,
    check_lun,
    check_size,
    shown,
)
from vmcluster.arrays.qsd import QsdArray
from vmcluster.arrays.serviceconfig import ServiceConfig
from vmcluster.arrays.wire import (
    ARRAY_HEADER,
    ERROR_KINDS,
    MAX_BODY_BYTES,
    REQUEST_ID_HEADER,
    REQUEST_ID_RE,
    WRONG_ARRAY,
    split_address,
)
from vmcluster.errors import InvalidInput, VmclusterError
from vmcluster.jsonbody import decode_object
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

MAX_REMEMBERED = 1024  # outcomes of requests kept for their retries
WATCH_INTERVAL_S = 1.0  # how often the daemon is checked for a configuration it forgot
QMP_CONNECT_TIMEOUT_S = 1.0  # a daemon that does not greet within this is unavailable


# ----- requests and answers -----


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    status: int
    body: Mapping[str, Any]

    def response(self) -> web.Response:
        return web.json_response(dict(self.body), status=self.status)


def error_answer(exc: VmclusterError) -> Answer:
    for cls, status, kind in ERROR_KINDS:
        if isinstance(exc, cls):
            return Answer(status=status, body={"error": str(exc), "kind": kind})
    return Answer(status=500, body={"error": str(exc), "kind": "error"})


async def _body(request: web.Request, fields: tuple[str, ...]) -> dict[str, Any]:
    """The request body: one flat JSON object with exactly ``fields`` (else InvalidInput)."""
    too_large = f"the request body is too large (at most {MAX_BODY_BYTES} bytes)"
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES,
                                            actual_size=request.content_length or 0,
                                            text=too_large)  # fmt: skip
    raw = await request.read()  # client_max_size bounds a body of unknown length
    body = decode_object(raw, max_depth=1, too_deep="the request body is not a flat JSON object")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise InvalidInput(f"unknown field {shown(unknown[0])} (this request takes "
                           f"{', '.join(fields)})")  # fmt: skip
    for name in fields:
        if name not in body:
            raise InvalidInput(f"field {name!r} is missing")
    return body


def _query(request: web.Request, known: tuple[str, ...]) -> dict[str, str]:
    seen: dict[str, str] = {}
    for key, value in request.query.items():  # items() keeps repeated keys
        if key not in known:
            takes = f"only {', '.join(known)}" if known else "no query parameters"
            raise InvalidInput(f"unknown query parameter {shown(key)}: this request takes {takes}")
        if key in seen:
            raise InvalidInput(f"query parameter {shown(key)} is given twice")
        seen[key] = value
    return seen


def _lun_json(lun: LunInfo) -> dict[str, Any]:
    return {"name": lun.name, "size_bytes": lun.size_bytes, "generation": lun.generation}


# ----- the service -----

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Operation = Callable[[], Awaitable[Answer]]


class ArrayService:
    """The HTTP front of one array. ``restore`` brings the daemon's configuration back (a full
    restore at the start), ``restore_if_forgotten`` does when the daemon lost it; both None for
    an array without a daemon (a FakeArray in tests)."""

    def __init__(
        self,
        array: ArrayDriver,
        *,
        restore: Callable[[], Awaitable[object]] | None = None,
        restore_if_forgotten: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.array = array
        self.name = array.name
        self._restore = restore
        self._restore_if_forgotten = restore_if_forgotten
        self._restored = restore is None
        self._lock = asyncio.Lock()  # one operation at a time
        self._requests: OrderedDict[str, tuple[str, asyncio.Task[Answer]]] = OrderedDict()
        self._under_way: set[asyncio.Task[Answer]] = set()
        self._daemon_ok = True

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES,
                              middlewares=[self._errors, self._checks])  # fmt: skip
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/v1/luns", self._luns)
        app.router.add_post("/v1/luns", self._create)
        app.router.add_delete("/v1/luns/{lun}", self._delete)
        app.router.add_post("/v1/luns/{lun}/fence", self._fence)
        app.router.add_post("/v1/luns/{lun}/resize", self._resize)
        app.router.add_post("/v1/luns/{lun}/copy", self._copy)
        app.router.add_get("/v1/exports", self._exports)
        return app

    # ----- middlewares -----

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except VmclusterError as exc:
            return error_answer(exc).response()
        except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, too large
            if exc.status < 400:
                raise
            kind = "not_found" if exc.status == 404 else "invalid_input"
            message = exc.text if exc.status == 413 else exc.reason.lower()
            response = web.json_response(
                {"error": f"{shown(f'{request.method} {request.path}', 60)}: {message}",
                 "kind": kind}, status=exc.status)  # fmt: skip
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response

    @web.middleware
    async def _checks(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The array named, the LUN in the path, the request id: before any handler runs."""
        wanted = request.headers.get(ARRAY_HEADER)
        if wanted is not None and wanted != self.name:
            return web.json_response(
                {"error": f"array service {self.name}: this request is for array "
                          f"{shown(wanted)}", "kind": WRONG_ARRAY}, status=421)  # fmt: skip
        if request.match_info.http_exception is None and "lun" in request.match_info:
            check_lun(request.match_info["lun"])
        request_id = request.headers.get(REQUEST_ID_HEADER)
        if request_id is not None and REQUEST_ID_RE.fullmatch(request_id) is None:
            raise InvalidInput(f"{REQUEST_ID_HEADER} {shown(request_id)} must be 8 to 64 letters, "
                               "digits, '-' or '_'")  # fmt: skip
        return await handler(request)

    # ----- running operations: one at a time, each request once -----

    async def _ready(self) -> None:
        """The daemon holds the array's configuration (restored if it had forgotten it)."""
        if not self._restored and self._restore is not None:
            await self._restore()
            self._restored = True
            log.info(event("array.service.restored", array=self.name))
        elif self._restore_if_forgotten is not None:
            await self._restore_if_forgotten()

    async def _serialised(self, operation: Operation) -> Answer:
        async with self._lock:
            try:
                await self._ready()
                return await operation()
            except VmclusterError as exc:
                return error_answer(exc)
            except OSError as exc:  # the array host's own files
                return Answer(status=503, body={"error": f"array {self.name}: {exc}",
                                                "kind": "unavailable"})  # fmt: skip
            except Exception as exc:
                log.exception(event("array.service.bug", array=self.name, reason=repr(exc)))
                return Answer(
                    status=500,
                    body={
                        "error": f"array {self.name}: internal error (see the service's log)",
                        "kind": "error",
                    },
                )

    def _start(self, operation: Operation) -> "asyncio.Task[Answer]":
        task = asyncio.create_task(self._serialised(operation))
        self._under_way.add(task)
        task.add_done_callback(self._under_way.discard)
        return task

    async def _once(self, request: web.Request, operation: Operation) -> web.Response:
        """Carry out a request that changes something, once per request id."""
        request_id = request.headers.get(REQUEST_ID_HEADER)
        signature = f"{request.method} {request.path}"
        if request_id is None:
            task = self._start(operation)
        elif request_id in self._requests:
            known, task = self._requests[request_id]
            if known != signature:
                raise InvalidInput(f"{REQUEST_ID_HEADER} {request_id} was used for another "
                                   "request")  # fmt: skip
            log.info(event("array.request.repeated", array=self.name, request=signature,
                           request_id=request_id))  # fmt: skip
        else:
            task = self._start(operation)
            self._requests[request_id] = (signature, task)
            self._forget_old()
        started = time.monotonic()
        answer = await asyncio.shield(task)  # a client that goes away abandons nothing
        log.info(event("array.request", array=self.name, request=signature, status=answer.status,
                       ms=round((time.monotonic() - started) * 1000, 1)))  # fmt: skip
        return answer.response()

    def _forget_old(self) -> None:
        while len(self._requests) > MAX_REMEMBERED:
            oldest = next(iter(self._requests))
            if not self._requests[oldest][1].done():
                break
            del self._requests[oldest]

    async def close(self) -> None:
        """Wait for the requests under way (a fence is never left half-done by a shutdown)."""
        await asyncio.gather(*self._under_way, return_exceptions=True)

    async def watch(self) -> None:
        """Restore the daemon's configuration at the start and whenever it forgets it."""
        while True:
            async with self._lock:
                try:
                    await self._ready()
                    if not self._daemon_ok:
                        log.info(event("array.daemon.answers", array=self.name))
                    self._daemon_ok = True
                except (VmclusterError, OSError) as exc:
                    if self._daemon_ok:
                        log.warning(event("array.daemon.unavailable", array=self.name,
                                          reason=str(exc)))  # fmt: skip
                    self._daemon_ok = False
            await asyncio.sleep(WATCH_INTERVAL_S)

    # ----- handlers -----

    async def _status(self, request: web.Request) -> web.Response:
        _query(request, ())

        async def run() -> Answer:
            status = await self.array.status()
            return Answer(status=200, body={"name": status.name, "luns": status.luns,
                                            "exports": status.exports})  # fmt: skip

        return (await self._serialised(run)).response()

    async def _luns(self, request: web.Request) -> web.Response:
        _query(request, ())

        async def run() -> Answer:
            return Answer(status=200, body={"luns": [_lun_json(x) for x in
                                                     await self.array.luns()]})  # fmt: skip

        return (await self._serialised(run)).response()

    async def _exports(self, request: web.Request) -> web.Response:
        lun = _query(request, ("lun",)).get("lun")
        if lun is not None:
            check_lun(lun)

        async def run() -> Answer:
            return Answer(status=200, body={"exports": await self.array.exports(lun)})

        return (await self._serialised(run)).response()

    async def _create(self, request: web.Request) -> web.Response:
        _query(request, ())
        body = await _body(request, ("name", "size_bytes"))
        lun, size_bytes = check_lun(body["name"]), check_size(body["size_bytes"])

        async def run() -> Answer:
            await self.array.create_lun(lun, size_bytes)
            return Answer(status=201, body={"name": lun, "size_bytes": size_bytes,
                                            "generation": 0})  # fmt: skip

        return await self._once(request, run)

    async def _delete(self, request: web.Request) -> web.Response:
        _query(request, ())
        lun = request.match_info["lun"]

        async def run() -> Answer:
            await self.array.delete_lun(lun)
            return Answer(status=200, body={"deleted": lun})

        return await self._once(request, run)

    async def _resize(self, request: web.Request) -> web.Response:
        _query(request, ())
        lun = check_lun(request.match_info["lun"])
        size_bytes = check_size((await _body(request, ("size_bytes",)))["size_bytes"])

        async def run() -> Answer:
            await self.array.resize_lun(lun, size_bytes)
            return Answer(status=200, body={"name": lun, "size_bytes": size_bytes})

        return await self._once(request, run)

    async def _copy(self, request: web.Request) -> web.Response:
        _query(request, ())
        source = check_lun(request.match_info["lun"])
        target = check_lun((await _body(request, ("target",)))["target"])

        async def run() -> Answer:
            await self.array.copy_lun(source, target)
            return Answer(status=201, body={"name": target, "source": source})

        return await self._once(request, run)

    async def _fence(self, request: web.Request) -> web.Response:
        _query(request, ())
        lun = request.match_info["lun"]
        generation = check_generation((await _body(request, ("generation",)))["generation"])

        async def run() -> Answer:
            export = await self.array.fence(lun, generation)
            return Answer(status=200, body={"export": export, "generation": generation})

        return await self._once(request, run)


# ----- running it -----


async def serve(config: ServiceConfig) -> None:
    """Serve the array of ``config`` on its addresses until cancelled."""
    array = QsdArray(name=config.array, qmp_socket=Path(config.qmp_socket),
                     directory=Path(config.directory),
                     connect_timeout_s=QMP_CONNECT_TIMEOUT_S)  # fmt: skip
    service = ArrayService(array, restore=array.restore,
                           restore_if_forgotten=array.restore_if_forgotten)  # fmt: skip
    runner = web.AppRunner(
        service.app(), access_log=None, handler_cancellation=False, shutdown_timeout=5.0
    )
    await runner.setup()
    try:
        for address in config.listen:
            host, port = split_address(address, where=f"array {config.array}: listen")
            site = web.TCPSite(runner, host, port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise VmclusterError(f"array service {config.array}: cannot listen on "
                                     f"{address}: {exc.strerror or exc}") from exc  # fmt: skip
        log.info(event("array.service.listening", array=config.array,
                       listen=",".join(config.listen)))  # fmt: skip
        async with asyncio.TaskGroup() as tg:
            tg.create_task(service.watch(), name="array-watch")
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        await service.close()
        log.info(event("array.service.stopped", array=config.array))
