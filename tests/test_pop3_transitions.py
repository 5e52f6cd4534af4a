"""The core's state machine, walked from its table.

:data:`popsync.pop3.connection.TRANSITIONS` claims to be every state
transition there is.  Here each state is reached through the public API, then
given every stimulus it can meet -- a +OK or -ERR to each command it accepts,
the greeting, a close, the TLS handshake, a protocol violation.  The state
that results must be what the RFCs say (:func:`rfc_next`, written as rules,
not as a copy of the table), and also the table's answer (or the old state,
where the table has no row); every row must be met along the way.
"""

from __future__ import annotations

import pytest

from popsync.errors import LocalProtocolError, RemoteProtocolError, SecurityError
from popsync.pop3 import (
    NEED_DATA,
    Apop,
    Auth,
    Capa,
    Command,
    Connection,
    ConnectionClosed,
    Dele,
    List,
    Noop,
    Pass,
    Quit,
    Retr,
    Rset,
    Stat,
    State,
    Stls,
    Top,
    Uidl,
    User,
    Utf8,
)
from popsync.pop3.connection import _ALLOWED, TRANSITIONS, Reply

#: One instance of every command type.
SAMPLES: dict[type[Command], Command] = {
    cmd.__class__: cmd
    for cmd in (
        User("u"),
        Pass("p"),
        Apop("u", "c4c9334bac560ecc979e58001b3e22fb"),
        Auth("PLAIN", b"\0u\0p"),
        Capa(),
        Stls(),
        Utf8(),
        Quit(),
        Stat(),
        List(),
        Uidl(),
        Retr(1),
        Top(1, 0),
        Dele(1),
        Noop(),
        Rset(),
    )
}

Key = tuple[State, type[Command] | None, Reply]


def drain(conn: Connection) -> None:
    """Take events until more data is needed, the server closed, or TLS must start."""
    while conn.state is not State.STARTTLS and (event := conn.next_event()) is not NEED_DATA:
        if isinstance(event, ConnectionClosed):
            return


def connection_in(state: State) -> Connection:
    """A fresh connection brought to *state* the way a client would get there."""
    conn = Connection()
    if state is State.GREETING:
        return conn
    conn.receive_data(b"+OK hi\r\n" if state is not State.DONE else b"-ERR go away\r\n")
    drain(conn)
    if state is State.STARTTLS:
        conn.send(Stls())
        conn.receive_data(b"+OK begin TLS\r\n")
        drain(conn)
    elif state is State.TRANSACTION:
        conn.send(Pass("p"))
        conn.receive_data(b"+OK in\r\n")
        drain(conn)
    elif state is State.ERROR:
        conn.receive_data(b"nonsense\r\n")
        conn.receive_data(b"")
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
    assert conn.state is state
    return conn


def rfc_next(state: State, command: type[Command] | None, reply: Reply) -> State:
    """The state after *reply* to *command* in *state*, by the RFCs' rules."""
    if reply is Reply.VIOLATION:
        return State.ERROR  # nothing the server says after that can be trusted
    if state is State.GREETING:
        return State.AUTHORIZATION if reply is Reply.OK else State.DONE  # RFC 1939 §4
    if command is Quit or reply is Reply.CLOSED:
        return State.DONE  # RFC 1939 §§5-6: QUIT ends it, whatever the answer
    if state is State.AUTHORIZATION and reply is Reply.OK:
        if command in (Pass, Apop, Auth):
            return State.TRANSACTION  # RFC 1939 §7, RFC 5034 §4
        if command is Stls:
            return State.STARTTLS  # RFC 2595 §4: TLS starts right after the CRLF
    if state is State.STARTTLS and reply is Reply.TLS_READY:
        return State.AUTHORIZATION
    return state


def stimuli(state: State) -> list[Key]:
    """Everything that can happen to a connection in *state*."""
    if state is State.GREETING:
        return [(state, None, Reply.OK), (state, None, Reply.ERR), (state, None, Reply.VIOLATION)]
    if state is State.STARTTLS:
        return [(state, Stls, Reply.TLS_READY), (state, None, Reply.VIOLATION)]
    if state is State.ERROR:
        return []
    answers = [
        (state, command, reply) for command in _ALLOWED[state] for reply in (Reply.OK, Reply.ERR)
    ]
    return [*answers, (state, None, Reply.CLOSED), (state, None, Reply.VIOLATION)]


def apply(conn: Connection, key: Key) -> None:
    """Make *key*'s reply happen to *conn*, through the public API only."""
    _, command_type, reply = key
    if reply is Reply.TLS_READY:
        conn.start_tls()
    elif reply is Reply.VIOLATION:
        conn.receive_data(b"nonsense\r\n")  # neither a status line nor an awaited one
        conn.receive_data(b"")
        with pytest.raises(SecurityError if conn.state is State.STARTTLS else RemoteProtocolError):
            conn.start_tls() if conn.state is State.STARTTLS else drain(conn)
    elif reply is Reply.CLOSED:
        conn.receive_data(b"")
        assert conn.next_event() == ConnectionClosed()
    elif command_type is None:  # the greeting
        conn.receive_data(b"+OK hi\r\n" if reply is Reply.OK else b"-ERR busy\r\n")
        drain(conn)
    else:
        command = SAMPLES[command_type]
        conn.send(command)
        status = b"+OK\r\n" if reply is Reply.OK else b"-ERR no\r\n"
        rest = b".\r\n" if reply is Reply.OK and command.multiline() else b""
        conn.receive_data(status + rest)
        drain(conn)
        assert conn.pending == ()


ALL_STIMULI = [key for state in State for key in stimuli(state)]


@pytest.mark.parametrize(
    "key",
    ALL_STIMULI,
    ids=[f"{s.value}-{c.name if c else '-'}-{r.value}" for s, c, r in ALL_STIMULI],
)
def test_each_stimulus_leads_where_the_rfcs_and_the_table_say(key: Key) -> None:
    state = key[0]
    conn = connection_in(state)
    apply(conn, key)
    assert conn.state is rfc_next(*key)
    assert conn.state is TRANSITIONS.get(key, state)


def test_every_row_of_the_table_is_walked() -> None:
    assert set(TRANSITIONS) <= set(ALL_STIMULI)


def test_every_row_names_a_command_its_state_accepts() -> None:
    for state, command, _ in TRANSITIONS:
        assert command is None or command in _ALLOWED[state] or state is State.STARTTLS


def test_every_state_is_reached_from_the_greeting() -> None:
    reached, todo = {State.GREETING}, [State.GREETING]
    while todo:
        here = todo.pop()
        for (state, _, _), nxt in TRANSITIONS.items():
            if state is here and nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    assert reached == set(State)


def test_error_is_final() -> None:
    conn = connection_in(State.ERROR)
    assert not [key for key in TRANSITIONS if key[0] is State.ERROR]
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())
