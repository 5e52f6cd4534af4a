"""The mboxrd format: ``From `` separator lines and ``>From`` quoting.

An mbox is messages one after another, each opened by a separator line
``From <envelope sender> <asctime date>`` and closed by a blank line.  A
reader splits the file at lines that start with ``From ``, so such lines
inside a message must be hidden: mboxrd (the variant mutt, Dovecot and
Thunderbird read) prepends one ``>`` to every line matching ``^>*From ``,
and a reader removes one ``>`` from every line matching ``^>+From ``.  Unlike
the older mboxo, that round trip is exact for any message.

Everything here works on the stored form (LF line ends) and streams:
:class:`Quoter` keeps at most four bytes between chunks, whatever the line
lengths, so a hostile message cannot grow memory.
"""

from __future__ import annotations

import re
import time

#: Lines a reader would take for a separator (and their quoted forms).
_FROM_LINE = re.compile(rb"(?m)^(>*From )")
#: Lines to unquote on reading.
_QUOTED_LINE = re.compile(rb"(?m)^>(>*From )")
#: The envelope sender a delivery agent records (RFC 5322 §3.6.7 ``Return-Path``).
_RETURN_PATH = re.compile(rb"(?im)^return-path:[ \t]*<?([^<>\s]*)>?[ \t]*$")
#: What may stand in a separator line as the sender: printable ASCII, no
#: spaces or angle brackets, and not too long.
_SENDER = re.compile(rb"[!-;=?-~]{1,254}")
#: The sender of a message without one (``Return-Path: <>``), as Dovecot writes it.
NO_SENDER = b"MAILER-DAEMON"


class Quoter:
    """Streams a message into its mboxrd-quoted form.

    :meth:`feed` returns the quoted bytes for a chunk; :meth:`flush` the
    bytes held back at the end.  Only the start of a line can need a ``>``;
    since a run of ``>`` is quoted the same wherever the extra ``>`` goes,
    the run is passed on as it arrives and at most the four bytes ``From``
    wait for the next chunk to decide.
    """

    def __init__(self) -> None:
        #: True while the current line holds nothing but ``>`` so far.
        self._at_start = True
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        data, self._held = self._held + data, b""
        out: list[bytes] = []
        if not self._at_start:
            newline = data.find(b"\n")
            if newline < 0:
                return data
            out.append(data[: newline + 1])
            data = data[newline + 1 :]
            self._at_start = True
        last = data.rfind(b"\n") + 1
        out.append(_quote_lines(data[:last]))
        out.append(self._open_line(data[last:]))
        return b"".join(out)

    def _open_line(self, tail: bytes) -> bytes:
        """Quote the unfinished last line, holding back what is still undecided."""
        rest = tail.lstrip(b">")
        run = tail[: len(tail) - len(rest)]
        if len(rest) < 5 and b"From "[: len(rest)] == rest:
            self._held = rest
            return run
        self._at_start = False
        return _quote_lines(tail)

    def flush(self) -> bytes:
        """The bytes held back: a last line too short to be ``From ``."""
        held, self._held = self._held, b""
        return held


def _quote_lines(data: bytes) -> bytes:
    """Quote whole lines (*data* starts at a line start).  Most chunks hold no
    ``From `` at all, and a substring search is far cheaper than the regex."""
    return _FROM_LINE.sub(rb">\1", data) if b"From " in data else data


def quote(message: bytes) -> bytes:
    """The whole of *message* quoted (for tests and small inputs)."""
    quoter = Quoter()
    return quoter.feed(message) + quoter.flush()


def unquote(data: bytes) -> bytes:
    """Remove one ``>`` from each ``>+From `` line: the reader's side of :func:`quote`."""
    return _QUOTED_LINE.sub(rb"\1", data)


def envelope_sender(header: bytes) -> bytes:
    """The sender for the separator line, from the first ``Return-Path`` in *header*.

    A missing, empty (``<>``) or unusable one (spaces, control or 8-bit
    bytes, over 254 octets) gives :data:`NO_SENDER`: nothing a server sends
    can break the separator line.
    """
    end = header.find(b"\n\n")
    section = header if end < 0 else header[: end + 1]
    match = _RETURN_PATH.search(section)
    if match is None or not _SENDER.fullmatch(match.group(1)):
        return NO_SENDER
    return match.group(1)


def from_line(sender: bytes, when: float) -> bytes:
    """The separator line, ``From sender Fri Nov 27 17:47:38 2026``, in local
    time as ctime(3) writes it (as mutt and Dovecot do)."""
    return b"From %s %s\n" % (sender, time.asctime(time.localtime(when)).encode("ascii"))


def padding(tail: bytes) -> bytes:
    """What to write before a separator so it follows a blank line, given the
    last two bytes of the mbox (empty for an empty one)."""
    if not tail or tail.endswith(b"\n\n"):
        return b""
    return b"\n" if tail.endswith(b"\n") else b"\n\n"
