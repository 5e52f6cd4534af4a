"""Talking to the token endpoint: the grants popsync uses, built with Authlib.

Authlib (the ``popsync[oauth]`` extra) builds the requests and checks the
answers the RFCs define: the authorization URL (RFC 6749 §4.1.1 with RFC
7636 S256 PKCE), the token request bodies (§4.1.3, §6, RFC 8628 §3.4) and
the redirect's ``code`` and ``state`` (§4.1.2, §10.12).  The bytes travel
through :func:`popsync.oauth.http.post_form`, which bounds them.

A confidential client sends its secret in the body (RFC 6749 §2.3.1,
``client_secret_post``): Google and Microsoft both accept that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from popsync.config.oauth2 import OAuth2Settings
from popsync.oauth.errors import OAuthError, OAuthUnavailable
from popsync.oauth.http import post_form
from popsync.oauth.tokens import DeviceAuthorization, TokenResponse

__all__ = ["DEVICE_GRANT", "Client", "require_authlib"]

#: RFC 8628 §3.4.
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def require_authlib() -> ModuleType:
    """Authlib's RFC 6749 parameter helpers; OAuthUnavailable without the extra."""
    try:
        from authlib.oauth2.rfc6749 import parameters
    except ImportError:
        raise OAuthUnavailable() from None
    module: ModuleType = parameters
    return module


@dataclass(frozen=True, slots=True)
class Client:
    """One account's OAuth2 client: its settings, secret and HTTP bounds."""

    settings: OAuth2Settings
    client_secret: str | None
    timeout: float
    ca_file: Path | None

    def _post(self, url: str, body: str) -> dict[str, Any]:
        from urllib.parse import parse_qsl

        fields = dict(parse_qsl(body, keep_blank_values=True))
        fields["client_id"] = self.settings.client_id
        if self.client_secret is not None:
            fields["client_secret"] = self.client_secret
        return post_form(url, fields, timeout=self.timeout, ca_file=self.ca_file)

    def token(self, grant_type: str, **fields: str) -> TokenResponse:
        """Ask the token endpoint for tokens with *grant_type*.

        Raises:
            OAuthError: as :func:`post_form`, or the answer is not a bearer
                token response.
        """
        parameters = require_authlib()
        assert self.settings.token_endpoint is not None  # the config insists
        body = parameters.prepare_token_request(grant_type, **fields)
        data = self._post(self.settings.token_endpoint, body)
        try:
            return TokenResponse.model_validate(data)
        except ValidationError as exc:
            bad = ", ".join(str(e["loc"][0]) for e in exc.errors() if e["loc"])
            raise OAuthError(f"the token endpoint sent an invalid token response ({bad})") from None

    def refresh(self, refresh_token: str) -> TokenResponse:
        """RFC 6749 §6: a new access token (and perhaps a new refresh token)."""
        return self.token("refresh_token", refresh_token=refresh_token)

    def device_authorization(self) -> DeviceAuthorization:
        """RFC 8628 §3.1-3.2: a device code, a user code and where to enter it."""
        endpoint = self.settings.device_authorization_endpoint
        assert endpoint is not None
        fields = {"scope": self.settings.scope} if self.settings.scope else {}
        from urllib.parse import urlencode

        data = self._post(endpoint, urlencode(fields))
        try:
            return DeviceAuthorization.model_validate(data)
        except ValidationError as exc:
            bad = ", ".join(str(e["loc"][0]) for e in exc.errors() if e["loc"])
            raise OAuthError(f"the device endpoint sent an invalid answer ({bad})") from None

    def authorization_url(self, redirect_uri: str, state: str, challenge: str) -> str:
        """RFC 6749 §4.1.1 with RFC 7636 §4.3: the URL the user opens."""
        parameters = require_authlib()
        assert self.settings.authorization_endpoint is not None
        url: str = parameters.prepare_grant_uri(
            self.settings.authorization_endpoint,
            self.settings.client_id,
            "code",
            redirect_uri=redirect_uri,
            scope=self.settings.scope or None,
            state=state,
            code_challenge=challenge,
            code_challenge_method="S256",
        )
        return url
