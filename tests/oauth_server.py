"""A small OAuth2 authorization server on 127.0.0.1 for the OAuth2 tests.

It speaks just enough of the RFCs for popsync's client and for Dovecot's
``oauth2`` passdb:

* ``POST /device`` -- RFC 8628 §3.1 device authorization; the code is
  approved by the test (:meth:`OAuthServer.approve` with the user code
  popsync printed).
* ``GET /authorize`` -- RFC 6749 §4.1.1; approves at once (the "user" is the
  test) and redirects (302) to the client's loopback ``redirect_uri`` with
  ``code`` and ``state``; remembers the PKCE challenge (RFC 7636 S256 only).
* ``POST /token`` -- grants ``urn:ietf:params:oauth:grant-type:device_code``
  (``authorization_pending`` until approved), ``authorization_code`` (one
  use; ``redirect_uri``, ``client_id`` and the PKCE verifier checked) and
  ``refresh_token`` (each refresh rotates the refresh token when
  :attr:`rotate` is set; :attr:`invalid_grant` refuses every refresh;
  :attr:`fail_status` answers every request with that HTTP status).
* ``POST /introspect`` -- RFC 7662: ``{"active": true, "username": ...}``
  for a live access token, else ``{"active": false}``.

Everything it issued is in :attr:`OAuthServer.issued` (the tests grep logs
and files for those strings).  It serves from a thread; use it as a
context manager.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["CLIENT_ID", "OAuthServer"]

CLIENT_ID = "popsync-test-client"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    user: str


@dataclass
class _Device:
    user_code: str
    approved_for: str | None = None


@dataclass
class OAuthServer:
    """The server's state; every switch may be flipped while it runs."""

    user: str = "alice"
    expires_in: int = 3600
    rotate: bool = True
    invalid_grant: bool = False
    fail_status: int | None = None
    client_secret: str | None = None
    device_interval: int = 1
    #: Answer this many device-code polls with ``slow_down`` (RFC 8628 §3.5).
    slow_down: int = 0
    #: Every token, code and device code ever issued (to grep for leaks).
    issued: list[str] = field(default_factory=list)
    #: Token requests by grant type.
    grants: dict[str, int] = field(default_factory=dict)
    #: Introspection requests (Dovecot asking).
    introspections: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._access: dict[str, tuple[str, float]] = {}
        self._refresh: dict[str, str] = {}
        self._codes: dict[str, _Code] = {}
        self._devices: dict[str, _Device] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------

    def __enter__(self) -> Self:
        handler = type("Handler", (_Handler,), {"server_state": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- test hooks --------------------------------------------------------------

    def approve(self, user_code: str) -> None:
        """The user entered *user_code* and approved (device flow)."""
        with self._lock:
            for device in self._devices.values():
                if device.user_code == user_code:
                    device.approved_for = self.user
                    return
        raise KeyError(user_code)

    def expire_access_tokens(self) -> None:
        """Every access token issued so far is now expired (introspection says so)."""
        with self._lock:
            self._access = {token: (user, 0.0) for token, (user, _) in self._access.items()}

    def refresh_tokens(self) -> list[str]:
        """The refresh tokens currently valid."""
        with self._lock:
            return list(self._refresh)

    # -- the endpoints -------------------------------------------------------------

    def _new(self, prefix: str) -> str:
        value = f"{prefix}-{secrets.token_urlsafe(18)}"
        self.issued.append(value)
        return value

    def _tokens(self, user: str) -> dict[str, Any]:
        access = self._new("at")
        self._access[access] = (user, time.time() + self.expires_in)
        refresh = self._new("rt")
        self._refresh[refresh] = user
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "refresh_token": refresh,
        }

    def device(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != CLIENT_ID:
            return 401, {"error": "invalid_client"}
        code = self._new("dc")
        user_code = f"{secrets.randbelow(10**8):08d}"
        with self._lock:
            self._devices[code] = _Device(user_code)
        return 200, {
            "device_code": code,
            "user_code": user_code,
            "verification_uri": f"{self.url}/device-login",
            "expires_in": 600,
            "interval": self.device_interval,
        }

    def authorize(self, query: dict[str, str]) -> str:
        """The Location of the redirect back to the client."""
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            raise ValueError("PKCE S256 required")
        code = self._new("ac")
        with self._lock:
            self._codes[code] = _Code(
                query["client_id"], query["redirect_uri"], query["code_challenge"], self.user
            )
        back = {"code": code, "state": query.get("state", "")}
        return f"{query['redirect_uri']}?{urlencode(back)}"

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        grant = form.get("grant_type", "")
        with self._lock:
            self.grants[grant] = self.grants.get(grant, 0) + 1
            if form.get("client_id") != CLIENT_ID or (
                self.client_secret is not None and form.get("client_secret") != self.client_secret
            ):
                return 401, {"error": "invalid_client"}
            if grant == DEVICE_GRANT:
                return self._device_grant(form)
            if grant == "authorization_code":
                return self._code_grant(form)
            if grant == "refresh_token":
                return self._refresh_grant(form)
        return 400, {"error": "unsupported_grant_type"}

    def _device_grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        device = self._devices.get(form.get("device_code", ""))
        if device is None:
            return 400, {"error": "expired_token"}
        if self.slow_down > 0:
            self.slow_down -= 1
            return 400, {"error": "slow_down"}
        if device.approved_for is None:
            return 400, {"error": "authorization_pending"}
        del self._devices[form["device_code"]]
        return 200, self._tokens(device.approved_for)

    def _code_grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        code = self._codes.pop(form.get("code", ""), None)  # one use only
        if code is None or code.redirect_uri != form.get("redirect_uri"):
            return 400, {"error": "invalid_grant"}
        verifier = form.get("code_verifier", "").encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
        if digest.decode() != code.challenge:
            return 400, {"error": "invalid_grant"}
        return 200, self._tokens(code.user)

    def _refresh_grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        old = form.get("refresh_token", "")
        if self.invalid_grant or old not in self._refresh:
            return 400, {"error": "invalid_grant"}
        user = self._refresh[old]
        answer = self._tokens(user)
        if self.rotate:
            del self._refresh[old]
        else:
            del self._refresh[answer.pop("refresh_token")]
        return 200, answer

    def introspect(self, form: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            self.introspections += 1
            user, expires = self._access.get(form.get("token", ""), ("", 0.0))
        if not user or expires <= time.time():
            return {"active": False}
        return {"active": True, "username": user}


class _Handler(BaseHTTPRequestHandler):
    server_state: OAuthServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the tests read popsync's output, not ours

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        return dict(parse_qsl(self.rfile.read(length).decode()))

    def _json(self, status: int, data: dict[str, Any]) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        state = self.server_state
        path = urlsplit(self.path).path
        form = self._form()
        if path == "/introspect":
            self._json(200, state.introspect(form))
            return
        if state.fail_status is not None:
            self._json(state.fail_status, {"error": "temporarily_unavailable"})
            return
        if path == "/device":
            self._json(*state.device(form))
        elif path == "/token":
            self._json(*state.token(form))
        else:
            self._json(404, {"error": "not_found"})

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != "/authorize":
            self._json(404, {"error": "not_found"})
            return
        try:
            location = self.server_state.authorize(dict(parse_qsl(parts.query)))
        except (KeyError, ValueError):
            self._json(400, {"error": "invalid_request"})
            return
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()
