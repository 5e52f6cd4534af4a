"""The JSON the endpoints send and the tokens popsync keeps, as pydantic models.

Whatever an endpoint sends is validated before use (RFC 6749 §5.1 token
response, RFC 8628 §3.2 device authorization response): a field of the
wrong type or a token with a line break in it is refused, never passed on
to the POP3 server (a token goes onto the wire inside an AUTH line).
Tokens are :class:`SecretStr`, so no ``repr`` or message shows them.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator

from popsync.credentials import LINE_BREAKERS

__all__ = ["MAX_TOKEN_LENGTH", "DeviceAuthorization", "StoredTokens", "TokenResponse"]

#: Longest token accepted (Microsoft's JWTs run to a few KiB).
MAX_TOKEN_LENGTH: Final = 16 << 10
#: Longest lifetime believed: a server cannot make popsync wait or cache for ever.
_MAX_SECONDS: Final = 366 * 86400

Seconds = Annotated[int, Field(ge=0, le=_MAX_SECONDS)]


def _clean_token(value: SecretStr | None) -> SecretStr | None:
    if value is None:
        return None
    text = value.get_secret_value()
    if not text or len(text) > MAX_TOKEN_LENGTH:
        raise ValueError("empty or too long")
    if LINE_BREAKERS.intersection(text) or not text.isprintable() or not text.isascii():
        raise ValueError("not one line of printable ASCII")
    return value


class TokenResponse(BaseModel):
    """A successful token response (RFC 6749 §5.1)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    access_token: SecretStr
    token_type: str
    expires_in: Seconds | None = None
    refresh_token: SecretStr | None = None

    _tokens_clean = field_validator("access_token", "refresh_token")(_clean_token)

    @field_validator("token_type")
    @classmethod
    def _bearer(cls, value: str) -> str:
        if value.lower() != "bearer":  # RFC 6750; case-insensitive (RFC 6749 §5.1)
            raise ValueError("not a bearer token")
        return value


class DeviceAuthorization(BaseModel):
    """A device authorization response (RFC 8628 §3.2).  Google spells
    ``verification_uri`` as ``verification_url``; both are accepted."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    device_code: SecretStr
    user_code: str = Field(min_length=1, max_length=64)
    verification_uri: str = Field(
        validation_alias=AliasChoices("verification_uri", "verification_url"), max_length=2048
    )
    verification_uri_complete: str | None = Field(default=None, max_length=2048)
    expires_in: Seconds
    interval: Seconds = 5

    _code_clean = field_validator("device_code")(_clean_token)

    @field_validator("user_code", "verification_uri", "verification_uri_complete")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        # Shown on the user's terminal: no control sequences.
        if value is not None and not (value.isprintable() and value.isascii()):
            raise ValueError("not printable ASCII")
        return value


class StoredTokens(BaseModel):
    """What the token store keeps for one account."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    refresh_token: SecretStr | None = None
    access_token: SecretStr | None = None
    #: Unix time the access token expires (None: unknown, refresh every poll).
    expires_at: float | None = None

    _tokens_clean = field_validator("access_token", "refresh_token")(_clean_token)

    def to_json(self) -> dict[str, Any]:
        """The plain JSON object for the store (the only place tokens are unwrapped)."""

        def unwrap(secret: SecretStr | None) -> str | None:
            return None if secret is None else secret.get_secret_value()

        return {
            "refresh_token": unwrap(self.refresh_token),
            "access_token": unwrap(self.access_token),
            "expires_at": self.expires_at,
        }
