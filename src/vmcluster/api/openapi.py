"""The OpenAPI 3.1 document served at /openapi.json.

It states the bounds the server enforces (vmcluster.api.server): names in paths follow the
object-name rule, query parameters are only those listed, and request bodies are JSON objects of
at most 64 KiB, nested at most 16 deep, without unknown fields; anything else is a 400."""

from typing import Any

from vmcluster.core.cluster import NodeState
from vmcluster.core.model import MAX_DISKS, NAME_RE

# The server's bounds (tests/api check that they agree): kept here as numbers so that the
# document depends on no agent module.
MAX_EVENTS = 1000  # vmcluster.agent.agent.MAX_EVENTS: the events the cluster keeps
DEFAULT_CONSOLE_BYTES = 64 * 1024  # vmcluster.service.vms
MAX_CONSOLE_BYTES = 1024 * 1024
_NAME = {"type": "string", "pattern": f"^{NAME_RE.pattern}$", "maxLength": 63}

_NODE = {
    "type": "object",
    "required": ["name", "state", "networks", "leader"],
    "properties": {
        "name": {"type": "string"},
        "state": {"enum": [state.value for state in NodeState]},
        "networks": {
            "type": "object",
            "additionalProperties": {"enum": ["up", "partitioned", "down", "unknown"]},
        },
        "leader": {"type": "boolean"},
        "storage": {"type": "object", "description": "the node's block forwarder and the "
                    "paths of its attached disks (forwarder: up, down or unknown)"},
        "site": {"type": "string"},
        "addresses": {"type": "object", "additionalProperties": {"type": "string"}},
        "paused": {"type": "boolean"},
        "incarnation": {"type": ["integer", "null"]},
    },
}  # fmt: skip
_EVENT = {
    "type": "object",
    "required": ["time", "kind", "subject", "reason"],
    "properties": {"time": {"type": "number"}, "kind": {"type": "string"},
                   "subject": {"type": "string"}, "reason": {"type": "string"},
                   "node": {"type": "string"}},
}  # fmt: skip
_ERROR_KINDS = ["no_quorum", "invalid_input", "not_found", "already_exists", "invalid_state",
                "no_coordinator", "error"]  # fmt: skip
_ERROR = {"type": "object", "required": ["error"],
          "properties": {"error": {"type": "string"}, "kind": {"enum": _ERROR_KINDS}}}  # fmt: skip
_POLICY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "priority": {"enum": ["high", "medium", "low", "none"]},
        "preferred": {"type": "array", "items": _NAME},
        "possible": {"type": "array", "items": _NAME},
        "anti_affinity": {"anyOf": [_NAME, {"type": "null"}]},
        "anti_affinity_hard": {"type": "boolean"},
        "failback": {"type": ["object", "null"], "additionalProperties": False, "properties": {
            "mode": {"enum": ["never", "immediate", "window"]},
            "start_hour": {"type": "integer", "minimum": 0, "maximum": 23},
            "end_hour": {"type": "integer", "minimum": 0, "maximum": 23}}},
    },
}  # fmt: skip
_VM = {
    "type": "object",
    "required": ["name", "state", "owner", "generation"],
    "properties": {
        "name": {"type": "string"},
        "state": {"enum": ["stopped", "pending", "starting", "running", "stopping", "failed"]},
        "owner": {"type": ["string", "null"]},
        "generation": {"type": "integer"},
        "reason": {"type": "string"},
        "intent": {"enum": ["running", "stopped"]},
        "memory_mib": {"type": "integer"},
        "vcpus": {"type": "integer"},
        "disks": {"type": "array", "items": {"type": "object"}},
        "policy": _POLICY,
        "failovers": {"type": "array", "items": {"type": "number"}},
        "instance": {"type": ["object", "null"]},
    },
}  # fmt: skip
_VM_CREATE = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": _NAME, "memory_mib": {"type": "integer", "default": 128},
        "vcpus": {"type": "integer", "default": 1},
        "disks": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                  "maxItems": MAX_DISKS, "description": "sizes, bytes"},
        "array": {"anyOf": [_NAME, {"type": "null"}]},
        "policy": {"anyOf": [_POLICY, {"type": "null"}]}, "image": _NAME,
        "probe_interval_ms": {"type": "integer"}, "start": {"type": "boolean", "default": False},
    },
}  # fmt: skip
_HA_SETTINGS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "failover_on_isolation": {"type": "boolean"},
        "restart_limit": {"type": "integer", "minimum": 0, "maximum": 1000},
        "restart_period_s": {"type": "number", "minimum": 60, "maximum": 30 * 86400},
        "failover_threshold": {"type": ["integer", "null"], "minimum": 0, "maximum": 1000},
        "failover_period_s": {"type": "number", "minimum": 60, "maximum": 30 * 86400},
    },
}  # fmt: skip


_VOLUME = {
    "type": "object",
    "required": ["name", "array", "size_bytes", "used_bytes", "free_bytes", "coordinator"],
    "properties": {
        "name": {"type": "string"}, "array": {"type": "string"},
        "size_bytes": {"type": "integer"}, "used_bytes": {"type": "integer"},
        "free_bytes": {"type": "integer"}, "disks": {"type": "integer"},
        "coordinator": {"type": ["string", "null"]}, "term": {"type": "integer"},
        "operations": {"type": "integer", "description": "metadata operations queued"},
        "nodes": {"type": "object", "description": "(one volume) node -> mode (direct, "
                  "redirected, no-access, unknown) and state"},
        "disk_list": {"type": "array", "items": {"type": "object"}},
    },
}  # fmt: skip
_DISK = {
    "type": "object",
    "properties": {
        "volume": {"type": "string"}, "name": {"type": "string"}, "path": {"type": "string"},
        "size_bytes": {"type": "integer"}, "kind": {"enum": ["disk", "snapshot"]},
        "source": {"type": ["string", "null"]}, "lun": {"type": "string"},
        "attached_to": {"type": ["string", "null"]}, "deleting": {"type": "boolean"},
    },
}  # fmt: skip
_OPERATION = {
    "type": "object",
    "required": ["volume", "id", "state"],
    "properties": {
        "volume": {"type": "string"}, "id": {"type": "string"},
        "kind": {"enum": ["create", "delete", "resize", "snapshot", "clone", "delete-volume"]},
        "disk": {"type": "string"}, "state": {"enum": ["running", "done"]},
        "by": {"type": ["string", "null"], "description": "the coordinator that carried it out"},
        "result": _DISK,
    },
}  # fmt: skip
_SIZE = {"type": "integer", "minimum": 1024 * 1024, "description": "bytes, whole MiB"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {"400": _json(_ERROR, "invalid input: a bad name in the path, an unknown or "
                                "malformed query parameter, a malformed body"),
           "401": _json(_ERROR, "missing or invalid bearer token")}  # fmt: skip
_NODE_PARAM = [{"name": "node", "in": "path", "required": True, "schema": _NAME}]
_VM_PARAM = [{"name": "vm", "in": "path", "required": True, "schema": _NAME}]
_WRITE_ERRORS = {"404": _json(_ERROR, "no such VM"), "409": _json(_ERROR, "wrong state"),
                 "503": _json(_ERROR, "no quorum: try another node"),
                 "504": _json(_ERROR, "the database did not confirm the change: it may or may "
                                      "not have been made (do not retry elsewhere blindly)"),
                 **_ERRORS}  # fmt: skip
_BODY_LIMITS = "a JSON object of at most 64 KiB, nested at most 16 deep, each key once"


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "description": _BODY_LIMITS,
            "content": {"application/json": {"schema": schema}}}  # fmt: skip


_VOLUME_PARAM = [{"name": "volume", "in": "path", "required": True, "schema": _NAME}]
_DISK_PARAMS = [*_VOLUME_PARAM, {"name": "disk", "in": "path", "required": True, "schema": _NAME}]
_OP_ANSWERS = {"202": _json(_OPERATION, "still running: ask again at /v1/volumes/{volume}/ops/"
                        "{op}"),
               "504": _json(_ERROR, "no coordinator took the operation in time (kind "
                                    "no_coordinator): nothing was done"),
               **_WRITE_ERRORS}  # fmt: skip


def _disk_op(summary: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"post": {"summary": summary, "parameters": _DISK_PARAMS, "requestBody": _body(body),
                     "responses": {"200": _json(_OPERATION), "201": _json(_OPERATION),
                                   **_OP_ANSWERS}}}  # fmt: skip


def _vm_action(summary: str) -> dict[str, Any]:
    return {"post": {"summary": summary, "parameters": _VM_PARAM,
                     "responses": {"200": _json({"type": "object"}), **_WRITE_ERRORS}}}  # fmt: skip


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "vmcluster agent API", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "security": [{"bearer": []}],
    "paths": {
        "/v1/cluster": {"get": {"summary": "The cluster as this node sees it",
                                "responses": {"200": _json({"type": "object"}), **_ERRORS}}},
        "/v1/nodes": {"get": {"summary": "Every node",
                              "responses": {"200": _json({"type": "array", "items": _NODE}),
                                            **_ERRORS}}},
        "/v1/nodes/{node}": {"get": {"summary": "One node", "parameters": _NODE_PARAM,
                                     "responses": {"200": _json(_NODE),
                                                   "404": _json(_ERROR, "no such node"),
                                                   **_ERRORS}}},
        "/v1/nodes/{node}/pause": {"post": {"summary": "Pause a node", "parameters": _NODE_PARAM,
                                            "responses": {"200": _json(_NODE),
                                                          "404": _json(_ERROR, "no such node"),
                                                          "503": _json(_ERROR, "no quorum"),
                                                          **_ERRORS}}},
        "/v1/nodes/{node}/resume": {"post": {"summary": "Resume a node",
                                             "parameters": [*_NODE_PARAM, {
                                                 "name": "failback", "in": "query",
                                                 "description": "move back the VMs that "
                                                                "prefer this node",
                                                 "schema": {"type": "boolean",
                                                            "default": False}}],
                                             "responses": {"200": _json(_NODE),
                                                           "404": _json(_ERROR, "no such node"),
                                                           "503": _json(_ERROR, "no quorum"),
                                                           **_ERRORS}}},
        "/v1/nodes/{node}/drain": {"post": {"summary": "Pause a node and move its VMs away",
                                            "parameters": _NODE_PARAM,
                                            "responses": {"200": _json(_NODE),
                                                          "404": _json(_ERROR, "no such node"),
                                                          "503": _json(_ERROR, "no quorum"),
                                                          **_ERRORS}}},
        "/v1/paths": {"get": {"summary": "Every node's storage paths, per attached disk",
                              "responses": {"200": _json({"type": "array",
                                                          "items": {"type": "object"}}),
                                            **_ERRORS}}},
        "/v1/vms": {
            "get": {"summary": "Every clustered VM",
                    "responses": {"200": _json({"type": "array", "items": _VM}), **_ERRORS}},
            "post": {"summary": "Create a clustered VM (its LUNs on an array)",
                     "requestBody": _body(_VM_CREATE),
                     "responses": {"201": _json(_VM), **_WRITE_ERRORS}}},
        "/v1/vms/{vm}": {
            "get": {"summary": "One VM", "parameters": _VM_PARAM,
                    "responses": {"200": _json(_VM), "404": _json(_ERROR, "no such VM"),
                                  **_ERRORS}},
            "delete": {"summary": "Delete a stopped VM and its LUNs", "parameters": _VM_PARAM,
                       "responses": {"200": _json({"type": "object"}), **_WRITE_ERRORS}}},
        "/v1/vms/{vm}/start": _vm_action("Ask the cluster to run the VM"),
        "/v1/vms/{vm}/stop": _vm_action("Ask the cluster to stop the VM"),
        "/v1/vms/{vm}/console": {"get": {
            "summary": "The console of an instance that ran on this node",
            "parameters": [*_VM_PARAM,
                           {"name": "generation", "in": "query", "description": "default: the "
                            "newest instance on this node",
                            "schema": {"type": "integer", "minimum": 0}},
                           {"name": "limit", "in": "query", "description": "the newest bytes",
                            "schema": {"type": "integer", "minimum": 1,
                                       "maximum": MAX_CONSOLE_BYTES,
                                       "default": DEFAULT_CONSOLE_BYTES}}],
            "responses": {"200": _json({"type": "object"}), "404": _json(_ERROR, "no console"),
                          **_ERRORS}}},
        "/v1/volumes": {
            "get": {"summary": "Every shared volume",
                    "responses": {"200": _json({"type": "array", "items": _VOLUME}), **_ERRORS}},
            "post": {"summary": "Create a shared volume on an array",
                     "requestBody": _body({"type": "object", "additionalProperties": False,
                                           "required": ["name", "array", "size_bytes"],
                                           "properties": {"name": _NAME, "array": _NAME,
                                                          "size_bytes": _SIZE}}),
                     "responses": {"201": _json(_VOLUME), **_WRITE_ERRORS}}},
        "/v1/volumes/{volume}": {
            "get": {"summary": "One volume, with each node's access and its disks",
                    "parameters": _VOLUME_PARAM,
                    "responses": {"200": _json(_VOLUME), "404": _json(_ERROR, "no such volume"),
                                  **_ERRORS}},
            "delete": {"summary": "Delete a volume that holds no disk (through its coordinator)",
                       "parameters": _VOLUME_PARAM,
                       "responses": {"200": _json({"type": "object"}), **_OP_ANSWERS}}},
        "/v1/volumes/{volume}/move": {"post": {
            "summary": "Move the volume's coordinator", "parameters": _VOLUME_PARAM,
            "requestBody": _body({"type": "object", "additionalProperties": False,
                                  "required": ["coordinator"],
                                  "properties": {"coordinator": _NAME}}),
            "responses": {"200": _json(_VOLUME), **_OP_ANSWERS}}},
        "/v1/volumes/{volume}/ops/{op}": {"get": {
            "summary": "An operation's outcome (waited for a few seconds)",
            "parameters": [*_VOLUME_PARAM,
                           {"name": "op", "in": "path", "required": True, "schema": _NAME}],
            "responses": {"200": _json(_OPERATION), **_OP_ANSWERS}}},
        "/v1/disks": {"get": {
            "summary": "The disks and snapshots of every volume",
            "parameters": [{"name": "volume", "in": "query", "schema": _NAME}],
            "responses": {"200": _json({"type": "array", "items": _DISK}), **_ERRORS}}},
        "/v1/volumes/{volume}/disks": {"post": {
            "summary": "Create a disk in the volume", "parameters": _VOLUME_PARAM,
            "requestBody": _body({"type": "object", "additionalProperties": False,
                                  "required": ["name", "size_bytes"],
                                  "properties": {"name": _NAME, "size_bytes": _SIZE}}),
            "responses": {"201": _json(_OPERATION), **_OP_ANSWERS}}},
        "/v1/volumes/{volume}/disks/{disk}": {"delete": {
            "summary": "Delete a disk or snapshot that no VM uses", "parameters": _DISK_PARAMS,
            "responses": {"200": _json({"type": "object"}), **_OP_ANSWERS}}},
        "/v1/volumes/{volume}/disks/{disk}/resize": _disk_op(
            "Grow a disk", {"type": "object", "additionalProperties": False,
                            "required": ["size_bytes"], "properties": {"size_bytes": _SIZE}}),
        "/v1/volumes/{volume}/disks/{disk}/snapshot": _disk_op(
            "A read-only copy of the disk as it is now",
            {"type": "object", "additionalProperties": False, "required": ["name"],
             "properties": {"name": _NAME}}),
        "/v1/volumes/{volume}/disks/{disk}/clone": _disk_op(
            "A new disk with the data of this disk or snapshot",
            {"type": "object", "additionalProperties": False, "required": ["name"],
             "properties": {"name": _NAME}}),
        "/v1/ha": {"get": {"summary": "Whether HA is armed",
                           "responses": {"200": _json({"type": "object"}), **_ERRORS}}},
        "/v1/ha/arm": {"post": {"summary": "Resume automatic HA actions",
                                "responses": {"200": _json({"type": "object"}), **_ERRORS}}},
        "/v1/ha/settings": {"post": {
            "summary": "Change HA settings (failover_on_isolation, restart_limit, "
                       "restart_period_s, failover_threshold, failover_period_s)",
            "requestBody": _body(_HA_SETTINGS),
            "responses": {"200": _json({"type": "object"}),
                          "503": _json(_ERROR, "no quorum: try another node"), **_ERRORS}}},
        "/v1/ha/disarm": {"post": {"summary": "Freeze automatic HA actions",
                                   "responses": {"200": _json({"type": "object"}), **_ERRORS}}},
        "/v1/events": {"get": {
            "summary": "Events (newest last); follow=true streams NDJSON",
            "parameters": [
                {"name": "limit", "in": "query", "description": "the newest N events",
                 "schema": {"type": "integer", "minimum": 0, "maximum": MAX_EVENTS,
                            "default": 100}},
                {"name": "follow", "in": "query", "schema": {"type": "boolean", "default": False}},
            ],
            "responses": {"200": _json({"type": "array", "items": _EVENT}), **_ERRORS}}},
        "/openapi.json": {"get": {"summary": "This document", "security": [],
                                  "responses": {"200": _json({"type": "object"})}}},
    },
}  # fmt: skip
