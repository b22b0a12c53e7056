"""Socket options of the forwarder's TCP connections, in one place.

- ``nodelay``: no Nagle; every request and reply goes out at once.
- ``QUICKACK``: an ACK at once, straight on the descriptor (see below).
- ``reset``: close with a reset (SO_LINGER 0). What the kernel still holds to send is discarded.
  A plain close would leave it to the kernel to deliver, retrying for about a minute even after
  the process has let the socket go, so old writes could reach the array when a cut link comes
  back, after newer ones went another way.
- ``bound_unacknowledged``: TCP_USER_TIMEOUT. Data the peer has not acknowledged within that
  time ends the connection (and is discarded), also when a reset never got through.
- ``keepalive``: TCP keepalive, so that a peer gone silent is noticed on an idle connection.
- ``pending_error``: the error a reset left on a socket that is not being read.
"""

import asyncio
import contextlib
import ctypes
import ctypes.util
import socket
import struct
from collections.abc import Callable

_LINGER_RESET = struct.pack("ii", 1, 0)

# How long a connection to an array (direct, or a relay's to the array) may leave data
# unacknowledged before its kernel gives up and discards it: shorter than the multipath
# stale-write guard (core/multipath.py), so that nothing sent on a connection the forwarder has
# given up on lands after the guard let a newer overlapping write go.
ARRAY_USER_TIMEOUT_S = 1.0


def _libc_setsockopt() -> Callable[[int], None] | None:
    """setsockopt(fd, TCP_QUICKACK, 1) straight on the descriptor: uvloop's transport socket
    makes a socket object (and a getsockname call) for every setsockopt, several µs a reply."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.setsockopt
    except (OSError, AttributeError):
        return None
    one = ctypes.c_int(1)
    size = ctypes.sizeof(one)
    level, name = socket.IPPROTO_TCP, socket.TCP_QUICKACK

    def quickack(fd: int) -> None:
        call(fd, level, name, ctypes.byref(one), size)  # an error only costs the quick ACK

    return quickack


QUICKACK = _libc_setsockopt()


def _socket(transport: asyncio.BaseTransport) -> socket.socket | None:
    sock: socket.socket | None = transport.get_extra_info("socket")
    return sock


def nodelay(transport: asyncio.BaseTransport) -> None:
    sock = _socket(transport)
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def bound_unacknowledged(transport: asyncio.BaseTransport, seconds: float) -> None:
    sock = _socket(transport)
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))


def keepalive(transport: asyncio.BaseTransport, idle_s: int = 1, interval_s: int = 1,
              count: int = 1) -> None:  # fmt: skip
    sock = _socket(transport)
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


def reset(transport: asyncio.Transport | None) -> None:
    """Drop the connection at once with a reset; nothing it held is sent any more."""
    if transport is None:
        return
    sock = _socket(transport)
    if sock is not None and not transport.is_closing():
        with contextlib.suppress(OSError, ValueError):  # ValueError: uvloop's, once closed
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def pending_error(transport: asyncio.BaseTransport) -> int:
    """The socket's pending error (0 for none), e.g. ECONNRESET after the peer's reset."""
    sock = _socket(transport)
    if sock is None:
        return 0
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    except (OSError, ValueError) as exc:
        return getattr(exc, "errno", None) or -1
