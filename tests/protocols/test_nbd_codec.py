"""Unit tests for the sans-IO NBD codec (vmcluster.protocols.nbdwire, nbdserver, nbdclient).

Direct calls, no event loop, no mocks: a ServerConnection and a ClientConnection are pumped into
each other in memory, or one side is driven with bytes built by hand from the wire structs, so
each test can say exactly what crossed the wire. Errno and reply choices follow doc/proto.md.
"""

import itertools
import tracemalloc
from dataclasses import replace
from typing import Any

import pytest

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
    MAX_OPTIONS,
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
    EXPORT_NAME_REPLY,
    EXPORT_NAME_ZEROES,
    EXTENT,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_OPTION_BYTES,
    MAX_PAYLOAD_BYTES,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_HEADER,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    U64,
    ClientFlag,
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
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)

TF = TransmissionFlag
MIB = 1 << 20
SIZE = MIB
ALL_FLAGS = (
    TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_CACHE
)
DISK = ExportInfo(
    name="disk",
    size=SIZE,
    flags=ALL_FLAGS,
    description="the test disk",
    meta_contexts=(BASE_ALLOCATION,),
)
# 512-byte blocks and a 64 KiB payload limit: for the alignment and payload refusals.
STRICT = replace(DISK, min_block=512, max_payload=64 * 1024)
READ_ONLY = replace(DISK, flags=ALL_FLAGS | TF.READ_ONLY)
BARE = replace(DISK, flags=TF.HAS_FLAGS)  # advertises no optional command and no FUA
CLIENT_DEFAULT_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES


# ----- both sides in memory ------------------------------------------------------------------


def serve(*exports: ExportInfo, tls: TlsPolicy = TlsPolicy.NONE) -> ServerConnection:
    table = {export.name: export for export in exports or (DISK,)}
    return ServerConnection(table.get, names=lambda: list(table), tls=tls)


def pump(
    server: ServerConnection, client: ClientConnection
) -> tuple[list[ServerEvent], list[ClientEvent]]:
    """Carry bytes both ways until neither side has anything to send."""
    server_events: list[ServerEvent] = []
    client_events: list[ClientEvent] = []
    while True:
        to_client, to_server = server.data_to_send(), client.data_to_send()
        if not to_client and not to_server:
            return server_events, client_events
        if to_client:
            client_events += client.receive_data(to_client)
        if to_server:
            server_events += server.receive_data(to_server)


def connect(
    export: ExportInfo = DISK, **client_options: Any
) -> tuple[ServerConnection, ClientConnection, Ready, Negotiated]:
    server = serve(export)
    client = ClientConnection(export.name, **client_options)
    server_events, client_events = pump(server, client)
    [ready] = server_events
    [negotiated] = client_events
    assert isinstance(ready, Ready)
    assert isinstance(negotiated, Negotiated)
    return server, client, ready, negotiated


def with_requests(export: ExportInfo = DISK, **client_options: Any) -> ClientConnection:
    """A client in transmission whose (discarded) server side will never answer."""
    _, client, _, _ = connect(export, **client_options)
    return client


# ----- the client side by hand ---------------------------------------------------------------


def option(opt: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def string(text: str) -> bytes:
    raw = text.encode()
    return U32.pack(len(raw)) + raw


def info_body(name: str, *infos: int) -> bytes:
    return string(name) + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def meta_body(name: str, *queries: str) -> bytes:
    return string(name) + U32.pack(len(queries)) + b"".join(string(q) for q in queries)


def request(
    command: int,
    offset: int = 0,
    length: int = 0,
    *,
    flags: int = 0,
    cookie: int = 1,
    data: bytes = b"",
) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length) + data


def options_server(
    *exports: ExportInfo,
    tls: TlsPolicy = TlsPolicy.NONE,
    client_flags: int = CLIENT_DEFAULT_FLAGS,
) -> ServerConnection:
    """A server past the greeting and the client flags: waiting for options."""
    server = serve(*exports, tls=tls)
    server.data_to_send()
    assert server.receive_data(CLIENT_FLAGS.pack(client_flags)) == []
    return server


def option_replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, data) of every option reply in ``raw``."""
    replies, pos = [], 0
    while pos < len(raw):
        magic, opt, rep, length = OPTION_REPLY_HEADER.unpack_from(raw, pos)
        assert magic == OPTION_REPLY_MAGIC
        pos += OPTION_REPLY_HEADER.size
        replies.append((opt, rep, raw[pos : pos + length]))
        pos += length
    assert pos == len(raw)
    return replies


def ask(
    server: ServerConnection, opt: int, data: bytes = b""
) -> tuple[list[ServerEvent], list[tuple[int, int, bytes]]]:
    events = server.receive_data(option(opt, data))
    return events, option_replies(server.data_to_send())


def transmission_server(
    export: ExportInfo = DISK, *, structured: bool = False, contexts: tuple[str, ...] = ()
) -> ServerConnection:
    server = options_server(export)
    if structured:
        assert ask(server, Option.STRUCTURED_REPLY)[1] == [(Option.STRUCTURED_REPLY, Rep.ACK, b"")]
    if contexts:
        ask(server, Option.SET_META_CONTEXT, meta_body(export.name, *contexts))
    events, _ = ask(server, Option.GO, info_body(export.name, Info.BLOCK_SIZE))
    assert [type(e) for e in events] == [Ready]
    return server


def chunks(raw: bytes) -> list[tuple[int, int, int, bytes]]:
    """(flags, type, cookie, payload) of every structured reply chunk in ``raw``."""
    found, pos = [], 0
    while pos < len(raw):
        magic, flags, kind, cookie, length = STRUCTURED_HEADER.unpack_from(raw, pos)
        assert magic == STRUCTURED_REPLY_MAGIC
        pos += STRUCTURED_HEADER.size
        found.append((flags, kind, cookie, raw[pos : pos + length]))
        pos += length
    assert pos == len(raw)
    return found


# ----- the server side by hand ---------------------------------------------------------------


def greeting(flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def option_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, opt, rep, len(data)) + data


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie: int, kind: int, payload: bytes = b"", *, done: bool = True) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + (
        payload
    )


def data_chunk(cookie: int, offset: int, data: bytes, *, done: bool = True) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_DATA, U64.pack(offset) + data, done=done)


def hole_chunk(cookie: int, offset: int, size: int, *, done: bool = True) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_HOLE, U64.pack(offset) + U32.pack(size), done=done)


def error_chunk(cookie: int, error: int, message: str, kind: int = ReplyType.ERROR) -> bytes:
    raw = message.encode()
    return chunk(cookie, kind, ERROR_CHUNK.pack(error, len(raw)) + raw)


# ===== the wire, byte by byte ================================================================


def test_the_greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() -> None:
    assert serve().data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert GREETING.size == 18


def test_the_client_answers_the_greeting_with_its_flags_and_the_first_option() -> None:
    client = ClientConnection("disk")
    assert client.receive_data(greeting()) == []
    assert client.data_to_send() == b"\x00\x00\x00\x03" + b"IHAVEOPT" + bytes.fromhex(
        "00000008 00000000"
    )


def test_the_client_asks_go_with_block_size_and_description() -> None:
    client = ClientConnection("disk", structured=False)
    client.receive_data(greeting())
    assert client.data_to_send() == U32.pack(3) + (
        b"IHAVEOPT"
        + bytes.fromhex("00000007 0000000e")
        + b"\x00\x00\x00\x04disk"
        + bytes.fromhex("0002 0003 0002")
    )


def test_a_request_header_is_28_bytes_laid_out_as_the_spec_says() -> None:
    client = with_requests()
    cookie = client.request(Cmd.WRITE, 4096, 4, data=b"abcd", flags=CmdFlag.FUA)
    assert REQUEST.size == 28
    assert (
        client.data_to_send()
        == bytes.fromhex(f"25609513 0001 0001 {cookie:016x} 0000000000001000 00000004") + b"abcd"
    )


def test_a_simple_reply_is_16_bytes() -> None:
    server = transmission_server()
    server.receive_data(request(Cmd.FLUSH, cookie=0x0102030405060708))
    server.reply(0x0102030405060708)
    assert SIMPLE_REPLY.size == 16
    assert server.data_to_send() == bytes.fromhex("67446698 00000000 0102030405060708")


def test_a_structured_data_chunk_has_a_20_byte_header_then_offset_then_data() -> None:
    server = transmission_server(structured=True)
    server.receive_data(request(Cmd.READ, 512, 3, cookie=7))
    server.reply_read(7, b"xyz")
    assert STRUCTURED_HEADER.size == 20
    assert (
        server.data_to_send()
        == bytes.fromhex("668e33ef 0001 0001 0000000000000007 0000000b 0000000000000200") + b"xyz"
    )


def test_option_replies_carry_the_option_reply_magic() -> None:
    server = options_server()
    server.receive_data(option(Option.STRUCTURED_REPLY))
    assert server.data_to_send() == bytes.fromhex("0003e889045565a9 00000008 00000001 00000000")


def test_block_status_is_one_chunk_per_context_with_its_extents() -> None:
    server = transmission_server(structured=True, contexts=(BASE_ALLOCATION,))
    server.receive_data(request(Cmd.BLOCK_STATUS, 0, 8192, cookie=3))
    server.reply_block_status(3, {1: [(4096, 0), (4096, STATE_HOLE | STATE_ZERO)]})
    assert server.data_to_send() == bytes.fromhex(
        "668e33ef 0001 0005 0000000000000003 00000014"  # header: 20 bytes of payload
        "00000001 00001000 00000000 00001000 00000003"  # context 1, then (length, flags) x 2
    )


# ===== the handshake =========================================================================


def test_go_negotiates_structured_replies_and_base_allocation_on_both_sides() -> None:
    _, client, ready, negotiated = connect(contexts=(BASE_ALLOCATION,))
    assert ready == Ready(export=DISK, structured=True, contexts={1: BASE_ALLOCATION})
    assert negotiated == Negotiated(export=DISK, structured=True, contexts={1: BASE_ALLOCATION})
    assert client.ready


def test_go_without_structured_replies_gives_simple_replies_and_no_contexts() -> None:
    _, _, ready, negotiated = connect(structured=False, contexts=(BASE_ALLOCATION,))
    assert (ready.structured, ready.contexts) == (False, {})
    assert (negotiated.structured, negotiated.contexts) == (False, {})


def test_the_client_learns_block_sizes_and_description_from_go() -> None:
    _, _, _, negotiated = connect(STRICT)
    assert negotiated.export == replace(STRICT, meta_contexts=())


def test_go_answers_the_infos_asked_then_ack() -> None:
    server = options_server()
    events, replies = ask(server, Option.GO, info_body("disk", Info.NAME, Info.DESCRIPTION))
    assert replies == [
        (Option.GO, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, SIZE, ALL_FLAGS)),
        (Option.GO, Rep.INFO, INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 1, 4096, MAX_PAYLOAD_BYTES)),
        (Option.GO, Rep.INFO, U16.pack(Info.NAME) + b"disk"),
        (Option.GO, Rep.INFO, U16.pack(Info.DESCRIPTION) + b"the test disk"),
        (Option.GO, Rep.ACK, b""),
    ]
    assert events == [Ready(export=DISK, structured=False, contexts={})]


def test_go_on_an_export_with_a_minimum_block_size_needs_block_size_asked() -> None:
    server = options_server(STRICT)
    events, replies = ask(server, Option.GO, info_body("disk"))
    assert events == []
    assert replies[-1][:2] == (Option.GO, Rep.ERR_BLOCK_SIZE_REQD)
    events, replies = ask(server, Option.INFO, info_body("disk"))  # INFO may go without
    assert replies[-1] == (Option.INFO, Rep.ACK, b"")


@pytest.mark.parametrize("body", [b"", b"\x00\x00\x00\x09disk\x00\x00", info_body("disk") + b"x"])
def test_malformed_go_data_is_invalid(body: bytes) -> None:
    server = options_server()
    events, replies = ask(server, Option.GO, body)
    assert events == []
    assert [r[:2] for r in replies] == [(Option.GO, Rep.ERR_INVALID)]


def test_info_describes_the_export_then_the_client_aborts() -> None:
    server, client = serve(), ClientConnection("disk", mode=Mode.INFO)
    server_events, client_events = [], []
    for _ in range(3):  # greeting, STRUCTURED_REPLY, INFO; stop before the ABORT's answer
        client_events += client.receive_data(server.data_to_send())
        server_events += server.receive_data(client.data_to_send())
    assert client_events == [Described(export=replace(DISK, meta_contexts=()))]
    assert server_events == [Disconnect("client aborted the handshake")]
    assert option_replies(server.data_to_send()) == [(Option.ABORT, Rep.ACK, b"")]


def test_list_names_the_exports_then_the_client_aborts() -> None:
    server, client = serve(DISK, replace(DISK, name="other")), ClientConnection(mode=Mode.LIST)
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    raw = server.data_to_send()
    assert option_replies(raw) == [
        (Option.LIST, Rep.SERVER, string("disk")),
        (Option.LIST, Rep.SERVER, string("other")),
        (Option.LIST, Rep.ACK, b""),
    ]
    assert client.receive_data(raw) == [Listed(("disk", "other"))]
    assert client.data_to_send() == option(Option.ABORT)


def test_list_with_data_is_invalid() -> None:
    assert ask(options_server(), Option.LIST, b"x")[1][0][:2] == (Option.LIST, Rep.ERR_INVALID)


def test_abort_is_acked_and_ends_the_session() -> None:
    server = options_server()
    events, replies = ask(server, Option.ABORT, b"ignored")
    assert events == [Disconnect("client aborted the handshake")]
    assert replies == [(Option.ABORT, Rep.ACK, b"")]
    assert server.closed
    assert server.receive_data(option(Option.GO, info_body("disk"))) == []


def test_structured_reply_is_acked_once_and_takes_no_data() -> None:
    server = options_server()
    assert ask(server, Option.STRUCTURED_REPLY)[1] == [(Option.STRUCTURED_REPLY, Rep.ACK, b"")]
    again = ask(server, Option.STRUCTURED_REPLY)[1]
    with_data = ask(server, Option.STRUCTURED_REPLY, b"x")[1]
    assert [r[:2] for r in again + with_data] == [(Option.STRUCTURED_REPLY, Rep.ERR_INVALID)] * 2


@pytest.mark.parametrize("opt", [Option.PEEK_EXPORT, Option.EXTENDED_HEADERS, 99, 0xFFFFFFFF])
def test_an_unknown_option_is_answered_err_unsup_and_the_handshake_goes_on(opt: int) -> None:
    server = options_server()
    events, replies = ask(server, opt, b"whatever")
    assert events == []
    assert [r[:2] for r in replies] == [(opt, Rep.ERR_UNSUP)]
    events, _ = ask(server, Option.GO, info_body("disk"))
    assert [type(e) for e in events] == [Ready]


@pytest.mark.parametrize("mode", [Mode.GO, Mode.INFO])
def test_an_unknown_export_is_refused_err_unknown_and_the_client_queues_abort(mode: Mode) -> None:
    server, client = serve(), ClientConnection("nope", mode=mode)
    with pytest.raises(OptionRefused) as refused:
        pump(server, client)
    expected = Option.GO if mode is Mode.GO else Option.INFO
    assert (refused.value.option, refused.value.reply) == (expected, Rep.ERR_UNKNOWN)
    assert "nope" in refused.value.message
    assert client.data_to_send() == option(Option.ABORT)
    assert not client.ready


def test_export_name_of_an_unknown_export_disconnects_without_a_reply() -> None:
    server = options_server()
    events = server.receive_data(option(Option.EXPORT_NAME, b"nope"))
    assert [type(e) for e in events] == [Disconnect]
    assert server.data_to_send() == b""
    assert server.closed


@pytest.mark.parametrize(
    ("client_flags", "zeroes"),
    [(CLIENT_DEFAULT_FLAGS, 0), (ClientFlag.FIXED_NEWSTYLE, EXPORT_NAME_ZEROES)],
)
def test_export_name_answers_size_and_flags_then_zeroes_unless_no_zeroes(
    client_flags: int, zeroes: int
) -> None:
    server = options_server(client_flags=client_flags)
    events = server.receive_data(option(Option.EXPORT_NAME, b"disk"))
    assert events == [Ready(export=DISK, structured=False, contexts={})]
    assert server.data_to_send() == EXPORT_NAME_REPLY.pack(SIZE, ALL_FLAGS) + bytes(zeroes)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_the_client_falls_back_to_export_name_when_go_is_unsupported(no_zeroes: bool) -> None:
    """An old server, built by hand: no structured replies, no GO, only EXPORT_NAME."""
    client = ClientConnection("disk", contexts=(BASE_ALLOCATION,))
    flags = HandshakeFlag.FIXED_NEWSTYLE | (HandshakeFlag.NO_ZEROES if no_zeroes else 0)
    assert client.receive_data(greeting(flags)) == []
    client_flags = ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0)
    assert client.data_to_send() == CLIENT_FLAGS.pack(client_flags) + option(
        Option.STRUCTURED_REPLY
    )
    assert client.receive_data(option_reply(Option.STRUCTURED_REPLY, Rep.ERR_UNSUP)) == []
    go = info_body("disk", Info.BLOCK_SIZE, Info.DESCRIPTION)
    assert client.data_to_send() == option(Option.GO, go)  # no SET_META_CONTEXT without it
    assert client.receive_data(option_reply(Option.GO, Rep.ERR_UNSUP, b"what is GO?")) == []
    assert client.data_to_send() == option(Option.EXPORT_NAME, b"disk")
    answer = EXPORT_NAME_REPLY.pack(SIZE, ALL_FLAGS) + bytes(0 if no_zeroes else EXPORT_NAME_ZEROES)
    assert client.receive_data(answer[:-1]) == []
    export = replace(DISK, description="", meta_contexts=())
    assert client.receive_data(answer[-1:]) == [Negotiated(export, False, {})]
    cookie = client.request(Cmd.READ, 0, 4)
    assert client.receive_data(simple(cookie, data=b"abcd")) == [Reply(cookie, 0, b"abcd")]


def test_the_client_refuses_transmission_flags_without_has_flags() -> None:
    client = ClientConnection("disk", structured=False)
    client.receive_data(greeting())
    client.receive_data(option_reply(Option.GO, Rep.ERR_UNSUP))
    with pytest.raises(RemoteProtocolError, match="HAS_FLAGS"):
        client.receive_data(EXPORT_NAME_REPLY.pack(SIZE, TF.SEND_FLUSH))


# ----- metadata contexts ---------------------------------------------------------------------


@pytest.mark.parametrize("opt", [Option.SET_META_CONTEXT, Option.LIST_META_CONTEXT])
def test_meta_contexts_need_structured_replies_first(opt: Option) -> None:
    replies = ask(options_server(), opt, meta_body("disk", BASE_ALLOCATION))[1]
    assert [r[:2] for r in replies] == [(opt, Rep.ERR_INVALID)]


@pytest.mark.parametrize(
    ("queries", "found"),
    [
        ((), [BASE_ALLOCATION]),
        (("base:",), [BASE_ALLOCATION]),
        ((BASE_ALLOCATION,), [BASE_ALLOCATION]),
        (("qemu:dirty-bitmap:x",), []),
    ],
)
def test_list_meta_context_lists_what_matches(queries: tuple[str, ...], found: list[str]) -> None:
    server = options_server()
    ask(server, Option.STRUCTURED_REPLY)
    replies = ask(server, Option.LIST_META_CONTEXT, meta_body("disk", *queries))[1]
    assert [(rep, data[4:]) for _, rep, data in replies] == [
        *[(Rep.META_CONTEXT, c.encode()) for c in found],
        (Rep.ACK, b""),
    ]


@pytest.mark.parametrize(
    ("body", "rep"),
    [
        (meta_body("nope", BASE_ALLOCATION), Rep.ERR_UNKNOWN),
        (meta_body("disk", BASE_ALLOCATION)[:-1], Rep.ERR_INVALID),
        (meta_body("disk") + b"x", Rep.ERR_INVALID),
        (string("disk") + U32.pack(5), Rep.ERR_INVALID),
    ],
)
def test_set_meta_context_refusals(body: bytes, rep: Rep) -> None:
    server = options_server()
    ask(server, Option.STRUCTURED_REPLY)
    replies = ask(server, Option.SET_META_CONTEXT, body)[1]
    assert [r[:2] for r in replies] == [(Option.SET_META_CONTEXT, rep)]


def test_set_meta_context_selects_base_allocation_for_go_on_the_same_export() -> None:
    server = options_server()
    ask(server, Option.STRUCTURED_REPLY)
    replies = ask(server, Option.SET_META_CONTEXT, meta_body("disk", BASE_ALLOCATION, "x:y"))[1]
    assert replies == [
        (Option.SET_META_CONTEXT, Rep.META_CONTEXT, U32.pack(1) + BASE_ALLOCATION.encode()),
        (Option.SET_META_CONTEXT, Rep.ACK, b""),
    ]
    events, _ = ask(server, Option.GO, info_body("disk", Info.BLOCK_SIZE))
    assert events == [Ready(export=DISK, structured=True, contexts={1: BASE_ALLOCATION})]


def test_contexts_set_for_another_export_do_not_carry_over_to_go() -> None:
    other = replace(DISK, name="other")
    server = options_server(DISK, other)
    ask(server, Option.STRUCTURED_REPLY)
    ask(server, Option.SET_META_CONTEXT, meta_body("other", BASE_ALLOCATION))
    events, _ = ask(server, Option.GO, info_body("disk", Info.BLOCK_SIZE))
    assert events == [Ready(export=DISK, structured=True, contexts={})]


def test_a_context_the_server_lacks_leaves_the_client_without_block_status() -> None:
    _, client, ready, negotiated = connect(
        replace(DISK, meta_contexts=()), contexts=(BASE_ALLOCATION,)
    )
    assert ready.contexts == negotiated.contexts == {}
    with pytest.raises(LocalProtocolError, match="metadata context"):
        client.request(Cmd.BLOCK_STATUS, 0, 512)


def test_the_client_rejects_a_context_it_did_not_ask_for() -> None:
    client = ClientConnection("disk", contexts=(BASE_ALLOCATION,))
    client.receive_data(greeting())
    client.receive_data(option_reply(Option.STRUCTURED_REPLY, Rep.ACK))
    bogus = option_reply(Option.SET_META_CONTEXT, Rep.META_CONTEXT, U32.pack(1) + b"qemu:x")
    with pytest.raises(RemoteProtocolError, match="not asked"):
        client.receive_data(bogus)


def test_the_client_goes_on_without_contexts_when_set_meta_context_is_refused() -> None:
    client = ClientConnection("disk", contexts=(BASE_ALLOCATION,))
    client.receive_data(greeting())
    client.receive_data(option_reply(Option.STRUCTURED_REPLY, Rep.ACK))
    client.data_to_send()
    assert client.receive_data(option_reply(Option.SET_META_CONTEXT, Rep.ERR_UNSUP)) == []
    assert client.data_to_send() == option(
        Option.GO, info_body("disk", Info.BLOCK_SIZE, Info.DESCRIPTION)
    )


# ----- STARTTLS ------------------------------------------------------------------------------


def test_starttls_on_a_server_without_tls_is_refused_by_policy() -> None:
    server, client = serve(), ClientConnection("disk", tls=True)
    with pytest.raises(OptionRefused) as refused:
        pump(server, client)
    assert (refused.value.option, refused.value.reply) == (Option.STARTTLS, Rep.ERR_POLICY)
    assert client.data_to_send() == option(Option.ABORT)


def test_starttls_when_allowed_stops_both_sides_until_tls_runs() -> None:
    server, client = serve(tls=TlsPolicy.ALLOWED), ClientConnection("disk", tls=True)
    server_events, client_events = pump(server, client)
    assert server_events == [ServerStartTls()]
    assert client_events == [ClientStartTls()]
    assert server.take_unparsed() == client.take_unparsed() == b""
    server.tls_started()
    client.tls_started()
    server_events, client_events = pump(server, client)
    assert server_events == [Ready(export=DISK, structured=True, contexts={})]
    assert [type(e) for e in client_events] == [Negotiated]


def test_a_plain_client_is_served_when_tls_is_only_allowed() -> None:
    server, client = serve(tls=TlsPolicy.ALLOWED), ClientConnection("disk")
    server_events, _ = pump(server, client)
    assert [type(e) for e in server_events] == [Ready]


def test_bytes_after_starttls_belong_to_the_tls_layer() -> None:
    server = options_server(tls=TlsPolicy.ALLOWED)
    hello = b"\x16\x03\x01\x02\x00client hello"
    assert server.receive_data(option(Option.STARTTLS) + hello[:5]) == [ServerStartTls()]
    assert server.receive_data(hello[5:]) == []
    assert option_replies(server.data_to_send()) == [(Option.STARTTLS, Rep.ACK, b"")]
    assert server.take_unparsed() == hello


def test_tls_started_resets_what_was_negotiated_before_tls() -> None:
    server = options_server(tls=TlsPolicy.ALLOWED)
    ask(server, Option.STRUCTURED_REPLY)
    ask(server, Option.SET_META_CONTEXT, meta_body("disk", BASE_ALLOCATION))
    assert ask(server, Option.STARTTLS)[0] == [ServerStartTls()]
    server.tls_started()
    again = ask(server, Option.STARTTLS)[1]
    assert [r[:2] for r in again] == [(Option.STARTTLS, Rep.ERR_INVALID)]
    events, _ = ask(server, Option.GO, info_body("disk", Info.BLOCK_SIZE))
    assert events == [Ready(export=DISK, structured=False, contexts={})]


def test_starttls_with_data_is_invalid() -> None:
    replies = ask(options_server(tls=TlsPolicy.ALLOWED), Option.STARTTLS, b"x")[1]
    assert [r[:2] for r in replies] == [(Option.STARTTLS, Rep.ERR_INVALID)]


@pytest.mark.parametrize(
    ("opt", "body"),
    [
        (Option.GO, info_body("disk")),
        (Option.INFO, info_body("disk")),
        (Option.LIST, b""),
        (Option.STRUCTURED_REPLY, b""),
        (Option.SET_META_CONTEXT, meta_body("disk")),
        (99, b""),
    ],
)
def test_tls_required_refuses_options_before_tls(opt: int, body: bytes) -> None:
    events, replies = ask(options_server(tls=TlsPolicy.REQUIRED), opt, body)
    assert events == []
    assert [r[:2] for r in replies] == [(opt, Rep.ERR_TLS_REQD)]


def test_tls_required_drops_export_name_before_tls() -> None:
    server = options_server(tls=TlsPolicy.REQUIRED)
    events = server.receive_data(option(Option.EXPORT_NAME, b"disk"))
    assert [type(e) for e in events] == [Disconnect]
    assert server.data_to_send() == b""


def test_tls_required_still_lets_a_client_abort() -> None:
    events, replies = ask(options_server(tls=TlsPolicy.REQUIRED), Option.ABORT)
    assert [type(e) for e in events] == [Disconnect]
    assert replies == [(Option.ABORT, Rep.ACK, b"")]


def test_tls_required_serves_once_tls_runs() -> None:
    server = options_server(tls=TlsPolicy.REQUIRED)
    assert ask(server, Option.STARTTLS)[0] == [ServerStartTls()]
    server.tls_started()
    events, _ = ask(server, Option.GO, info_body("disk"))
    assert [type(e) for e in events] == [Ready]


def test_a_plain_client_meets_tls_required_with_a_refusal() -> None:
    server, client = serve(tls=TlsPolicy.REQUIRED), ClientConnection("disk")
    with pytest.raises(OptionRefused) as refused:
        pump(server, client)
    assert refused.value.reply == Rep.ERR_TLS_REQD
    assert client.data_to_send() == option(Option.ABORT)


def test_the_client_sends_its_next_option_only_after_tls_started() -> None:
    client = ClientConnection("disk", tls=True)
    client.receive_data(greeting())
    assert client.data_to_send() == U32.pack(3) + option(Option.STARTTLS)
    assert client.receive_data(option_reply(Option.STARTTLS, Rep.ACK)) == [ClientStartTls()]
    assert client.data_to_send() == b""
    client.tls_started()
    assert client.data_to_send() == option(Option.STRUCTURED_REPLY)


def test_tls_started_without_starttls_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        options_server(tls=TlsPolicy.ALLOWED).tls_started()
    with pytest.raises(LocalProtocolError):
        ClientConnection("disk", tls=True).tls_started()


# ===== transmission ==========================================================================

FUA = CmdFlag.FUA


@pytest.mark.parametrize("structured", [True, False])
def test_read_and_write_round_trip_with_fua(structured: bool) -> None:
    server, client, _, _ = connect(structured=structured)
    write = client.request(Cmd.WRITE, 4096, 5, data=b"hello", flags=FUA)
    read = client.request(Cmd.READ, 4096, 5, flags=FUA)
    assert server.receive_data(client.data_to_send()) == [
        Request(write, Cmd.WRITE, FUA, 4096, 5, b"hello"),
        Request(read, Cmd.READ, FUA, 4096, 5),
    ]
    server.reply_read(read, b"hello")  # out of order
    server.reply(write)
    assert client.receive_data(server.data_to_send()) == [Reply(read, 0, b"hello"), Reply(write, 0)]
    assert client.in_flight == server.in_flight == 0


@pytest.mark.parametrize(
    ("command", "offset", "length"),
    [
        (Cmd.FLUSH, 0, 0),
        (Cmd.TRIM, 0, 65536),
        (Cmd.CACHE, 512, 4096),
        (Cmd.WRITE_ZEROES, SIZE - 4096, 4096),
    ],
)
def test_commands_without_payload_round_trip_with_fua(
    command: Cmd, offset: int, length: int
) -> None:
    server, client, _, _ = connect()
    cookie = client.request(command, offset, length, flags=FUA)
    assert server.receive_data(client.data_to_send()) == [
        Request(cookie, command, FUA, offset, length)
    ]
    server.reply(cookie)
    assert client.receive_data(server.data_to_send()) == [Reply(cookie, 0)]


def test_write_zeroes_passes_no_hole_and_fast_zero_through() -> None:
    server, client, _, _ = connect(replace(DISK, flags=ALL_FLAGS | TF.SEND_FAST_ZERO))
    flags = CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO | FUA
    cookie = client.request(Cmd.WRITE_ZEROES, 0, 4096, flags=flags)
    assert server.receive_data(client.data_to_send()) == [
        Request(cookie, Cmd.WRITE_ZEROES, flags, 0, 4096)
    ]


def test_block_status_round_trips_per_context_with_fua_and_req_one() -> None:
    server, client, _, _ = connect(contexts=(BASE_ALLOCATION,))
    flags = FUA | CmdFlag.REQ_ONE
    cookie = client.request(Cmd.BLOCK_STATUS, 0, 8192, flags=flags)
    assert server.receive_data(client.data_to_send()) == [
        Request(cookie, Cmd.BLOCK_STATUS, flags, 0, 8192)
    ]
    server.reply_block_status(cookie, {1: [(4096, STATE_ZERO)]})
    assert client.receive_data(server.data_to_send()) == [
        Reply(cookie, 0, extents={1: [(4096, STATE_ZERO)]})
    ]


def test_a_zero_length_structured_read_is_answered_with_a_none_chunk() -> None:
    server, client, _, _ = connect()
    cookie = client.request(Cmd.READ, 0, 0)
    server.receive_data(client.data_to_send())
    server.reply_read(cookie, b"")
    raw = server.data_to_send()
    assert chunks(raw) == [(ReplyFlag.DONE, ReplyType.NONE, cookie, b"")]
    assert client.receive_data(raw) == [Reply(cookie, 0, b"")]


@pytest.mark.parametrize(("structured", "message"), [(True, "disk on fire"), (False, "")])
def test_reply_error_reaches_the_client_with_its_message_when_structured(
    structured: bool, message: str
) -> None:
    server, client, _, _ = connect(structured=structured)
    cookie = client.request(Cmd.READ, 0, 512)
    server.receive_data(client.data_to_send())
    server.reply_error(cookie, Errno.EIO, "disk on fire")
    assert client.receive_data(server.data_to_send()) == [Reply(cookie, Errno.EIO, message=message)]


def test_disc_ends_the_session_on_both_sides() -> None:
    server, client, _, _ = connect()
    client.request(Cmd.DISC)
    assert client.data_to_send() == request(Cmd.DISC, cookie=1)
    assert server.receive_data(request(Cmd.DISC)) == [
        Disconnect("client disconnected (NBD_CMD_DISC)")
    ]
    assert server.closed
    assert server.receive_data(request(Cmd.READ, 0, 512, cookie=2)) == []
    with pytest.raises(LocalProtocolError):
        client.request(Cmd.READ, 0, 512)


# ----- server refusals: answered by the codec, never reaching the caller ---------------------

S = SIZE
BA = (BASE_ALLOCATION,)
NO_FUA = replace(DISK, flags=ALL_FLAGS & ~TF.SEND_FUA)
REFUSALS = [
    # (export, contexts, command, flags, offset, length, errno)
    pytest.param(DISK, (), Cmd.WRITE, 0, S - 512, 1024, Errno.ENOSPC, id="write-beyond-end"),
    pytest.param(DISK, (), Cmd.READ, 0, S - 512, 1024, Errno.EINVAL, id="read-beyond-end"),
    pytest.param(DISK, (), Cmd.READ, 0, S, 1, Errno.EINVAL, id="read-past-end"),
    pytest.param(DISK, (), Cmd.TRIM, 0, S - 512, 1024, Errno.EINVAL, id="trim-beyond-end"),
    pytest.param(DISK, (), Cmd.CACHE, 0, 0, S + 1, Errno.EINVAL, id="cache-beyond-end"),
    pytest.param(DISK, BA, Cmd.BLOCK_STATUS, 0, S, 512, Errno.EINVAL, id="status-beyond-end"),
    pytest.param(DISK, (), Cmd.READ, 0, 2**64 - 1, 512, Errno.EINVAL, id="read-offset-huge"),
    pytest.param(STRICT, (), Cmd.READ, 0, 100, 512, Errno.EINVAL, id="read-misaligned"),
    pytest.param(STRICT, (), Cmd.WRITE, 0, 0, 100, Errno.EINVAL, id="write-misaligned"),
    pytest.param(STRICT, (), Cmd.TRIM, 0, 512, 1000, Errno.EINVAL, id="trim-misaligned"),
    pytest.param(STRICT, (), Cmd.WRITE_ZEROES, 0, 256, 512, Errno.EINVAL, id="zeroes-misaligned"),
    pytest.param(STRICT, (), Cmd.CACHE, 0, 1, 511, Errno.EINVAL, id="cache-misaligned"),
    pytest.param(STRICT, BA, Cmd.BLOCK_STATUS, 0, 0, 100, Errno.EINVAL, id="status-misaligned"),
    pytest.param(STRICT, (), Cmd.READ, 0, 0, 128 * 1024, Errno.EINVAL, id="read-over-payload"),
    pytest.param(STRICT, (), Cmd.WRITE, 0, 0, 128 * 1024, Errno.EINVAL, id="write-over-payload"),
    pytest.param(READ_ONLY, (), Cmd.WRITE, 0, 0, 512, Errno.EPERM, id="write-read-only"),
    pytest.param(READ_ONLY, (), Cmd.TRIM, 0, 0, 512, Errno.EPERM, id="trim-read-only"),
    pytest.param(READ_ONLY, (), Cmd.WRITE_ZEROES, 0, 0, 512, Errno.EPERM, id="zeroes-read-only"),
    pytest.param(BARE, (), Cmd.FLUSH, 0, 0, 0, Errno.EINVAL, id="flush-not-advertised"),
    pytest.param(BARE, (), Cmd.TRIM, 0, 0, 512, Errno.EINVAL, id="trim-not-advertised"),
    pytest.param(BARE, (), Cmd.CACHE, 0, 0, 512, Errno.EINVAL, id="cache-not-advertised"),
    pytest.param(BARE, (), Cmd.WRITE_ZEROES, 0, 0, 512, Errno.EINVAL, id="zeroes-not-advertised"),
    pytest.param(DISK, (), Cmd.READ, CmdFlag.NO_HOLE, 0, 512, Errno.EINVAL, id="read-no-hole"),
    pytest.param(DISK, (), Cmd.WRITE, CmdFlag.DF, 0, 512, Errno.EINVAL, id="write-df"),
    pytest.param(DISK, (), Cmd.FLUSH, CmdFlag.REQ_ONE, 0, 0, Errno.EINVAL, id="flush-req-one"),
    pytest.param(DISK, (), Cmd.TRIM, CmdFlag.FAST_ZERO, 0, 512, Errno.EINVAL, id="trim-fast-zero"),
    pytest.param(DISK, BA, Cmd.BLOCK_STATUS, CmdFlag.DF, 0, 512, Errno.EINVAL, id="status-df"),
    pytest.param(NO_FUA, (), Cmd.WRITE, FUA, 0, 512, Errno.EINVAL, id="write-fua-not-offered"),
    pytest.param(NO_FUA, (), Cmd.FLUSH, FUA, 0, 0, Errno.EINVAL, id="flush-fua-not-offered"),
    pytest.param(DISK, (), Cmd.READ, CmdFlag.DF, 0, 512, Errno.EINVAL, id="read-df-not-offered"),
    pytest.param(
        DISK,
        (),
        Cmd.WRITE_ZEROES,
        CmdFlag.FAST_ZERO,
        0,
        512,
        Errno.EINVAL,
        id="fast-zero-not-offered",
    ),
    pytest.param(DISK, (), Cmd.BLOCK_STATUS, 0, 0, 512, Errno.EINVAL, id="status-no-context"),
    pytest.param(DISK, (), 8, 0, 0, 512, Errno.EINVAL, id="resize-unknown-command"),
    pytest.param(DISK, (), 0xFFFF, 0, 0, 512, Errno.EINVAL, id="unknown-command"),
]


@pytest.mark.parametrize(
    ("export", "contexts", "command", "flags", "offset", "length", "errno"), REFUSALS
)
def test_a_bad_request_is_refused_with_the_errno_the_spec_names(
    export: ExportInfo,
    contexts: tuple[str, ...],
    command: int,
    flags: int,
    offset: int,
    length: int,
    errno: Errno,
) -> None:
    server = transmission_server(export, structured=True, contexts=contexts)
    payload = bytes(length) if command == Cmd.WRITE else b""
    events = server.receive_data(
        request(command, offset, length, flags=flags, cookie=5, data=payload)
    )
    assert [(type(e), e.cookie, e.command, e.error) for e in events] == [
        (Refused, 5, command, errno)
    ]
    [(done, kind, cookie, body)] = chunks(server.data_to_send())
    assert (done, kind, cookie) == (ReplyFlag.DONE, ReplyType.ERROR, 5)
    assert ERROR_CHUNK.unpack_from(body)[0] == errno
    assert server.in_flight == 0


@pytest.mark.parametrize(
    ("export", "contexts", "command", "flags", "offset", "length", "errno"),
    [p for p in REFUSALS if not p.values[1]],  # contexts need structured replies
)
def test_without_structured_replies_a_refusal_is_a_simple_reply(
    export: ExportInfo,
    contexts: tuple[str, ...],
    command: int,
    flags: int,
    offset: int,
    length: int,
    errno: Errno,
) -> None:
    server = transmission_server(export)
    payload = bytes(length) if command == Cmd.WRITE else b""
    events = server.receive_data(
        request(command, offset, length, flags=flags, cookie=5, data=payload)
    )
    assert [(type(e), e.error) for e in events] == [(Refused, errno)]
    assert server.data_to_send() == simple(5, errno)


def test_a_refused_read_reaches_the_client_as_an_error_chunk_with_the_reason() -> None:
    server, client, _, _ = connect()
    cookie = client.request(Cmd.READ, 0, 512, flags=CmdFlag.NO_HOLE)  # the client lets it by
    [refused] = server.receive_data(client.data_to_send())
    assert isinstance(refused, Refused)
    raw = server.data_to_send()
    message = refused.reason.encode()
    assert raw == chunk(
        cookie, ReplyType.ERROR, ERROR_CHUNK.pack(Errno.EINVAL, len(message)) + message
    )
    assert client.receive_data(raw) == [Reply(cookie, Errno.EINVAL, message=refused.reason)]


def test_a_refused_read_without_structured_replies_carries_no_payload() -> None:
    server, client, _, _ = connect(structured=False)
    cookie = client.request(Cmd.READ, 0, 512, flags=CmdFlag.NO_HOLE)
    server.receive_data(client.data_to_send())
    raw = server.data_to_send()
    assert raw == simple(cookie, Errno.EINVAL)
    assert client.receive_data(raw) == [Reply(cookie, Errno.EINVAL)]


def test_a_refused_write_still_consumes_its_payload() -> None:
    server = transmission_server(STRICT)
    trap = request(Cmd.READ, 0, 512, cookie=99)  # looks like a request, but is write data
    payload = (trap * 40)[:1000]
    events = server.receive_data(
        request(Cmd.WRITE, S - 512, 1000, cookie=1, data=payload)
        + request(Cmd.READ, 0, 512, cookie=2)
    )
    assert [type(e) for e in events] == [Refused, Request]
    assert events[1] == Request(2, Cmd.READ, 0, 0, 512)


def test_a_refused_cookie_may_be_used_again() -> None:
    server = transmission_server()
    events = server.receive_data(
        request(Cmd.READ, S, 512, cookie=1) + request(Cmd.READ, 0, 512, cookie=1)
    )
    assert [type(e) for e in events] == [Refused, Request]


# ----- hostile clients -----------------------------------------------------------------------


def test_a_request_with_bad_magic_is_a_remote_error() -> None:
    server = transmission_server()
    with pytest.raises(RemoteProtocolError, match="magic"):
        server.receive_data(b"\x25\x60\x95\x14" + request(Cmd.READ, 0, 512)[4:])


def test_a_write_over_32_mib_is_a_remote_error_before_its_payload() -> None:
    server = transmission_server()
    with pytest.raises(RemoteProtocolError, match="too large"):
        server.receive_data(request(Cmd.WRITE, 0, MAX_PAYLOAD_BYTES + 1))


def test_a_write_of_32_mib_waits_for_its_payload() -> None:
    server = transmission_server(replace(DISK, size=64 * MIB))
    assert server.receive_data(request(Cmd.WRITE, 0, MAX_PAYLOAD_BYTES) + bytes(1000)) == []


def test_an_option_over_64_kib_is_a_remote_error_before_its_data() -> None:
    server = options_server()
    assert server.receive_data(OPTION_HEADER.pack(IHAVEOPT, 99, MAX_OPTION_BYTES)) == []
    server = options_server()
    with pytest.raises(RemoteProtocolError, match="too large"):
        server.receive_data(OPTION_HEADER.pack(IHAVEOPT, 99, MAX_OPTION_BYTES + 1))


def test_an_option_with_bad_magic_is_a_remote_error() -> None:
    server = options_server()
    with pytest.raises(RemoteProtocolError, match="magic"):
        server.receive_data(b"IHAVEOPX" + option(Option.LIST)[8:])


def test_more_than_1024_options_is_a_remote_error() -> None:
    server = options_server()
    server.receive_data(option(Option.LIST) * MAX_OPTIONS)
    assert len(option_replies(server.data_to_send())) == 2 * MAX_OPTIONS  # SERVER + ACK each
    with pytest.raises(RemoteProtocolError, match="1024"):
        server.receive_data(option(Option.LIST))


def test_a_cookie_already_in_flight_is_a_remote_error() -> None:
    server = transmission_server()
    server.receive_data(request(Cmd.READ, 0, 512, cookie=7))
    with pytest.raises(RemoteProtocolError, match="in flight"):
        server.receive_data(request(Cmd.FLUSH, cookie=7))


def test_unknown_client_flags_are_a_remote_error() -> None:
    # Fixed: "the server MUST drop the TCP connection if the client sets an unknown flag", but
    # ServerConnection accepts any client flags: _KNOWN_CLIENT_FLAGS is a ClientFlag holding
    # every member, and IntFlag's ~ only complements within the members, so
    # ``flags & ~_KNOWN_CLIENT_FLAGS`` is always 0 (~ gives 0x0, not 0xfffffffc).
    server = serve()
    with pytest.raises(RemoteProtocolError, match="client flags"):
        server.receive_data(CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | 1 << 2))


# ----- hostile servers -----------------------------------------------------------------------


def read_in_flight(
    length: int = 4096, offset: int = 8192, **options: Any
) -> tuple[ClientConnection, int]:
    client = with_requests(**options)
    cookie = client.request(Cmd.READ, offset, length)
    client.data_to_send()
    return client, cookie


@pytest.mark.parametrize("reply", [simple(77), chunk(77, ReplyType.NONE)])
def test_a_reply_to_a_cookie_not_in_flight_is_a_remote_error(reply: bytes) -> None:
    client, _ = read_in_flight()
    with pytest.raises(RemoteProtocolError, match="not in flight"):
        client.receive_data(reply)


def test_a_simple_reply_to_a_read_with_structured_replies_on_is_a_remote_error() -> None:
    client, cookie = read_in_flight()
    with pytest.raises(RemoteProtocolError, match="simple reply"):
        client.receive_data(simple(cookie, data=bytes(4096)))


def test_a_structured_chunk_without_structured_replies_is_a_remote_error() -> None:
    client, cookie = read_in_flight(structured=False)
    with pytest.raises(RemoteProtocolError, match="magic"):
        client.receive_data(data_chunk(cookie, 8192, bytes(4096)))


@pytest.mark.parametrize(
    "reply",
    [
        data_chunk(1, 8191, bytes(10)),
        data_chunk(1, 8192 + 4090, bytes(10)),
        hole_chunk(1, 8192 + 4096, 1),
        hole_chunk(1, 0, 512),
        hole_chunk(1, 8192, 0),
    ],
    ids=["data-before", "data-after", "hole-after", "hole-before", "hole-empty"],
)
def test_a_read_chunk_outside_the_request_is_a_remote_error(reply: bytes) -> None:
    client, _ = read_in_flight()
    with pytest.raises(RemoteProtocolError):
        client.receive_data(reply)


@pytest.mark.parametrize("kind", [3, 4, 6, 0x7FFF])
def test_an_unknown_chunk_type_is_a_remote_error(kind: int) -> None:
    client, cookie = read_in_flight()
    with pytest.raises(RemoteProtocolError, match="unknown type"):
        client.receive_data(chunk(cookie, kind, b"\x00" * 8))


def test_an_error_chunk_gives_the_error_and_its_message() -> None:
    client, cookie = read_in_flight()
    assert client.receive_data(error_chunk(cookie, Errno.EIO, "bad sector")) == [
        Reply(cookie, Errno.EIO, message="bad sector")
    ]


def test_an_error_offset_chunk_after_data_gives_the_error() -> None:
    client, cookie = read_in_flight()
    raw = ERROR_CHUNK.pack(Errno.EIO, 3) + b"bad" + U64.pack(8192 + 512)
    events = client.receive_data(
        data_chunk(cookie, 8192, bytes(512), done=False)
        + chunk(cookie, ReplyType.ERROR_OFFSET, raw)
    )
    assert events == [Reply(cookie, Errno.EIO, message="bad")]


@pytest.mark.parametrize(("kind", "error"), [(ReplyType.ERROR, 0), ((1 << 15) + 9, Errno.EIO)])
def test_an_error_chunk_of_unknown_type_or_error_zero_counts_as_einval(
    kind: int, error: int
) -> None:
    client, cookie = read_in_flight()
    assert client.receive_data(error_chunk(cookie, error, "odd", kind)) == [
        Reply(cookie, Errno.EINVAL, message="odd")
    ]


def test_an_error_chunk_whose_message_overruns_it_is_a_remote_error() -> None:
    client, cookie = read_in_flight()
    with pytest.raises(RemoteProtocolError, match="beyond"):
        client.receive_data(chunk(cookie, ReplyType.ERROR, ERROR_CHUNK.pack(5, 10) + b"short"))


def test_a_hole_chunk_reads_as_zeroes() -> None:
    client, cookie = read_in_flight()
    assert client.receive_data(hole_chunk(cookie, 8192, 4096)) == [Reply(cookie, 0, bytes(4096))]


def test_a_read_assembles_data_and_hole_chunks_in_any_order() -> None:
    client, cookie = read_in_flight(length=12)
    raw = (
        data_chunk(cookie, 8192 + 8, b"tail", done=False)
        + hole_chunk(cookie, 8192 + 4, 4, done=False)
        + data_chunk(cookie, 8192, b"head", done=False)
        + chunk(cookie, ReplyType.NONE)
    )
    for i in range(len(raw) - 1):  # the reply split anywhere gives the same read
        client, cookie = read_in_flight(length=12)
        events = client.receive_data(raw[:i]) + client.receive_data(raw[i:])
        assert events == [Reply(cookie, 0, b"head\0\0\0\0tail")]


def test_chunks_of_other_requests_may_interleave() -> None:
    client = with_requests()
    a = client.request(Cmd.READ, 0, 8)
    b = client.request(Cmd.READ, 8, 8)
    events = client.receive_data(
        data_chunk(a, 0, b"aaaa", done=False)
        + data_chunk(b, 8, b"bbbbbbbb")
        + data_chunk(a, 4, b"AAAA")
    )
    assert events == [Reply(b, 0, b"bbbbbbbb"), Reply(a, 0, b"aaaaAAAA")]


def test_a_simple_success_to_block_status_is_a_remote_error() -> None:
    client = with_requests(contexts=(BASE_ALLOCATION,))
    cookie = client.request(Cmd.BLOCK_STATUS, 0, 512)
    with pytest.raises(RemoteProtocolError, match="BLOCK_STATUS"):
        client.receive_data(simple(cookie))


@pytest.mark.parametrize(
    "payload",
    [
        U32.pack(2) + EXTENT.pack(512, 0),
        U32.pack(1) + EXTENT.pack(0, 0),
        U32.pack(1) + EXTENT.pack(512, 0)[:-1],
        U32.pack(1),
    ],
    ids=["unknown-context", "empty-extent", "ragged", "no-extent"],
)
def test_a_bad_block_status_chunk_is_a_remote_error(payload: bytes) -> None:
    client = with_requests(contexts=(BASE_ALLOCATION,))
    cookie = client.request(Cmd.BLOCK_STATUS, 0, 512)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(chunk(cookie, ReplyType.BLOCK_STATUS, payload))


def test_a_block_status_reply_without_its_context_is_a_remote_error() -> None:
    client = with_requests(contexts=(BASE_ALLOCATION,))
    cookie = client.request(Cmd.BLOCK_STATUS, 0, 512)
    with pytest.raises(RemoteProtocolError, match="misses a context"):
        client.receive_data(chunk(cookie, ReplyType.NONE))


def test_a_data_chunk_to_a_write_is_a_remote_error() -> None:
    client = with_requests()
    cookie = client.request(Cmd.WRITE, 0, 4, data=b"abcd")
    with pytest.raises(RemoteProtocolError, match="no read"):
        client.receive_data(data_chunk(cookie, 0, b"abcd"))


@pytest.mark.parametrize(
    "raw",
    [
        b"NBDMAGIX" + b"IHAVEOPT\x00\x03",
        b"NBDMAGIC" + bytes.fromhex("0000420281861253") + b"\0\0",
        greeting(HandshakeFlag.NO_ZEROES),
    ],
    ids=["bad-magic", "oldstyle", "not-fixed-newstyle"],
)
def test_a_bad_greeting_is_a_remote_error(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        ClientConnection("disk").receive_data(raw)


@pytest.mark.parametrize(
    "reply",
    [
        option_reply(Option.STRUCTURED_REPLY, Rep.ACK)[:7]
        + b"\x00"
        + option_reply(Option.STRUCTURED_REPLY, Rep.ACK)[8:],
        option_reply(Option.GO, Rep.ACK),
        option_reply(Option.STRUCTURED_REPLY, Rep.SERVER),
        OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, Option.STRUCTURED_REPLY, Rep.ACK, 1 << 21),
    ],
    ids=["bad-magic", "not-asked", "unexpected-type", "too-large"],
)
def test_a_bad_option_reply_is_a_remote_error(reply: bytes) -> None:
    client = ClientConnection("disk")
    client.receive_data(greeting())
    with pytest.raises(RemoteProtocolError):
        client.receive_data(reply)


@pytest.mark.parametrize(
    "info",
    [
        INFO_EXPORT.pack(Info.EXPORT, SIZE, ALL_FLAGS)[:-1],
        INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 3, 4096, 65536),
        INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 1, 4096, 1024),
        b"\x00",
        INFO_EXPORT.pack(Info.EXPORT, 2**63, ALL_FLAGS),
    ],
    ids=["export-short", "min-not-power-of-2", "max-below-preferred", "short", "size-too-big"],
)
def test_a_bad_info_reply_is_a_remote_error(info: bytes) -> None:
    client = ClientConnection("disk", structured=False)
    client.receive_data(greeting())
    with pytest.raises(RemoteProtocolError):
        client.receive_data(
            option_reply(Option.GO, Rep.INFO, info) + option_reply(Option.GO, Rep.ACK)
        )


def test_go_acked_without_info_export_is_a_remote_error() -> None:
    client = ClientConnection("disk", structured=False)
    client.receive_data(greeting())
    with pytest.raises(RemoteProtocolError, match="NBD_INFO_EXPORT"):
        client.receive_data(option_reply(Option.GO, Rep.ACK))


# ----- local errors: the caller's bugs, nothing sent -----------------------------------------


def test_a_request_before_the_handshake_is_a_local_error() -> None:
    client = ClientConnection("disk")
    with pytest.raises(LocalProtocolError, match="handshake"):
        client.request(Cmd.READ, 0, 512)
    client.receive_data(greeting())
    client.data_to_send()
    with pytest.raises(LocalProtocolError, match="handshake"):
        client.request(Cmd.READ, 0, 512)
    assert client.data_to_send() == b""


@pytest.mark.parametrize(
    ("export", "command", "offset", "length", "data", "match"),
    [
        (DISK, Cmd.READ, S - 511, 512, b"", "beyond"),
        (DISK, Cmd.WRITE, S, 1, b"x", "beyond"),
        (DISK, Cmd.TRIM, -512, 512, b"", "beyond"),
        (STRICT, Cmd.READ, 100, 512, b"", "aligned"),
        (STRICT, Cmd.WRITE_ZEROES, 0, 1000, b"", "aligned"),
        (STRICT, Cmd.READ, 0, 128 * 1024, b"", "larger"),
        (READ_ONLY, Cmd.WRITE, 0, 1, b"x", "read-only"),
        (READ_ONLY, Cmd.TRIM, 0, 512, b"", "read-only"),
        (READ_ONLY, Cmd.WRITE_ZEROES, 0, 512, b"", "read-only"),
        (DISK, Cmd.WRITE, 0, 4, b"abc", "exactly"),
        (DISK, Cmd.READ, 0, 3, b"abc", "carries no data"),
        (BARE, Cmd.FLUSH, 0, 0, b"", "does not support"),
        (BARE, Cmd.CACHE, 0, 512, b"", "does not support"),
        (DISK, Cmd.BLOCK_STATUS, 0, 512, b"", "metadata context"),
    ],
)
def test_a_request_the_export_does_not_allow_is_a_local_error(
    export: ExportInfo, command: Cmd, offset: int, length: int, data: bytes, match: str
) -> None:
    client = with_requests(export)
    with pytest.raises(LocalProtocolError, match=match):
        client.request(command, offset, length, data=data)
    assert client.data_to_send() == b""
    assert client.in_flight == 0


def test_fua_not_offered_is_a_local_error() -> None:
    client = with_requests(NO_FUA)
    with pytest.raises(LocalProtocolError, match="FUA"):
        client.request(Cmd.WRITE, 0, 1, data=b"x", flags=FUA)


def test_a_cookie_already_in_flight_is_a_local_error() -> None:
    client = with_requests()
    client.request(Cmd.READ, 0, 1, cookie=5)
    client.data_to_send()
    with pytest.raises(LocalProtocolError, match="in flight"):
        client.request(Cmd.READ, 0, 1, cookie=5)
    assert client.data_to_send() == b""


def test_server_replies_that_do_not_fit_the_request_are_local_errors() -> None:
    server = transmission_server(structured=True, contexts=(BASE_ALLOCATION,))
    server.receive_data(
        request(Cmd.READ, 0, 8, cookie=1)
        + request(Cmd.READ, 0, 8, cookie=2)
        + request(Cmd.BLOCK_STATUS, 0, 8, cookie=3)
        + request(Cmd.BLOCK_STATUS, 0, 8, cookie=4)
    )
    with pytest.raises(LocalProtocolError, match="not in flight"):
        server.reply(5)
    with pytest.raises(LocalProtocolError, match="read reply of 5 bytes"):
        server.reply_read(1, b"short")
    with pytest.raises(LocalProtocolError, match="needs reply_read"):
        server.reply(2)
    with pytest.raises(LocalProtocolError, match="every negotiated context"):
        server.reply_block_status(3, {})
    with pytest.raises(LocalProtocolError, match="nonzero extents"):
        server.reply_block_status(4, {1: [(0, 0)]})
    assert server.data_to_send() == b""


def test_reply_error_with_error_zero_is_a_local_error() -> None:
    server = transmission_server()
    server.receive_data(request(Cmd.FLUSH, cookie=1))
    with pytest.raises(LocalProtocolError):
        server.reply_error(1, 0)


# ===== regressions: codec bugs these tests found (each failed before its fix) ================


@pytest.mark.parametrize("mode", [Mode.LIST, Mode.INFO])
def test_the_servers_ack_to_abort_ends_a_list_or_info_session_quietly(mode: Mode) -> None:
    # Fixed: the spec says "NBD_OPT_ABORT: ... The server MUST reply with NBD_REP_ACK" (and our own
    # ServerConnection does), but ClientConnection enters DONE when it queues the ABORT and then
    # raises RemoteProtocolError("NBD server sent data after the session ended") on that ACK.
    # LIST and INFO therefore never finish cleanly, not even against our own server.
    server, client = serve(), ClientConnection("disk", mode=mode)
    server_events, client_events = pump(server, client)
    assert [type(e) for e in client_events] == [Listed if mode is Mode.LIST else Described]
    assert [type(e) for e in server_events] == [Disconnect]


def test_the_servers_ack_to_abort_after_a_refused_option_is_not_an_error() -> None:
    # Fixed: same as above after OptionRefused: the client queues ABORT, the server ACKs it as the
    # spec demands, and feeding that ACK raises RemoteProtocolError.
    server, client = serve(), ClientConnection("nope")
    with pytest.raises(OptionRefused):
        pump(server, client)
    server.receive_data(client.data_to_send())
    assert client.receive_data(server.data_to_send()) == []


def test_replies_to_requests_outstanding_at_disc_are_still_taken() -> None:
    # Fixed: "NBD_CMD_DISC: The server MUST handle all outstanding requests" before closing, so
    # their replies may follow the DISC; ClientConnection goes DONE on request(Cmd.DISC) and
    # raises RemoteProtocolError on the reply to a READ that was in flight.
    server, client, _, _ = connect()
    cookie = client.request(Cmd.READ, 0, 4)
    client.request(Cmd.DISC)
    server_events = server.receive_data(client.data_to_send())
    assert [type(e) for e in server_events] == [Request, Disconnect]
    server.reply_read(cookie, b"data")
    assert client.receive_data(server.data_to_send()) == [Reply(cookie, 0, b"data")]


def test_send_df_is_not_advertised_without_structured_replies() -> None:
    # Fixed: "NBD_FLAG_SEND_DF ... MUST leave this flag clear if structured replies have not been
    # negotiated." ServerConnection passes export.flags through unchanged in NBD_INFO_EXPORT
    # (and in the NBD_OPT_EXPORT_NAME reply), so a simple-reply client is offered DF (flags
    # 0x4ed here) and the server then accepts READ with NBD_CMD_FLAG_DF.
    export = replace(DISK, flags=ALL_FLAGS | TF.SEND_DF)
    _, _, _, negotiated = connect(export, structured=False)
    assert not negotiated.export.flags & TF.SEND_DF


def test_flush_with_nonzero_offset_or_length_never_reaches_the_caller_out_of_bounds() -> None:
    # Fixed: "For a flush request, length and offset are reserved, and MUST be set to all-zero."
    # ServerConnection skips the bounds for FLUSH (``command != _FLUSH`` on the fast path of
    # _transmission_step, an early return in _check), so REQUEST(FLUSH, offset=2**62,
    # length=2**31) becomes Request(FLUSH, offset=2**62, length=2**31): a Request outside the
    # export. Expected: refused (EINVAL) or normalised, never past the end.
    server = transmission_server()
    events = server.receive_data(request(Cmd.FLUSH, 1 << 62, 1 << 31, cookie=9))
    for event in events:
        if isinstance(event, Request):
            assert event.offset + event.length <= SIZE


def test_the_client_does_not_send_flush_with_nonzero_offset_or_length() -> None:
    # Fixed: ClientConnection._check returns early for FLUSH/DISC, so request(Cmd.FLUSH, 5, 7) puts
    # offset 5 and length 7 on the wire although the spec says they MUST be zero.
    client = with_requests()
    with pytest.raises(LocalProtocolError):
        client.request(Cmd.FLUSH, 5, 7)


def test_write_zeroes_beyond_the_end_is_enospc() -> None:
    # Fixed: "The server SHOULD return NBD_ENOSPC if it receives a write zeroes request including
    # one or more sectors beyond the size of the device" (proto.md, NBD_CMD_WRITE_ZEROES);
    # ServerConnection answers EINVAL (only WRITE gets ENOSPC).
    server = transmission_server()
    [refused] = server.receive_data(request(Cmd.WRITE_ZEROES, S - 512, 1024))
    assert isinstance(refused, Refused)
    assert refused.error == Errno.ENOSPC


@pytest.mark.parametrize(
    ("command", "offset", "length"), [(Cmd.TRIM, 0, 1 << 32), (Cmd.FLUSH, -1, 0)]
)
def test_a_request_that_does_not_fit_the_header_is_a_local_error(
    command: Cmd, offset: int, length: int
) -> None:
    # Fixed: a length of 2**32 or more (fine for TRIM/WRITE_ZEROES on an 8 GiB export: no
    # max_payload check applies) or a negative FLUSH offset escapes ClientConnection._check and
    # REQUEST.pack raises struct.error instead of LocalProtocolError.
    client = with_requests(replace(DISK, size=8 << 30))
    with pytest.raises(LocalProtocolError):
        client.request(command, offset, length)


def test_unknown_command_flags_are_refused_einval() -> None:
    # Fixed: "The server SHOULD return NBD_EINVAL if it receives an unknown command flag". The
    # fast path's int mask sends such a request to _check, but _check tests
    # ``flags & ~ALLOWED_FLAGS[cmd]`` and IntFlag's ~ only complements within CmdFlag's five
    # members (~(FUA|DF) == 0x1a), so bits 5..15 pass and reach the caller in Request.flags:
    # READ with flags 0x80 becomes Request(READ, flags=0x80).
    server = transmission_server()
    events = server.receive_data(
        request(Cmd.READ, 0, 512, flags=1 << 7, cookie=1)
        + request(Cmd.WRITE, 0, 1, flags=1 << 5, cookie=2, data=b"x")
        + request(Cmd.TRIM, 0, 512, flags=1 << 15, cookie=3)
    )
    assert [(type(e), getattr(e, "error", None)) for e in events] == [(Refused, Errno.EINVAL)] * 3


def test_an_eight_byte_data_chunk_is_a_remote_error_even_for_a_zero_length_read() -> None:
    # Fixed: "NBD_REPLY_TYPE_OFFSET_DATA: length MUST be at least 9". The slow path
    # (_apply_chunk) refuses a shorter chunk, but ClientConnection._chunk's fast path ("the
    # whole read in one final chunk": DONE, length - 8 == pending.length) takes an 8-byte
    # OFFSET_DATA chunk as the complete answer to a zero-length READ: Reply(cookie, 0, b"").
    client, cookie = read_in_flight(length=0)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(chunk(cookie, ReplyType.OFFSET_DATA, U64.pack(8192)))


def test_a_refused_reply_keeps_its_request_in_flight_for_the_right_one() -> None:
    # Fixed: a reply the codec refused (wrong length) used to forget the cookie, so the right
    # reply could not be sent afterwards.
    server = transmission_server()
    server.receive_data(request(Cmd.READ, 0, 512, cookie=9))
    with pytest.raises(LocalProtocolError):
        server.reply_read(9, bytes(100))
    server.reply_read(9, bytes(512))
    assert server.in_flight == 0
    assert len(server.data_to_send()) > 512


def test_a_read_reply_that_does_not_cover_the_read_is_a_protocol_error() -> None:
    # Fixed (failed before): 4 KiB of data then NONE/DONE for an 8 KiB read succeeded, the rest
    # read as zeros; the protocol says the chunks MUST cover the whole region.
    client = with_requests()
    cookie = client.request(Cmd.READ, 0, 8192)
    data = STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, 0, ReplyType.OFFSET_DATA, cookie,
                                  8 + 4096) + U64.pack(0) + bytes(4096)  # fmt: skip
    done = STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.NONE,
                                  cookie, 0)  # fmt: skip
    with pytest.raises(RemoteProtocolError, match="covers 4096 of 8192"):
        client.receive_data(data + done)


# ----- payloads that come in parts -----------------------------------------------------------


def _parts(raw: bytes, *cuts: int) -> list[bytes]:
    edges = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(edges)]


def test_a_write_that_comes_in_parts_reaches_the_caller_whole_with_the_next_request() -> None:
    server = transmission_server()
    payload = bytes(range(256)) * 1024  # 256 KiB
    raw = request(Cmd.WRITE, 0, len(payload), cookie=1, data=payload) + request(Cmd.FLUSH, cookie=2)
    events: list[ServerEvent] = []
    for part in _parts(raw, 28, 30, 100_000, len(raw) - 20):  # header, then the payload in 3
        events += server.receive_data(part)
    assert events == [Request(1, Cmd.WRITE, 0, 0, len(payload), payload),
                      Request(2, Cmd.FLUSH, 0, 0, 0)]  # fmt: skip


def test_a_read_reply_that_comes_in_parts_gives_the_whole_data_then_the_next_reply() -> None:
    client = with_requests()
    first = client.request(Cmd.READ, 0, 256 * 1024)
    second = client.request(Cmd.READ, 4096, 4096)
    data = bytes(range(256)) * 1024
    raw = data_chunk(first, 0, data) + data_chunk(second, 4096, data[:4096])
    events: list[ClientEvent] = []
    for part in _parts(raw, 10, 20, 28, 150_000, len(raw) - 4000):
        events += client.receive_data(part)
    assert events == [Reply(first, 0, data), Reply(second, 0, data[:4096])]
    assert client.in_flight == 0


def test_a_write_header_over_the_exports_maximum_holds_no_buffer_of_its_size() -> None:
    # A header alone must not make the server hold the (refused) payload's size in memory.
    server = transmission_server(STRICT)  # 64 KiB maximum payload
    tracemalloc.start()
    try:
        assert server.receive_data(request(Cmd.WRITE, 0, MAX_PAYLOAD_BYTES) + bytes(1000)) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MIB
