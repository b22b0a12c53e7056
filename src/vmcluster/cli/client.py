"""The CLI's client for the agents' REST API: which agents to ask, with which token.

Where the CLI finds the cluster, in order:
1. ``$VMCLUSTER_API`` (comma-separated ``unix:///path`` or ``http://host:port`` URLs) and
   ``$VMCLUSTER_SECRETS`` (the secrets file holding the token);
2. the current lab (set by ``vmcluster lab up``): every node's local API socket;
3. this host's agent: ``unix:///run/vmcluster/api.sock`` and ``/etc/vmcluster/secrets.json``.
Any agent can answer; the CLI tries them in order and says which addresses it tried.
"""

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from vmcluster.agent.config import Secrets
from vmcluster.errors import AlreadyExists, InvalidInput, InvalidState, NotFound, VmclusterError
from vmcluster.paths import DataDir

ERROR_KINDS: dict[str, type[VmclusterError]] = {
    "invalid_input": InvalidInput, "not_found": NotFound, "already_exists": AlreadyExists,
    "invalid_state": InvalidState,
}  # fmt: skip

DEFAULT_API = "unix:///run/vmcluster/api.sock"
DEFAULT_SECRETS = "/etc/vmcluster/secrets.json"
REQUEST_TIMEOUT_S = 10.0
QUORUM_HEADER = "X-Vmcluster-Quorum"  # "no": the agent answered from a cache that may be stale


class ApiUnreachable(VmclusterError):
    """No agent answered."""


class NoQuorumAnswer(InvalidState):
    """An agent answered 503: it has no quorum now (another agent may)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterTarget:
    endpoints: dict[str, str]  # node (or "local") -> URL
    secrets_file: str


def find_target(data: DataDir) -> ClusterTarget:
    env_api = os.environ.get("VMCLUSTER_API")
    if env_api:
        urls = [u.strip() for u in env_api.split(",") if u.strip()]
        secrets_file = os.environ.get("VMCLUSTER_SECRETS", DEFAULT_SECRETS)
        endpoints = {f"api{i + 1}": url for i, url in enumerate(urls)}
        return ClusterTarget(endpoints=endpoints, secrets_file=secrets_file)
    from vmcluster.lab.lab import Lab, get_context

    lab = get_context(data)
    if lab is not None and Lab(data, lab).cli_file.exists():
        info = json.loads(Lab(data, lab).cli_file.read_text())
        return ClusterTarget(endpoints=dict(info["api"]), secrets_file=info["secrets_file"])
    secrets = os.environ.get("VMCLUSTER_SECRETS", DEFAULT_SECRETS)
    if not Path(secrets).exists():
        raise NotFound(
            f"no cluster to talk to: no lab is up, VMCLUSTER_API is not set and {secrets} "
            "does not exist (--local works on this machine's own VMs)"
        )
    return ClusterTarget(endpoints={"local": DEFAULT_API}, secrets_file=secrets)


def _session(url: str, *, stream: bool = False) -> tuple[aiohttp.ClientSession, str]:
    # A stream may be quiet for long: the server sends a keep-alive line every 10 s.
    read_s = 3 * REQUEST_TIMEOUT_S if stream else REQUEST_TIMEOUT_S
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=read_s)
    if url.startswith("unix://"):
        connector = aiohttp.UnixConnector(path=url.removeprefix("unix://"))
        return aiohttp.ClientSession(connector=connector, timeout=timeout), "http://agent"
    return aiohttp.ClientSession(timeout=timeout), url.rstrip("/")


class ApiClient:
    def __init__(self, target: ClusterTarget, *, via: str | None = None) -> None:
        if via is not None and via not in target.endpoints:
            raise NotFound(f"no API address known for node {via!r}: known are "
                           f"{', '.join(sorted(target.endpoints))}")  # fmt: skip
        self.endpoints = [target.endpoints[via]] if via else list(target.endpoints.values())
        self.token = Secrets.read(Path(target.secrets_file)).token

    async def _first(
        self, attempt: Callable[[aiohttp.ClientSession, str], Any], *, idempotent: bool = True
    ) -> Any:
        """The first agent's answer; an answer from an agent without quorum (possibly stale)
        only if no agent with quorum answers."""
        errors: list[str] = []
        no_quorum: NoQuorumAnswer | None = None
        stale: list[Any] = []
        for url in self.endpoints:
            session, base = _session(url)
            try:
                async with session:
                    answer, quorate = await attempt(session, base)
                if quorate:
                    return answer
                stale.append(answer)
            except (aiohttp.ClientConnectionError, TimeoutError, OSError) as exc:
                sent = not isinstance(exc, (aiohttp.ClientConnectorError, ConnectionRefusedError,
                                            FileNotFoundError))  # fmt: skip
                if sent and not idempotent:  # it may have been applied: never send it twice
                    raise ApiUnreachable(f"no answer from {url} ({type(exc).__name__}): the "
                                         "request may or may not have been applied; check "
                                         "before retrying") from None  # fmt: skip
                errors.append(f"{url} ({type(exc).__name__})")
            except NoQuorumAnswer as exc:  # 503: this agent has no quorum; another may
                no_quorum = exc
                errors.append(f"{url} (no quorum)")
        if stale:
            return stale[0]
        if no_quorum is not None:
            raise no_quorum
        raise ApiUnreachable(f"cannot reach the cluster API: tried {', '.join(errors)}")

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        async def attempt(session: aiohttp.ClientSession, base: str) -> Any:
            headers = {"Authorization": f"Bearer {self.token}"}
            async with session.request(method, base + path, headers=headers, json=body) as response:
                text = await response.text()
                try:
                    answer = json.loads(text) if text else {}
                except ValueError:
                    answer = {"error": text.strip().splitlines()[0] if text.strip() else ""}
                if response.status < 400:
                    return answer, response.headers.get(QUORUM_HEADER, "yes") != "no"
                error = str(answer.get("error", "")) if isinstance(answer, dict) else ""
                kind = str(answer.get("kind", "")) if isinstance(answer, dict) else ""
                if response.status == 404:
                    raise NotFound(error or f"API {path}: not found")
                if response.status == 503:
                    raise NoQuorumAnswer(error or "the agent is unavailable")
                if kind in ERROR_KINDS:
                    raise ERROR_KINDS[kind](error)
                raise VmclusterError(f"API {method} {path}: {response.status} {error}".rstrip())

        return await self._first(attempt, idempotent=method == "GET")

    def get(self, path: str) -> Any:
        return asyncio.run(self.request("GET", path))

    def post(self, path: str, body: Any = None) -> Any:
        return asyncio.run(self.request("POST", path, body))

    def delete(self, path: str) -> Any:
        return asyncio.run(self.request("DELETE", path))

    async def stream_lines(self, path: str) -> AsyncIterator[dict[str, Any]]:
        """JSON objects from an NDJSON stream (blank keep-alive lines are skipped)."""
        url = self.endpoints[0]
        for candidate in self.endpoints:  # the first that answers
            url = candidate
            session, base = _session(url, stream=True)
            try:
                async with (
                    session,
                    session.get(
                        base + path, headers={"Authorization": f"Bearer {self.token}"}
                    ) as response,
                ):
                    if response.status >= 400:
                        raise VmclusterError(f"API GET {path}: {response.status}")
                    async for line in response.content:
                        if line.strip():
                            yield json.loads(line)
                    return
            except (aiohttp.ClientConnectionError, OSError):
                continue
        raise ApiUnreachable(f"cannot reach the cluster API: tried {', '.join(self.endpoints)}")
