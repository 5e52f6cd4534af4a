"""The names popsync gives messages in a Maildir, and the check every name passes.

A name is ``<first_seen>.P<32 hex>.<escaped host>``: the unique-name scheme
of maildir(5) with the middle part replaced by a hash of the account, the
server's UID and its occurrence. That gives two guarantees:

* **No server byte reaches a path.** The UID is only ever hashed; the host
  part is escaped; the result contains no ``/`` or ``:`` and never starts
  with a dot. Every name handed back to the Maildir (from the ledger) is
  checked by :func:`check_name`, so a corrupt ledger row cannot escape the
  Maildir either.
* **Exactly once.** The name is deterministic, so a re-run after a crash
  between link and ledger commit derives the same name and finds the copy it
  already delivered -- by the ``P<hex>`` part even if the time or host part
  differ (say, the machine was renamed), see :func:`name_hash`.
"""

from __future__ import annotations

import hashlib
import re
import socket

__all__ = [
    "base_hash",
    "check_info_sep",
    "check_name",
    "delivery_hash",
    "escape_host",
    "is_our_name",
    "name_hash",
    "unique_name",
]

#: Longest escaped host part; the name stays far below NAME_MAX (255) even
#: after a reader appends ":2,<flags>" or Dovecot its ",S=<size>".
_HOST_MAX = 64
#: Longest name accepted from a caller (ours are at most ~120 characters).
_NAME_MAX = 200

# A popsync name, strict form: decides which tmp/ files are ours to sweep.
_OUR_NAME = re.compile(r"[0-9]+\.P[0-9a-f]{32}\.[A-Za-z0-9.\\-]+")
# Loose form for recognising a delivered file by its hash even if something
# appended to the name (e.g. Dovecot's ",S=<size>").
_HASH_PREFIX = re.compile(r"[0-9]+\.(P[0-9a-f]{32})\.")
_HOST_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-")


def delivery_hash(account: str, uid: bytes, occurrence: int) -> str:
    """Return ``P`` + the first 32 hex digits of SHA-256(account ‖ 0 ‖ uid ‖ 0 ‖ occurrence).

    *occurrence* (0 for the first message listing this UID, 1 for the second
    ...) tells apart duplicate UIDs, which RFC 1939 §7 does not forbid. It is
    hashed as decimal ASCII. The encoding is injective because an account name
    cannot contain NUL and the occurrence is digits only.

    Raises ValueError for an empty account, one containing NUL, or a negative
    occurrence; TypeError if *uid* is not bytes.
    """
    if not account or "\0" in account:
        raise ValueError("account name must be non-empty and contain no NUL")
    if not isinstance(uid, bytes):
        raise TypeError("uid must be bytes, exactly as the server sent it")
    if occurrence < 0:
        raise ValueError("occurrence must be >= 0")
    digest = hashlib.sha256()
    digest.update(account.encode("utf-8"))
    digest.update(b"\0")
    digest.update(uid)
    digest.update(b"\0")
    digest.update(str(occurrence).encode("ascii"))
    return "P" + digest.hexdigest()[:32]


def escape_host(host: str) -> str:
    """Escape a host name for the third part of a Maildir name.

    maildir(5) asks for ``/`` -> ``\\057`` and ``:`` -> ``\\072``; we escape
    every byte outside ``[A-Za-z0-9.-]`` the same way (backslash included, so
    the escaping is unambiguous), cut at an escape boundary after 64
    characters. An empty result becomes ``localhost``.
    """
    out: list[str] = []
    length = 0
    for byte in host.encode("utf-8", "surrogateescape"):
        piece = chr(byte) if byte in _HOST_SAFE else f"\\{byte:03o}"
        if length + len(piece) > _HOST_MAX:
            break
        out.append(piece)
        length += len(piece)
    return "".join(out) or "localhost"


def unique_name(
    account: str, uid: bytes, occurrence: int, first_seen: int, host: str | None = None
) -> str:
    """Return the deterministic Maildir name for one server message.

    ``<first_seen>.P<sha256(account ‖ 0x00 ‖ uid ‖ 0x00 ‖ occurrence)[:32 hex]>.<host>``.
    *first_seen* is the epoch second the message was first listed; store the
    name in the ledger before RETR. *host* defaults to
    ``socket.gethostname()`` and is escaped (see :func:`escape_host`). The
    result matches ``[0-9]+\\.P[0-9a-f]{32}\\.[A-Za-z0-9.\\\\-]+``: no ``/``, no
    ``:``, no leading dot, no server byte.

    Raises ValueError for a negative *first_seen* and as :func:`delivery_hash`.
    """
    if first_seen < 0:
        raise ValueError("first_seen must be >= 0")
    host_part = escape_host(socket.gethostname() if host is None else host)
    return f"{int(first_seen)}.{delivery_hash(account, uid, occurrence)}.{host_part}"


def name_hash(name: str, info_sep: str = ":") -> str:
    """Return the ``P<32 hex>`` part of a popsync name (with or without info).

    Two files with the same hash are the same server message whatever their
    timestamp or host part, which is how recovery recognises a delivery made
    under an older name (say, before the machine was renamed).

    Raises ValueError if *name* is not a popsync name.
    """
    found = base_hash(name.split(info_sep, 1)[0])
    if found is None:
        raise ValueError(f"not a popsync Maildir name: {name!r}")
    return found


def base_hash(base: str) -> str | None:
    """The ``P<32 hex>`` part of base name *base* (no info part), or None if it has none."""
    match = _HASH_PREFIX.match(base)
    return match.group(1) if match else None


def is_our_name(name: str) -> bool:
    """Whether *name* has exactly the shape :func:`unique_name` produces."""
    return _OUR_NAME.fullmatch(name) is not None


def check_name(name: str, info_sep: str) -> None:
    """Refuse anything that is not a plain, harmless file name.

    Names come from :func:`unique_name` via the ledger; this guards against a
    corrupt row turning into ``../../somewhere``. Raises ValueError for an
    empty or overlong name, a leading dot, ``/``, ``:`` or *info_sep*, or any
    character outside printable ASCII.
    """
    if (
        not name
        or len(name) > _NAME_MAX
        or name.startswith(".")
        or info_sep in name
        or ":" in name
        or "/" in name
        or not all(0x21 <= ord(ch) <= 0x7E for ch in name)
    ):
        raise ValueError(f"unsafe Maildir name: {name!r}")


def check_info_sep(info_sep: str) -> None:
    """Refuse an info separator that could appear in a name or a path.

    It must be one character that :func:`escape_host` never emits and that
    is not ``/``, ``\\`` or NUL. Raises ValueError otherwise.
    """
    if len(info_sep) != 1 or ord(info_sep) in _HOST_SAFE or info_sep in "/\\\0":
        raise ValueError(f"unusable info separator: {info_sep!r}")
