"""The sans-I/O core: every reader fed whole, one byte at a time, and with
trailing data that must stay untouched, plus properties."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popsync.errors import LocalProtocolError, RemoteProtocolError, RespCode, SecurityError
from popsync.pop3 import (
    NEED_DATA,
    Apop,
    Auth,
    AuthResponse,
    BodyData,
    Capa,
    CapaListing,
    Challenge,
    Command,
    Connection,
    ConnectionClosed,
    Dele,
    EndOfBody,
    Err,
    Event,
    Greeting,
    List,
    Listing,
    Noop,
    Ok,
    Pass,
    Quit,
    Retr,
    ScanListing,
    Stat,
    State,
    Stls,
    Top,
    Uidl,
    UidListing,
    User,
)
from popsync.pop3.auth import apop_digest, apop_timestamp, oauthbearer, sasl_plain, xoauth2
from popsync.pop3.events import parse_resp_code
from popsync.pop3.listing import (
    LISTING_LIMITS,
    MAX_MESSAGE_SIZE,
    MAX_MESSAGES,
    ListingLimits,
    ScanParser,
    UidlParser,
    parse_capabilities,
    parse_scan_line,
    parse_uidl_line,
)
from popsync.pop3.reader import BodyReader

Chunker = Callable[[bytes], Iterator[bytes]]


def whole(data: bytes) -> Iterator[bytes]:
    yield data


def bytewise(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i : i + 1]


def odd_sizes(data: bytes) -> Iterator[bytes]:
    i, step = 0, 1
    while i < len(data):
        yield data[i : i + step]
        i += step
        step = step * 3 % 17 + 1


CHUNKINGS = pytest.mark.parametrize("chunks", [whole, bytewise, odd_sizes])


def drain(conn: Connection, data: bytes, chunks: Chunker) -> list[Event]:
    """Feed *data* in the given chunking and collect events, merging BodyData."""
    out: list[Event] = []
    for piece in chunks(data):
        conn.receive_data(piece)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            assert not isinstance(ev, type(NEED_DATA))
            if isinstance(ev, BodyData) and out and isinstance(out[-1], BodyData):
                out[-1] = BodyData(ev.command, out[-1].data + ev.data)
            else:
                out.append(ev)
    return out


def logged_in(pipelining: bool = True) -> Connection:
    conn = Connection()
    conn.receive_data(b"+OK ready\r\n")
    assert conn.next_event() == Greeting(b"ready")
    conn.send(User("u"))
    conn.receive_data(b"+OK\r\n")
    conn.next_event()
    conn.send(Pass("p"))
    conn.receive_data(b"+OK logged in\r\n")
    assert conn.next_event() == Ok(Pass("p"), b"logged in")
    assert conn.state is State.TRANSACTION
    conn.pipelining = pipelining
    return conn


def uidl_entries(raw: bytes) -> list[tuple[int, bytes]]:
    """A whole UIDL listing (lines as on the wire) through the parser the core streams into."""
    parser = UidlParser()
    parser.feed(raw)
    return parser.result


def scan_entries(raw: bytes) -> list[tuple[int, int]]:
    """A whole LIST listing (lines as on the wire) through the parser the core streams into."""
    parser = ScanParser()
    parser.feed(raw)
    return parser.result


# -- commands -------------------------------------------------------------------


def test_command_bytes_are_exact() -> None:
    assert User("alice").to_bytes() == b"USER alice\r\n"
    assert Pass("a secret with spaces").to_bytes() == b"PASS a secret with spaces\r\n"
    assert Retr(7).to_bytes() == b"RETR 7\r\n"
    assert Top(3, 0).to_bytes() == b"TOP 3 0\r\n"
    assert List().to_bytes() == b"LIST\r\n" and List(2).to_bytes() == b"LIST 2\r\n"
    assert Uidl().to_bytes() == b"UIDL\r\n" and Uidl(9).to_bytes() == b"UIDL 9\r\n"
    assert Auth("PLAIN", b"\0u\0p").to_bytes() == b"AUTH PLAIN AHUAcA==\r\n"
    assert Auth("PLAIN", b"").to_bytes() == b"AUTH PLAIN =\r\n"
    assert AuthResponse(None).to_bytes() == b"*\r\n"


@pytest.mark.parametrize("secret", ["secret\r\nDELE 1", "a\nb", "nul\0", ""])
def test_secrets_cannot_inject_commands(secret: str) -> None:
    with pytest.raises(LocalProtocolError):
        Pass(secret).to_bytes()
    with pytest.raises(LocalProtocolError):
        User(secret).to_bytes()


def test_password_not_in_repr() -> None:
    assert "hunter2" not in repr(Pass("hunter2"))
    assert "hunter2" not in repr(Auth("PLAIN", b"hunter2"))


def test_command_line_limit_rfc2449() -> None:
    with pytest.raises(LocalProtocolError, match="255"):
        Pass("x" * 260).to_bytes()
    assert not Auth("XOAUTH2", b"t" * 300).fits()
    assert Auth("XOAUTH2", None).fits()
    # a continuation line is not bound by the command limit (RFC 5034 §4)
    assert len(AuthResponse(b"t" * 3000).to_bytes()) > 4000


@pytest.mark.parametrize("bad", [0, -1, True])
def test_message_numbers_must_be_positive(bad: int) -> None:
    with pytest.raises(LocalProtocolError):
        Retr(bad).to_bytes()


# -- greeting and state machine ------------------------------------------------


@CHUNKINGS
def test_greeting_then_login(chunks: Chunker) -> None:
    conn = Connection()
    assert drain(conn, b"+OK POP3 ready <1.2@host>\r\n", chunks) == [
        Greeting(b"POP3 ready <1.2@host>")
    ]
    assert conn.state is State.AUTHORIZATION
    conn.send(User("u"))
    assert drain(conn, b"+OK\r\n", chunks) == [Ok(User("u"), b"")]
    assert conn.state is State.AUTHORIZATION
    conn.send(Pass("p"))
    assert drain(conn, b"-ERR [AUTH] bad password\r\n", chunks)[0] == Err(
        Pass("p"), b"[AUTH] bad password", parse_code(b"[AUTH]")
    )
    assert conn.state is State.AUTHORIZATION


def parse_code(text: bytes) -> RespCode:
    """The response code at the start of *text*, which must have one."""
    code = parse_resp_code(text)
    assert code is not None, text
    return code


def test_resp_codes_parsed_and_unknown_levels_kept() -> None:
    code = parse_code(b"[SYS/TEMP/EXTRA] later")
    assert code.top == "SYS" and code.temporary is True
    assert parse_code(b"[in-use] busy").top == "IN-USE"
    assert parse_code(b"[SYS/PERM] no").temporary is False
    assert parse_code(b"[AUTH] no").temporary is False
    assert parse_code(b"[WHATEVER] x").temporary is None
    assert parse_resp_code(b"no code") is None
    assert parse_resp_code(b"[unterminated") is None
    assert parse_resp_code(b"[\x1b[31m] evil") is None


def test_err_greeting() -> None:
    conn = Connection()
    conn.receive_data(b"-ERR [SYS/TEMP] overloaded\r\n")
    ev = conn.next_event()
    assert isinstance(ev, Err) and ev.command is None and ev.code is not None
    assert conn.state is State.DONE


def test_garbage_greeting_is_remote_error() -> None:
    conn = Connection()
    conn.receive_data(b"HELLO\r\n")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_commands_refused_in_wrong_state() -> None:
    conn = Connection()
    with pytest.raises(LocalProtocolError, match="GREETING"):
        conn.send(User("u"))
    conn.receive_data(b"+OK\r\n")
    conn.next_event()
    with pytest.raises(LocalProtocolError, match="AUTHORIZATION"):
        conn.send(Retr(1))
    conn = logged_in()
    with pytest.raises(LocalProtocolError, match="TRANSACTION"):
        conn.send(Stls())


def test_no_pipelining_without_capability() -> None:
    conn = logged_in(pipelining=False)
    conn.send(Retr(1))
    with pytest.raises(LocalProtocolError, match="outstanding"):
        conn.send(Retr(2))


def test_quit_never_runs_ahead() -> None:
    conn = logged_in()
    conn.send(Dele(1))
    with pytest.raises(LocalProtocolError):
        conn.send(Quit())


def test_unsolicited_data_is_remote_error() -> None:
    conn = logged_in()
    conn.receive_data(b"+OK surprise\r\n")
    assert conn.next_event() is NEED_DATA  # left alone while nothing is asked
    assert conn.trailing_data == b"+OK surprise\r\n"
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="answers no command"):
        conn.next_event()


def test_non_status_line_where_status_due() -> None:
    # CPython gh-95252: an early '.' leaves the stream out of step; must not guess.
    conn = logged_in()
    conn.send(Stat())
    conn.receive_data(b"Received: from x\r\n")
    with pytest.raises(RemoteProtocolError, match="STAT"):
        conn.next_event()


def test_eof_mid_reply_and_clean_close() -> None:
    conn = logged_in()
    conn.send(Retr(1))
    conn.receive_data(b"+OK\r\npartial line")
    assert isinstance(conn.next_event(), Ok)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="RETR"):
        conn.next_event()

    conn = logged_in()
    conn.send(Quit())
    conn.receive_data(b"+OK bye\r\n")
    conn.receive_data(b"")
    assert conn.next_event() == Ok(Quit(), b"bye")
    assert conn.state is State.DONE
    assert conn.next_event() == ConnectionClosed()


# -- listings ------------------------------------------------------------------


@CHUNKINGS
def test_uidl_and_list_pipelined_with_trailing_data(chunks: Chunker) -> None:
    conn = logged_in()
    conn.send(Uidl())
    conn.send(List())
    conn.send(Stat())
    wire = (
        b"+OK unique-id listing\r\n1 aaa\r\n2 ..dotted\r\n.\r\n"
        b"+OK scan\r\n1 120\r\n2 4000\r\n.\n"
        b"+OK 2 4120\r\n"
        b"+OK trailing"  # belongs to no command yet: must stay in the buffer
    )
    events = drain(conn, wire, chunks)
    assert events == [
        Ok(Uidl(), b"unique-id listing"),
        UidListing(Uidl(), [(1, b"aaa"), (2, b"..dotted")]),
        Ok(List(), b"scan"),
        ScanListing(List(), [(1, 120), (2, 4000)]),
        Ok(Stat(), b"2 4120"),
    ]
    assert conn.trailing_data == b"+OK trailing"


@pytest.mark.parametrize(
    "line",
    [b"1", b"x abc", b"1 a b", b"0 abc", b"1 \x01bad", b"1 " + b"u" * 600, b"-1 abc"],
)
def test_bad_uidl_lines(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="UIDL"):
        uidl_entries(line + b"\r\n")


def test_duplicate_message_numbers_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="twice"):
        uidl_entries(b"1 a\r\n1 b\r\n")
    with pytest.raises(RemoteProtocolError, match="twice"):
        scan_entries(b"1 10\r\n1 20\r\n")


def test_duplicate_uids_are_allowed() -> None:
    # RFC 1939 §7: identical copies may share a unique-id
    assert uidl_entries(b"1 same\r\n2 same\r\n") == [(1, b"same"), (2, b"same")]


# -- listing bounds: each checked as the listing streams ----------------------


def sent(command: Capa | Uidl | List, **limits: ListingLimits) -> Connection:
    """A connection that has just sent *command* (CAPA before login, the others after)."""
    if isinstance(command, Capa):
        conn = Connection(listing_limits=limits)
        conn.receive_data(b"+OK hi\r\n")
        conn.next_event()
    else:
        conn = logged_in()
        conn.listing_limits.update(limits)
    conn.send(command)
    return conn


@CHUNKINGS
def test_capa_listing_unstuffed_with_trailing_data(chunks: Chunker) -> None:
    conn = sent(Capa())
    wire = b"+OK caps\r\nTOP\r\nSASL PLAIN\n..X-DOT\r\n.\r\n+OK extra"
    assert drain(conn, wire, chunks) == [
        Ok(Capa(), b"caps"),
        CapaListing(Capa(), (b"TOP", b"SASL PLAIN", b".X-DOT")),
    ]
    assert conn.trailing_data == b"+OK extra"


# The longest line each listing takes (CRLF included), and one octet more.
LONGEST = [
    (Capa(), b"X" * 1022, (b"X" * 1022,)),  # RFC 2449 §5 says 512; twice that
    (Uidl(), b"%d %s" % (MAX_MESSAGES, b"u" * 512), [(MAX_MESSAGES, b"u" * 512)]),
    (List(), b"1 100 " + b"x" * 120, [(1, 100)]),  # RFC 1939 §5 "additional information"
]


@CHUNKINGS
@pytest.mark.parametrize(("command", "line", "parsed"), LONGEST)
def test_longest_listing_line_passes(
    chunks: Chunker, command: Capa | Uidl | List, line: bytes, parsed: object
) -> None:
    conn = sent(command)
    events = drain(conn, b"+OK\r\n" + line + b"\r\n.\r\n+OK next", chunks)
    assert len(events) == 2 and isinstance(events[1], Listing)
    assert getattr(events[1], "lines" if isinstance(command, Capa) else "entries") == parsed
    assert conn.trailing_data == b"+OK next"


@CHUNKINGS
@pytest.mark.parametrize(("command", "line", "parsed"), LONGEST)
def test_one_octet_longer_is_refused(
    chunks: Chunker, command: Capa | Uidl | List, line: bytes, parsed: object
) -> None:
    limit = LISTING_LIMITS[command.name].line
    assert len(line) + 2 == limit
    conn = sent(command)
    wire = b"+OK\r\n" + b"1 a\r\n" * isinstance(command, Uidl) + line + b"x\r\n.\r\n"
    with pytest.raises(RemoteProtocolError, match=f"^{command.name}: .*longer than {limit} "):
        drain(conn, wire, chunks)
    assert conn.state is State.ERROR


@pytest.mark.parametrize("command", [Capa(), Uidl(), List()])
def test_overlong_line_fails_at_once(command: Capa | Uidl | List) -> None:
    limit = LISTING_LIMITS[command.name].line
    # Its end in the same receive, the rest of the listing still to come:
    conn = sent(command)
    conn.receive_data(b"+OK\r\n1 " + b"u" * 60_000 + b"\r\n2 b\r\n")
    assert isinstance(conn.next_event(), Ok)
    with pytest.raises(RemoteProtocolError, match="longer than"):
        conn.next_event()
    # Its end not yet in sight: refused as soon as the line reaches the bound.
    conn = sent(command)
    conn.receive_data(b"+OK\r\n" + b"1 " + b"u" * (limit - 3))
    assert isinstance(conn.next_event(), Ok)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"u")
    with pytest.raises(RemoteProtocolError, match="longer than"):
        conn.next_event()


@CHUNKINGS
def test_capa_line_count_and_octet_bounds(chunks: Chunker) -> None:
    caps = LISTING_LIMITS["CAPA"]
    assert (caps.lines, caps.octets) == (200, 64 * 1024)
    full = b"X" * 1022 + b"\r\n"
    assert len(drain(sent(Capa()), b"+OK\r\n" + full * 64 + b".\r\n", chunks)) == 2  # 64 KiB
    with pytest.raises(RemoteProtocolError, match=r"^CAPA: listing is longer than 65536"):
        drain(sent(Capa()), b"+OK\r\n" + full * 65 + b".\r\n", chunks)
    with pytest.raises(RemoteProtocolError, match=r"^CAPA: listing has more than 200 lines"):
        drain(sent(Capa()), b"+OK\r\n" + b"X\r\n" * 201 + b".\r\n", chunks)


@CHUNKINGS
@pytest.mark.parametrize("command", [Capa(), Uidl(), List()])
def test_overlong_lines_past_the_octet_bound_are_named_as_overlong(
    chunks: Chunker, command: Capa | Uidl | List
) -> None:
    # However the bytes are cut, the fault named is the line's: a piece that
    # holds several overlong lines also breaks the octet bound, and must not
    # report that instead (it did, depending on how a read was cut).
    limits = ListingLimits(line=64, lines=100, octets=300)
    line = {"CAPA": b"X-", "UIDL": b"1 ", "LIST": b"1 "}[command.name] + b"9" * 200 + b"\r\n"
    conn = Connection(listing_limits={command.name: limits})
    conn.receive_data(b"+OK\r\n")
    conn.next_event()
    conn.send(Pass("p"))
    conn.receive_data(b"+OK\r\n")
    conn.next_event()
    conn.send(command)
    wire = b"+OK\r\n" + line * 3 + b".\r\n"
    with pytest.raises(RemoteProtocolError, match=r"listing line longer than 64 octets"):
        drain(conn, wire, chunks)


@CHUNKINGS
def test_uidl_and_list_line_count_and_octet_bounds(chunks: Chunker) -> None:
    small = ListingLimits(line=64, lines=3, octets=1000)
    wire = b"+OK\r\n1 a\r\n2 b\r\n3 c\r\n4 d\r\n.\r\n"
    with pytest.raises(RemoteProtocolError, match=r"^UIDL: listing has more than 3 lines"):
        drain(sent(Uidl(), UIDL=small), wire, chunks)
    with pytest.raises(RemoteProtocolError, match=r"^LIST: listing has more than 3 lines"):
        drain(sent(List(), LIST=small), b"+OK\r\n1 9\r\n2 9\r\n3 9\r\n4 9\r\n.\r\n", chunks)
    tight = ListingLimits(line=64, lines=100, octets=14)
    with pytest.raises(RemoteProtocolError, match=r"^UIDL: listing is longer than 14 octets"):
        drain(sent(Uidl(), UIDL=tight), wire, chunks)
    assert len(drain(sent(Uidl(), UIDL=tight), b"+OK\r\n1 a\r\n2 b\r\n.\r\n", chunks)) == 2


@CHUNKINGS
def test_lenient_forms_and_order_across_pieces(chunks: Chunker) -> None:
    conn = sent(Uidl())
    wire = b"+OK\r\n3 c\r\n1  a \r\n2\tb\n.4 d\r\n.\r\n"
    events = drain(conn, wire, chunks)
    assert events[1] == UidListing(Uidl(), [(3, b"c"), (1, b"a"), (2, b"b"), (4, b"d")])


@CHUNKINGS
@pytest.mark.parametrize(
    "wire", [b"1 a\r\n2 b\r\n1 c\r\n", b"2 a\r\n3 b\r\n1 c\r\n3 d\r\n", b"5 a\r\n5 a\r\n"]
)
def test_duplicate_numbers_refused_in_any_piece(chunks: Chunker, wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match=r"^UIDL: the same message number"):
        drain(sent(Uidl()), b"+OK\r\n" + wire + b".\r\n", chunks)


def test_sizes_that_cannot_be_a_message() -> None:
    # 2**63 would overflow SQLite's INTEGER downstream; 2**40 octets (1 TiB)
    # is the largest size believed, so sums over a listing stay below 2**60.
    assert MAX_MESSAGES * MAX_MESSAGE_SIZE < 2**63 - 1
    assert parse_scan_line(b"1 %d" % MAX_MESSAGE_SIZE) == (1, MAX_MESSAGE_SIZE)
    for size in (MAX_MESSAGE_SIZE + 1, 2**63, 2**63 - 1):
        with pytest.raises(RemoteProtocolError, match=r"^LIST size: .*cannot be a message"):
            parse_scan_line(b"1 %d" % size)
        with pytest.raises(RemoteProtocolError, match=r"^LIST size"):
            scan_entries(b"1 10\r\n2 %d\r\n" % size)
    with pytest.raises(RemoteProtocolError, match=r"^LIST size: not a decimal"):
        parse_scan_line(b"1 %d" % 2**64)


@CHUNKINGS
def test_oversized_list_entry_refused_while_streaming(chunks: Chunker) -> None:
    wire = b"+OK\r\n1 10\r\n2 %d\r\n.\r\n" % 2**63
    with pytest.raises(RemoteProtocolError, match=r"^LIST size"):
        drain(sent(List()), wire, chunks)


def test_message_numbers_beyond_any_listing() -> None:
    assert parse_uidl_line(b"%d a" % MAX_MESSAGES) == (MAX_MESSAGES, b"a")
    too_big = MAX_MESSAGES + 1
    with pytest.raises(RemoteProtocolError, match=r"^UIDL: message number above"):
        parse_uidl_line(b"%d a" % too_big)
    with pytest.raises(RemoteProtocolError, match=r"^UIDL: message number above"):
        uidl_entries(b"1 a\r\n%d b\r\n" % too_big)
    with pytest.raises(RemoteProtocolError, match=r"^LIST: message number above"):
        parse_scan_line(b"%d 10" % too_big)
    with pytest.raises(RemoteProtocolError, match=r"^LIST: message number above"):
        scan_entries(b"%d 10\r\n" % too_big)


uid_bytes = st.binary(min_size=1, max_size=12).map(
    lambda b: bytes(0x21 + x % 0x5E for x in b)  # 0x21-0x7E
)


@settings(max_examples=200, deadline=None)
@given(
    uids=st.lists(uid_bytes, max_size=40),
    gaps=st.lists(st.integers(min_value=1, max_value=3), min_size=40, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
)
def test_uidl_streamed_in_any_split_equals_the_listing(
    uids: list[bytes], gaps: list[int], cuts: list[int]
) -> None:
    numbers = [sum(gaps[: i + 1]) for i in range(len(uids))]
    entries = list(zip(numbers, uids, strict=True))
    wire = b"+OK\r\n" + b"".join(b"%d %s\r\n" % e for e in entries) + b".\r\n+OK next"
    points = sorted({c % (len(wire) + 1) for c in cuts})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True) if b > a]
    conn = sent(Uidl())
    events = drain(conn, wire, lambda _: iter(pieces))
    assert events[1] == UidListing(Uidl(), entries)
    assert conn.trailing_data == b"+OK next"


def test_status_line_bound() -> None:
    conn = Connection(max_line=1024)
    conn.receive_data(b"+OK " + b"x" * 1100)
    with pytest.raises(RemoteProtocolError, match="longer than 1024"):
        conn.next_event()


def test_capabilities() -> None:
    caps = parse_capabilities(
        [
            b"TOP",
            b"USER",
            b"SASL PLAIN login XOAUTH2",
            b"RESP-CODES",
            b"LOGIN-DELAY 300",
            b"PIPELINING",
            b"EXPIRE 0",
            b"UIDL",
            b"IMPLEMENTATION Dovecot",
        ]
    )
    assert caps.pipelining and caps.has("uidl") and caps.expire_zero
    assert caps.sasl == {"PLAIN", "LOGIN", "XOAUTH2"}
    assert caps.login_delay == 300 and caps.implementation == "Dovecot"
    assert not parse_capabilities([b"EXPIRE NEVER"]).expire_zero


# -- bodies --------------------------------------------------------------------

BODY_WIRE = (
    b"From: a@b\r\n"
    b"\r\n"
    b"..leading dot\r\n"
    b"...two dots\r\n"
    b".\x00nul after dot\r\n"
    b"bare\rCR and NUL\x00\r\n"
    b"lone LF\n"
    b"..\r\n"
    b"last line\r\n"
)
BODY_STORED = (
    b"From: a@b\n"
    b"\n"
    b".leading dot\n"
    b"..two dots\n"
    b"\x00nul after dot\n"
    b"bare\rCR and NUL\x00\n"
    b"lone LF\n"
    b".\n"
    b"last line\n"
)


@pytest.mark.usefixtures("body_reader_impl")
@CHUNKINGS
def test_retr_body_unstuffed_and_lf(chunks: Chunker) -> None:
    conn = logged_in()
    cmd = Retr(1)
    conn.send(cmd)
    conn.send(Dele(1))
    wire = b"+OK 200 octets\r\n" + BODY_WIRE + b".\r\n+OK marked\r\n+OK extra"
    events = drain(conn, wire, chunks)
    octets = len(BODY_WIRE) - 4  # four stuffing dots are not counted (RFC 1939 §11)
    assert events == [
        Ok(cmd, b"200 octets"),
        BodyData(cmd, BODY_STORED),
        EndOfBody(cmd, octets),
        Ok(Dele(1), b"marked"),
    ]
    assert conn.trailing_data == b"+OK extra"


@pytest.mark.usefixtures("body_reader_impl")
@CHUNKINGS
def test_empty_body_and_lf_terminator(chunks: Chunker) -> None:
    conn = logged_in()
    conn.send(Retr(1))
    conn.send(Top(2, 0))
    events = drain(conn, b"+OK\r\n.\r\n+OK\nSubject: x\n.\n", chunks)
    assert events == [
        Ok(Retr(1), b""),
        EndOfBody(Retr(1), 0),
        Ok(Top(2, 0), b""),
        BodyData(Top(2, 0), b"Subject: x\n"),
        EndOfBody(Top(2, 0), 11),
    ]


@pytest.mark.usefixtures("body_reader_impl")
def test_body_limit_cuts_off() -> None:
    conn = logged_in()
    conn.send(Retr(1, limit=100))
    conn.receive_data(b"+OK\r\n" + b"x" * 80 + b"\r\n" + b"y" * 80 + b"\r\n")
    conn.next_event()
    with pytest.raises(RemoteProtocolError, match="limit of 100"):
        while conn.next_event() is not NEED_DATA:
            pass


@pytest.mark.usefixtures("body_reader_impl")
def test_long_body_line_is_streamed_with_bounded_buffer() -> None:
    conn = logged_in()
    conn.send(Retr(1))
    conn.receive_data(b"+OK\r\n")
    conn.next_event()
    total = b""
    piece = b"." + b"z" * 65535  # a 3 MB line that starts with a stuffed dot
    for i in range(48):
        conn.receive_data(piece if i == 0 else b"z" * 65536)
        while (ev := conn.next_event()) is not NEED_DATA:
            assert isinstance(ev, BodyData)
            total += ev.data
        assert len(conn.trailing_data) <= 64 * 1024 + 1
    conn.receive_data(b"\r\n.\r\n")
    while (ev := conn.next_event()) is not NEED_DATA:
        if isinstance(ev, BodyData):
            total += ev.data
        else:
            assert isinstance(ev, EndOfBody)
            break
    assert total == b"z" * (48 * 65536 - 1) + b"\n"


@pytest.mark.usefixtures("body_reader_impl")
def test_crlf_split_across_partial_flush() -> None:
    reader = BodyReader(partial_flush=4)
    buf = bytearray(b"abcdef\r")
    first = reader.read(buf)
    assert first.data == b"abcdef" and buf == b"\r"
    buf += b"\n.\r\n"
    second = reader.read(buf)
    assert second.data == b"\n" and second.done


# -- STLS and AUTH ---------------------------------------------------------------


def authorization() -> Connection:
    conn = Connection()
    conn.receive_data(b"+OK hi\r\n")
    conn.next_event()
    return conn


def test_stls_refuses_injected_plaintext() -> None:
    conn = authorization()
    conn.send(Stls())
    conn.receive_data(b"+OK begin TLS\r\n+OK injected\r\n")
    assert conn.next_event() == Ok(Stls(), b"begin TLS")
    assert conn.state is State.STARTTLS
    assert conn.trailing_data == b"+OK injected\r\n"
    with pytest.raises(SecurityError, match="injection"):
        conn.start_tls()


def test_stls_clean_resets_capabilities() -> None:
    conn = authorization()
    conn.pipelining = True
    conn.send(Stls())
    conn.receive_data(b"+OK\r\n")
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.next_event()  # must not read plaintext while TLS is pending
    conn.start_tls()
    assert conn.state is State.AUTHORIZATION and conn.pipelining is False


@CHUNKINGS
def test_auth_exchange(chunks: Chunker) -> None:
    conn = authorization()
    cmd = Auth("LOGIN")
    conn.send(cmd)
    events = drain(conn, b"+ VXNlcm5hbWU6\r\n", chunks)
    assert events == [Challenge(cmd, b"VXNlcm5hbWU6")]
    assert conn.send_auth_response(AuthResponse(b"u")) == b"dQ==\r\n"
    with pytest.raises(LocalProtocolError):
        conn.send_auth_response(AuthResponse(b"again"))
    assert drain(conn, b"+ UGFzc3dvcmQ6\r\n+OK welcome\r\n", chunks) == [
        Challenge(cmd, b"UGFzc3dvcmQ6"),
        Ok(cmd, b"welcome"),
    ]
    assert conn.state is State.TRANSACTION


def test_apop_and_sasl_payloads() -> None:
    # RFC 1939 §7 example
    ts = apop_timestamp(b"POP3 server ready <1896.697170952@dbc.mtview.ca.us>")
    assert ts == b"<1896.697170952@dbc.mtview.ca.us>"
    assert apop_digest(ts, "tanstaaf") == "c4c9334bac560ecc979e58001b3e22fb"
    assert apop_timestamp(b"ready") is None
    assert Apop("mrose", "c4c9").to_bytes() == b"APOP mrose c4c9\r\n"
    assert sasl_plain("u", "p") == b"\0u\0p"
    assert xoauth2("u@x", "tok") == b"user=u@x\x01auth=Bearer tok\x01\x01"
    assert oauthbearer("u@x", "tok") == b"n,a=u@x,\x01auth=Bearer tok\x01\x01"


# -- properties ------------------------------------------------------------------


def stuff(body: bytes) -> bytes:
    """The server's side of RFC 1939 §3: CRLF lines, a dot before every '.' line."""
    lines = body.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in out) + b".\r\n"


line_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))


@pytest.mark.usefixtures("body_reader_impl")
@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(line_bytes | st.sampled_from([b".", b"..", b".\x00", b""]), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_stuffing_round_trip_any_split(lines: list[bytes], cuts: list[int]) -> None:
    body = b"".join(line + b"\n" for line in lines)
    wire = b"+OK\r\n" + stuff(body) + b"+OK next"
    points = sorted({c % (len(wire) + 1) for c in cuts})
    bounds = zip([0, *points], [*points, len(wire)], strict=True)
    pieces = [wire[a:b] for a, b in bounds if b > a]  # b"" would mean end of stream
    conn = logged_in()
    conn.send(Retr(1))
    got = b""
    ended = None
    for piece in pieces:
        conn.receive_data(piece)
        while (ev := conn.next_event()) is not NEED_DATA:
            if isinstance(ev, BodyData):
                got += ev.data
            elif isinstance(ev, EndOfBody):
                ended = ev
    assert got == body
    assert ended is not None and ended.octets == len(body) + body.count(b"\n")
    assert conn.trailing_data == b"+OK next"


#: What a fuzzed connection waits for: the greeting, or the replies to these
#: commands (sent in AUTHORIZATION, or pipelined in TRANSACTION).
FUZZ_SCENARIOS: dict[str, tuple[str, tuple[Command, ...]]] = {
    "greeting": ("GREETING", ()),
    "capa": ("AUTHORIZATION", (Capa(),)),
    "user": ("AUTHORIZATION", (User("u"),)),
    "auth": ("AUTHORIZATION", (Auth("LOGIN"),)),
    "stls": ("AUTHORIZATION", (Stls(),)),
    "quit": ("AUTHORIZATION", (Quit(),)),
    "retr": ("TRANSACTION", (Retr(1, limit=300),)),
    "uidl": ("TRANSACTION", (Uidl(),)),
    "list": ("TRANSACTION", (List(),)),
    "stat": ("TRANSACTION", (Stat(),)),
    "pipelined": (
        "TRANSACTION",
        (Uidl(), List(), List(2), Uidl(3), Top(1, 0, limit=300), Retr(2), Dele(1), Noop()),
    ),
}


def fuzz_connection(scenario: str) -> Connection:
    """A connection (512-octet lines) awaiting what *scenario* names."""
    state, commands = FUZZ_SCENARIOS[scenario]
    if state == "GREETING":
        return Connection(max_line=512)
    conn = authorization() if state == "AUTHORIZATION" else logged_in()
    conn.max_line = 512
    for command in commands:
        conn.send(command)
    return conn


def fuzz_step(conn: Connection) -> bool:
    """Take one event as a client would; False once nothing more can come."""
    if conn.state is State.STARTTLS:
        conn.start_tls()  # SecurityError if plaintext followed the +OK
        return True
    ev = conn.next_event()
    if isinstance(ev, Challenge):
        conn.send_auth_response(AuthResponse(None))
    return ev is not NEED_DATA and not isinstance(ev, ConnectionClosed)


@pytest.mark.usefixtures("body_reader_impl")
@settings(max_examples=600, deadline=None)
@given(
    data=st.binary(max_size=600)
    | st.lists(
        st.sampled_from(
            [b"+OK\r\n", b"-ERR x\r\n", b"+ \r\n", b"1 a\r\n", b"1 2\r\n", b".\r\n", b"..\r\n"]
        )
        | st.binary(max_size=20),
        max_size=30,
    ).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=700), max_size=6),
    scenario=st.sampled_from(sorted(FUZZ_SCENARIOS)),
)
def test_arbitrary_input_only_raises_remote_protocol_errors(
    data: bytes, cuts: list[int], scenario: str
) -> None:
    """Whatever the server sends, in whatever pieces, the core either makes
    sense of it or raises RemoteProtocolError (or SecurityError, for bytes
    after STLS's +OK) -- and is dead after that.  A LocalProtocolError, an
    assertion or any other exception would be a bug of ours, and fails here."""
    conn = fuzz_connection(scenario)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]
    try:
        for piece in [*pieces, b""]:  # b"": the server closes
            conn.receive_data(piece)
            for _ in range(2000):
                if not fuzz_step(conn):
                    break
            else:
                raise AssertionError("the core kept returning events without input")
    except (RemoteProtocolError, SecurityError):
        assert conn.state is State.ERROR
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
