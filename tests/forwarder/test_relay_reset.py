"""The relay never delivers a node's requests to the array after the node's side is gone.

When a node's forwarder gives up on a relayed path (its probe timed out because the relay's own
link to the array was cut), it resets the connection and re-sends the requests elsewhere; its
stale-write guard holds newer overlapping writes for a while. If the relay then closed its array
side gracefully, its kernel would go on retransmitting what it had taken for the array (for
about a minute) and deliver those old writes when the link came back, over newer ones: a lost
acknowledged write. So the relay resets its array side when the node's side goes, and bounds how
long its kernel may hold unacknowledged data for the array (TCP_USER_TIMEOUT) below the guard.

The array here is a plain socket that does not read until the node has gone: what the relay
had taken for it (its send buffer, the kernel's) must be dropped, not handed over later."""

import asyncio
import socket
import struct
from typing import cast

import pytest

from vmcluster.core.multipath import PathTimings
from vmcluster.forwarder.relay import Relay, preamble
from vmcluster.forwarder.sockopts import ARRAY_USER_TIMEOUT_S
from vmcluster.forwarder.upstream import Address, Upstream

pytestmark = pytest.mark.timeout(60)

CHUNK = b"w" * (1 << 16)


def _listener(rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    return sock


async def _relay_to(array: socket.socket) -> tuple[Relay, Address]:
    relay = Relay()
    await relay.configure((Address("127.0.0.1", 0),),
                          {"a1": (Address(*array.getsockname()),)})  # fmt: skip
    port = cast(asyncio.Server, relay._servers[0]).sockets[0].getsockname()[1]
    return relay, Address("127.0.0.1", port)


async def _read_all(sock: socket.socket) -> tuple[int, str]:
    """Read until the end; how many bytes came and how it ended (eof or reset)."""
    loop = asyncio.get_running_loop()
    total = 0
    while True:
        try:
            data = await loop.sock_recv(sock, 1 << 20)
        except ConnectionResetError:
            return total, "reset"
        if not data:
            return total, "eof"
        total += len(data)


async def _until(check: object, what: str) -> None:
    for _ in range(500):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def test_what_the_relay_took_for_the_array_is_dropped_when_the_node_goes() -> None:
    asyncio.run(_dropped_when_the_node_goes(2 << 20, paused=False))


def test_a_relay_that_stopped_reading_the_node_still_notices_it_went() -> None:
    asyncio.run(_dropped_when_the_node_goes(64 << 20, paused=True))


async def _dropped_when_the_node_goes(size: int, *, paused: bool) -> None:
    """The node sends ``size`` bytes the array does not read (enough to make the relay stop
    reading the node, if ``paused``), then resets its side."""
    array = _listener(rcvbuf=4096)
    relay, address = await _relay_to(array)
    loop = asyncio.get_running_loop()
    try:
        _, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(preamble("a1"))
        accepted, _ = await asyncio.wait_for(loop.sock_accept(array), 10)
        sent, last, still = 0, -1, 0
        while still < 5:  # until the relay has taken what it will
            if sent < size and writer.transport.get_write_buffer_size() < 1 << 20:
                writer.write(CHUNK * 16)
                sent += len(CHUNK) * 16
            await asyncio.sleep(0.1)
            still = still + 1 if relay.bytes_relayed == last else 0
            last = relay.bytes_relayed
        taken = relay.bytes_relayed
        assert taken > 1 << 20, f"the relay took only {taken} bytes"
        assert (taken < sent) == paused, f"the relay took {taken} of {sent} bytes"
        _reset(writer)  # the node gives the path up
        await _until(lambda: not relay.connections, "the relay to drop the pair")
        received, end = await asyncio.wait_for(_read_all(accepted), 20)
        assert end == "reset", f"the array got {received} of {taken} bytes and then a clean end"
        assert received < taken
        accepted.close()
    finally:
        await relay.close()
        array.close()


def test_the_relay_bounds_how_long_its_kernel_holds_data_for_the_array() -> None:
    asyncio.run(_bounds_unacknowledged_data())


async def _bounds_unacknowledged_data() -> None:
    array = _listener()
    relay, address = await _relay_to(array)
    loop = asyncio.get_running_loop()
    try:
        _, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(preamble("a1") + b"x")
        accepted, _ = await asyncio.wait_for(loop.sock_accept(array), 10)
        assert await asyncio.wait_for(loop.sock_recv(accepted, 1), 10) == b"x"
        (pair,) = relay.connections
        assert pair.peer is not None
        assert pair.peer.transport is not None
        sock = pair.peer.transport.get_extra_info("socket")
        timeout_ms = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        assert timeout_ms == int(ARRAY_USER_TIMEOUT_S * 1000)
        assert pair.transport is not None  # the node's side: a silent node is noticed too
        node_side = pair.transport.get_extra_info("socket")
        assert node_side.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert node_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == timeout_ms
        writer.close()
        accepted.close()
    finally:
        await relay.close()
        array.close()


def test_the_stale_write_guard_outlasts_the_relays_user_timeout() -> None:
    assert PathTimings().stale_write_guard_s > ARRAY_USER_TIMEOUT_S


def test_the_forwarders_own_connections_to_arrays_bound_it_too() -> None:
    async def run() -> int:
        array = _listener()
        try:
            conn = await Upstream.open(Address(*array.getsockname()), "e", timeout_s=5,
                                       on_ready=lambda n: None, on_reply=lambda r: None,
                                       on_lost=lambda reason, refused: None)  # fmt: skip
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            found = int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
            conn.abort()
            return found
        finally:
            array.close()

    assert asyncio.run(run()) == int(ARRAY_USER_TIMEOUT_S * 1000)
