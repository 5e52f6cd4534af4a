"""An IMAP mailbox as a delivery target: APPEND, exactly once across crashes.

Why not :mod:`imaplib`
----------------------
imaplib verifies TLS when given a context and re-reads CAPABILITY after
STARTTLS, but it cannot keep popsync's bounds: ``append`` takes the whole
message as bytes (a 200 MB message would cost 200+ MB), a literal announced
in a reply is read whole whatever its size, untagged replies pile up in a
dict for the life of the connection, and nothing limits how long a command
may keep the client reading.  So this module speaks the few commands it
needs (RFC 3501: CAPABILITY, STARTTLS, AUTHENTICATE PLAIN / LOGIN, EXAMINE,
CREATE, APPEND, UID SEARCH, UID FETCH, LOGOUT) over
:class:`popsync.transport.Transport`, which already gives verified TLS and a
timeout on every call.  Every reply line, literal and command is bounded
(:data:`LINE_CAP`, :data:`LITERAL_CAP`, :data:`COMMAND_CAP`, ``timeout``).

APPEND always uses a synchronizing literal (RFC 3501 §7.5): the body is sent
only after the server's ``+``, streamed from the spool file in chunks with
each LF turned into CRLF, so memory stays bounded by the chunk size; a server
that refuses the size up front (``NO [OVERQUOTA]``) is answered before any
of the body is sent.  LITERAL+ would save one round trip per message but
takes that chance away; a batch is at most :data:`BATCH` messages.

Exactly once
------------
Before the APPENDs of a batch, :meth:`ImapTarget.intent` gives the ledger
``imap1 <mailbox hex> <UIDVALIDITY> <UIDNEXT> <size> <CRLF size> <sha256>
<sha256 with NUL as 0x80> <Message-ID>``
(UIDNEXT as known before the batch, kept current from APPENDUID).  After a
crash, :meth:`ImapTarget.recover` searches for each such message: UIDs from
the noted UIDNEXT on while UIDVALIDITY is unchanged (else all), narrowed by
its size and Message-ID, and every candidate confirmed by its SHA-256 over
the fetched body, CRLF turned back to LF (fetched in bounded pieces).  A
literal cannot carry NUL (RFC 3501 §4.3): Dovecot stores one as sent but
FETCH shows it as 0x80, so for a message with NULs the intent also notes
the hash of that form, and either hash confirms a copy.  Two messages with
the same bytes never claim one copy.  The same search gives the receipt
after an APPEND when the server does not offer UIDPLUS (RFC 4315), whose
APPENDUID otherwise names the new UID.

Only intents find copies: a message name alone (a lost ledger rebuilt from
the target) finds nothing in a mailbox, so such a message is APPENDed again.

The mailbox is created (CREATE, RFC 3501 §6.3.3) when it does not exist: the
config names it, and a migration wants it made.  Replies: ``NO [INUSE]`` or
``NO [UNAVAILABLE]`` (RFC 5530) refuse a message for now (the poll ends as
temporary); any other ``NO`` or ``BAD`` (``[OVERQUOTA]``, too big, ...)
refuses it for good -- it stays on the POP3 server, undeleted, and is
reported.  BYE, a lost connection or a timeout raise DeliveryError.

The password goes only into AUTHENTICATE PLAIN (or LOGIN), and only over TLS
unless ``allow_plaintext``; it never reaches an error text or a receipt.
"""

from __future__ import annotations

import base64
import hashlib
import re
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from popsync import failpoints
from popsync.deliver.base import Draft, Held, Pending, Receipt, Refusal
from popsync.deliver.spool import SpoolDraft
from popsync.errors import (
    DeliveryError,
    PopsyncError,
    SecurityError,
    TransportError,
    escape_server_text,
)
from popsync.identity import HEADER_CAP
from popsync.options import TlsMode
from popsync.transport import Transport

#: Messages one commit may cover (one ledger commit for their intents).
BATCH = 16
#: Longest reply line accepted, literals aside (a SEARCH of a big mailbox is long).
LINE_CAP = 1024 * 1024
#: Longest literal accepted in a reply, except the body pieces recovery asks for.
LITERAL_CAP = 64 * 1024
#: Body bytes asked for per FETCH when a copy is hashed.
FETCH_PIECE = 1024 * 1024
#: Most bytes one command's replies may take (untagged lines and literals).
COMMAND_CAP = 8 * 1024 * 1024
#: Bytes of a spooled body read per chunk of an APPEND.
SEND_CHUNK = 256 * 1024
#: Longest Message-ID used in a search; a longer one is not used at all.
MESSAGE_ID_CAP = 250
#: Response codes that mean "not now" (RFC 5530 §3).
TEMPORARY_CODES = frozenset({"INUSE", "UNAVAILABLE"})

_TAGGED = re.compile(rb"(?P<tag>A\d+) (?P<status>OK|NO|BAD)(?: (?P<text>.*))?\Z", re.I | re.S)
_CODE = re.compile(rb"\[(?P<code>[^\]]*)\]")
_LITERAL_END = re.compile(rb"\{(?P<size>\d{1,12})\}\Z")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(?P<id><[\x21-\x7e]+>)", re.I | re.M)
_FETCH_NUMBER = re.compile(rb"\b(?P<key>UID|RFC822\.SIZE) (?P<value>\d+)")
_INTERNALDATE = re.compile(rb'INTERNALDATE "(?P<date>[^"]*)"')


class ImapConfig(Protocol):
    """What the target reads of the config's ``imap:`` mapping
    (:class:`popsync.config.ImapTarget`)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def tls(self) -> TlsMode: ...
    @property
    def ca_file(self) -> Path | None: ...
    @property
    def username(self) -> str: ...
    @property
    def allow_plaintext(self) -> bool: ...
    @property
    def mailbox(self) -> str: ...

    def secret(self) -> str: ...

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context for ``tls: implicit`` or ``starttls`` (pins, client
        certificate and minimum version included)."""
        ...


class ImapAuthError(DeliveryError):
    """The IMAP server refused the login: the user must fix the credentials."""

    temporary = False


# -- the wire ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One untagged reply: its text (with ``{n}`` markers) and its literals."""

    line: bytes
    literals: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Done:
    """The tagged end of a command."""

    tag: bytes
    status: str  # OK, NO or BAD
    text: bytes
    untagged: tuple[Reply, ...] = ()

    @property
    def code(self) -> str:
        """The response code's first word, upper case ("" if none)."""
        match = _CODE.match(self.text)
        return match["code"].split(b" ", 1)[0].decode("ascii", "replace").upper() if match else ""

    @property
    def code_args(self) -> list[bytes]:
        match = _CODE.match(self.text)
        return match["code"].split()[1:] if match else []

    def shown(self) -> str:
        return f"{self.status} {escape_server_text(self.text)}"


class Wire:
    """Commands out, bounded replies in, over one transport.

    Raises DeliveryError for anything the server does wrong (BYE, a reply
    past a cap, nonsense) and for a lost connection or a timeout.
    """

    def __init__(self, transport: Transport, where: str) -> None:
        self.transport = transport
        self.where = where
        self._buf = bytearray()
        self._tag = 0
        self._until = 0.0
        self._budget = 0

    # -- receiving -----------------------------------------------------------

    def arm(self, budget: int = COMMAND_CAP) -> None:
        """Start the limits of one command: ``timeout`` and *budget* bytes."""
        self._until = time.monotonic() + self.transport.timeout
        self._budget = budget

    def _fill(self) -> None:
        try:
            data = self.transport.recv(self._until)
        except TransportError as exc:
            raise DeliveryError(f"{self.where}: {exc}") from None
        if not data:
            raise DeliveryError(f"{self.where}: the server closed the connection")
        self._budget -= len(data)
        if self._budget < 0:
            raise DeliveryError(f"{self.where}: the server sent too much in reply")
        self._buf += data

    def line(self) -> bytes:
        """One line without its CRLF (at most :data:`LINE_CAP` bytes)."""
        start = 0
        while (end := self._buf.find(b"\r\n", start)) < 0:
            if len(self._buf) > LINE_CAP:
                raise DeliveryError(f"{self.where}: reply line longer than {LINE_CAP} octets")
            start = max(0, len(self._buf) - 1)
            self._fill()
        if end > LINE_CAP:
            raise DeliveryError(f"{self.where}: reply line longer than {LINE_CAP} octets")
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line

    def exact(self, size: int) -> bytes:
        while len(self._buf) < size:
            self._fill()
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def reply(self, literal_cap: int = LITERAL_CAP) -> Reply | Done | None:
        """The next reply: untagged, tagged, or None for a ``+`` continuation."""
        line = self.line()
        if line.startswith(b"+"):
            return None
        if (tagged := _TAGGED.match(line)) is not None:
            return Done(tagged["tag"], tagged["status"].decode().upper(), tagged["text"] or b"")
        if not line.startswith(b"* "):
            raise DeliveryError(f"{self.where}: unexpected reply {escape_server_text(line)}")
        parts = [line]
        literals: list[bytes] = []
        while (size := _LITERAL_END.search(parts[-1])) is not None:
            count = int(size["size"])
            if count > literal_cap:
                raise DeliveryError(f"{self.where}: the server sent a {count}-octet literal")
            literals.append(self.exact(count))
            parts.append(self.line())
        whole = b"".join(parts)
        if whole.upper().startswith(b"* BYE"):
            raise DeliveryError(f"{self.where}: the server said {escape_server_text(whole[2:])}")
        return Reply(whole, tuple(literals))

    # -- commands ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        try:
            self.transport.send(data)
        except TransportError as exc:
            raise DeliveryError(f"{self.where}: {exc}") from None

    def start(self, command: bytes) -> bytes:
        """Send ``<tag> <command>`` and return the tag."""
        self._tag += 1
        tag = b"A%d" % self._tag
        self.send(tag + b" " + command + b"\r\n")
        return tag

    def finish(self, tag: bytes, literal_cap: int = LITERAL_CAP) -> Done:
        """Read replies up to the tagged one for *tag*."""
        untagged: list[Reply] = []
        while True:
            reply = self.reply(literal_cap)
            if reply is None:
                raise DeliveryError(f"{self.where}: unexpected continuation request")
            if isinstance(reply, Reply):
                untagged.append(reply)
                continue
            if reply.tag != tag:
                raise DeliveryError(f"{self.where}: reply for a command never sent")
            return Done(tag, reply.status, reply.text, tuple(untagged))

    def command(self, command: bytes, literal_cap: int = LITERAL_CAP) -> Done:
        """Run one command to its end (bounded by ``timeout`` and :data:`COMMAND_CAP`)."""
        self.arm()
        tag = self.start(command)
        return self.finish(tag, literal_cap)

    def buffered(self) -> bool:
        """Whether bytes arrived that no reply has read yet."""
        return bool(self._buf)


# -- values on the wire -------------------------------------------------------------------


def quoted(text: str) -> bytes:
    """An IMAP quoted string (RFC 3501 §4.3); DeliveryError for CR, LF or NUL."""
    raw = text.encode("utf-8")
    if any(c in raw for c in b"\r\n\0"):
        raise DeliveryError("IMAP strings cannot carry CR, LF or NUL")
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def mailbox_name(name: str) -> bytes:
    """*name* as a quoted IMAP mailbox: modified UTF-7 (RFC 3501 §5.1.3)."""
    out: list[str] = []
    wide: list[str] = []

    def flush() -> None:
        if wide:
            raw = "".join(wide).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            wide.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            wide.append(char)
    flush()
    return quoted("".join(out))


def to_wire(chunk: bytes) -> bytes:
    """The stored form's LF line ends as IMAP's CRLF."""
    return chunk.replace(b"\n", b"\r\n")


class FromWire:
    """CRLF back to LF across chunk boundaries (a CR may end one chunk)."""

    def __init__(self) -> None:
        self._cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._cr:
            chunk = b"\r" + chunk
        self._cr = chunk.endswith(b"\r")
        if self._cr:
            chunk = chunk[:-1]
        return chunk.replace(b"\r\n", b"\n")

    def end(self) -> bytes:
        return b"\r" if self._cr else b""


# -- drafts and intents ---------------------------------------------------------------------


class ImapDraft(SpoolDraft):
    """A spooled body that also counts its lines (its CRLF size is size + lines)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.lines = 0
        self.has_nul = False
        self.intent: Intent | None = None

    def write(self, data: bytes) -> None:
        super().write(data)
        self.lines += data.count(b"\n")
        self.has_nul = self.has_nul or b"\0" in data

    def nul_mapped_sha256(self) -> str:
        """SHA-256 of the body with each NUL as 0x80 (how FETCH may show it), or "-"."""
        if not self.has_nul:
            return "-"
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk.replace(b"\0", b"\x80"))
        return digest.hexdigest()

    @property
    def wire_size(self) -> int:
        return self.size + self.lines

    def message_id(self) -> str:
        """The Message-ID usable in a SEARCH, or "" (none, too long, or odd)."""
        head = self.head(HEADER_CAP)
        end = head.find(b"\n\n")
        match = _MESSAGE_ID.search(head if end < 0 else head[: end + 1])
        if match is None or len(match["id"]) > MESSAGE_ID_CAP:
            return ""
        if b'"' in match["id"] or b"\\" in match["id"]:
            return ""  # kept out of the quoted string; size and hash still find it
        return match["id"].decode("ascii")


@dataclass(frozen=True, slots=True)
class Intent:
    """What recovery needs to find one APPENDed message again."""

    mailbox: str
    uidvalidity: int
    uidnext: int
    size: int
    wire_size: int
    sha256: str
    #: The hash with NUL as 0x80, or "-" for a message without NUL.
    sha256_nul: str
    message_id: str

    def text(self) -> str:
        box = self.mailbox.encode("utf-8").hex()
        fields = (box, self.uidvalidity, self.uidnext, self.size, self.wire_size, self.sha256)
        tail = f" {self.sha256_nul} {self.message_id or '-'}"
        return "imap1 " + " ".join(map(str, fields)) + tail

    def matches(self, sha256: str) -> bool:
        return sha256 in (self.sha256, self.sha256_nul)

    @classmethod
    def parse(cls, text: str) -> Intent | None:
        """The intent noted as *text*, or None if it is not one of ours."""
        parts = text.split(" ")
        if len(parts) != 9 or parts[0] != "imap1":
            return None
        try:
            box = bytes.fromhex(parts[1]).decode("utf-8")
            numbers = int(parts[2]), int(parts[3]), int(parts[4]), int(parts[5])
        except (ValueError, UnicodeDecodeError):
            return None
        return cls(box, *numbers, parts[6], parts[7], "" if parts[8] == "-" else parts[8])


@dataclass(frozen=True, slots=True)
class Found:
    """A copy in the mailbox confirmed to be the message looked for."""

    uid: int
    wire_size: int
    header_section: bytes
    delivered_at: float


# -- the session ------------------------------------------------------------------------------


class ImapSession:
    """A logged-in IMAP connection with one mailbox examined."""

    def __init__(self, wire: Wire, capabilities: set[str]) -> None:
        self.wire = wire
        self.where = wire.where
        self.capabilities = capabilities
        self.examined = ""
        self.uidvalidity = 0
        self.uidnext = 0

    # -- mailboxes -----------------------------------------------------------

    def examine(self, mailbox: str, *, create: bool) -> bool:
        """EXAMINE *mailbox* (read-only: flags of other clients are left alone),
        first creating it if it does not exist and *create*.

        False if it does not exist and not *create*.  Raises DeliveryError.
        """
        done = self.wire.command(b"EXAMINE " + mailbox_name(mailbox))
        if done.status == "NO" and done.code == "NONEXISTENT" and not create:
            return False
        if done.status != "OK" and create:
            self.create(mailbox)
            done = self.wire.command(b"EXAMINE " + mailbox_name(mailbox))
        if done.status != "OK":
            raise DeliveryError(f"{self.where}: cannot open mailbox {mailbox!r}: {done.shown()}")
        self.examined = mailbox
        self.uidvalidity = self.uidnext = 0
        for reply in done.untagged:
            match = _CODE.search(reply.line)
            if reply.line.upper().startswith(b"* OK") and match is not None:
                self._status_code(match["code"].split())
        if not self.uidvalidity:
            raise DeliveryError(f"{self.where}: mailbox {mailbox!r} has no UIDVALIDITY")
        return True

    def _status_code(self, words: list[bytes]) -> None:
        if len(words) == 2 and words[1].isdigit():
            if words[0].upper() == b"UIDVALIDITY":
                self.uidvalidity = int(words[1])
            elif words[0].upper() == b"UIDNEXT":
                self.uidnext = int(words[1])

    def create(self, mailbox: str) -> None:
        done = self.wire.command(b"CREATE " + mailbox_name(mailbox))
        if done.status != "OK" and done.code != "ALREADYEXISTS":
            raise DeliveryError(f"{self.where}: cannot create mailbox {mailbox!r}: {done.shown()}")

    # -- APPEND --------------------------------------------------------------

    def append(self, draft: ImapDraft) -> Done:
        """APPEND *draft* into the examined mailbox; its tagged reply.

        The literal is synchronizing: a refusal before the ``+`` costs no body.
        """
        self.wire.arm()
        head = b"APPEND " + mailbox_name(self.examined) + b" {%d}" % draft.wire_size
        tag = self.wire.start(head)
        reply = self.wire.reply()
        while isinstance(reply, Reply):  # untagged news (EXISTS, ...) may come first
            reply = self.wire.reply()
        if isinstance(reply, Done):
            if reply.tag != tag:
                raise DeliveryError(f"{self.where}: reply for a command never sent")
            return reply
        for chunk in draft.chunks(SEND_CHUNK):
            self.wire.send(to_wire(chunk))
            failpoints.failpoint("imap_mid_append")
        self.wire.send(b"\r\n")
        self.wire.arm()  # the reply's time starts once the body is sent
        return self.wire.finish(tag)

    # -- finding a copy --------------------------------------------------------

    def find(self, intent: Intent, taken: frozenset[int] = frozenset()) -> Found | None:
        """The copy of the message *intent* describes, confirmed by its hash, or None.

        UIDs in *taken* are copies already matched to other messages (two
        messages with the same bytes must not both claim one copy).
        """
        since = max(intent.uidnext if intent.uidvalidity == self.uidvalidity else 1, 1)
        size = intent.wire_size
        criteria = b"UID %d:* LARGER %d SMALLER %d" % (since, size - 1, size + 1)
        for uid in self.search(criteria, intent.message_id):
            # "n:*" also matches the highest UID when it is below n (RFC 3501 §6.4.8)
            if uid < since or uid in taken:
                continue
            found = self.confirm(uid, intent)
            if found is not None:
                return found
        return None

    def search(self, criteria: bytes, message_id: str) -> list[int]:
        if message_id:
            criteria += b" HEADER Message-ID " + quoted(message_id)
        done = self.wire.command(b"UID SEARCH " + criteria)
        if done.status != "OK":
            raise DeliveryError(f"{self.where}: SEARCH failed: {done.shown()}")
        uids: list[int] = []
        for reply in done.untagged:
            if reply.line.upper().startswith(b"* SEARCH"):
                uids += [int(w) for w in reply.line.split()[2:] if w.isdigit()]
        return sorted(set(uids))

    def confirm(self, uid: int, intent: Intent) -> Found | None:
        """Fetch *uid* in pieces and compare its LF form with the intent's size and hash."""
        size = intent.size
        done = self.wire.command(b"UID FETCH %d (UID RFC822.SIZE INTERNALDATE)" % uid)
        wire_size = _fetch_number(done, b"RFC822.SIZE")
        if done.status != "OK" or wire_size is None or wire_size < size:
            return None
        digest, back, head = hashlib.sha256(), FromWire(), bytearray()
        stored = 0
        for piece in self.pieces(uid, wire_size):
            data = back.feed(piece)
            digest.update(data)
            stored += len(data)
            if len(head) <= HEADER_CAP:
                head += data[: HEADER_CAP + 1 - len(head)]
            if stored > size:
                return None
        tail = back.end()
        digest.update(tail)
        stored += len(tail)
        if stored != size or not intent.matches(digest.hexdigest()):
            return None
        end = head.find(b"\n\n")
        section = bytes(head[: end + 2]) if end >= 0 else bytes(head)
        return Found(uid, wire_size, section, _internaldate(done))

    def pieces(self, uid: int, wire_size: int) -> Iterator[bytes]:
        offset = 0
        while offset < wire_size:
            ask = b"UID FETCH %d (BODY.PEEK[]<%d.%d>)" % (uid, offset, FETCH_PIECE)
            done = self.wire.command(ask, literal_cap=FETCH_PIECE)
            data = b"".join(lit for r in done.untagged for lit in r.literals)
            if done.status != "OK" or not data:
                return
            yield data
            offset += len(data)

    # -- the end ---------------------------------------------------------------

    def logout(self) -> None:
        """LOGOUT, bounded by the timeout; never raises."""
        with suppress(PopsyncError):
            self.wire.command(b"LOGOUT")


def _fetch_number(done: Done, key: bytes) -> int | None:
    for reply in done.untagged:
        for match in _FETCH_NUMBER.finditer(reply.line):
            if match["key"].upper() == key:
                return int(match["value"])
    return None


def _internaldate(done: Done) -> float:
    for reply in done.untagged:
        if (match := _INTERNALDATE.search(reply.line)) is not None:
            text = match["date"].decode("ascii", "replace").strip()
            try:
                return datetime.strptime(text, "%d-%b-%Y %H:%M:%S %z").timestamp()
            except ValueError:
                break
    return time.time()


# -- opening ----------------------------------------------------------------------------------


def _capabilities(done: Done) -> set[str]:
    words: list[bytes] = []
    for reply in done.untagged:
        if reply.line.upper().startswith(b"* CAPABILITY"):
            words += reply.line.split()[2:]
    return {w.decode("ascii", "replace").upper() for w in words}


def _ask_capabilities(wire: Wire) -> set[str]:
    done = wire.command(b"CAPABILITY")
    caps = _capabilities(done)
    if done.status != "OK" or "IMAP4REV1" not in caps:
        raise DeliveryError(f"{wire.where}: not an IMAP4rev1 server ({done.shown()})")
    return caps


def _greeting(wire: Wire) -> None:
    """The server's ``* OK`` greeting.  A ``* PREAUTH`` one is refused: popsync
    always logs in as the configured user, over TLS unless told otherwise."""
    wire.arm()
    reply = wire.reply()
    if not isinstance(reply, Reply) or not reply.line.upper().startswith(b"* OK"):
        shown = escape_server_text(reply.line) if isinstance(reply, Reply) else "+"
        raise DeliveryError(f"{wire.where}: not an IMAP greeting: {shown}")


def _starttls(wire: Wire, config: ImapConfig) -> set[str]:
    """STARTTLS (RFC 3501 §6.2.1, RFC 7817 for the name checked); the new CAPABILITY."""
    if "STARTTLS" not in _ask_capabilities(wire):
        raise SecurityError(f"{wire.where}: the server does not offer STARTTLS; refusing to log in")
    done = wire.command(b"STARTTLS")
    if done.status != "OK":
        raise SecurityError(f"{wire.where}: STARTTLS refused: {done.shown()}")
    if wire.buffered():  # bytes sent before the handshake would be trusted after it
        raise SecurityError(f"{wire.where}: the server sent data ahead of the TLS handshake")
    wire.transport.start_tls(config.ssl_context())
    return _ask_capabilities(wire)  # what was said in clear is forgotten (RFC 3501 §6.2.1)


def _login(wire: Wire, caps: set[str], config: ImapConfig) -> None:
    """AUTHENTICATE PLAIN when offered (any bytes), else LOGIN.

    Raises ImapAuthError (refused), SecurityError (no TLS, no consent).
    """
    if not wire.transport.is_tls and not config.allow_plaintext:
        raise SecurityError(
            f"{wire.where}: refusing to send the password without TLS "
            "(set allow_plaintext: true to accept that)"
        )
    if "LOGINDISABLED" in caps and "AUTH=PLAIN" not in caps:
        raise SecurityError(f"{wire.where}: the server allows no login on this connection")
    user, secret = config.username, config.secret()
    if "AUTH=PLAIN" in caps:
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + secret.encode())
        wire.arm()
        tag = wire.start(b"AUTHENTICATE PLAIN")
        reply = wire.reply()
        while isinstance(reply, Reply):
            reply = wire.reply()
        if reply is None:
            wire.send(token + b"\r\n")
            done = wire.finish(tag)
        elif reply.tag == tag:
            done = reply
        else:
            raise DeliveryError(f"{wire.where}: reply for a command never sent")
    else:
        done = wire.command(b"LOGIN " + quoted(user) + b" " + quoted(secret))
    if done.status != "OK":
        raise ImapAuthError(f"{wire.where}: login as {user!r} refused: {done.shown()}")


def connect(config: ImapConfig, timeout: float) -> ImapSession:
    """Connect, secure, log in and examine the configured mailbox (creating it).

    Raises DeliveryError, ImapAuthError, SecurityError.
    """
    where = f"imap target {config.host}:{config.port}"
    implicit = config.tls == TlsMode.IMPLICIT
    context = config.ssl_context() if implicit else None
    try:
        transport = Transport.connect(
            config.host, config.port, timeout=timeout, ssl_context=context
        )
    except SecurityError as exc:
        raise SecurityError(f"imap target: {exc}") from None
    except TransportError as exc:
        raise DeliveryError(f"imap target: {exc}") from None
    wire = Wire(transport, where)
    try:
        _greeting(wire)
        if config.tls == TlsMode.STARTTLS:
            try:
                caps = _starttls(wire, config)
            except TransportError as exc:  # the handshake failed (not a certificate)
                raise DeliveryError(f"imap target: {exc}") from None
        else:
            caps = _ask_capabilities(wire)
        _login(wire, caps, config)
        session = ImapSession(wire, _ask_capabilities(wire))
        session.examine(config.mailbox, create=True)
    except BaseException:
        transport.close()
        raise
    return session


# -- the target -------------------------------------------------------------------------------


class ImapTarget:
    """One poll's deliveries into one IMAP mailbox (see the module docstring)."""

    kind = "imap"
    batch = BATCH
    exactly_once = True

    def __init__(self, session: ImapSession, mailbox: str) -> None:
        self.session = session
        self.mailbox = mailbox
        self._drafts: list[ImapDraft] = []

    def reserve(self, name: str) -> None:
        return None

    def begin(self, name: str, uid: bytes) -> ImapDraft:
        draft = ImapDraft(name)
        self._drafts.append(draft)
        return draft

    def end(self, draft: Draft) -> None:
        return None  # the body is sent by commit, after the ledger noted the intent

    def intent(self, draft: Draft) -> str:
        assert isinstance(draft, ImapDraft)
        return self._intent(draft).text()

    def _intent(self, draft: ImapDraft) -> Intent:
        """The draft's intent, computed once (the UIDNEXT known before its batch)."""
        if draft.intent is None:
            draft.intent = self._new_intent(draft)
        return draft.intent

    def _new_intent(self, draft: ImapDraft) -> Intent:
        s = self.session
        return Intent(
            self.mailbox,
            s.uidvalidity,
            s.uidnext,
            draft.size,
            draft.wire_size,
            draft.sha256_hex,
            draft.nul_mapped_sha256(),
            draft.message_id(),
        )

    def commit(self, drafts: Sequence[Draft]) -> list[Receipt | Refusal]:
        """APPEND each draft in turn; a receipt or a refusal each (see the module doc).

        Raises DeliveryError when the connection fails: then none counts.
        """
        results: list[Receipt | Refusal] = []
        for draft in drafts:
            assert isinstance(draft, ImapDraft)
            results.append(self._deliver(draft))
            failpoints.failpoint("imap_after_append")
            self._forget(draft)
        return results

    def _deliver(self, draft: ImapDraft) -> Receipt | Refusal:
        intent = self._intent(draft)
        done = self.session.append(draft)
        if done.status == "NO" and done.code == "TRYCREATE":  # removed since the poll began
            self.session.create(self.mailbox)
            done = self.session.append(draft)
        if done.status != "OK":
            return Refusal(done.shown(), temporary=done.code in TEMPORARY_CODES)
        uid = self._appended_uid(done, intent)
        self.session.uidnext = max(self.session.uidnext, uid + 1)
        return Receipt(f"{self.mailbox} {self.session.uidvalidity} {uid}")

    def _appended_uid(self, done: Done, intent: Intent) -> int:
        args = done.code_args
        same_mailbox = len(args) == 2 and args[0] == b"%d" % self.session.uidvalidity
        if done.code == "APPENDUID" and same_mailbox and args[1].isdigit():
            return int(args[1])
        self.session.wire.command(b"NOOP")  # the new message must be visible to SEARCH
        found = self.session.find(intent)
        if found is None:
            raise DeliveryError(f"{self.session.where}: APPEND succeeded but the copy is not found")
        return found.uid

    def recover(self, pending: Sequence[Pending]) -> list[Held]:
        """Look each pending message with an IMAP intent up (see the module doc).

        Raises DeliveryError.
        """
        held: list[Held] = []
        taken: set[tuple[str, int]] = set()
        for item in pending:
            intent = Intent.parse(item.intent) if item.intent else None
            if intent is None:
                continue  # no APPEND was ever started for it
            if intent.mailbox != self.session.examined and not self.session.examine(
                intent.mailbox, create=False
            ):
                continue  # that mailbox is gone, and the copy with it
            claimed = frozenset(uid for box, uid in taken if box == intent.mailbox)
            found = self.session.find(intent, claimed)
            if found is not None:
                taken.add((intent.mailbox, found.uid))
                held.append(self._held(item.name, intent, found))
        if self.session.examined != self.mailbox:
            self.session.examine(self.mailbox, create=True)
        return held

    def _held(self, name: str, intent: Intent, found: Found) -> Held:
        return Held(
            asked=name,
            name=name,
            size=intent.size,
            sha256=intent.sha256,
            wire_size=found.wire_size,
            header_section=found.header_section,
            delivered_at=found.delivered_at,
            receipt=f"{intent.mailbox} {self.session.uidvalidity} {found.uid}",
        )

    def _forget(self, draft: ImapDraft) -> None:
        draft.abort()
        if draft in self._drafts:
            self._drafts.remove(draft)

    def close(self) -> None:
        for draft in self._drafts:
            draft.abort()
        self._drafts.clear()


@contextmanager
def open_imap_target(
    spec: ImapConfig, *, account: str, timeout: float, warn: Callable[[str], None]
) -> Iterator[ImapTarget]:
    """Log in to the IMAP target of *account* for one poll; LOGOUT on exit.

    Raises DeliveryError (cannot connect, mailbox unusable), ImapAuthError
    (login refused) or SecurityError (certificate not trusted, no TLS).
    """
    if spec.tls == TlsMode.NONE:
        warn(f"account {account}: the IMAP target {spec.host} is reached without TLS")
    session = connect(spec, timeout)
    target = ImapTarget(session, spec.mailbox)
    try:
        yield target
    finally:
        target.close()
        session.logout()
        session.wire.transport.close()


__all__ = ["BATCH", "ImapAuthError", "ImapTarget", "open_imap_target"]
