"""Bounded readers over the receive buffer: status lines and multi-line bodies.

Contract (RFC 1939 §3):

* A status line ends at LF (CRLF expected; a bare LF is tolerated, as mpop
  and poplib do).  A line longer than ``max_line`` is a protocol violation
  -- the buffer never grows past that while we wait for a line end.
* A multi-line body ends with a line holding a single ``.`` -- ``.CRLF``,
  or ``.LF``.  Every other line that starts with ``.`` had one ``.`` added
  by the server (byte-stuffing); exactly one is removed.
* Bodies are never held whole.  :meth:`BodyReader.read` consumes whatever complete
  lines the buffer holds and hands them out at once, so memory is bounded by
  the receive chunk size, not by the message.  A body line with no line end
  in sight is streamed too once it exceeds ``partial_flush`` bytes, so a
  message with a 10 MB line neither fails nor buffers 10 MB.
* Body line ends are stored as LF (the Maildir convention); bare CR, lone
  LF and NUL bytes pass through untouched.
* Listings are handed out as raw runs of complete lines
  (:func:`take_listing_lines`), for the listing's own parser to bound and
  check as they stream; a listing is never held whole here.

Speed: a body is read by one pass over the receive buffer in C when the
optional accelerator ``popsync.pop3._bodypass`` is built (it is, by any
install with a C compiler; see setup.py), else by the pure-Python
:func:`_scan_python`, which is the reference: the tests run both on the same
random input and require the same results.  The Python version is never a
Python call per line either: one regex search finds the terminator in either
line-end form, ``re.sub`` turns CRLF into LF, and a second ``re.subn``
unstuffs dots (and counts them) only when a ``\n.`` occurs at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from popsync.errors import RemoteProtocolError

#: A body line without a line end is streamed once it is this long.
PARTIAL_FLUSH = 64 * 1024


def take_line(buf: bytearray, max_line: int) -> bytes | None:
    """Remove and return the first line of *buf* (without CRLF / LF), or None.

    Raises :class:`RemoteProtocolError` if the line is longer than *max_line*
    octets (its end counted), whether or not its end has arrived.
    """
    end = buf.find(b"\n", 0, max_line)
    if end < 0:
        if len(buf) >= max_line:
            raise RemoteProtocolError(f"server sent a line longer than {max_line} octets")
        return None
    line = bytes(buf[:end])
    del buf[: end + 1]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line


@dataclass(slots=True)
class BodyChunk:
    """What one call of :func:`read_body` produced."""

    data: bytes  # unstuffed, LF line ends
    octets: int  # the same data counted as on the wire (RFC 1939 §11)
    done: bool  # the terminating ``.`` line was consumed


# The terminating line in either line-end form; one regex pass over the
# buffer is faster than two ``find`` passes (CRLF and bare LF).
_TERMINATOR = re.compile(rb"\n\.\r?\n")
# re.sub with a literal pattern beats bytes.replace by ~1.5x when, as in
# mail, matches come every few dozen bytes (measured: 930 vs 590 MB/s), and
# by ~2.4x for the stuffed line starts (1,200 vs 500 MB/s on 256 KiB of mail
# with a stuffed line every ~450 bytes): bytes.replace counts, then copies.
_CRLF = re.compile(rb"\r\n")
_STUFFED = re.compile(rb"\n\.")


def _find_terminator(buf: bytearray, at_line_start: bool) -> tuple[int, int]:
    """(start of the terminator line, its length), or (-1, 0) if not yet seen."""
    if at_line_start:
        if buf.startswith(b".\r\n"):
            return 0, 3
        if buf.startswith(b".\n"):
            return 0, 2
    match = _TERMINATOR.search(buf)
    if match is None:
        return -1, 0
    return match.start() + 1, match.end() - match.start() - 1


def _unstuff(raw: bytes, at_line_start: bool, crlf_to_lf: bool) -> tuple[bytes, int]:
    """Remove the stuffing dot of every line start in *raw*; return (data, dots removed)."""
    data = _CRLF.sub(b"\n", raw) if crlf_to_lf else raw
    dots = 0
    if at_line_start and data.startswith(b"."):
        data = data[1:]
        dots = 1
    if b"\n." in data:  # rare in real mail: skip the copy when there is none
        data, stuffed = _STUFFED.subn(b"\n", data)
        dots += stuffed  # one byte per stuffed line
    return data, dots


#: (data, octets, consumed, done, next_line_start) of one body read; see _scan_python.
ScanResult = tuple[bytes, int, int, bool, bool]
Scan = Callable[[bytearray, bool, bool, int], ScanResult]


def _scan_python(
    buf: bytearray, at_line_start: bool, crlf_to_lf: bool, partial_flush: int
) -> ScanResult:
    """Read what can be read of the body in *buf*; *buf* itself is not changed.

    Returns the unstuffed data (LF line ends if *crlf_to_lf*), its size as
    counted on the wire, how many octets of *buf* were consumed (the
    terminating line included), whether the terminating line was seen, and
    whether the next octet after the consumed ones starts a line.
    The reference for the C accelerator's ``scan``, which returns the same.
    """
    term, term_len = _find_terminator(buf, at_line_start)
    done = term >= 0
    if done:
        cut = term
        next_line_start = True
    else:
        last_lf = buf.rfind(b"\n")
        cut = last_lf + 1
        next_line_start = cut > 0 or at_line_start
        if len(buf) - cut > partial_flush:
            # A very long line: stream it, but keep a trailing CR back so a
            # CRLF split across receives is still recognised as one line end,
            # and keep the line-start state honest (we are now mid-line).
            cut = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
            next_line_start = False
    with memoryview(buf) as view:  # one copy, not two (slice, then bytes)
        raw = bytes(view[:cut])
    data, dots = _unstuff(raw, at_line_start, crlf_to_lf) if raw else (b"", 0)
    return data, len(raw) - dots, cut + term_len, done, next_line_start


def _load_accelerator() -> Scan | None:
    try:
        from popsync.pop3._bodypass import scan
    except ImportError:  # built without a C compiler: the pure-Python reader
        return None
    return scan


_scan_c = _load_accelerator()
_scan: Scan = _scan_python if _scan_c is None else _scan_c


def accelerated() -> bool:
    """Whether bodies are read by the C accelerator."""
    return _scan is _scan_c


def use_accelerator(on: bool) -> None:
    """Read bodies with the C accelerator (*on*) or the pure-Python reference.

    For tests and benchmarks; the default is the accelerator when it is built.
    Raises :class:`RuntimeError` if *on* and the accelerator is not built.
    """
    global _scan  # noqa: PLW0603 -- one process-wide switch, read on every body read
    if on and _scan_c is None:
        raise RuntimeError("popsync.pop3._bodypass is not built")
    _scan = _scan_c if on and _scan_c is not None else _scan_python


class BodyReader:
    """Streams one multi-line body out of a receive buffer.

    Holds only the "are we at the start of a line" bit between calls; the
    buffer itself belongs to the connection.
    """

    __slots__ = ("at_line_start", "crlf_to_lf", "partial_flush")

    def __init__(self, *, crlf_to_lf: bool = True, partial_flush: int = PARTIAL_FLUSH) -> None:
        """Raises :class:`ValueError` if *partial_flush* is below 2.

        A shorter flush could stream a terminating ``.`` line (or its ``.CR``
        start) before its line end arrives, and take it for stuffing.
        """
        if partial_flush < 2:
            raise ValueError(f"partial_flush must be at least 2, not {partial_flush}")
        self.at_line_start = True
        self.crlf_to_lf = crlf_to_lf
        self.partial_flush = partial_flush

    def read(self, buf: bytearray) -> BodyChunk:
        """Consume what can be consumed of *buf*; the rest stays for later."""
        data, octets, consumed, done, self.at_line_start = _scan(
            buf, self.at_line_start, self.crlf_to_lf, self.partial_flush
        )
        del buf[:consumed]
        return BodyChunk(data, octets, done)


def take_listing_lines(buf: bytearray) -> tuple[bytes, bool]:
    """Consume the complete lines of a listing (CAPA, LIST, UIDL) from *buf*.

    Returns (those lines exactly as received -- line ends and stuffing dots
    kept, the terminating ``.`` line removed; whether that line was seen).
    An unfinished last line stays in *buf*: the caller bounds its length,
    and the listing's parser checks every complete line
    (:class:`popsync.pop3.listing.ListingParser`).
    """
    term, term_len = _find_terminator(buf, True)  # listings resume at line starts
    done = term >= 0
    cut = term if done else buf.rfind(b"\n") + 1
    with memoryview(buf) as view:
        raw = bytes(view[:cut])
    del buf[: cut + term_len]
    return raw, done
