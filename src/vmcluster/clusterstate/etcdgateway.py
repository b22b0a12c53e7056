"""A small blocking etcd client over etcd's JSON gateway (``/v3/kv/range``, ``/v3/kv/txn``,
``/v3/lease/grant``, ``/v3/lease/revoke``), for the node's watchdog: a process that must stay
small and start fast, with the standard library only (the agent uses the gRPC client,
clusterstate/etcd.py).

Each call tries the endpoints in turn, each within ``timeout_s``; :class:`GatewayError` when
none answers. A transaction whose answer is lost may have been applied (as with any etcd
client): the caller reads back.
"""

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from vmcluster.clusterstate.store import Commit, Entry


class GatewayError(Exception):
    """No etcd endpoint answered, or one answered with an error."""


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read())
        return str(body.get("message") or body.get("error") or error)
    except (OSError, ValueError, AttributeError):
        return str(error)


class EtcdGateway:
    def __init__(self, endpoints: Sequence[str], *, timeout_s: float = 0.5) -> None:
        self.endpoints = [e if "://" in e else f"http://{e}" for e in endpoints]
        self.timeout_s = timeout_s

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        errors = []
        for endpoint in self.endpoints:
            request = urllib.request.Request(
                endpoint.rstrip("/") + path, data=data,
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                    reply = json.loads(answer.read())
            except urllib.error.HTTPError as exc:  # etcd answered: an error of its own
                raise GatewayError(f"{endpoint}: {_message(exc)}") from None
            except (OSError, ValueError) as exc:  # URLError, timeouts, refused: the next one
                errors.append(f"{endpoint}: {exc}")
                continue
            if not isinstance(reply, dict):
                errors.append(f"{endpoint}: unexpected answer")
                continue
            if "error" in reply:  # etcd's own (lease not found, ...)
                raise GatewayError(f"{endpoint}: {reply.get('message') or reply['error']}")
            return reply
        raise GatewayError("etcd: no endpoint answered (" + "; ".join(errors) + ")")

    def get(self, key: str) -> Entry | None:
        reply = self._call("/v3/kv/range", {"key": _b64(key)})
        for kv in reply.get("kvs", []):
            return Entry(key=key, value=base64.b64decode(kv.get("value", "")),
                         create_revision=int(kv.get("create_revision", 0)),
                         mod_revision=int(kv.get("mod_revision", 0)),
                         lease=int(kv.get("lease", 0)))  # fmt: skip
        return None

    def grant_lease(self, ttl_s: int) -> int:
        return int(self._call("/v3/lease/grant", {"TTL": ttl_s})["ID"])

    def revoke_lease(self, lease: int) -> None:
        self._call("/v3/lease/revoke", {"ID": str(lease)})

    def commit(self, commit: Commit) -> bool:
        """Puts and deletes if every expected key has its mod revision (0: absent)."""
        compare = [{"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(rev)}
                   for key, rev in commit.expect.items()]  # fmt: skip
        success: list[dict[str, Any]] = [
            {"request_put": {"key": _b64(key), "value": _b64(put.value), "lease": str(put.lease)}}
            for key, put in commit.puts.items()
        ]
        success += [{"request_delete_range": {"key": _b64(key)}} for key in commit.deletes]
        reply = self._call("/v3/kv/txn", {"compare": compare, "success": success})
        return bool(reply.get("succeeded", False))
