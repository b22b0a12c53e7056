"""Fuzzing the NBD codec both ways: arbitrary bytes, messages built from a loose grammar (the
right magic, any codes and lengths), and mutations of valid streams (bytes flipped, truncated,
spliced, duplicated), fed in random pieces to a ServerConnection and a ClientConnection, fresh or
in transmission with requests in flight.

Whatever arrives, a side raises only RemoteProtocolError (the client also OptionRefused), never
anything else and never loops forever; the server never hands its caller a request the export
does not allow; the client never reports a reply that does not fit what it asked.
"""

import os
from dataclasses import dataclass

import hypothesis
import pytest
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
    Disconnect,
    Ready,
    Refused,
    Request,
    ServerConnection,
    ServerEvent,
    TlsPolicy,
)
from vmcluster.protocols.nbdserver import StartTls as ServerStartTls
from vmcluster.protocols.nbdwire import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    ERROR_CHUNK,
    EXTENT,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_HEADER,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    U64,
    Cmd,
    CmdFlag,
    Errno,
    ExportInfo,
    HandshakeFlag,
    Info,
    LocalProtocolError,
    Option,
    OptionRefused,
    RemoteProtocolError,
    Rep,
    ReplyType,
    TransmissionFlag,
)

TF = TransmissionFlag
DISK = ExportInfo(
    name="disk",
    size=1 << 20,
    min_block=512,
    max_payload=65536,
    flags=TF.HAS_FLAGS
    | TF.SEND_FLUSH
    | TF.SEND_FUA
    | TF.SEND_TRIM
    | TF.SEND_WRITE_ZEROES
    | TF.SEND_CACHE,
    meta_contexts=(BASE_ALLOCATION,),
)
READ_ONLY = ExportInfo(name="ro", size=64 * 1024, flags=TF.HAS_FLAGS | TF.READ_ONLY)
EXPORTS = {export.name: export for export in (DISK, READ_ONLY)}
# NBD_FUZZ_EXAMPLES=20000 for a long hunt; the default keeps the suite quick.
EXAMPLES = int(os.environ.get("NBD_FUZZ_EXAMPLES", "75"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None)
# A codec that loops forever fails the test instead of hanging the suite.
pytestmark = pytest.mark.timeout(60 * max(1, EXAMPLES // 75))

# Client setups whose real sessions give the valid streams to mutate.
SETUPS = {
    "go-contexts": {"export": "disk", "contexts": (BASE_ALLOCATION,)},
    "go-simple": {"export": "disk", "structured": False},
    "go-tls": {"export": "disk", "tls": True, "contexts": (BASE_ALLOCATION,)},
    "go-read-only": {"export": "ro"},
    "info": {"export": "ro", "mode": Mode.INFO},
    "list": {"mode": Mode.LIST},
}
TRANSMISSION = ["go-contexts", "go-simple", "go-tls", "go-read-only"]
# What a client in transmission asks; the fuzzed replies answer (or fail to answer) these.
ASKED = [
    (Cmd.READ, 4096, 4096),
    (Cmd.WRITE, 0, 512),
    (Cmd.BLOCK_STATUS, 0, 65536),
    (Cmd.READ, 0, 512),
    (Cmd.FLUSH, 0, 0),
    (Cmd.TRIM, 8192, 1024),
    (Cmd.READ, 512, 0),
]


def new_server(tls: TlsPolicy = TlsPolicy.ALLOWED) -> ServerConnection:
    return ServerConnection(EXPORTS.get, names=lambda: list(EXPORTS), tls=tls)


def new_client(setup: str) -> ClientConnection:
    return ClientConnection(**SETUPS[setup])


def server_feed(server: ServerConnection, piece: bytes) -> list[ServerEvent]:
    """receive_data, with TLS as the identity (what was left unparsed is the clear text)."""
    events = server.receive_data(piece)
    while events and isinstance(events[-1], ServerStartTls):
        rest = server.take_unparsed()
        server.tls_started()
        new = server.receive_data(rest)
        if not new:
            break
        events += new
    return events


def client_feed(client: ClientConnection, piece: bytes) -> list[ClientEvent]:
    events = client.receive_data(piece)
    while events and isinstance(events[-1], ClientStartTls):
        rest = client.take_unparsed()
        client.tls_started()
        new = client.receive_data(rest)
        if not new:
            break
        events += new
    return events


def ask_all(client: ClientConnection) -> dict[int, tuple[Cmd, int, int]]:
    """Send whichever of ASKED the negotiated export allows; cookie -> (command, offset, len)."""
    asked = {}
    for command, offset, length in ASKED:
        data = bytes(range(256)) * (length // 256) if command is Cmd.WRITE else b""
        try:
            cookie = client.request(command, offset, length, data=data)
        except LocalProtocolError:
            continue  # not on this export
        asked[cookie] = (command, offset, length)
    return asked


def carry_out(server: ServerConnection, request: Request) -> None:
    if request.command is Cmd.READ:
        server.reply_read(request.cookie, b"\x5a" * request.length)
    elif request.command is Cmd.BLOCK_STATUS:
        extents = [(request.length - 512, 0), (512, 3)]
        server.reply_block_status(request.cookie, dict.fromkeys(server.contexts, extents))
    elif request.command is Cmd.TRIM:
        server.reply_error(request.cookie, Errno.EIO, "no trim today")
    else:
        server.reply(request.cookie)


@dataclass(frozen=True, slots=True)
class Streams:
    """One real session, as it crossed the wire."""

    handshake_in: bytes  # what the client sent before its requests
    requests_in: bytes  # its requests
    handshake_out: bytes  # what the server sent before them (without the ABORT's ACK)
    replies_out: bytes  # its replies


def session(setup: str) -> Streams:
    server, client = new_server(), new_client(setup)
    sent: dict[bool, bytes] = {False: b"", True: b""}  # by "the requests are out"
    received: dict[bool, bytes] = {False: b"", True: b""}
    asked = over = False
    while True:
        to_client, to_server = server.data_to_send(), client.data_to_send()
        if not to_client and not to_server:
            return Streams(sent[False], sent[True], received[False], received[True])
        sent[asked] += to_server
        if to_client and not over:  # LIST/INFO: what follows is the ABORT's ACK
            received[asked] += to_client
            events = client_feed(client, to_client)
            over = any(isinstance(e, Listed | Described) for e in events)
        if client.ready and not asked:
            asked = True
            ask_all(client)
        for event in server_feed(server, to_server):
            if isinstance(event, Request):
                carry_out(server, event)


STREAMS = {setup: session(setup) for setup in SETUPS}
TO_SERVER = [s.handshake_in + s.requests_in for s in STREAMS.values()]
TO_CLIENT = [s.handshake_out + s.replies_out for s in STREAMS.values()]


# ----- strategies ----------------------------------------------------------------------------

U32_EDGES = [0, 1, 4, 511, 512, 4096, 65536, 65537, 1 << 25, (1 << 25) + 1, 2**31, 2**32 - 1]
U64_EDGES = [0, 512, DISK.size - 512, DISK.size, DISK.size + 512, 2**63, 2**64 - 512]
u16s = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 0x8001, 0x8002, 0xFFFF]), st.integers(0, 0xFFFF))
u32s = st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1))
u64s = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))
aligned_offsets = st.one_of(u64s, st.integers(0, 2100).map(lambda blocks: blocks * 512))
aligned_lengths = st.one_of(u32s, st.integers(0, 130).map(lambda blocks: blocks * 512))
names = st.sampled_from(["disk", "ro", "", "nope", BASE_ALLOCATION, "base:", "\udcff"])
# The options each client setup sends, in order: its server's replies are about these.
PLANS = {
    "go-contexts": [Option.STRUCTURED_REPLY, Option.SET_META_CONTEXT, Option.GO],
    "go-simple": [Option.GO],
    "go-tls": [Option.STARTTLS, Option.STRUCTURED_REPLY, Option.SET_META_CONTEXT, Option.GO],
    "go-read-only": [Option.STRUCTURED_REPLY, Option.GO],
    "info": [Option.STRUCTURED_REPLY, Option.INFO],
    "list": [Option.LIST],
}
GREETING_BYTES = GREETING.pack(
    NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
)


def string(text: str) -> bytes:
    raw = text.encode(errors="surrogateescape")
    return U32.pack(len(raw)) + raw


@st.composite
def mutated(draw: st.DrawFn, primary: bytes, sources: list[bytes]) -> bytes:
    """``primary`` with one to four edits; splices take from any of ``sources``."""
    blob = bytearray(primary)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(blob)))
        edit = draw(
            st.sampled_from(
                ["flip", "truncate", "insert", "delete", "duplicate", "splice", "number"]
            )
        )
        if edit == "flip" and blob:
            blob[min(at, len(blob) - 1)] ^= draw(st.integers(1, 255))
        elif edit == "truncate":
            del blob[at:]
        elif edit == "insert":
            blob[at:at] = draw(st.binary(min_size=1, max_size=24))
        elif edit == "delete":
            del blob[at : at + draw(st.integers(1, 24))]
        elif edit == "duplicate":
            blob[at:at] = blob[at : at + draw(st.integers(1, 96))]
        elif edit == "splice":  # the rest from another stream, from anywhere in it
            other = draw(st.sampled_from(sources))
            blob[at:] = other[draw(st.integers(0, len(other))) :]
        elif edit == "number":  # a boundary value where a length or a code may be
            blob[at : at + 4] = U32.pack(draw(u32s))
    return bytes(blob)


@st.composite
def pieces(draw: st.DrawFn, blob: bytes) -> list[bytes]:
    """``blob`` cut after a few random sizes."""
    out, pos = [], 0
    for size in draw(st.lists(st.integers(1, 40), max_size=4)):
        out.append(blob[pos : pos + size])
        pos += size
    return [*out, blob[pos:]]


@st.composite
def option_messages(draw: st.DrawFn) -> bytes:
    """An option with the right magic and anything for code, data and length."""
    opt = draw(st.one_of(st.sampled_from(list(Option)), st.integers(0, 2**32 - 1)))
    name = string(draw(names))
    shape = draw(st.sampled_from(["none", "name", "info", "meta", "any"]))
    if shape == "none":
        body = b""
    elif shape == "name":
        body = name
    elif shape == "info":
        infos = draw(st.lists(u16s, max_size=4))
        body = name + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)
    elif shape == "meta":
        queries = draw(st.lists(names, max_size=3))
        body = name + U32.pack(len(queries)) + b"".join(string(q) for q in queries)
    else:
        body = draw(st.binary(max_size=40))
    length = draw(st.one_of(st.just(len(body)), u32s))
    return OPTION_HEADER.pack(IHAVEOPT, opt, length) + body


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request with the right magic and anything for the rest (a few cookies, to collide)."""
    command = draw(
        st.one_of(st.sampled_from([c for c in Cmd if c is not Cmd.DISC]), st.integers(0, 0xFFFF))
    )
    flags = draw(st.one_of(st.sampled_from([0, *CmdFlag, 1 << 7]), st.integers(0, 0xFFFF)))
    offset, length = draw(aligned_offsets), draw(aligned_lengths)
    header = REQUEST.pack(REQUEST_MAGIC, flags, command, draw(st.integers(0, 6)), offset, length)
    if command == Cmd.WRITE and length <= 70000:
        header += b"\xa5" * length
    return header


@st.composite
def option_replies(draw: st.DrawFn, likely: Option) -> bytes:
    """An option reply with the right magic, most often to ``likely``, and loose contents."""
    opt = draw(st.one_of(st.just(likely), st.sampled_from(list(Option)), u32s))
    plausible = [Rep.ACK, Rep.INFO, Rep.META_CONTEXT, Rep.SERVER, Rep.ERR_UNSUP]
    rep = draw(st.one_of(st.sampled_from(plausible), st.sampled_from(list(Rep)), u32s))
    name = draw(names).encode(errors="surrogateescape")
    shape = draw(st.sampled_from(["none", "export", "blocks", "name", "context", "any"]))
    if shape == "none":
        body = b""
    elif shape == "export":
        size = draw(st.one_of(st.sampled_from([DISK.size, 0, 512]), u64s))
        flags = draw(st.one_of(st.sampled_from([DISK.flags, TF.HAS_FLAGS, TF.SEND_FLUSH]), u16s))
        body = INFO_EXPORT.pack(Info.EXPORT, size, flags)
    elif shape == "blocks":
        blocks = draw(
            st.one_of(
                st.sampled_from([(1, 4096, 1 << 25), (512, 4096, 65536)]),
                st.tuples(u32s, u32s, u32s),
            )
        )
        body = INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, *blocks)
    elif shape == "name":  # NBD_INFO_NAME / _DESCRIPTION, or an NBD_REP_SERVER entry
        body = (
            draw(
                st.sampled_from(
                    [U16.pack(Info.NAME), U16.pack(Info.DESCRIPTION), U32.pack(len(name))]
                )
            )
            + name
        )
    elif shape == "context":
        body = U32.pack(draw(st.integers(0, 3))) + name
    else:
        body = draw(st.binary(max_size=40))
    length = draw(st.one_of(st.just(len(body)), u32s))
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, opt, rep, length) + body


def option_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, opt, rep, len(data)) + data


@st.composite
def handshakes(draw: st.DrawFn, setup: str) -> list[bytes]:
    """A greeting, then for each option the client will send what a server would answer, with
    loose contents, then an ACK; at most one option also gets loose replies or no ACK. One
    message a piece."""
    out = [GREETING_BYTES]
    plan = PLANS[setup]
    faulty = draw(st.sampled_from([None, *plan]))
    for opt in plan:
        proper = []
        if opt in (Option.GO, Option.INFO):
            size = draw(st.one_of(st.sampled_from([DISK.size, READ_ONLY.size, 0, 512]), u64s))
            flags = (
                draw(st.sampled_from([DISK.flags, READ_ONLY.flags, TF.HAS_FLAGS]))
                if (opt is not faulty)
                else draw(u16s)
            )
            proper.append(option_reply(opt, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, size, flags)))
            if draw(st.booleans()):
                blocks = (
                    draw(st.sampled_from([(1, 4096, 1 << 25), (512, 4096, 65536)]))
                    if (opt is not faulty)
                    else draw(st.tuples(u32s, u32s, u32s))
                )
                info = INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, *blocks)
                proper.append(option_reply(opt, Rep.INFO, info))
        elif opt is Option.SET_META_CONTEXT and draw(st.booleans()):
            context = U32.pack(draw(st.integers(0, 3))) + BASE_ALLOCATION.encode()
            proper.append(option_reply(opt, Rep.META_CONTEXT, context))
        elif opt is Option.LIST:
            entries = draw(st.lists(names, max_size=3))
            proper += [option_reply(opt, Rep.SERVER, string(name)) for name in entries]
        ack = option_reply(opt, Rep.ACK)
        if opt is faulty:
            proper += draw(st.lists(option_replies(opt), max_size=2))
            ack = draw(st.one_of(st.just(ack), option_replies(opt)))
        out += [*draw(st.permutations(proper)), ack]
    return out


@st.composite
def answers(draw: st.DrawFn, asked: dict[int, tuple[Cmd, int, int]], structured: bool) -> bytes:
    """What a server would answer to one of the ``asked`` requests, sometimes with one field
    off: a cookie, an offset, a length, a flag."""
    cookie = draw(st.sampled_from(sorted(asked)))
    command, offset, length = asked[cookie]
    if command is Cmd.READ and structured:
        cut = draw(st.integers(min(1, length), length))
        messages = [data_chunk(cookie, offset, cut)] if cut else []
        if length > cut:
            hole = draw(st.booleans())
            rest = (hole_chunk if hole else data_chunk)(cookie, offset + cut, length - cut)
            messages.append(rest)
        messages = draw(st.permutations(messages))
        last = STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, 1, ReplyType.NONE, cookie, 0)
        if draw(st.booleans()):
            last = STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, 1, ReplyType.ERROR, cookie, 8)
            last += ERROR_CHUNK.pack(Errno.EIO, 2) + b"io"
        blob = b"".join(messages) + last
    elif command is Cmd.READ:
        blob = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie) + b"\x5a" * length
    elif command is Cmd.BLOCK_STATUS:
        body = U32.pack(1) + EXTENT.pack(length, 0)
        blob = (
            STRUCTURED_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, 1, ReplyType.BLOCK_STATUS, cookie, len(body)
            )
            + body
        )
    else:
        blob = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, draw(st.sampled_from([0, 5])), cookie)
    if draw(st.booleans()) and blob:  # one field off
        at = draw(st.integers(0, len(blob) - 1))
        blob = blob[:at] + U32.pack(draw(u32s)) + blob[at + 4 :]
    return blob


def data_chunk(cookie: int, offset: int, size: int) -> bytes:
    header = STRUCTURED_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, 0, ReplyType.OFFSET_DATA, cookie, 8 + size
    )
    return header + U64.pack(offset) + b"\x5a" * size


def hole_chunk(cookie: int, offset: int, size: int) -> bytes:
    header = STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, 0, ReplyType.OFFSET_HOLE, cookie, 12)
    return header + U64.pack(offset) + U32.pack(size)


@st.composite
def replies(draw: st.DrawFn) -> bytes:
    """A simple reply or a structured chunk with the right magic, most often to cookies 1..7."""
    cookie = draw(st.one_of(st.integers(1, 7), st.integers(0, 2**64 - 1)))
    if draw(st.booleans()):
        data = draw(st.sampled_from([b"", b"", b"\x5a" * 512, b"\x5a" * 4096]))
        error = draw(st.one_of(st.sampled_from([0, 0, Errno.EIO]), u32s))
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data
    kind = draw(st.one_of(st.sampled_from(list(ReplyType)), u16s))
    shape = draw(st.sampled_from(["none", "data", "hole", "status", "error", "any"]))
    offset = U64.pack(draw(st.one_of(st.sampled_from([0, 512, 4096, 8192]), u64s)))
    if shape == "none":
        body = b""
    elif shape == "data":
        body = offset + b"\x5a" * draw(st.sampled_from([1, 512, 4096]))
    elif shape == "hole":
        body = offset + U32.pack(draw(st.one_of(st.sampled_from([512, 4096]), u32s)))
    elif shape == "status":
        body = U32.pack(draw(st.integers(0, 2))) + EXTENT.pack(draw(u32s), draw(u32s))
    elif shape == "error":
        message = draw(names).encode(errors="surrogateescape")
        size = draw(st.one_of(st.just(len(message)), u16s))
        body = ERROR_CHUNK.pack(draw(u32s), size) + message
    else:
        body = draw(st.binary(max_size=40))
    flags = draw(st.sampled_from([0, 1, 1, 0xFFFF]))
    length = draw(st.one_of(st.just(len(body)), u32s))
    return STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length) + body


# ----- the invariants ------------------------------------------------------------------------


def note(what: str) -> None:
    """Count what the fuzzing reached (shown by pytest --hypothesis-show-statistics)."""
    hypothesis.event(what)


class Watched:
    """A server under fuzzing: every event is checked against the export it serves."""

    def __init__(self, server: ServerConnection) -> None:
        self.server = server
        self.cookies: set[int] = set()  # requests handed out (never answered: all in flight)
        self.ended = False

    def feed(self, chunks: list[bytes]) -> None:
        try:
            for piece in chunks:
                for event in server_feed(self.server, piece):
                    self.check(event)
        except RemoteProtocolError:
            return

    def check(self, event: ServerEvent) -> None:
        note(f"server {type(event).__name__}")
        assert not self.ended, f"{event} after Disconnect"
        if isinstance(event, Ready):
            assert EXPORTS.get(event.export.name) == event.export
            assert set(event.contexts.values()) <= set(event.export.meta_contexts)
            assert event.structured or not event.contexts
        elif isinstance(event, Request):
            self.check_request(event)
        elif isinstance(event, Refused):
            assert event.error in set(Errno)
        elif isinstance(event, Disconnect):
            self.ended = True
            assert self.server.closed

    def check_request(self, request: Request) -> None:
        export = self.server.export
        assert export is not None
        assert request.cookie not in self.cookies
        self.cookies.add(request.cookie)
        command = request.command
        assert command is not Cmd.DISC
        assert export.allows(command)
        assert not (export.read_only and command in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES))
        assert command is not Cmd.BLOCK_STATUS or self.server.contexts
        assert not request.flags & CmdFlag.FUA or export.flags & TF.SEND_FUA
        assert len(request.data) == (request.length if command is Cmd.WRITE else 0)
        if command is Cmd.FLUSH:
            assert request.offset == request.length == 0
            return
        assert request.offset + request.length <= export.size
        assert request.offset % export.min_block == request.length % export.min_block == 0
        if command in (Cmd.READ, Cmd.WRITE):
            assert request.length <= export.max_payload


class Asking:
    """A client under fuzzing: every reply is checked against the request it answers."""

    def __init__(self, client: ClientConnection, setup: str) -> None:
        self.client = client
        self.setup = setup
        self.asked: dict[int, tuple[Cmd, int, int]] = {}

    def feed(self, chunks: list[bytes], *, ask: bool = True) -> None:
        try:
            for piece in chunks:
                for event in client_feed(self.client, piece):
                    self.check(event)
                if ask and self.client.ready and not self.asked:
                    self.asked = ask_all(self.client)
        except (RemoteProtocolError, OptionRefused):
            return

    def check(self, event: ClientEvent) -> None:
        note(f"client {type(event).__name__}")
        mode = SETUPS[self.setup].get("mode", Mode.GO)
        if isinstance(event, Negotiated):
            assert mode is Mode.GO
            assert event.export.name == self.client.export_name
            assert event.export.flags & TF.HAS_FLAGS
        elif isinstance(event, Described):
            assert mode is Mode.INFO
        elif isinstance(event, Listed):
            assert mode is Mode.LIST
        elif isinstance(event, Reply):
            self.check_reply(event)

    def check_reply(self, reply: Reply) -> None:
        command, _, length = self.asked.pop(reply.cookie)  # KeyError: a reply to nothing
        if reply.error:
            assert reply.data == b""
            assert reply.extents is None
        elif command is Cmd.READ:
            assert len(reply.data) == length
        elif command is Cmd.BLOCK_STATUS:
            assert reply.extents is not None
            assert set(reply.extents) == set(self.client.contexts)
            assert all(n > 0 for ranges in reply.extents.values() for n, _ in ranges)
        else:
            assert (reply.data, reply.extents) == (b"", None)


def in_transmission(setup: str) -> ServerConnection:
    server = new_server()
    events = server_feed(server, STREAMS[setup].handshake_in)
    assert [type(e) for e in events if not isinstance(e, ServerStartTls)] == [Ready]
    return server


def asking_in_transmission(setup: str) -> Asking:
    asking = Asking(new_client(setup), setup)
    asking.feed([STREAMS[setup].handshake_out])
    assert asking.client.ready
    assert asking.asked
    return asking


# ===== the server ============================================================================

tls_policies = st.sampled_from(list(TlsPolicy))
transmission_setups = st.sampled_from(TRANSMISSION)


@FUZZ
@given(tls=tls_policies, blob=st.binary(max_size=400), data=st.data())
def test_a_fresh_server_survives_arbitrary_bytes(
    tls: TlsPolicy, blob: bytes, data: st.DataObject
) -> None:
    Watched(new_server(tls)).feed(data.draw(pieces(blob)))


@FUZZ
@given(tls=tls_policies, data=st.data())
def test_a_fresh_server_survives_mutated_client_streams(
    tls: TlsPolicy, data: st.DataObject
) -> None:
    blob = data.draw(mutated(data.draw(st.sampled_from(TO_SERVER)), TO_SERVER))
    Watched(new_server(tls)).feed(data.draw(pieces(blob)))


@FUZZ
@given(
    tls=tls_policies,
    client_flags=st.sampled_from([0, 1, 3]),
    options=st.lists(option_messages(), max_size=6),
)
def test_a_fresh_server_survives_any_options(
    tls: TlsPolicy, client_flags: int, options: list[bytes]
) -> None:
    Watched(new_server(tls)).feed([CLIENT_FLAGS.pack(client_flags), *options])


@FUZZ
@given(
    setup=transmission_setups,
    messages=st.lists(requests(), max_size=8),
    tail=st.binary(max_size=64),
)
def test_a_server_in_transmission_hands_out_only_requests_the_export_allows(
    setup: str, messages: list[bytes], tail: bytes
) -> None:
    Watched(in_transmission(setup)).feed([*messages, tail])


@FUZZ
@given(setup=transmission_setups, data=st.data())
def test_a_server_in_transmission_survives_mutated_request_streams(
    setup: str, data: st.DataObject
) -> None:
    sources = [STREAMS[s].requests_in for s in TRANSMISSION]
    blob = data.draw(mutated(STREAMS[setup].requests_in, sources))
    Watched(in_transmission(setup)).feed(data.draw(pieces(blob)))


# ===== the client ============================================================================

client_setups = st.sampled_from(list(SETUPS))


@FUZZ
@given(setup=client_setups, greet=st.booleans(), blob=st.binary(max_size=400), data=st.data())
def test_a_fresh_client_survives_arbitrary_bytes(
    setup: str, greet: bool, blob: bytes, data: st.DataObject
) -> None:
    prefix = GREETING_BYTES if greet else b""
    Asking(new_client(setup), setup).feed(data.draw(pieces(prefix + blob)))


@FUZZ
@given(setup=client_setups, data=st.data())
def test_a_fresh_client_survives_mutated_server_streams(setup: str, data: st.DataObject) -> None:
    own = STREAMS[setup]
    where = data.draw(st.sampled_from(["handshake", "replies", "both"]))
    handshake, replies = own.handshake_out, own.replies_out
    if where != "replies":
        handshake = data.draw(mutated(handshake, TO_CLIENT))
    if where != "handshake":
        replies = data.draw(mutated(replies, TO_CLIENT))
    # The requests go out between the two: no server answers requests not sent yet.
    Asking(new_client(setup), setup).feed([*data.draw(pieces(handshake)), replies])


@FUZZ
@given(setup=client_setups, data=st.data())
def test_a_fresh_client_survives_any_option_replies(setup: str, data: st.DataObject) -> None:
    Asking(new_client(setup), setup).feed(data.draw(handshakes(setup)))


@FUZZ
@given(setup=transmission_setups, data=st.data())
def test_a_client_with_requests_in_flight_takes_only_replies_that_fit(
    setup: str, data: st.DataObject
) -> None:
    asking = asking_in_transmission(setup)
    messages = st.one_of(replies(), answers(asking.asked, asking.client.structured))
    asking.feed(data.draw(st.lists(messages, max_size=8)), ask=False)


@FUZZ
@given(setup=transmission_setups, data=st.data())
def test_a_client_with_requests_in_flight_survives_mutated_replies(
    setup: str, data: st.DataObject
) -> None:
    sources = [STREAMS[s].replies_out for s in TRANSMISSION]
    blob = data.draw(mutated(STREAMS[setup].replies_out, sources))
    asking_in_transmission(setup).feed(data.draw(pieces(blob)), ask=False)
