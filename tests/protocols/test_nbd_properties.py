"""Property tests for the NBD codec: random request sequences survive the client -> server ->
client round trip against an in-memory disk exactly as a model says, and how a byte stream is cut
into reads never changes what either side makes of it (handshake, STARTTLS and replies included).
"""

import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from vmcluster.protocols.nbdclient import (
    ClientConnection,
    ClientEvent,
    Described,
    Listed,
    Mode,
    Negotiated,
    Reply,
)
from vmcluster.protocols.nbdclient import StartTls as ClientStartTls
from vmcluster.protocols.nbdserver import (
    Request,
    ServerConnection,
    ServerEvent,
    TlsPolicy,
)
from vmcluster.protocols.nbdserver import StartTls as ServerStartTls
from vmcluster.protocols.nbdwire import (
    BASE_ALLOCATION,
    MAX_PAYLOAD_BYTES,
    STATE_ZERO,
    Cmd,
    CmdFlag,
    ExportInfo,
    TransmissionFlag,
)

TF = TransmissionFlag
FLAGS = (
    TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_CACHE
)
Connection = ServerConnection | ClientConnection
Event = ServerEvent | ClientEvent


@dataclass(frozen=True, slots=True)
class Setup:
    export: ExportInfo
    mode: Mode = Mode.GO
    structured: bool = True
    contexts: tuple[str, ...] = ()
    tls: bool = False  # the server allows STARTTLS and the client asks for it

    def server(self) -> ServerConnection:
        exports = {self.export.name: self.export}
        tls = TlsPolicy.ALLOWED if self.tls else TlsPolicy.NONE
        return ServerConnection(exports.get, names=lambda: list(exports), tls=tls)

    def client(self) -> ClientConnection:
        return ClientConnection(
            self.export.name,
            mode=self.mode,
            structured=self.structured,
            contexts=self.contexts,
            tls=self.tls,
        )


@dataclass(frozen=True, slots=True)
class Op:
    command: Cmd
    offset: int = 0
    length: int = 0
    flags: int = 0
    data: bytes = b""


@dataclass(slots=True)
class Transcript:
    """One whole session as it crossed the wire."""

    to_server: bytes = b""  # everything the client sent
    server_out: bytes = b""  # everything the server sent (the ABORT's ACK included)
    handshake: bytes = b""  # what the client read up to Negotiated (or the end of LIST/INFO)
    replies: bytes = b""  # what the client read after it sent its requests
    client_events: list[ClientEvent] = field(default_factory=list)


# ----- the in-memory disk behind the server --------------------------------------------------


def extents(disk: bytes | bytearray, offset: int, length: int, block: int) -> list[tuple[int, int]]:
    """base:allocation of ``disk[offset:offset+length]``: runs of zero / data blocks."""
    runs: list[tuple[int, int]] = []
    for at in range(offset, offset + length, block):
        size = min(block, offset + length - at)
        state = STATE_ZERO if not any(disk[at : at + size]) else 0
        if runs and runs[-1][1] == state:
            runs[-1] = (runs[-1][0] + size, state)
        else:
            runs.append((size, state))
    return runs


def granule(export: ExportInfo) -> int:
    """The block size the disk reports allocation in."""
    return max(export.min_block, 512)


def carry_out(server: ServerConnection, disk: bytearray, request: Request) -> None:
    end = request.offset + request.length
    if request.command is Cmd.READ:
        server.reply_read(request.cookie, bytes(disk[request.offset : end]))
    elif request.command is Cmd.BLOCK_STATUS:
        assert server.export is not None
        ranges = extents(disk, request.offset, request.length, granule(server.export))
        server.reply_block_status(request.cookie, dict.fromkeys(server.contexts, ranges))
    else:
        if request.command is Cmd.WRITE:
            disk[request.offset : end] = request.data
        elif request.command in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            disk[request.offset : end] = bytes(request.length)
        server.reply(request.cookie)


def model_reply(
    model: bytearray, op: Op, cookie: int, block: int, contexts: dict[int, str]
) -> Reply:
    """What the client must see for ``op``, applying it to ``model``."""
    end = op.offset + op.length
    if op.command is Cmd.READ:
        return Reply(cookie, 0, bytes(model[op.offset : end]))
    if op.command is Cmd.BLOCK_STATUS:
        return Reply(
            cookie, 0, extents=dict.fromkeys(contexts, extents(model, op.offset, op.length, block))
        )
    if op.command is Cmd.WRITE:
        model[op.offset : end] = op.data
    elif op.command in (Cmd.TRIM, Cmd.WRITE_ZEROES):
        model[op.offset : end] = bytes(op.length)
    return Reply(cookie, 0)


def issue(client: ClientConnection, op: Op) -> int:
    return client.request(op.command, op.offset, op.length, flags=op.flags, data=op.data)


# ----- strategies ----------------------------------------------------------------------------


@st.composite
def setups(draw: st.DrawFn, *, modes: tuple[Mode, ...] = (Mode.GO,)) -> Setup:
    min_block = draw(st.sampled_from([1, 512]))
    size = draw(st.integers(1, 48 * 1024 // min_block)) * min_block
    max_payload = draw(st.sampled_from([8192, 65536, MAX_PAYLOAD_BYTES]))
    export = ExportInfo(
        name=draw(st.sampled_from(["", "disk", "lun1.g4"])),
        size=size,
        flags=FLAGS,
        min_block=min_block,
        max_payload=max_payload,
        description=draw(st.sampled_from(["", "a disk"])),
        meta_contexts=(BASE_ALLOCATION,),
    )
    structured = draw(st.booleans())
    contexts = (BASE_ALLOCATION,) if structured and draw(st.booleans()) else ()
    return Setup(export, draw(st.sampled_from(modes)), structured, contexts, draw(st.booleans()))


@st.composite
def ops(draw: st.DrawFn, setup: Setup, *, max_bytes: int = 16384) -> Op:
    export = setup.export
    commands = [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.FLUSH, Cmd.CACHE]
    if setup.contexts:
        commands.append(Cmd.BLOCK_STATUS)
    command = draw(st.sampled_from(commands))
    flags = CmdFlag.FUA if draw(st.booleans()) else 0
    if command is Cmd.FLUSH:
        return Op(command, flags=flags)
    block = export.min_block
    blocks = export.size // block
    least = 1 if command is Cmd.BLOCK_STATUS else 0  # block status needs a nonzero range
    start = draw(st.integers(0, blocks - least))
    cap = min(max_bytes, export.max_payload) if command in (Cmd.READ, Cmd.WRITE) else max_bytes
    most = min(blocks - start, cap // block)
    length = draw(st.integers(least, max(least, most))) * block
    data = b""
    if command is Cmd.WRITE:
        data = random.Random(draw(st.integers(0, 2**32))).randbytes(length)
        if draw(st.booleans()):  # some zero writes, so block status sees zero runs
            data = bytes(length)
    return Op(command, start * block, length, flags, data)


# ----- driving one connection ----------------------------------------------------------------


def feed(conn: Connection, piece: bytes) -> list[Event]:
    """receive_data, with TLS as the identity: on StartTls, hand back what the codec had not
    parsed (take_unparsed) as the 'decrypted' stream after tls_started()."""
    events: list[Event] = list(conn.receive_data(piece))
    while events and isinstance(events[-1], (ServerStartTls, ClientStartTls)):
        rest = conn.take_unparsed()
        conn.tls_started()
        new = conn.receive_data(rest)
        if not new:
            break
        events += new
    return events


def run_server(setup: Setup, pieces: list[bytes]) -> tuple[list[ServerEvent], bytes]:
    """A server fed ``pieces``, carrying out every request on its disk as it comes."""
    server, disk = setup.server(), bytearray(setup.export.size)
    events: list[ServerEvent] = []
    out = [server.data_to_send()]
    for piece in pieces:
        new = feed(server, piece)
        for event in new:
            if isinstance(event, Request):
                carry_out(server, disk, event)
        events += new
        out.append(server.data_to_send())
    return events, b"".join(out)


def run_client(
    setup: Setup, requests: list[Op], handshake: list[bytes], replies: list[bytes]
) -> tuple[list[ClientEvent], bytes]:
    """A client fed the ``handshake`` pieces, then sending ``requests``, then fed ``replies``."""
    client = setup.client()
    events: list[ClientEvent] = []
    out = []
    for piece in handshake:
        events += feed(client, piece)
        out.append(client.data_to_send())
    if requests:
        for op in requests:
            issue(client, op)
        out.append(client.data_to_send())
    for piece in replies:
        events += feed(client, piece)
        out.append(client.data_to_send())
    return events, b"".join(out)


def handshake(setup: Setup) -> tuple[ServerConnection, ClientConnection]:
    """Both sides pumped into each other until the client is in transmission."""
    server, client = setup.server(), setup.client()
    while not client.ready:
        to_client, to_server = server.data_to_send(), client.data_to_send()
        assert to_client or to_server, "the handshake stalled"
        feed(client, to_client)
        feed(server, to_server)
    return server, client


def session(setup: Setup, requests: list[Op]) -> Transcript:
    """The reference: both sides pumped into each other, whole buffers at a time."""
    server, client, disk = setup.server(), setup.client(), bytearray(setup.export.size)
    t = Transcript()
    phase = "handshake"
    while True:
        to_client, to_server = server.data_to_send(), client.data_to_send()
        t.server_out += to_client
        t.to_server += to_server
        if not to_client and not to_server:
            return t
        if to_client and phase != "over":  # LIST/INFO: the ABORT's ACK is left unread
            t.client_events += feed(client, to_client)
            if phase == "handshake":
                t.handshake += to_client
            else:
                t.replies += to_client
        if phase == "handshake" and client.ready:
            phase = "requests"
            for op in requests:
                issue(client, op)
        elif phase == "handshake" and any(
            isinstance(e, Described | Listed) for e in t.client_events
        ):
            phase = "over"
        if to_server:
            for event in feed(server, to_server):
                if isinstance(event, Request):
                    carry_out(server, disk, event)


def cut(data: st.DataObject, blob: bytes) -> list[bytes]:
    """``blob`` in arbitrary pieces: whole, one byte at a time, or cut at random points."""
    how = data.draw(st.sampled_from(["whole", "bytes", "random"]))
    if how == "whole" or not blob:
        return [blob]
    if how == "bytes":
        return [blob[i : i + 1] for i in range(len(blob))]
    points = sorted(data.draw(st.sets(st.integers(1, max(1, len(blob) - 1)), max_size=12)))
    return [blob[a:b] for a, b in zip([0, *points], [*points, len(blob)], strict=True)]


# ===== round trip against a model ============================================================


def answer_in(
    server: ServerConnection, disk: bytearray, requests: list[Event], order: list[int]
) -> bytes:
    """Carry ``requests`` out in arrival order, but send their replies in ``order``."""
    answers = []
    for request in requests:
        assert isinstance(request, Request)
        carry_out(server, disk, request)
        answers.append(server.data_to_send())
    return b"".join(answers[i] for i in order)


@settings(max_examples=60, deadline=None)
@given(setup=setups(), data=st.data())
def test_random_requests_round_trip_like_the_model(setup: Setup, data: st.DataObject) -> None:
    server, client = handshake(setup)
    disk, model = bytearray(setup.export.size), bytearray(setup.export.size)
    block, contexts = granule(setup.export), dict(client.contexts)
    assert contexts == ({1: BASE_ALLOCATION} if setup.contexts else {})
    batches = data.draw(st.lists(st.lists(ops(setup), min_size=1, max_size=5), max_size=6))
    for batch in batches:
        cookies = [issue(client, op) for op in batch]
        expected = [
            model_reply(model, op, c, block, contexts) for c, op in zip(cookies, batch, strict=True)
        ]
        arrived = server.receive_data(client.data_to_send())
        assert arrived == [
            Request(c, op.command, op.flags, op.offset, op.length, op.data)
            for c, op in zip(cookies, batch, strict=True)
        ]
        order = data.draw(st.permutations(range(len(arrived))))
        got = client.receive_data(answer_in(server, disk, arrived, order))
        assert got == [expected[i] for i in order]
        assert client.in_flight == server.in_flight == 0
    assert disk == model


# ===== any cut of the byte stream gives the same events =======================================


@st.composite
def sessions(draw: st.DrawFn) -> tuple[Setup, list[Op]]:
    setup = draw(setups(modes=(Mode.GO, Mode.GO, Mode.INFO, Mode.LIST)))
    requests = []
    if setup.mode is Mode.GO:
        requests = draw(st.lists(ops(setup, max_bytes=2048), max_size=6))
    return setup, requests


@settings(max_examples=60, deadline=None)
@given(given_session=sessions(), data=st.data())
def test_the_server_makes_the_same_of_any_cut_of_its_input(
    given_session: tuple[Setup, list[Op]], data: st.DataObject
) -> None:
    setup, requests = given_session
    transcript = session(setup, requests)
    whole = run_server(setup, [transcript.to_server])
    assert whole[1] == transcript.server_out
    assert run_server(setup, cut(data, transcript.to_server)) == whole


@settings(max_examples=60, deadline=None)
@given(given_session=sessions(), data=st.data())
def test_the_client_makes_the_same_of_any_cut_of_its_input(
    given_session: tuple[Setup, list[Op]], data: st.DataObject
) -> None:
    setup, requests = given_session
    transcript = session(setup, requests)
    whole = run_client(setup, requests, [transcript.handshake], [transcript.replies])
    assert whole == (transcript.client_events, transcript.to_server)
    # The requests go out once the handshake is read: no server answers a request not sent yet.
    pieces = cut(data, transcript.handshake), cut(data, transcript.replies)
    assert run_client(setup, requests, *pieces) == whole


def test_one_byte_at_a_time_both_ways_with_tls_contexts_and_every_command() -> None:
    export = ExportInfo(
        name="disk", size=65536, flags=FLAGS, min_block=512, meta_contexts=(BASE_ALLOCATION,)
    )
    setup = Setup(export, contexts=(BASE_ALLOCATION,), tls=True)
    requests = [
        Op(Cmd.WRITE, 512, 1024, CmdFlag.FUA, b"x" * 1024),
        Op(Cmd.READ, 0, 2048),
        Op(Cmd.BLOCK_STATUS, 0, 4096),
        Op(Cmd.TRIM, 512, 512),
        Op(Cmd.FLUSH),
        Op(Cmd.WRITE_ZEROES, 0, 512),
        Op(Cmd.CACHE, 0, 65536),
        Op(Cmd.READ, 0, 0),
    ]
    t = session(setup, requests)
    assert [type(e) for e in t.client_events] == [ClientStartTls, Negotiated] + [Reply] * 8
    server_side = run_server(setup, [t.to_server[i : i + 1] for i in range(len(t.to_server))])
    assert server_side == run_server(setup, [t.to_server])
    handshake = [t.handshake[i : i + 1] for i in range(len(t.handshake))]
    replies = [t.replies[i : i + 1] for i in range(len(t.replies))]
    assert run_client(setup, requests, handshake, replies) == (t.client_events, t.to_server)
