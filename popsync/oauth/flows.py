"""``popsync auth``: the one interactive step, with no stdin.

* :func:`device_flow` (RFC 8628) when a device authorization endpoint is
  known: print the verification URL and user code, then poll the token
  endpoint every ``interval`` seconds (5 more after each ``slow_down``,
  §3.5) until the user approves, refuses, or the code expires
  (``expires_in``, at most :data:`MAX_WAIT`).
* :func:`code_flow` otherwise: authorization code with PKCE (RFC 7636, S256)
  and a loopback redirect (RFC 8252 §7.3): listen on 127.0.0.1 at a port the
  kernel picks, print the URL to open, wait (at most *wait* seconds) for the
  browser to come back with ``code`` and the ``state`` sent (§10.12: a
  request with another state is answered 400 and ignored), then exchange
  the code and the PKCE verifier for tokens.

Both print only URLs and the user code, never a token, a device code or an
authorization code.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from collections.abc import Callable
from typing import Final
from urllib.parse import parse_qsl, urlsplit

from popsync.errors import escape_server_text
from popsync.oauth.client import DEVICE_GRANT, Client
from popsync.oauth.errors import OAuthError
from popsync.oauth.tokens import TokenResponse

__all__ = ["MAX_WAIT", "code_flow", "device_flow"]

#: Longest popsync waits for the user, whatever the server says.
MAX_WAIT: Final = 1800.0
#: RFC 8628 §3.5: a slow_down adds this to the polling interval.
_SLOW_DOWN: Final = 5
_MAX_REQUEST: Final = 16 << 10
_PAGE: Final = b"<!doctype html><title>popsync</title><p>popsync: %s You may close this window.</p>"


def device_flow(
    client: Client,
    say: Callable[[str], None],
    *,
    wait: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> TokenResponse:
    """Run the device authorization grant; the tokens once the user approved.

    Raises:
        OAuthError: the endpoints failed, the user refused (``access_denied``)
            or the code expired before approval.
    """
    grant = client.device_authorization()
    say(f"To authorize popsync, open {grant.verification_uri} and enter the code {grant.user_code}")
    if grant.verification_uri_complete:
        say(f"(or open {grant.verification_uri_complete})")
    deadline = clock() + min(float(grant.expires_in), MAX_WAIT)
    interval = float(grant.interval)
    while True:
        if clock() + interval > deadline:
            raise OAuthError("the code expired before it was approved; run popsync auth again")
        wait(interval)
        try:
            return client.token(DEVICE_GRANT, device_code=grant.device_code.get_secret_value())
        except OAuthError as exc:
            if exc.code == "authorization_pending":
                continue
            if exc.code == "slow_down":
                interval += _SLOW_DOWN
                continue
            if exc.code == "access_denied":
                raise OAuthError("the authorization was refused") from None
            if exc.code == "expired_token":
                raise OAuthError("the code expired before it was approved") from None
            raise


def code_flow(
    client: Client,
    say: Callable[[str], None],
    *,
    wait: float,
) -> TokenResponse:
    """Run the authorization code grant with PKCE over a loopback redirect.

    Raises:
        OAuthError: nothing came back within *wait* seconds, the user or the
            server refused (an ``error`` redirect), or the code exchange failed.
    """
    from authlib.common.security import generate_token
    from authlib.oauth2.rfc7636 import create_s256_code_challenge

    verifier = generate_token(64)  # RFC 7636 §4.1: 43-128 unreserved characters
    state = secrets.token_urlsafe(24)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        redirect_uri = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        url = client.authorization_url(redirect_uri, state, create_s256_code_challenge(verifier))
        say(f"To authorize popsync, open this URL in a browser:\n{url}")
        say(f"(waiting up to {wait:g} seconds for the browser to come back to {redirect_uri})")
        code = _await_redirect(listener, state, time.monotonic() + wait)
    return client.token(
        "authorization_code", code=code, redirect_uri=redirect_uri, code_verifier=verifier
    )


def _await_redirect(listener: socket.socket, state: str, deadline: float) -> str:
    """The ``code`` of the first request to the listener that carries our *state*."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise OAuthError("no answer from the browser in time; run popsync auth again")
        listener.settimeout(left)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            params = _read_query(conn, deadline)
            if params is None or params.get("state") != state:
                _answer(conn, 400, b"this is not the answer popsync is waiting for.")
                continue
            if params.get("code"):
                _answer(conn, 200, b"authorized.")
                return params["code"]
            _answer(conn, 200, b"the authorization was refused.")
            error = escape_server_text(params.get("error", "no code"), 64)
            raise OAuthError(f"the authorization was refused: {error}")


def _read_query(conn: socket.socket, deadline: float) -> dict[str, str] | None:
    """The query parameters of one HTTP GET, read within the deadline and size cap."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or len(data) > _MAX_REQUEST:
            return None
        conn.settimeout(min(left, 10.0))
        try:
            chunk = conn.recv(4096)
        except OSError:
            return None
        if not chunk:
            break
        data += chunk
    line = data.split(b"\n", 1)[0].decode("latin-1").strip()
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != "GET":
        return None
    return dict(parse_qsl(urlsplit(parts[1]).query))


def _answer(conn: socket.socket, status: int, text: bytes) -> None:
    body = _PAGE % text
    reason = b"OK" if status == 200 else b"Bad Request"
    head = b"HTTP/1.1 %d %s\r\nContent-Type: text/html; charset=utf-8\r\n" % (status, reason)
    head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    with contextlib.suppress(OSError):
        conn.sendall(head + body)
