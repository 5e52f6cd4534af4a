"""Certificate pins (``tls_fingerprint``): their spelling, and matching a peer.

Two forms, both SHA-256:

* ``sha256:AB:CD:...`` -- of the whole certificate (DER), 32 bytes in hex,
  colons optional, any case: what ``openssl x509 -fingerprint -sha256``
  prints, and what mpop and fetchmail pin.  A renewed certificate has a new
  one, even with the same key.
* ``pin-sha256:BASE64`` -- of the certificate's SubjectPublicKeyInfo, the
  RFC 7469 §2.4 pin: it survives a renewal that keeps the key.

A pin replaces CA and host-name verification (as in mpop): a self-signed
server can be trusted by its pin alone.  This module does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from typing import Final

__all__ = ["cert_fingerprint", "matches", "parse_pin", "spki_pin"]

_HEX_RE: Final = re.compile(r"[0-9a-f]{64}")
_SHA256_BYTES: Final = 32


def parse_pin(text: str) -> str:
    """*text* in its canonical form (upper-case hex with colons, or
    ``pin-sha256:`` and standard base64); ValueError saying what is wrong."""
    word = text.strip()
    lower = word.lower()
    if lower.startswith("pin-sha256:"):
        try:
            raw = base64.b64decode(word[len("pin-sha256:") :], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("pin-sha256: must be followed by base64") from None
        if len(raw) != _SHA256_BYTES:
            raise ValueError(f"pin-sha256: must hold {_SHA256_BYTES} bytes, not {len(raw)}")
        return "pin-sha256:" + base64.b64encode(raw).decode("ascii")
    if lower.startswith("sha256:"):
        digits = lower[len("sha256:") :].replace(":", "")
        if not _HEX_RE.fullmatch(digits):
            raise ValueError(
                "sha256: must be followed by 32 bytes in hex (64 digits, colons optional)"
            )
        return _colon_hex(bytes.fromhex(digits))
    raise ValueError("must start with sha256: (the certificate) or pin-sha256: (its key)")


def cert_fingerprint(der: bytes) -> str:
    """``sha256:AB:CD:...`` of a DER certificate."""
    return _colon_hex(hashlib.sha256(der).digest())


def spki_pin(der: bytes) -> str:
    """``pin-sha256:BASE64`` of a DER certificate's SubjectPublicKeyInfo;
    ValueError if *der* cannot be parsed."""
    from asn1crypto import x509

    try:
        spki = x509.Certificate.load(der).public_key.dump()
    except Exception as exc:  # asn1crypto raises many types for bad input
        raise ValueError(f"cannot parse the certificate: {type(exc).__name__}") from None
    return "pin-sha256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def matches(der: bytes, pins: Iterable[str]) -> bool:
    """Whether the certificate *der* matches one of the canonical *pins*."""
    wanted = set(pins)
    if cert_fingerprint(der) in wanted:
        return True
    if any(pin.startswith("pin-sha256:") for pin in wanted):
        try:
            return spki_pin(der) in wanted
        except ValueError:
            return False
    return False


def _colon_hex(digest: bytes) -> str:
    return "sha256:" + ":".join(f"{byte:02X}" for byte in digest)
