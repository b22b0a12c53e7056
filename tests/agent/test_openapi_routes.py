"""Every route the agent serves is described in its OpenAPI document, with the same methods."""

from typing import Any, cast

from vmcluster.api.openapi import OPENAPI
from vmcluster.api.server import make_app


def test_every_route_is_in_the_openapi_document() -> None:
    app = make_app(cast(Any, object()))
    served: dict[str, set[str]] = {}
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource is not None else ""
        served.setdefault(path, set()).add(route.method.lower())
    documented = {path: set(ops) for path, ops in OPENAPI["paths"].items()}
    assert served == documented
