"""Authentication payloads: APOP digest and SASL initial responses.

Pure functions; the session decides which to use and never chooses APOP on
its own (MD5 is broken: Leurent, FSE 2007; RFC 5034).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from popsync.errors import RemoteProtocolError

# RFC 1939 §7: the banner's timestamp is a msg-id: <process-ID.clock@hostname>.
_TIMESTAMP_RE = re.compile(rb"<[\x21-\x3d\x3f-\x7e]+@[\x21-\x3d\x3f-\x7e]+>")


def apop_timestamp(greeting: bytes) -> bytes | None:
    """The ``<...@...>`` timestamp of the greeting text, or None."""
    match = _TIMESTAMP_RE.search(greeting)
    return match.group(0) if match else None


def apop_digest(timestamp: bytes, password: str) -> str:
    """Lower-case hex MD5 of timestamp + password (RFC 1939 §7)."""
    return hashlib.md5(timestamp + password.encode("utf-8"), usedforsecurity=False).hexdigest()


def sasl_plain(user: str, password: str, authzid: str = "") -> bytes:
    """RFC 4616 PLAIN message: authzid NUL authcid NUL passwd."""
    return b"\0".join(s.encode("utf-8") for s in (authzid, user, password))


def xoauth2(user: str, token: str) -> bytes:
    """Google / Microsoft XOAUTH2 initial response."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user: str, token: str) -> bytes:
    """RFC 7628 OAUTHBEARER initial client response (GS2 header with authzid)."""
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


def decode_challenge(data: bytes) -> bytes:
    """The raw bytes of a ``+ base64`` challenge; bad base64 is the server's fault."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError("AUTH challenge is not valid base64") from None
