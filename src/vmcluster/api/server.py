"""The agent's REST API (aiohttp). Every /v1 request needs ``Authorization: Bearer <token>``.

    GET  /v1/cluster                 the cluster as this node sees it (leader, quorum, networks)
    GET  /v1/nodes                   every node: state, per-network state, leader flag
    GET  /v1/nodes/{node}            one node
    POST /v1/nodes/{node}/pause      pause a node (needs quorum)
    POST /v1/nodes/{node}/resume     resume a node (needs quorum)
    POST /v1/nodes/{node}/drain      pause a node and move its VMs away
    POST /v1/nodes/{node}/resume?failback=true   resume; VMs that prefer it move back
    GET  /v1/vms                     every clustered VM: state, owner, generation, reason
    POST /v1/vms                     create one (JSON body: name, memory_mib, disks, policy, ...)
    GET  /v1/vms/{vm}                one VM
    DELETE /v1/vms/{vm}              delete a stopped VM and its LUNs
    POST /v1/vms/{vm}/start|stop     set the VM's intent; the leader acts on it
    GET  /v1/vms/{vm}/console?generation=N&limit=BYTES   the console kept on this node
                                     (the newest BYTES: 1 to 1 MiB, default 64 KiB)
    GET  /v1/volumes                 shared volumes: array, size, used, coordinator
    POST /v1/volumes                 create one (name, array, size_bytes)
    GET  /v1/volumes/{volume}        one, with each node's access mode and its disks
    DELETE /v1/volumes/{volume}      delete an empty volume (through its coordinator)
    POST /v1/volumes/{volume}/move   {"coordinator": NODE}: move its coordinator
    GET  /v1/disks?volume=V          the disks of every volume (or of V)
    POST /v1/volumes/{volume}/disks  create a disk (name, size_bytes)
    POST /v1/volumes/{volume}/disks/{disk}/resize|snapshot|clone   grow; copy to {"name": NEW}
    DELETE /v1/volumes/{volume}/disks/{disk}   delete a disk that no VM uses
    GET  /v1/volumes/{volume}/ops/{op}   an operation's outcome (after a 202 "running")
    GET  /v1/ha, POST /v1/ha/arm|disarm   automatic HA actions on or frozen, and the settings
    POST /v1/ha/settings             failover_on_isolation, restart_limit, failover_threshold, ...
    GET  /v1/events?limit=N          the newest N events (0 to 1000, default 100)
    GET  /v1/events?follow=true      newline-delimited JSON: the newest, then each new event
    GET  /openapi.json               this API's OpenAPI document (no token needed)

Reads are served from the agent's cache, so they work (with ``quorum: false``) on a node that
has lost quorum; writes need quorum and answer 503 without it. A write that needs an array this
node reaches on no path (``vm create``) answers 421 ``not_reached_here`` having changed nothing:
the client asks another agent, as after a 503.

Input is checked before it is used, and refused with a 4xx and a one-line JSON error naming the
field (a 500 is a bug):

- names in paths ({vm}, {node}) follow the object-name rule, so a name never walks out of a
  directory (``..%2F..%2Fx``): 400;
- query parameters: only the documented ones, each at most once; booleans are ``true`` or
  ``false``, numbers are plain decimal digits within the documented range: else 400;
- a request body is a JSON object of at most 64 KiB (MAX_BODY_BYTES), nested at most 16 deep
  (MAX_JSON_DEPTH, checked before decoding), with no key twice and no NaN or Infinity; each
  field has its JSON type (``"start": "false"`` is refused, not taken as true): else 400.
"""

import asyncio
import contextlib
import hmac
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from vmcluster.api.openapi import OPENAPI
from vmcluster.clusterstate.keys import loads
from vmcluster.clusterstate.store import StoreError
from vmcluster.errors import (
    AlreadyExists,
    ArrayUnavailable,
    InvalidInput,
    InvalidState,
    NoCoordinator,
    NotFound,
    NotReachedHere,
    VmclusterError,
)
from vmcluster.jsonbody import decode_object, shown
from vmcluster.logs import event, get_logger
from vmcluster.service import ha as haadmin
from vmcluster.service import nodes as nodeadmin
from vmcluster.service import vms as vmservice
from vmcluster.service import volumes as volservice
from vmcluster.service.context import NodeContext, NoQuorum
from vmcluster.service.fields import check_name

log = get_logger(__name__)

CONTEXT_KEY: "web.AppKey[NodeContext]" = web.AppKey("context")
KEEPALIVE_S = 10.0  # a blank line on an idle event stream
MAX_BODY_BYTES = 64 * 1024  # a create request is a few hundred bytes
MAX_JSON_DEPTH = 16  # a create request nests 3 deep (policy.failback.mode)
MAX_EVENTS_LIMIT = 1000  # the cluster keeps no more (vmcluster.agent.events.MAX_EVENTS)
DEFAULT_EVENTS_LIMIT = 100
MAX_GENERATION = 2**63 - 1
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, kind: str = "") -> web.Response:
    body = {"error": message, "kind": kind} if kind else {"error": message}
    return web.json_response(body, status=status)


ERROR_STATUS: tuple[tuple[type[VmclusterError], int, str], ...] = (
    (NoQuorum, 503, "no_quorum"),
    (NotReachedHere, 421, "not_reached_here"),  # nothing done: the client asks another agent
    (ArrayUnavailable, 502, "array_unavailable"),  # final: never re-sent to another agent
    (InvalidInput, 400, "invalid_input"),
    (NotFound, 404, "not_found"),
    (AlreadyExists, 409, "already_exists"),
    (InvalidState, 409, "invalid_state"),
    (NoCoordinator, 504, "no_coordinator"),  # nothing done: no coordinator took the operation
)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors become JSON with the HTTP status and a kind the CLI maps back to exit codes.
    Every answer says whether this agent has quorum (without it, reads may be stale)."""
    try:
        response = await handler(request)
        if not response.prepared:
            quorate = request.app[CONTEXT_KEY].has_quorum()
            response.headers["X-Vmcluster-Quorum"] = "yes" if quorate else "no"
        return response
    except StoreError as exc:
        if request.method == "GET":
            return _error(503, f"cluster database unavailable: {exc}", "no_quorum")
        # A change may have reached the database: another agent must not be asked to make it.
        return _error(504, f"the cluster database did not confirm the change, which may or may "
                           f"not have been made: {exc}; check before retrying",
                      "outcome_unknown")  # fmt: skip
    except VmclusterError as exc:
        for cls, status, kind in ERROR_STATUS:
            if isinstance(exc, cls):
                return _error(status, str(exc), kind)
        log.warning(event("api.error", path=request.path, reason=str(exc)))
        return _error(500, str(exc), "error")
    except web.HTTPException as exc:  # aiohttp's own answers: no such route, wrong method
        if exc.status < 400:
            raise
        kind = "not_found" if exc.status == 404 else "invalid_input"
        target = shown(f"{request.method} {request.path}")
        response = _error(exc.status, f"{target}: {exc.reason.lower()}", kind)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        expected = f"Bearer {request.app[CONTEXT_KEY].secrets.token}".encode()
        try:  # the header as the bytes sent (aiohttp keeps undecodable ones as surrogates)
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            given = b""
        if not hmac.compare_digest(given, expected):
            return _error(401, "missing or invalid bearer token")
    return await handler(request)


# ----- input: names in paths, query parameters, bodies -----

PATH_NAMES = {
    "vm": "VM",
    "node": "node",
    "volume": "volume",
    "disk": "disk",
    "op": "operation",
}  # every {param} of a route: what it names


@web.middleware
async def _inputs(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Before any handler runs: every name in the path is valid (names end up in keys and file
    paths), and the query holds only parameters the route takes (QUERY_PARAMS), each once."""
    match = request.match_info
    if match.http_exception is None:  # a route matched
        for param, value in match.items():
            check_name(value, what=PATH_NAMES[param])
        known = QUERY_PARAMS.get(match.handler, ())
        seen: set[str] = set()
        for key, _ in request.query.items():  # items() keeps repeated keys, iter() not
            if key not in known:
                takes = f"only {', '.join(known)}" if known else "no query parameters"
                raise InvalidInput(f"unknown query parameter {shown(key)}: this "
                                   f"request takes {takes}")  # fmt: skip
            if key in seen:
                raise InvalidInput(f"query parameter {shown(key)} is given twice")
            seen.add(key)
    return await handler(request)


def _bool_param(params: Mapping[str, str], name: str) -> bool:
    raw = params.get(name, "false")
    if raw not in ("true", "false"):
        raise InvalidInput(f"query parameter {name} must be true or false, not "
                           f"{shown(raw)}")  # fmt: skip
    return raw == "true"


_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only: int() also takes ' 5', '1_0', other digits


def _int_param(params: Mapping[str, str], name: str, low: int, high: int, default: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if _DIGITS.fullmatch(raw) is None or not low <= int(raw) <= high:
        raise InvalidInput(f"query parameter {name} must be a whole number from {low} to "
                           f"{high}, not {shown(raw)}")  # fmt: skip
    return int(raw)


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The request body: a JSON object, bounded in size and nesting (else InvalidInput)."""
    too_large = f"the request body is too large (at most {MAX_BODY_BYTES // 1024} KiB)"
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise InvalidInput(too_large)
    try:
        raw = await request.read()  # the app's client_max_size bounds a body of unknown length
    except web.HTTPRequestEntityTooLarge:
        raise InvalidInput(too_large) from None
    return decode_object(raw, max_depth=MAX_JSON_DEPTH)


def _node_json(ctx: NodeContext, name: str) -> dict[str, Any]:
    view = ctx.view()
    node = view.nodes[name]
    parts = ctx.cache.nodes().get(name, {})
    spec = parts.get("spec", {})
    return {
        "name": name,
        "state": str(node.state),
        "networks": {net: str(state) for net, state in node.networks.items()},
        "leader": node.leader,
        "site": spec.get("site", ""),
        "addresses": spec.get("addresses", {}),
        "paused": bool(parts.get("admin", {}).get("paused")),
        "incarnation": parts.get("alive", {}).get("incarnation"),
        "storage": _storage_json(parts.get("paths")),
    }


def _storage_json(published: dict[str, Any] | None) -> dict[str, Any]:
    """A node's forwarder and its disks' paths, as the node last published them."""
    if published is None:
        return {"forwarder": "unknown", "reason": "not published", "disks": []}
    return {"forwarder": published.get("forwarder", "unknown"),
            "reason": published.get("reason", ""), "disks": published.get("disks", []),
            "at": published.get("at")}  # fmt: skip


async def _paths(request: web.Request) -> web.Response:
    """Every node's storage paths: one row per (node, disk, path)."""
    ctx = request.app[CONTEXT_KEY]
    rows = []
    for name in sorted(ctx.view().nodes):
        storage = _storage_json(ctx.cache.nodes().get(name, {}).get("paths"))
        for disk in storage["disks"]:
            for path in disk.get("paths", []):
                rows.append(
                    {
                        "node": name,
                        "disk": disk.get("disk"),
                        "generation": disk.get("generation"),
                        "disk_state": disk.get("state"),
                        "policy": disk.get("policy"),
                        "path": path.get("name"),
                        "address": path.get("address"),
                        "state": path.get("state"),
                        "since": path.get("since"),
                        "reason": path.get("reason"),
                        "failures": path.get("failures"),
                    }
                )
    return web.json_response(rows)  # fmt: skip


async def _cluster(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    view = ctx.view()
    states = [str(n.state) for n in view.nodes.values()]
    return web.json_response({
        "name": ctx.config.cluster,
        "served_by": ctx.config.node,
        "quorum": ctx.has_quorum(),
        "leader": view.leader,
        "networks": {net: str(state) for net, state in view.networks.items()},
        "nodes": {state: states.count(state) for state in sorted(set(states))},
        "revision": ctx.cache.revision,
    })  # fmt: skip


async def _nodes(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    return web.json_response([_node_json(ctx, name) for name in sorted(ctx.view().nodes)])


async def _node(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    name = request.match_info["node"]
    if name not in ctx.view().nodes:
        return _error(404, f"node {name!r} is not a member of cluster {ctx.config.cluster}")
    return web.json_response(_node_json(ctx, name))


async def _set_paused(
    request: web.Request, paused: bool, *, drain: bool = False, failback: bool = False
) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    name = request.match_info["node"]
    if name not in ctx.view().nodes:
        return _error(404, f"node {name!r} is not a member of cluster {ctx.config.cluster}")
    if not ctx.has_quorum():
        return _error(503, f"node {ctx.config.node} has no quorum: try another node")
    await nodeadmin.set_paused(ctx, name, paused, drain=drain, failback=failback)
    return web.json_response(_node_json(ctx, name) | {"paused": paused})


async def _pause(request: web.Request) -> web.Response:
    return await _set_paused(request, True)


async def _drain(request: web.Request) -> web.Response:
    return await _set_paused(request, True, drain=True)


async def _resume(request: web.Request) -> web.Response:
    failback = _bool_param(request.query, "failback")
    return await _set_paused(request, False, failback=failback)


async def _vms(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    stored = ctx.records.stored()
    period = ctx.records.ha_settings().failover_period_s
    return web.json_response(
        [vmservice.vm_json(stored[n], failover_period_s=period) for n in sorted(stored)]
    )


async def _vm(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    vm = vmservice.find(ctx, request.match_info["vm"])
    period = ctx.records.ha_settings().failover_period_s
    return web.json_response(vmservice.vm_json(vm, failover_period_s=period))


async def _vm_create(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    return web.json_response(await vmservice.create(ctx, await _json_body(request)), status=201)


async def _vm_delete(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    return web.json_response(await vmservice.delete(ctx, request.match_info["vm"]))


async def _vm_start(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    return web.json_response(await vmservice.set_intent(ctx, request.match_info["vm"], True))


async def _vm_stop(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    return web.json_response(await vmservice.set_intent(ctx, request.match_info["vm"], False))


async def _vm_console(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    query = request.query
    generation = None
    if "generation" in query:
        generation = _int_param(query, "generation", 0, MAX_GENERATION, 0)
    limit = _int_param(query, "limit", 1, vmservice.MAX_CONSOLE_BYTES,
                       vmservice.DEFAULT_CONSOLE_BYTES)  # fmt: skip
    return web.json_response(
        await vmservice.console(ctx, request.match_info["vm"], generation, limit)
    )


async def _volumes(request: web.Request) -> web.Response:
    return web.json_response(volservice.list_volumes(request.app[CONTEXT_KEY]))


async def _volume(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    return web.json_response(volservice.show_volume(ctx, request.match_info["volume"]))


async def _volume_create(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    body = await _json_body(request)
    return web.json_response(await volservice.create_volume(ctx, body), status=201)


async def _volume_delete(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    return web.json_response(await volservice.delete_volume(ctx, request.match_info["volume"]))


async def _volume_move(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    body = await _json_body(request)
    return web.json_response(await volservice.move_volume(ctx, request.match_info["volume"], body))


def _op_answer(answer: dict[str, Any], done_status: int = 200) -> web.Response:
    """An operation's outcome: ``done_status`` when done, 202 while it still runs."""
    return web.json_response(
        answer, status=202 if answer.get("state") == "running" else done_status
    )


async def _volume_op(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    match = request.match_info
    return _op_answer(await volservice.operation(ctx, match["volume"], match["op"]))


async def _disks(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    volume = request.query.get("volume")
    return web.json_response(volservice.list_disks(ctx, volume))


async def _disk_create(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    body = await _json_body(request)
    return _op_answer(await volservice.create_disk(ctx, request.match_info["volume"], body), 201)


async def _disk_resize(request: web.Request) -> web.Response:
    ctx, match = request.app[CONTEXT_KEY], request.match_info
    body = await _json_body(request)
    return _op_answer(await volservice.resize_disk(ctx, match["volume"], match["disk"], body))


async def _disk_snapshot(request: web.Request) -> web.Response:
    ctx, match = request.app[CONTEXT_KEY], request.match_info
    body = await _json_body(request)
    return _op_answer(await volservice.copy_disk(ctx, match["volume"], match["disk"], body,
                                                 snapshot=True), 201)  # fmt: skip


async def _disk_clone(request: web.Request) -> web.Response:
    ctx, match = request.app[CONTEXT_KEY], request.match_info
    body = await _json_body(request)
    return _op_answer(await volservice.copy_disk(ctx, match["volume"], match["disk"], body,
                                                 snapshot=False), 201)  # fmt: skip


async def _disk_delete(request: web.Request) -> web.Response:
    ctx, match = request.app[CONTEXT_KEY], request.match_info
    return web.json_response(await volservice.delete_disk(ctx, match["volume"], match["disk"]))


async def _ha(request: web.Request) -> web.Response:
    return web.json_response(haadmin.ha_json(request.app[CONTEXT_KEY]))


async def _ha_settings(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT_KEY]
    return web.json_response(await haadmin.set_ha_settings(ctx, await _json_body(request)))


async def _ha_arm(request: web.Request) -> web.Response:
    return web.json_response(await haadmin.set_armed(request.app[CONTEXT_KEY], True))


async def _ha_disarm(request: web.Request) -> web.Response:
    return web.json_response(await haadmin.set_armed(request.app[CONTEXT_KEY], False))


async def _events(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT_KEY]
    limit = _int_param(request.query, "limit", 0, MAX_EVENTS_LIMIT, DEFAULT_EVENTS_LIMIT)
    follow = _bool_param(request.query, "follow")
    if not follow:
        return web.json_response([value for _, value in ctx.cache.events(limit)])
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    with ctx.cache.listen() as changes, contextlib.suppress(ConnectionError):
        for _, value in ctx.cache.events(limit):
            await response.write(json.dumps(value).encode() + b"\n")
        last_write = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, last_write + KEEPALIVE_S - loop.time())):
                    change = await changes.get()
                    if change.key.startswith(ctx.keys.events_prefix) and change.value:
                        await response.write(json.dumps(loads(change.value)).encode() + b"\n")
                        last_write = loop.time()
                    continue
            await response.write(b"\n")  # keep-alive, by time since the last write
            last_write = loop.time()
    return response


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


QUERY_PARAMS: dict[Callable[..., Any], tuple[str, ...]] = {  # other routes take none
    _resume: ("failback",),
    _vm_console: ("generation", "limit"),
    _events: ("limit", "follow"),
    _disks: ("volume",),
}


def make_app(ctx: NodeContext) -> web.Application:
    app = web.Application(middlewares=[_auth, _errors, _inputs], client_max_size=MAX_BODY_BYTES)
    app[CONTEXT_KEY] = ctx
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_get("/v1/cluster", _cluster)
    app.router.add_get("/v1/nodes", _nodes)
    app.router.add_get("/v1/nodes/{node}", _node)
    app.router.add_post("/v1/nodes/{node}/pause", _pause)
    app.router.add_post("/v1/nodes/{node}/resume", _resume)
    app.router.add_post("/v1/nodes/{node}/drain", _drain)
    app.router.add_get("/v1/paths", _paths)
    app.router.add_get("/v1/vms", _vms)
    app.router.add_post("/v1/vms", _vm_create)
    app.router.add_get("/v1/vms/{vm}", _vm)
    app.router.add_delete("/v1/vms/{vm}", _vm_delete)
    app.router.add_post("/v1/vms/{vm}/start", _vm_start)
    app.router.add_post("/v1/vms/{vm}/stop", _vm_stop)
    app.router.add_get("/v1/vms/{vm}/console", _vm_console)
    app.router.add_get("/v1/volumes", _volumes)
    app.router.add_post("/v1/volumes", _volume_create)
    app.router.add_get("/v1/volumes/{volume}", _volume)
    app.router.add_delete("/v1/volumes/{volume}", _volume_delete)
    app.router.add_post("/v1/volumes/{volume}/move", _volume_move)
    app.router.add_get("/v1/volumes/{volume}/ops/{op}", _volume_op)
    app.router.add_get("/v1/disks", _disks)
    app.router.add_post("/v1/volumes/{volume}/disks", _disk_create)
    app.router.add_post("/v1/volumes/{volume}/disks/{disk}/resize", _disk_resize)
    app.router.add_post("/v1/volumes/{volume}/disks/{disk}/snapshot", _disk_snapshot)
    app.router.add_post("/v1/volumes/{volume}/disks/{disk}/clone", _disk_clone)
    app.router.add_delete("/v1/volumes/{volume}/disks/{disk}", _disk_delete)
    app.router.add_get("/v1/ha", _ha)
    app.router.add_post("/v1/ha/arm", _ha_arm)
    app.router.add_post("/v1/ha/disarm", _ha_disarm)
    app.router.add_post("/v1/ha/settings", _ha_settings)
    app.router.add_get("/v1/events", _events)
    return app


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)


async def serve(ctx: NodeContext) -> None:
    """Serve the API until cancelled."""
    runner = web.AppRunner(make_app(ctx), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)  # fmt: skip
    await runner.setup()
    try:
        if ctx.config.api_listen:
            host, _, port = ctx.config.api_listen.rpartition(":")
            await web.TCPSite(runner, host.strip("[]"), int(port)).start()
            log.info(event("api.listening", address=ctx.config.api_listen))
        if ctx.config.api_socket:
            path = Path(ctx.config.api_socket)
            _prepare_socket_path(path)
            await web.UnixSite(runner, str(path)).start()
            os.chmod(path, 0o600)
            log.info(event("api.listening", socket=str(path)))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
