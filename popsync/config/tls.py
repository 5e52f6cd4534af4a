"""The TLS controls of a model that logs in (an account, an IMAP target).

* ``tls_fingerprint`` -- one pin or a list (:mod:`popsync.tlspin`); a pin
  replaces CA and host-name verification, so ``ca_file`` beside it is refused
  (it would never be consulted).
* ``tls_client_cert`` / ``tls_client_key`` -- a client certificate for
  servers that ask for one; the key may sit in the cert file.  Whichever
  file holds the key must not be readable by group or others.
* ``tls_min_version`` -- ``"1.2"`` (default) or ``"1.3"``; YAML's unquoted
  1.2 and 1.3 (floats) are accepted.

None of them may be set with ``tls: none``.  Paths are expanded like the
others (:mod:`popsync.config.paths`) and must exist when the config loads.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from popsync.config.paths import resolve_path
from popsync.config.secrets import context_of
from popsync.config.values import KeyedValueError
from popsync.credentials import mode_problem
from popsync.options import TlsMode
from popsync.tlspin import parse_pin

__all__ = ["TLS_CONTROL_KEYS", "TlsControls"]

TLS_CONTROL_KEYS: Final = ("tls_fingerprint", "tls_client_cert", "tls_client_key")
_VERSIONS: Final = ("1.2", "1.3")


class TlsControls(BaseModel):
    """The four TLS keys; the model inheriting this declares ``tls``,
    ``ca_file`` and ``allow_plaintext`` (checked together in the last)."""

    tls_fingerprint: tuple[str, ...] = ()
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = Field(default=None, validate_default=True)
    tls_min_version: str = "1.2"

    @field_validator("tls_fingerprint", mode="before")
    @classmethod
    def _pins(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError("must be a pin (sha256:...) or a list of them")
        pins = []
        for item in items:
            if not isinstance(item, str):
                raise ValueError("each pin must be text (sha256:AB:CD:...)")
            pins.append(parse_pin(item))
        return tuple(pins)

    @field_validator("tls_client_cert", "tls_client_key", mode="before")
    @classmethod
    def _expand(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else resolve_path(value, *context_of(info))

    @field_validator("tls_client_cert")
    @classmethod
    def _cert_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value}: no such file")
        return value

    @field_validator("tls_client_key")
    @classmethod
    def _key_private(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        cert = info.data.get("tls_client_cert")
        if value is not None and cert is None and "tls_client_cert" in info.data:
            raise ValueError("only with tls_client_cert")
        holder = value if value is not None else cert
        if holder is None:
            return value
        try:
            problem = mode_problem(holder, holder.stat().st_mode)
        except OSError as exc:
            problem = f"{holder}: {exc.strerror}"
        if problem:
            # Without tls_client_key, the cert file holds the key.
            raise KeyedValueError(
                f"{problem} (it holds the private key)",
                key="tls_client_key" if value is not None else "tls_client_cert",
            )
        return value

    @field_validator("tls_min_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        # YAML reads an unquoted 1.2 as a float; 1.2 == float("1.2") exactly.
        text = str(value) if isinstance(value, float | str) else None
        if text not in _VERSIONS:
            raise ValueError('must be "1.2" or "1.3"')
        return text

    @field_validator("allow_plaintext", check_fields=False)
    @classmethod
    def _controls_need_tls(cls, value: bool, info: ValidationInfo) -> bool:
        data = info.data
        given = [key for key in TLS_CONTROL_KEYS if data.get(key)]
        if data.get("tls") == TlsMode.NONE and given:
            raise KeyedValueError("only with tls: implicit or starttls", key=given[0])
        if data.get("tls_fingerprint") and data.get("ca_file") is not None:
            raise KeyedValueError(
                "not with tls_fingerprint: a pin replaces CA verification; drop one",
                key="ca_file",
            )
        return value

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context these keys (and ``ca_file``) ask for.

        Raises ConfigError if a file cannot be loaded (see
        :func:`popsync.transport.make_ssl_context`).
        """
        from popsync.transport import make_ssl_context

        return make_ssl_context(
            getattr(self, "ca_file", None),
            pins=self.tls_fingerprint,
            client_cert=self.tls_client_cert,
            client_key=self.tls_client_key,
            min_version=self.tls_min_version,
        )
