"""The connection choices a user makes, defined once for the config and the session.

``tls`` and ``auth`` are spelled here as :class:`~enum.StrEnum` members: the
config validates the YAML into them, and :mod:`popsync.session` acts on them.
A member equals its text (``TlsMode.NONE == "none"``).  This module imports
nothing, so the protocol core stays free of it and anything may use it.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["AuthMethod", "TlsMode"]


class TlsMode(StrEnum):
    """How the connection is protected."""

    IMPLICIT = "implicit"  # TLS from the first byte (pop3s, port 995; RFC 8314 §3.3)
    STARTTLS = "starttls"  # plain connect, then STLS (RFC 2595 §4)
    NONE = "none"  # no TLS at all; credentials only with allow_plaintext


class AuthMethod(StrEnum):
    """Which login to use; ``auto`` never picks APOP or CRAM-MD5 (MD5 is broken)."""

    AUTO = "auto"
    USER = "user"  # USER/PASS, RFC 1939 §7
    PLAIN = "plain"  # SASL PLAIN, RFC 4616
    LOGIN = "login"  # SASL LOGIN (draft-murchison-sasl-login)
    APOP = "apop"  # RFC 1939 §7
    SCRAM_SHA_256 = "scram-sha-256"  # RFC 7677
    SCRAM_SHA_1 = "scram-sha-1"  # RFC 5802
    CRAM_MD5 = "cram-md5"  # RFC 2195; like APOP, only when configured
    XOAUTH2 = "xoauth2"  # the secret is the OAuth access token
    OAUTHBEARER = "oauthbearer"  # RFC 7628; the secret is the OAuth token
