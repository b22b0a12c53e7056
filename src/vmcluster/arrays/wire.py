"""The array service's HTTP protocol, shared by the service (arrays/service.py) and its client
(arrays/client.py): addresses, headers, and the error kinds with their HTTP statuses."""

import re

from vmcluster.arrays.driver import shown
from vmcluster.errors import (
    AlreadyExists,
    ArrayUnavailable,
    HypervisorError,
    InvalidInput,
    InvalidState,
    NotFound,
    VmclusterError,
)

SERVICE_PORT = 10810
MAX_BODY_BYTES = 4096  # a request body is a few dozen bytes
ARRAY_HEADER = "X-Array"  # the array the client means: another array's service refuses (421)
REQUEST_ID_HEADER = "X-Request-Id"  # one id per request, on every path it is tried on
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
WRONG_ARRAY = "wrong_array"

# An error's class, its HTTP status and its kind (the JSON "kind" of the error), in order: the
# first class an error is an instance of gives its status. HypervisorError: the daemon did not
# answer the service, or failed a command.
ERROR_KINDS: tuple[tuple[type[VmclusterError], int, str], ...] = (
    (InvalidInput, 400, "invalid_input"),
    (NotFound, 404, "not_found"),
    (AlreadyExists, 409, "already_exists"),
    (InvalidState, 409, "invalid_state"),
    (ArrayUnavailable, 503, "unavailable"),
    (HypervisorError, 503, "unavailable"),
)


def error_of_kind(kind: object) -> type[VmclusterError]:
    """The class a client raises for an error of ``kind`` (VmclusterError if unknown)."""
    for cls, _, known in ERROR_KINDS:
        if kind == known:
            return cls  # "unavailable": ArrayUnavailable, the first of that kind
    return VmclusterError


def split_address(address: object, *, where: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT``) as (host, port); InvalidInput naming ``where``."""
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidInput(f"{where}: address {shown(address)} must be HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
