"""The one exception tree of popsync.

Every error popsync raises on purpose derives from :class:`PopsyncError`, and the
type says who is to blame, so callers decide by type, never by message text:

* :class:`ConfigError` -- the user's configuration or command line is wrong
  (exit status 2; fix the config).
* :class:`TransportError` -- the network or TLS failed (temporary), except
  :class:`TlsModeMismatch`: the port speaks the other TLS mode (permanent).
* :class:`LocalProtocolError` -- popsync misused the protocol core (a bug).
* :class:`RemoteProtocolError` -- the server broke the protocol (the session is
  abandoned; nothing is deleted).
* :class:`ServerError` -- the server answered ``-ERR``; carries the RFC 2449 /
  RFC 3206 response code so the scheduler can tell "retry later" from "fix
  your credentials".
* :class:`SecurityError` -- popsync refused to continue because going on would
  leak credentials or trust an attacker (no TLS, unverified certificate,
  bytes injected after STLS).
* :class:`DeliveryError`, :class:`LedgerError` -- local storage failed.

``temporary`` on each error tells the daemon whether a retry with backoff may
help (network, timeouts, ``[IN-USE]``, ``[LOGIN-DELAY]``, ``[SYS/TEMP]``) or
whether the account must pause until the user acts (``[AUTH]``,
``[SYS/PERM]``, security refusals, config errors).

This module imports nothing of popsync, so every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "DeliveryError",
    "LedgerError",
    "LocalProtocolError",
    "PopsyncError",
    "ProtocolError",
    "RemoteProtocolError",
    "RespCode",
    "SecurityError",
    "ServerError",
    "TimeoutError_",
    "TransportError",
    "escape_server_text",
]

#: Longest piece of server text that reaches a log line or the terminal.
MAX_SERVER_TEXT = 200


def escape_server_text(raw: bytes | str, limit: int = MAX_SERVER_TEXT) -> str:
    """Render untrusted server bytes safely for a log or a terminal.

    Non-printable and non-ASCII bytes become ``\\xNN`` escapes, so a hostile
    server cannot write terminal control sequences or forge log lines; the
    result is capped at *limit* characters with a ``...`` marker.
    """
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    out: list[str] = []
    length = 0
    for byte in data:
        piece = chr(byte) if 0x20 <= byte < 0x7F and byte != 0x5C else f"\\x{byte:02x}"
        if length + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        length += len(piece)
    return "".join(out)


class PopsyncError(Exception):
    """Root of every error popsync raises on purpose."""

    #: Whether retrying later (with backoff) may succeed without the user acting.
    temporary: bool = False


class ConfigError(PopsyncError):
    """The configuration file or the command line is wrong."""


class TransportError(PopsyncError):
    """The connection failed: DNS, connect, reset, TLS handshake, EOF."""

    temporary = True


class TimeoutError_(TransportError):  # trailing _ : the builtin keeps its name
    """A network operation did not finish within its deadline."""


class TlsModeMismatch(TransportError):
    """The port speaks plain POP3 where TLS was configured, or the reverse.

    Permanent: retrying cannot help, the account's ``tls`` or ``port`` must change.
    """

    temporary = False


class ProtocolError(PopsyncError):
    """The POP3 conversation went wrong; see the two subclasses for who is to blame."""


class LocalProtocolError(ProtocolError):
    """popsync tried something the protocol does not allow (a bug in popsync)."""


class RemoteProtocolError(ProtocolError):
    """The server violated the protocol; the session cannot safely continue."""

    temporary = True


class BodyLimitExceeded(RemoteProtocolError):
    """A RETR or TOP body ran past the limit set for it and was cut off.

    The session is unusable afterwards (the rest of the body is unread), but
    the fault belongs to one message: the poll skips it and goes on.
    """

    def __init__(self, text: str, msg: int) -> None:
        super().__init__(text)
        self.msg = msg


class SecurityError(PopsyncError):
    """popsync refused to go on because that would expose credentials or mail."""


class DeliveryError(PopsyncError):
    """Writing a message into the Maildir failed (disk full, I/O error, permissions)."""

    temporary = True


class LedgerError(PopsyncError):
    """The ledger database could not be read or written."""


@dataclass(frozen=True, slots=True)
class RespCode:
    """An RFC 2449 §6.4 response code such as ``[SYS/TEMP]`` or ``[LOGIN-DELAY]``.

    Codes are hierarchical; unknown sub-levels are kept but must be ignored
    (RFC 2449 §8), so decisions look only at :attr:`top` (and ``SYS/...``).
    """

    parts: tuple[str, ...]

    @property
    def top(self) -> str:
        return self.parts[0] if self.parts else ""

    def __str__(self) -> str:
        return "/".join(self.parts)

    @property
    def temporary(self) -> bool | None:
        """True for "retry later", False for "the user must act", None if unknown."""
        if self.top in ("IN-USE", "LOGIN-DELAY"):  # RFC 2449 §8.1
            return True
        if self.top == "SYS" and len(self.parts) > 1:  # RFC 3206 §4
            if self.parts[1] == "TEMP":
                return True
            if self.parts[1] == "PERM":
                return False
        if self.top == "AUTH":  # RFC 3206 §5: the credentials are the problem
            return False
        return None


class ServerError(PopsyncError):
    """The server answered ``-ERR``.

    ``text`` is the raw reply text (without ``-ERR``), ``code`` the parsed
    response code if any, ``command`` the name of the command that failed.
    """

    def __init__(
        self,
        command: str,
        text: bytes,
        code: RespCode | None = None,
        *,
        temporary: bool | None = None,
    ) -> None:
        self.command = command
        self.text = text
        self.code = code
        self._temporary = temporary
        shown = escape_server_text(text)
        super().__init__(f"server refused {command}: -ERR {shown}")

    @property
    def temporary(self) -> bool:  # type: ignore[override]
        """A response code decides; else the caller's judgement; else "temporary"."""
        if self.code is not None and self.code.temporary is not None:
            return self.code.temporary
        if self._temporary is not None:
            return self._temporary
        return True
