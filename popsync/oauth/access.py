"""A valid access token for each poll, and ``popsync auth``'s storing of new ones.

:func:`access_token` holds a per-account refresh lock (``oauth/ACCOUNT.lock``
beside the token file, an ``flock``) from reading the tokens to storing the
renewed ones, so two processes -- a poll, ``serverinfo``, ``check --online``,
``sync --dry-run`` -- never refresh at once and a rotated refresh token
cannot be lost between them:

1. the stored access token is used while it has more than
   :data:`EXPIRY_MARGIN` seconds left;
2. else the refresh token buys a new one (RFC 6749 §6); a new refresh token
   in the answer (rotation) replaces the old one in the same atomic write
   as the new access token;
3. ``invalid_grant`` (the refresh token was revoked or expired) and a store
   with no tokens are :class:`NeedsAuthorization` -- permanent; every other
   endpoint failure is a temporary :class:`OAuthError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from pydantic import SecretStr

from popsync.config import Account
from popsync.locks import account_lock
from popsync.oauth.client import Client, require_authlib
from popsync.oauth.errors import NeedsAuthorization, OAuthError
from popsync.oauth.store import TokenStore, open_store
from popsync.oauth.tokens import StoredTokens, TokenResponse

__all__ = ["EXPIRY_MARGIN", "access_token", "authorize", "client_for", "store_tokens"]

log = logging.getLogger(__name__)

#: An access token is refreshed this many seconds before it expires, so it
#: cannot expire between the check and the server's.
EXPIRY_MARGIN: Final = 60.0


def client_for(account: Account) -> Client:
    """The account's OAuth2 client (reads the client secret from its source).

    Raises:
        OAuthUnavailable: the ``popsync[oauth]`` extra is missing.
        ConfigError: the client secret's file or command failed.
    """
    require_authlib()
    settings = account.oauth2
    assert settings is not None
    secret = settings.read_client_secret(f"account {account.name!r}")
    return Client(settings, secret, account.timeout, account.ca_file)


def _tokens_from(response: TokenResponse, previous: SecretStr | None, now: float) -> StoredTokens:
    return StoredTokens(
        refresh_token=response.refresh_token or previous,
        access_token=response.access_token,
        expires_at=None if response.expires_in is None else now + response.expires_in,
    )


def store_tokens(store: TokenStore, response: TokenResponse, now: float) -> None:
    """Store a fresh grant's tokens (``popsync auth``)."""
    store.save(_tokens_from(response, None, now))


def access_token(
    account: Account,
    state_dir: Path,
    *,
    fresh: bool = False,
    now: Callable[[], float] = time.time,
) -> str:
    """A valid access token for *account* (see the module docstring); with
    *fresh*, a new one even if the stored one has not expired (the server
    refused it).

    Safe to call from several processes at once (see the module docstring).

    Raises:
        NeedsAuthorization: no tokens stored, or ``invalid_grant``.
        OAuthError: the token endpoint failed (temporary).
        OAuthUnavailable: the ``popsync[oauth]`` extra is missing.
        ConfigError: the client secret's source failed.
        PopsyncError: the token store cannot be read or written.
    """
    require_authlib()
    # Exclusive use of the account's tokens, held at most for one token
    # request (bounded by the account's ``timeout``).
    with account_lock(state_dir, account.name, wait=True, folder="oauth"):
        return _access_token(account, state_dir, fresh=fresh, at=now())


def _access_token(account: Account, state_dir: Path, *, fresh: bool, at: float) -> str:
    store = open_store(state_dir, account.name)
    tokens = store.load()
    if tokens is None:
        raise NeedsAuthorization(account.name, "no OAuth2 token is stored yet")
    fresh_enough = tokens.expires_at is not None and tokens.expires_at - EXPIRY_MARGIN > at
    if tokens.access_token is not None and fresh_enough and not fresh:
        return tokens.access_token.get_secret_value()
    if tokens.refresh_token is None:
        raise NeedsAuthorization(account.name, "the access token expired and no refresh token")
    client = client_for(account)
    try:
        response = client.refresh(tokens.refresh_token.get_secret_value())
    except OAuthError as exc:
        if exc.code == "invalid_grant":
            raise NeedsAuthorization(account.name, "the refresh token was refused") from None
        raise
    renewed = _tokens_from(response, tokens.refresh_token, at)
    store.save(renewed)
    rotated = response.refresh_token is not None and response.refresh_token != tokens.refresh_token
    log.info(
        "%s: OAuth2 access token refreshed%s", account.name, "; refresh token rotated" * rotated
    )
    assert renewed.access_token is not None
    return renewed.access_token.get_secret_value()


def authorize(
    account: Account,
    state_dir: Path,
    say: Callable[[str], None],
    *,
    wait: float,
    now: Callable[[], float] = time.time,
) -> str:
    """``popsync auth ACCOUNT``: run the device or code flow, store the tokens.

    Returns where the tokens were stored.  The store is written under the
    account's lock, so a poll in progress cannot overwrite the new tokens
    with a refresh of the old ones.

    Raises:
        OAuthError: the flow failed, was refused or timed out.
        OAuthUnavailable, ConfigError, PopsyncError: as :func:`access_token`.
    """
    from popsync.locks import account_lock
    from popsync.oauth.flows import code_flow, device_flow

    client = client_for(account)
    settings = client.settings
    if settings.device_authorization_endpoint is not None:
        response = device_flow(client, say)
    else:
        response = code_flow(client, say, wait=wait)
    if response.refresh_token is None:
        say(
            "note: the provider sent no refresh token; popsync auth is needed again when the "
            "access token expires (for Microsoft, the scope needs offline_access)"
        )
    with account_lock(state_dir, account.name, wait=wait):
        store = open_store(state_dir, account.name)
        store_tokens(store, response, now())
    return store.where
