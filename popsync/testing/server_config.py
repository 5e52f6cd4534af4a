"""Options of the test POP3 server, checked once when the server is built.

One frozen value shared read-only by every session of a server; the
keyword arguments of :class:`popsync.testing.server.POP3TestServer` map onto
it one to one (``stls=None`` is resolved there before it gets here).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal

__all__ = ["ServerConfig"]


@dataclass(frozen=True)
class ServerConfig:
    """The server's options (see :class:`popsync.testing.server.POP3TestServer`).

    Raises ValueError from construction when the options contradict each other.
    """

    username: str = "user"
    password: str = "pass"  # noqa: S105 - the test account
    tls: Literal["none", "implicit"] = "none"
    ssl_context: ssl.SSLContext | None = None
    stls: bool = False
    apop: bool = True
    pipelining: bool = True
    sasl: tuple[str, ...] = ("PLAIN",)
    user: bool = True
    top: bool = True
    uidl: bool = True
    resp_codes: bool = True
    auth_resp_code: bool = True
    login_delay: int | None = None
    expire: str | None = None
    exclusive_lock: bool = True
    require_tls_for_auth: bool = False
    max_line_length: int = 1 << 16
    idle_timeout: float = 600.0
    banner_host: str = "popsync.test"
    #: Like GNU Mailutils and most servers that keep mail in mbox files: at
    #: UPDATE, every message retrieved in the session gains ``Status: RO``
    #: and ``X-UID`` header fields, so its LIST size grows.
    mbox_status: bool = False
    #: Like Courier (RFC 6856): CAPA lists UTF8, and a message with 8-bit
    #: bytes in its header section is served to a client that has not sent
    #: UTF8 as a generated wrapper whose MIME boundary changes on every RETR
    #: and TOP (its LIST size stays that of the original).
    utf8_wrapper: bool = False
    #: Like popa3d and other servers without PIPELINING that write each piece
    #: of a reply as soon as it is made: every status line and every body is
    #: its own ``send``, with Nagle's algorithm left on (RFC 896).  A small
    #: body then waits for the client's ACK of the status line before it is
    #: sent, which a client that delays its ACKs pays on every message.
    #: (Nothing is queued in this mode, so the trickling faults do not apply.)
    write_each: bool = False

    def __post_init__(self) -> None:
        if self.tls not in ("none", "implicit"):
            raise ValueError(f"tls must be 'none' or 'implicit', not {self.tls!r}")
        if self.tls == "implicit" and self.ssl_context is None:
            raise ValueError("tls='implicit' needs a server ssl_context")
        if self.stls and self.ssl_context is None:
            raise ValueError("STLS needs a server ssl_context")
        if self.stls and self.tls == "implicit":
            raise ValueError("STLS makes no sense on an implicit-TLS port")
        if self.max_line_length < 256 or self.idle_timeout <= 0:
            raise ValueError("max_line_length must be >= 256 and idle_timeout > 0")
        object.__setattr__(self, "sasl", tuple(m.upper() for m in self.sasl))
