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
                "error"]  # fmt: skip
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
