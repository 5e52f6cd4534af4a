"""What can go wrong getting an OAuth2 token, and who must act.

* :class:`OAuthError` -- the token endpoint was unreachable, slow, answered
  5xx, an error other than ``invalid_grant``, or something that is not a
  token response: temporary, the next poll tries again.
* :class:`NeedsAuthorization` -- no token is stored, or the provider refused
  the refresh token (``invalid_grant``: revoked, expired, password changed):
  permanent until the user runs ``popsync auth ACCOUNT``.
* :class:`OAuthUnavailable` -- the ``popsync[oauth]`` extra is not installed.

No message ever holds a token, a code or a client secret: only the
endpoint's host, an HTTP status and the RFC 6749 §5.2 ``error`` code.
"""

from __future__ import annotations

from popsync.errors import ConfigError, PopsyncError

__all__ = ["EXTRA_HINT", "NeedsAuthorization", "OAuthError", "OAuthUnavailable"]

#: The one line shown when the extra is missing.
EXTRA_HINT = "oauth2 needs popsync[oauth]: pip install 'popsync[oauth]'"


class OAuthError(PopsyncError):
    """A token endpoint failed; retrying later may help."""

    temporary = True

    def __init__(self, text: str, *, code: str | None = None) -> None:
        super().__init__(text)
        #: The RFC 6749 §5.2 / RFC 8628 §3.5 ``error`` code, when the endpoint sent one.
        self.code = code


class NeedsAuthorization(PopsyncError):
    """The user must authorize popsync again (``popsync auth ACCOUNT``)."""

    temporary = False

    def __init__(self, account: str, why: str) -> None:
        super().__init__(f"needs attention: run popsync auth {account} ({why})")
        self.account = account


class OAuthUnavailable(ConfigError):
    """An account uses oauth2 but the ``popsync[oauth]`` extra is not installed."""

    temporary = False

    def __init__(self) -> None:
        super().__init__(EXTRA_HINT)
