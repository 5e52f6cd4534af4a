"""``popsync import``: adopt the unique-ids another POP3 client already fetched.

A leave-on-server user moving from fetchmail, getmail or mpop to popsync
would otherwise download every message on the server again.  Their state
file says which unique-ids (RFC 1939 §7 UIDL) the old tool has fetched;
those of this account become ledger rows that count as delivered now, with
no local copy, so popsync never fetches them.

Formats read (each checked against files written by the Debian packages
fetchmail 6.4.37, getmail6 6.18.11 and mpop 1.4.18):

* **fetchmail** ``--idfile`` (default ``~/.fetchids``; fetchmail(1), and
  ``uid.c``, which reads and writes it): one line ``USER@HOST UID`` per
  fetched message, for every account fetchmail polls.  The user ends at the
  last ``@`` before the first space after the first ``@`` (a user may hold
  ``@``); HOST is the ``via`` host, else the poll name; no port.
* **getmail6** ``oldmail-SERVER-PORT-USERNAME`` in the getmail directory
  (getmail6 ``getmailcore/_retrieverbases.py``): one file per account, named
  from the rc values with each run of ``/ : ; < > |`` turned into ``-``;
  one line ``UID NUL EPOCH`` per message.  getmail writes a POP UID with
  every ``/`` turned into ``-``, so ``a/b`` and ``a-b`` are one entry there.
  popsync adopts the UID as written: a server UID holding ``/`` is then not
  recognised and is fetched once more -- at worst a duplicate, never a
  lost message.  (Adopting both spellings could mark a different message,
  one really named ``a-b``, as fetched when it never was.)
* **mpop** ``uidls_file`` (mpop's manual, ``src/uidls.c``): optional ``#``
  comment lines, then per account a header `` N HOST USER`` (a leading
  space) followed by exactly N UID lines; mpop 1.4.23 and later append
  `` EPOCH`` to each UID.  No port.

An entry belongs to the account when its user equals ``username`` and its
host equals ``host``, both compared case-insensitively as fetchmail does,
and, where the file records a port (getmail only), the port equals ``port``.
UIDs are bytes, compared exactly.

Deletion: an adopted row has no stored copy to compare with the server's
message, so :func:`popsync.identity.judge` never confirms it and popsync
never DELEs it (``delete_after_days`` withholds it, with a warning).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from popsync.errors import ConfigError, escape_server_text

if TYPE_CHECKING:
    from popsync.config import Account

Tool = Literal["fetchmail", "getmail", "mpop"]
TOOLS: Final[tuple[Tool, ...]] = ("fetchmail", "getmail", "mpop")

#: The receipt of an adopted row starts with this, then the tool's name.
RECEIPT_PREFIX: Final = "imported from "

#: Larger state files are refused unread: 50,000 UIDs of 70 octets are 3.5 MB.
MAX_FILE_SIZE: Final = 64 * 1024 * 1024

# getmail6 _retrieverbases.py: re.sub(r'[/\:;<>|]+', '-', ...) on each part.
_GETMAIL_UNSAFE = re.compile(rb"[/\\:;<>|]+")
_GETMAIL_NAME = re.compile(rb"oldmail-(.+)-([0-9]+)-(.+)", re.DOTALL)
_DIGITS = re.compile(rb"[0-9]+")


class StateFileError(ConfigError):
    """The state file cannot be read or parsed, or holds nothing for the account.

    A :class:`ConfigError`: the command line exits 2 with this one line.
    """


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose UIDs a list in a state file holds."""

    user: bytes
    host: bytes
    port: int | None  # None: the file does not record one
    #: getmail: ``SERVER-PORT-USERNAME`` from the file name, each run of
    #: ``/ : ; < > |`` written as ``-``.  Matched as a whole, because a host
    #: or user may itself hold ``-<digits>-``.
    getmail_name: bytes | None = None

    def __str__(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return escape_server_text(self.user + b"@" + self.host) + port

    def matches(self, account: Account) -> bool:
        """Is this the account's user at its server (and port, if recorded)?"""
        user, host = account.username.encode("utf-8"), account.host.encode("utf-8")
        if self.getmail_name is not None:
            mine = b"%s-%d-%s" % (_getmail_safe(host), account.port, _getmail_safe(user))
            return self.getmail_name.lower() == mine.lower()
        return (
            self.user.lower() == user.lower()
            and self.host.lower() == host.lower()
            and (self.port is None or self.port == account.port)
        )


@dataclass(slots=True)
class StateFile:
    """A parsed state file: the UIDs it holds per owner, in file order, each once."""

    tool: Tool
    path: Path
    lists: dict[Owner, list[bytes]] = field(default_factory=dict)

    def add(self, owner: Owner, uid: bytes) -> None:
        self.lists.setdefault(owner, []).append(uid)


@dataclass(frozen=True, slots=True)
class Selection:
    """What a state file holds for one account."""

    mine: list[bytes]  # this account's UIDs, each once, in file order
    ignored: int  # UIDs of other accounts


def _getmail_safe(value: bytes) -> bytes:
    return _GETMAIL_UNSAFE.sub(b"-", value)


def _bad(path: Path, tool: Tool, where: str, why: str) -> StateFileError:
    return StateFileError(f"{path}: not a {tool} state file: {where}{why}")


def _check_uid(path: Path, tool: Tool, lineno: int, uid: bytes) -> bytes:
    # RFC 1939 §7: a unique-id is 1 to 70 characters in 0x21-0x7E.  Longer
    # ones are accepted (popsync stores whatever a server sends), but never
    # an empty one or one with a space or control byte: no server lists that.
    if not uid or any(b <= 0x20 or b == 0x7F for b in uid):
        raise _bad(path, tool, f"line {lineno}: ", f"bad unique-id {escape_server_text(uid)!r}")
    return uid


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def parse_fetchmail(path: Path, data: bytes) -> StateFile:
    """Lines ``USER@HOST UID`` (fetchmail ``uid.c``); no header, no port."""
    out = StateFile("fetchmail", path)
    for lineno, line in enumerate(_lines(data), 1):
        at = line.find(b"@")
        space = line.find(b" ", at + 1) if at >= 0 else -1
        if at <= 0 or space < 0:
            raise _bad(path, "fetchmail", f"line {lineno}: ", "expected USER@HOST UID")
        owner_text = line[:space]
        last_at = owner_text.rfind(b"@")
        user, host = owner_text[:last_at], owner_text[last_at + 1 :]
        if not host:
            raise _bad(path, "fetchmail", f"line {lineno}: ", "no host before the unique-id")
        uid = _check_uid(path, "fetchmail", lineno, line[space + 1 :])
        out.add(Owner(user, host, None), uid)
    return out


def parse_getmail(path: Path, data: bytes) -> StateFile:
    """Lines ``UID NUL EPOCH``; the owner is in the file name (getmail6
    ``_retrieverbases.py``: ``oldmail-SERVER-PORT-USERNAME``)."""
    raw = path.name.encode("utf-8", "surrogateescape")
    name = _GETMAIL_NAME.fullmatch(raw)
    if name is None:
        raise _bad(path, "getmail", "", "its name is not oldmail-SERVER-PORT-USERNAME")
    owner = Owner(name[3], name[1], int(name[2]), getmail_name=raw.removeprefix(b"oldmail-"))
    out = StateFile("getmail", path)
    for lineno, line in enumerate(_lines(data), 1):
        uid, nul, epoch = line.partition(b"\0")
        if not nul or not _DIGITS.fullmatch(epoch):
            raise _bad(path, "getmail", f"line {lineno}: ", "expected UID, NUL, a time")
        out.add(owner, _check_uid(path, "getmail", lineno, uid))
    return out


def parse_mpop(path: Path, data: bytes) -> StateFile:
    """``#`` comments, then blocks: `` N HOST USER`` and N lines ``UID[ EPOCH]``
    (mpop ``src/uidls.c``)."""
    out = StateFile("mpop", path)
    lines = _lines(data)
    i = 0
    while i < len(lines) and lines[i].startswith(b"#"):
        i += 1
    while i < len(lines):
        header = lines[i].split(b" ")
        if len(header) != 4 or header[0] != b"" or not _DIGITS.fullmatch(header[1]):
            raise _bad(path, "mpop", f"line {i + 1}: ", "expected ' COUNT HOST USER'")
        count, owner = int(header[1]), Owner(header[3], header[2], None)
        if not header[2] or not header[3]:
            raise _bad(path, "mpop", f"line {i + 1}: ", "empty host or user")
        if i + count >= len(lines):
            ends = f"line {i + 1} announces {count} UIDs; the file ends first"
            raise _bad(path, "mpop", "", ends)
        for lineno in range(i + 2, i + 2 + count):
            uid, _, epoch = lines[lineno - 1].partition(b" ")
            if epoch and not _DIGITS.fullmatch(epoch):
                raise _bad(path, "mpop", f"line {lineno}: ", "expected UID or 'UID TIME'")
            out.add(owner, _check_uid(path, "mpop", lineno, uid))
        i += 1 + count
    return out


_PARSERS: Final = {"fetchmail": parse_fetchmail, "getmail": parse_getmail, "mpop": parse_mpop}


def read_state_file(name: str, path: Path) -> StateFile:
    """Read and parse *path* as the state file of the tool *name* (one of :data:`TOOLS`).

    Raises:
        StateFileError: the tool is unknown, or the file cannot be read, is
            too large, or is not in the tool's format.
    """
    tool = next((t for t in TOOLS if t == name), None)
    if tool is None:
        raise StateFileError(f"unknown tool {name!r} (known: {', '.join(TOOLS)})")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_SIZE:
        raise StateFileError(f"{path}: larger than {MAX_FILE_SIZE} bytes; not a {tool} state file")
    return _PARSERS[tool](path, data)


def select(state: StateFile, account: Account) -> Selection:
    """This account's UIDs in *state* (each once), and how many belong to others.

    Raises:
        StateFileError: *state* holds no UID for the account; the message says
            what it does hold.
    """
    mine: dict[bytes, None] = {}
    ignored = 0
    for owner, uids in state.lists.items():
        if owner.matches(account):
            mine.update(dict.fromkeys(uids))
        else:
            ignored += len(set(uids))
    if not mine:
        raise StateFileError(
            f"{state.path}: holds {_describe(state.lists.items())}, "
            f"none for {_wanted(account)} (account {account.name})"
        )
    return Selection(list(mine), ignored)


def _wanted(account: Account) -> str:
    return f"{escape_server_text(account.username)}@{escape_server_text(account.host)}"


def _describe(lists: Iterable[tuple[Owner, Sequence[bytes]]]) -> str:
    held = [_count_uids(len(set(uids))) + f" for {owner}" for owner, uids in lists if uids]
    if not held:
        return "no UIDs"
    if len(held) > 5:
        held = [*held[:5], f"and {len(held) - 5} more accounts"]
    return ", ".join(held)


def _count_uids(n: int) -> str:
    return f"{n} UID" if n == 1 else f"{n} UIDs"


def receipt(tool: Tool) -> str:
    """The receipt of a row adopted from *tool*'s state file."""
    return RECEIPT_PREFIX + tool
