"""The OpenAPI 3.1 document served at /openapi.json."""

from typing import Any

_NODE = {
    "type": "object",
    "required": ["name", "state", "networks", "leader"],
    "properties": {
        "name": {"type": "string"},
        "state": {
            "enum": ["up", "down", "paused", "isolated", "quarantined", "joining", "no-quorum"]
        },
        "networks": {
            "type": "object",
            "additionalProperties": {"enum": ["up", "partitioned", "down", "unknown"]},
        },
        "leader": {"type": "boolean"},
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
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {"401": _json(_ERROR, "missing or invalid bearer token")}
_NODE_PARAM = [{"name": "node", "in": "path", "required": True, "schema": {"type": "string"}}]

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
                                             "parameters": _NODE_PARAM,
                                             "responses": {"200": _json(_NODE),
                                                           "404": _json(_ERROR, "no such node"),
                                                           "503": _json(_ERROR, "no quorum"),
                                                           **_ERRORS}}},
        "/v1/events": {"get": {
            "summary": "Events (newest last); follow=true streams NDJSON",
            "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 100}},
                {"name": "follow", "in": "query", "schema": {"type": "boolean", "default": False}},
            ],
            "responses": {"200": _json({"type": "array", "items": _EVENT}), **_ERRORS}}},
        "/openapi.json": {"get": {"summary": "This document", "security": [],
                                  "responses": {"200": _json({"type": "object"})}}},
    },
}  # fmt: skip
