"""What a server says about itself, read-only: ``popsync serverinfo`` and
``popsync check --online``.

:func:`probe` connects as the account's TLS settings say, reads the
greeting, the TLS parameters and certificate, CAPA, then logs in and asks
STAT.  It sends no RETR, no TOP, no DELE and touches neither the ledger nor
the delivery target; a session ends with QUIT, which removes nothing when
nothing was DELEd (RFC 1939 §6).  A failure at any step is kept in the
result with everything learnt before it, so the user sees how far it got.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from popsync.config import Account
from popsync.errors import ConfigError, PopsyncError, SecurityError, escape_server_text
from popsync.options import TlsMode
from popsync.session import Session
from popsync.sync import login_secret, session_options
from popsync.textfmt import format_size
from popsync.transport import TlsInfo


@dataclass
class Certificate:
    """The server certificate as a user compares it with what the provider publishes."""

    subject: str
    issuer: str
    not_before: str | None
    not_after: str | None
    #: ``sha256:AB:CD:...``, the SHA-256 of the DER certificate.
    fingerprint: str


@dataclass
class ServerInfo:
    """Everything :func:`probe` learnt; *error* is the step that failed, if any."""

    account: str
    host: str
    port: int
    address: str = ""
    greeting: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    certificate: Certificate | None = None
    capabilities: list[str] = field(default_factory=list)
    sasl: list[str] = field(default_factory=list)
    login_delay: int | None = None
    expire: str | None = None
    logged_in: bool = False
    messages: int | None = None
    size: int | None = None
    error: str | None = None
    #: The error was the config's (a secret that cannot be read), not the server's.
    config_error: bool = False


def fingerprint(der: bytes) -> str:
    """``sha256:`` and the SHA-256 of *der* as colon-separated upper-case hex pairs."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _name(rdns: object) -> str:
    """A certificate name as ``ssl`` parses it -- ((("commonName", "x"),), ...) --
    as ``commonName=x, organizationName=y``."""
    if not isinstance(rdns, tuple):
        return ""
    parts = [
        f"{key}={escape_server_text(str(value))}"
        for rdn in rdns
        if isinstance(rdn, tuple)
        for pair in rdn
        if isinstance(pair, tuple) and len(pair) == 2
        for key, value in (pair,)
    ]
    return ", ".join(parts)


def _iso(stamp: object) -> str | None:
    if not isinstance(stamp, str):
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ssl.cert_time_to_seconds(stamp)))
    except ValueError:
        return escape_server_text(stamp)


def certificate_of(tls: TlsInfo) -> Certificate | None:
    """The certificate of a verified TLS connection (None if the server sent none)."""
    if tls.certificate_der is None:
        return None
    cert = tls.certificate
    return Certificate(
        subject=_name(cert.get("subject")),
        issuer=_name(cert.get("issuer")),
        not_before=_iso(cert.get("notBefore")),
        not_after=_iso(cert.get("notAfter")),
        fingerprint=fingerprint(tls.certificate_der),
    )


def probe(account: Account, state_dir: Path, *, details: bool = True) -> ServerInfo:
    """Connect, negotiate TLS, log in and STAT; never raises for a network,
    server or secret fault (see :attr:`ServerInfo.error`).  With *details*
    off, only the login and STAT are of interest (``check --online``)."""
    info = ServerInfo(account.name, account.host, account.port)
    try:
        session = Session.open(session_options(account))
    except SecurityError as exc:
        info.error = str(exc)
        if details and account.tls != TlsMode.NONE:
            info.certificate = _unverified_certificate(account)
        return info
    except PopsyncError as exc:
        info.error = str(exc)
        return info
    with session:
        try:
            _before_login(info, session, details=details)
            session.login(login_secret(account, state_dir))
            info.logged_in = True
            _note_capabilities(info, session)  # per-user values come after login
            info.messages, info.size = session.stat()
            session.quit()
        except PopsyncError as exc:
            info.error = str(exc)
            info.config_error = isinstance(exc, ConfigError)
    return info


def _unverified_certificate(account: Account) -> Certificate | None:
    """The certificate a server refused by verification presents, by a second
    handshake that does not verify it -- so the user can compare its
    fingerprint with the provider's -- then dropped before any credential.
    Only the fingerprint is known: ``ssl`` parses verified certificates only."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # read-only look; nothing is sent but STLS
    options = replace(session_options(account), ssl_context=ctx)
    try:
        with Session.open(options) as session:
            tls = session.transport.tls_info()
    except PopsyncError:
        return None
    if tls is None or tls.certificate_der is None:
        return None
    return Certificate(
        subject="(not verified)",
        issuer="(not verified)",
        not_before=None,
        not_after=None,
        fingerprint=fingerprint(tls.certificate_der),
    )


def _before_login(info: ServerInfo, session: Session, *, details: bool) -> None:
    transport = session.transport
    info.address = transport.peer
    info.greeting = escape_server_text(session.greeting)
    tls = transport.tls_info()
    if tls is not None:
        info.tls_version, info.cipher = tls.version, tls.cipher
        if details:
            info.certificate = certificate_of(tls)
    _note_capabilities(info, session)


def _note_capabilities(info: ServerInfo, session: Session) -> None:
    caps = session.capabilities
    info.capabilities = [escape_server_text(line) for line in session.capa_lines]
    info.sasl = sorted(caps.sasl)
    info.login_delay = caps.login_delay
    info.expire = caps.expire


def format_info(info: ServerInfo) -> list[str]:
    """The lines ``popsync serverinfo`` prints: what was learnt, in order."""
    lines = [f"account: {info.account} ({info.host}:{info.port}, address {info.address or '?'})"]
    if info.greeting is None:
        if info.certificate is not None:  # refused by verification
            fp = info.certificate.fingerprint
            lines.append(f"certificate (not trusted, not verified): fingerprint {fp}")
        return lines
    lines.append(f"greeting: {info.greeting}")
    if info.tls_version is None:
        lines.append("TLS: none")
    else:
        lines.append(f"TLS: {info.tls_version}, cipher {info.cipher}")
    if info.certificate is not None:
        cert = info.certificate
        lines += [
            "certificate:",
            f"  subject: {cert.subject}",
            f"  issuer: {cert.issuer}",
            f"  valid: {cert.not_before} to {cert.not_after}",
            f"  fingerprint: {cert.fingerprint}",
        ]
    lines.append("capabilities:" if info.capabilities else "capabilities: none (CAPA refused)")
    lines += [f"  {line}" for line in info.capabilities]
    lines.append(f"SASL mechanisms: {' '.join(info.sasl) or 'none'}")
    delay = "not advertised" if info.login_delay is None else f"{info.login_delay} s"
    expire = "not advertised" if info.expire is None else escape_server_text(info.expire)
    lines.append(f"LOGIN-DELAY: {delay}; EXPIRE: {expire}")
    if info.messages is not None and info.size is not None:
        lines.append(f"messages: {info.messages} ({format_size(info.size)}, {info.size} octets)")
    return lines


def info_document(info: ServerInfo) -> dict[str, object]:
    """``serverinfo --json``: the same facts, ``null`` where not learnt."""
    cert = info.certificate
    return {
        "account": info.account,
        "host": info.host,
        "port": info.port,
        "address": info.address or None,
        "greeting": info.greeting,
        "tls": None
        if info.tls_version is None
        else {"version": info.tls_version, "cipher": info.cipher},
        "certificate": None
        if cert is None
        else {
            "subject": cert.subject,
            "issuer": cert.issuer,
            "not_before": cert.not_before,
            "not_after": cert.not_after,
            "fingerprint": cert.fingerprint,
        },
        "capabilities": info.capabilities,
        "sasl": info.sasl,
        "login_delay": info.login_delay,
        "expire": info.expire,
        "logged_in": info.logged_in,
        "messages": info.messages,
        "size": info.size,
        "error": info.error,
    }


__all__ = ["Certificate", "ServerInfo", "fingerprint", "format_info", "info_document", "probe"]
