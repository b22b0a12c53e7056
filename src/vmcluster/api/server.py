"""The agent's REST API (aiohttp). Every /v1 request needs ``Authorization: Bearer <token>``.

    GET  /v1/cluster                 the cluster as this node sees it (leader, quorum, networks)
    GET  /v1/nodes                   every node: state, per-network state, leader flag
    GET  /v1/nodes/{node}            one node
    POST /v1/nodes/{node}/pause      pause a node (needs quorum)
    POST /v1/nodes/{node}/resume     resume a node (needs quorum)
    GET  /v1/events?limit=N          the newest events
    GET  /v1/events?follow=true      newline-delimited JSON: the newest, then each new event
    GET  /openapi.json               this API's OpenAPI document (no token needed)

Reads are served from the agent's cache, so they work (with ``quorum: false``) on a node that
has lost quorum; writes need quorum and answer 503 without it.
"""

import asyncio
import contextlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from vmcluster.api.openapi import OPENAPI
from vmcluster.clusterstate.keys import loads
from vmcluster.clusterstate.store import StoreError
from vmcluster.logs import event, get_logger

if TYPE_CHECKING:
    from vmcluster.agent.agent import Agent

log = get_logger(__name__)

AGENT_KEY: "web.AppKey[Agent]" = web.AppKey("agent")
KEEPALIVE_S = 10.0  # a blank line on an idle event stream
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        token = request.app[AGENT_KEY].secrets.token
        given = request.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(
            given.removeprefix("Bearer ").encode(), token.encode()
        ):
            return _error(401, "missing or invalid bearer token")
    return await handler(request)


def _node_json(agent: "Agent", name: str) -> dict[str, Any]:
    view = agent.view()
    node = view.nodes[name]
    parts = agent.cache.nodes().get(name, {})
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
    }


async def _cluster(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    view = agent.view()
    states = [str(n.state) for n in view.nodes.values()]
    return web.json_response({
        "name": agent.config.cluster,
        "served_by": agent.config.node,
        "quorum": agent.has_quorum(),
        "leader": view.leader,
        "networks": {net: str(state) for net, state in view.networks.items()},
        "nodes": {state: states.count(state) for state in sorted(set(states))},
        "revision": agent.cache.revision,
    })  # fmt: skip


async def _nodes(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return web.json_response([_node_json(agent, name) for name in sorted(agent.view().nodes)])


async def _node(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    name = request.match_info["node"]
    if name not in agent.view().nodes:
        return _error(404, f"node {name!r} is not a member of cluster {agent.config.cluster}")
    return web.json_response(_node_json(agent, name))


async def _set_paused(request: web.Request, paused: bool) -> web.Response:
    agent = request.app[AGENT_KEY]
    name = request.match_info["node"]
    if name not in agent.view().nodes:
        return _error(404, f"node {name!r} is not a member of cluster {agent.config.cluster}")
    if not agent.has_quorum():
        return _error(503, f"node {agent.config.node} has no quorum: try another node")
    try:
        await agent.set_paused(name, paused)
    except StoreError as exc:
        return _error(503, f"cluster database unavailable: {exc}")
    return web.json_response(_node_json(agent, name) | {"paused": paused})


async def _pause(request: web.Request) -> web.Response:
    return await _set_paused(request, True)


async def _resume(request: web.Request) -> web.Response:
    return await _set_paused(request, False)


async def _events(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return _error(400, "limit must be a whole number")
    follow = request.query.get("follow", "false").lower() in ("1", "true", "yes")
    if not follow:
        return web.json_response([value for _, value in agent.cache.events(limit)])
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    with agent.cache.listen() as changes, contextlib.suppress(ConnectionError):
        for _, value in agent.cache.events(limit):
            await response.write(json.dumps(value).encode() + b"\n")
        last_write = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, last_write + KEEPALIVE_S - loop.time())):
                    change = await changes.get()
                    if change.key.startswith(agent.keys.events_prefix) and change.value:
                        await response.write(json.dumps(loads(change.value)).encode() + b"\n")
                        last_write = loop.time()
                    continue
            await response.write(b"\n")  # keep-alive, by time since the last write
            last_write = loop.time()
    return response


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


def make_app(agent: "Agent") -> web.Application:
    app = web.Application(middlewares=[_auth])
    app[AGENT_KEY] = agent
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_get("/v1/cluster", _cluster)
    app.router.add_get("/v1/nodes", _nodes)
    app.router.add_get("/v1/nodes/{node}", _node)
    app.router.add_post("/v1/nodes/{node}/pause", _pause)
    app.router.add_post("/v1/nodes/{node}/resume", _resume)
    app.router.add_get("/v1/events", _events)
    return app


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)


async def serve(agent: "Agent") -> None:
    """Serve the API until cancelled."""
    runner = web.AppRunner(make_app(agent), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)  # fmt: skip
    await runner.setup()
    try:
        if agent.config.api_listen:
            host, _, port = agent.config.api_listen.rpartition(":")
            await web.TCPSite(runner, host.strip("[]"), int(port)).start()
            log.info(event("api.listening", address=agent.config.api_listen))
        if agent.config.api_socket:
            path = Path(agent.config.api_socket)
            _prepare_socket_path(path)
            await web.UnixSite(runner, str(path)).start()
            os.chmod(path, 0o600)
            log.info(event("api.listening", socket=str(path)))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
