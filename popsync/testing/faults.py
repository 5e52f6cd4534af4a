"""Faults the test POP3 server can inject; every one is off by default.

A :class:`Faults` value is immutable and is captured by each session when the
connection is accepted, so a test can switch faults between sessions
(``srv.faults = Faults(...)``) without racing a session in progress.

Command names in :attr:`Faults.stall`, :attr:`Faults.errors` and
:attr:`Faults.trickle` are matched case-insensitively (RFC 1939 §3: keywords
are case-insensitive).  Besides the POP3 keywords, the pseudo-command
``GREETING`` is understood by all three: stall before the greeting, send the
given line as the greeting and hang up, or send the greeting slowly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["HUGE_LISTINGS", "OVERLONG_PLACES", "Faults", "HugeListing", "OverlongPlace"]

OverlongPlace = Literal["greeting", "uidl", "retr_status", "capa"]
OVERLONG_PLACES: frozenset[str] = frozenset({"greeting", "uidl", "retr_status", "capa"})
HugeListing = Literal["UIDL", "LIST", "CAPA"]
HUGE_LISTINGS: frozenset[str] = frozenset({"UIDL", "LIST", "CAPA"})


@dataclass(frozen=True)
class Faults:
    """What the server should do wrong.  All off by default.

    Attributes:
        drop_during_retr: ``(n, k)``: on ``RETR n`` send the status line and the
            first *k* bytes of the (stuffed) body, then close the socket without
            a terminator, without TLS close_notify and without UPDATE.
        stall: command name -> seconds to sleep before answering it (ended
            early by ``stop()``).
        errors: command name -> the full ``-ERR ...`` line (CRLF optional) sent
            instead of the real answer; the command has no other effect.  An
            error to ``QUIT`` also ends the session without UPDATE.
        changing_uids: every session lists different UIDs for the same messages.
        ignore_dele: DELE says ``+OK`` but QUIT removes nothing.
        endless_body: ``RETR n`` for this *n* streams body lines forever, until
            the client disconnects or the server stops.
        overlong_line: where to send one line of :attr:`overlong_length` bytes
            (CRLF included): the greeting, a UIDL line, the RETR status line,
            or a CAPA line.
        overlong_length: length of that line (default 1 MiB).
        inject_after_stls: bytes sent in the same ``send()`` right after
            ``+OK Begin TLS\\r\\n``, in clear, as a man in the middle would.
        drop_quit_reply: apply the deletions at QUIT, then close without a reply.
        quit_error: remove only the first half (in message-number order) of the
            marked messages and answer ``-ERR some deleted messages not removed``
            (RFC 1939 §6 allows "some or none").
        unstuffed_dot_line: message *n* is sent with one unstuffed lone ``.``
            line in the middle of its body (CPython gh-95252); LIST counts that
            line as part of the message.
        wrong_list_size: message number -> size that LIST (and STAT's total)
            report instead of the true size.
        no_uidl: UIDL answers ``-ERR`` and CAPA does not list UIDL.
        huge_listing: ``(command, lines, line_length)``: the whole listing of
            ``UIDL``, ``LIST`` or ``CAPA`` is *lines* made-up lines of
            *line_length* octets each (CRLF included), made and sent a batch
            at a time so the server itself stays small.  UIDL lines are
            ``n uid`` with a distinct uid; LIST lines ``n 100`` followed by
            filler ("additional information", RFC 1939 §5); CAPA lines
            ``X-HUGE-n`` followed by filler.  Lines are never shorter than
            that text.
        trickle: command name -> ``(n, seconds)``: the whole reply to that
            command (status line, listing or body) goes out *n* bytes at a
            time, one piece every *seconds* (the wait ends early at ``stop()``).
    """

    drop_during_retr: tuple[int, int] | None = None
    stall: Mapping[str, float] = field(default_factory=dict)
    errors: Mapping[str, bytes] = field(default_factory=dict)
    changing_uids: bool = False
    ignore_dele: bool = False
    endless_body: int | None = None
    overlong_line: OverlongPlace | None = None
    overlong_length: int = 1 << 20
    inject_after_stls: bytes = b""
    drop_quit_reply: bool = False
    quit_error: bool = False
    unstuffed_dot_line: int | None = None
    wrong_list_size: Mapping[int, int] = field(default_factory=dict)
    no_uidl: bool = False
    huge_listing: tuple[HugeListing, int, int] | None = None
    trickle: Mapping[str, tuple[int, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate and normalise; raises ValueError on a nonsensical fault."""
        if self.overlong_line is not None and self.overlong_line not in OVERLONG_PLACES:
            raise ValueError(f"overlong_line must be one of {sorted(OVERLONG_PLACES)}")
        if self.overlong_length < 64:
            raise ValueError("overlong_length must be at least 64 bytes")
        if self.drop_during_retr is not None:
            number, after = self.drop_during_retr
            if number < 1 or after < 0:
                raise ValueError("drop_during_retr is (message number >= 1, bytes >= 0)")
        if any(seconds < 0 for seconds in self.stall.values()):
            raise ValueError("stall times must not be negative")
        if self.huge_listing is not None:
            command, lines, length = self.huge_listing
            if command not in HUGE_LISTINGS or lines < 0 or length < 1:
                raise ValueError(
                    f"huge_listing is (one of {sorted(HUGE_LISTINGS)}, lines >= 0, length >= 1)"
                )
        if any(n < 1 or seconds < 0 for n, seconds in self.trickle.values()):
            raise ValueError("trickle is (bytes >= 1, seconds >= 0) per command")
        # Frozen: normalise through object.__setattr__ (keys upper-cased, line
        # ends stripped, and private copies so a caller's dict cannot change us).
        object.__setattr__(self, "stall", {k.upper(): v for k, v in self.stall.items()})
        object.__setattr__(self, "trickle", {k.upper(): v for k, v in self.trickle.items()})
        errors = {k.upper(): v.rstrip(b"\r\n") for k, v in self.errors.items()}
        object.__setattr__(self, "errors", errors)
        object.__setattr__(self, "wrong_list_size", dict(self.wrong_list_size))

    def stall_for(self, command: str) -> float:
        """Seconds to wait before answering *command* (0.0 if none)."""
        return self.stall.get(command.upper(), 0.0)

    def trickle_for(self, command: str) -> tuple[int, float] | None:
        """``(bytes, seconds)`` to send the reply to *command* at, or None (all at once)."""
        return self.trickle.get(command.upper())

    def error_for(self, command: str) -> bytes | None:
        """The ``-ERR`` line (without CRLF) to send instead of answering *command*."""
        return self.errors.get(command.upper())
