"""An account's ``oauth2`` block: where to get tokens, as whom, with what scope.

Invariants once an :class:`OAuth2Settings` exists:

* ``token_endpoint`` is set, and so is ``authorization_endpoint`` or
  ``device_authorization_endpoint`` (``popsync auth`` needs one of them);
  a ``provider`` filled in whatever the block left out.
* Every endpoint is ``https://``, or ``http://`` to a loopback address only
  (a token must not cross a network in clear).
* ``client_id`` is one non-empty line; at most one of ``client_secret``,
  ``client_secret_file``, ``client_secret_command`` is given, with the
  rules of the password keys (a file private to its owner, a command split
  like a shell would, run without one).
* ``tenant`` only with ``provider: microsoft`` (default ``common``).
"""

from __future__ import annotations

import ipaddress
import shlex
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from popsync.config.paths import resolve_path
from popsync.config.secrets import PASSWORD_COMMAND_TIMEOUT, context_of
from popsync.config.values import KeyedValueError, check_command_words
from popsync.credentials import (
    LINE_BREAKERS,
    mode_problem,
    read_password_file,
    run_password_command,
)
from popsync.errors import ConfigError
from popsync.oauth.presets import DEFAULT_TENANT, PRESETS

__all__ = ["OAuth2Settings", "check_endpoint"]

_ENDPOINT_KEYS = ("authorization_endpoint", "token_endpoint", "device_authorization_endpoint")
_SECRET_KEYS = ("client_secret", "client_secret_file", "client_secret_command")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(value: str) -> str:
    """*value* if it is an https URL, or an http URL to a loopback host; else ValueError."""
    try:
        url = urlsplit(value)
        host = url.hostname or ""
        _ = url.port  # ValueError for a bad port
    except ValueError:
        raise ValueError("must be a URL such as https://login.example/token") from None
    if LINE_BREAKERS.intersection(value) or " " in value or not host:
        raise ValueError("must be a URL such as https://login.example/token")
    if url.username is not None or url.fragment:
        raise ValueError("must not contain a user name, password or #fragment")
    if url.scheme == "https":
        return value
    if url.scheme == "http" and _loopback(host):
        return value
    if url.scheme == "http":
        raise ValueError("must be https:// (plain http:// only to a loopback address)")
    raise ValueError("must be an https:// URL")


class OAuth2Settings(BaseModel):
    """The ``oauth2`` block of an account (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["google", "microsoft"] | None = None
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    scope: str = ""
    client_id: str
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    client_secret_command: str | None = None
    tenant: str | None = Field(default=None, validate_default=True)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="before")
    @classmethod
    def _fill_in_preset(cls, data: Any) -> Any:
        # Explicit keys override the preset; the tenant goes into its URLs.
        if not isinstance(data, dict):
            return data
        provider = data.get("provider")
        preset = PRESETS.get(provider) if isinstance(provider, str) else None
        if preset is None:
            return data
        tenant = data.get("tenant")
        filled = preset.for_tenant(tenant if isinstance(tenant, str) else DEFAULT_TENANT)
        return {**filled, **{k: v for k, v in data.items() if v is not None}}

    @field_validator(*_ENDPOINT_KEYS)
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        return None if value is None else check_endpoint(value)

    @field_validator("scope", "client_id")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if LINE_BREAKERS.intersection(value):
            raise ValueError("must not contain line breaks or NUL characters")
        return value

    @field_validator("client_id")
    @classmethod
    def _client_id_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("client_secret_file", mode="before")
    @classmethod
    def _expand_secret_file(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else resolve_path(value, *context_of(info))

    @field_validator("client_secret_file")
    @classmethod
    def _secret_file_safe(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                problem = mode_problem(value, value.stat().st_mode)
            except OSError as exc:
                raise ValueError(f"{value}: {exc.strerror}") from None
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("client_secret_command")
    @classmethod
    def _secret_command_words(cls, value: str | None) -> str | None:
        return check_command_words(value)

    @field_validator("tenant")
    @classmethod
    def _tenant_for_microsoft(cls, value: str | None, info: ValidationInfo) -> str | None:
        provider = info.data.get("provider")
        if value is not None and provider != "microsoft":
            raise ValueError("only with provider: microsoft")
        if value is not None and not all(c.isalnum() or c in ".-" for c in value):
            raise ValueError("must be a tenant name or id (letters, digits, '.', '-')")
        return value

    @model_validator(mode="after")
    def _complete(self, info: ValidationInfo) -> OAuth2Settings:
        # An error here is located at the block ("oauth2"), which the key
        # named replaces: hence "oauth2." in front of it.
        given = [key for key in _SECRET_KEYS if getattr(self, key) is not None]
        if len(given) > 1:
            raise KeyedValueError(f"give only one of {', '.join(given)}", key=f"oauth2.{given[0]}")
        if self.token_endpoint is None:
            raise KeyedValueError(
                "missing: give token_endpoint, or a provider (google or microsoft)",
                key="oauth2.token_endpoint",
            )
        if self.authorization_endpoint is None and self.device_authorization_endpoint is None:
            raise KeyedValueError(
                "missing: give authorization_endpoint or device_authorization_endpoint",
                key="oauth2.authorization_endpoint",
            )
        self._base_dir = context_of(info)[0]
        return self

    def read_client_secret(self, owner: str) -> str | None:
        """The client secret, read afresh from its source, or None without one.

        Raises ConfigError naming *owner* and the key (never the secret) when
        the file or command fails, as :meth:`SecretSource.read_secret` does.
        """
        try:
            if self.client_secret is not None:
                return self.client_secret.get_secret_value()
            if self.client_secret_file is not None:
                return read_password_file(self.client_secret_file)
            if self.client_secret_command is not None:
                argv = shlex.split(self.client_secret_command)
                return run_password_command(argv, self._base_dir, PASSWORD_COMMAND_TIMEOUT)
        except ValueError as exc:
            key = "client_secret_file" if self.client_secret_file else "client_secret_command"
            raise ConfigError(f"{owner}: oauth2.{key}: {exc}") from None
        return None
