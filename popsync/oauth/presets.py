"""Well-known OAuth2 endpoints and scopes of the providers popsync knows by name.

A preset fills in what an account's ``oauth2`` block leaves out; keys given
explicitly win.  ``{tenant}`` in a Microsoft endpoint is the account's
``tenant`` (default ``common``).  This module imports nothing: the config
uses it whether or not the ``popsync[oauth]`` extra is installed.

Sources, checked when these were written:

* Google, "OAuth 2.0 for Mobile & Desktop Apps" and "OAuth 2.0 for TV and
  Limited-Input Device Applications": the authorization and token endpoints
  below; the scope for POP3 is ``https://mail.google.com/``.  Google's device
  flow accepts only a short list of scopes and the mail scope is not on it,
  so the Google preset names no device endpoint and ``popsync auth`` uses the
  authorization-code flow (RFC 7636 PKCE, RFC 8252 loopback redirect).
* Microsoft identity platform, "OAuth 2.0 authorization code flow" and
  "device authorization grant flow" (v2.0 endpoints), and "Authenticate an
  IMAP, POP or SMTP connection using OAuth": the scope
  ``https://outlook.office.com/POP.AccessAsUser.All`` plus ``offline_access``
  for a refresh token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_TENANT", "PRESETS", "Preset"]

#: Microsoft's tenant for "any work, school or personal account".
DEFAULT_TENANT: Final = "common"


@dataclass(frozen=True, slots=True)
class Preset:
    """One provider's endpoints (``{tenant}`` substituted by :meth:`for_tenant`)."""

    authorization_endpoint: str
    token_endpoint: str
    device_authorization_endpoint: str | None
    scope: str
    has_tenant: bool = False

    def for_tenant(self, tenant: str) -> dict[str, str]:
        """The preset's keys as config values, ``{tenant}`` filled in."""
        keys = {
            "authorization_endpoint": self.authorization_endpoint,
            "token_endpoint": self.token_endpoint,
            "device_authorization_endpoint": self.device_authorization_endpoint,
            "scope": self.scope,
        }
        return {key: value.replace("{tenant}", tenant) for key, value in keys.items() if value}


_MICROSOFT_BASE: Final = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"

PRESETS: Final[dict[str, Preset]] = {
    "google": Preset(
        authorization_endpoint="https://accounts.google.com/o/oauth2/v2/auth",
        token_endpoint="https://oauth2.googleapis.com/token",  # noqa: S106 - a URL
        device_authorization_endpoint=None,  # Gmail's scope is not allowed in the device flow
        scope="https://mail.google.com/",
    ),
    "microsoft": Preset(
        authorization_endpoint=f"{_MICROSOFT_BASE}/authorize",
        token_endpoint=f"{_MICROSOFT_BASE}/token",
        device_authorization_endpoint=f"{_MICROSOFT_BASE}/devicecode",
        scope="https://outlook.office.com/POP.AccessAsUser.All offline_access",
        has_tenant=True,
    ),
}
