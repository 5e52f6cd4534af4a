"""One bounded HTTP POST of a form to an OAuth2 endpoint, JSON back.

Bounds (a token endpoint is as untrusted as a POP3 server): the whole
exchange must finish within *timeout* seconds (connect, TLS, every read);
at most :data:`MAX_RESPONSE` bytes of body are read; redirects are not
followed (RFC 6749 §3.2 endpoints answer directly).  ``https://`` is
verified against the system's CA store plus the account's ``ca_file``;
the config allows plain ``http://`` only to a loopback host.

Errors never quote the request (it carries codes, tokens, the client
secret) nor the response body; they name the host, the HTTP status and the
RFC 6749 §5.2 ``error`` code.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

from popsync.errors import escape_server_text
from popsync.oauth.errors import OAuthError

__all__ = ["MAX_RESPONSE", "post_form"]

#: Most bytes of a response body read: a token response is a few KiB.
MAX_RESPONSE: Final = 64 << 10
_CHUNK: Final = 8192
_MAX_ERROR_CODE: Final = 64


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise OAuthError(f"cannot use ca_file {ca_file}: {exc}") from None
    return context


def _connect(url: str, timeout: float, ca_file: Path | None) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https":
        return http.client.HTTPSConnection(
            host, parts.port, timeout=timeout, context=_tls_context(ca_file)
        )
    return http.client.HTTPConnection(host, parts.port, timeout=timeout)


def _read_body(
    connection: http.client.HTTPConnection,
    response: http.client.HTTPResponse,
    deadline: float,
    where: str,
) -> bytes:
    """The body, at most MAX_RESPONSE bytes, each read bounded by what is left of the deadline."""
    body = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if isinstance(connection.sock, socket.socket):
            connection.sock.settimeout(left)
        chunk = response.read(_CHUNK)
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > MAX_RESPONSE:
            raise OAuthError(f"{where} sent more than {MAX_RESPONSE} bytes")


def _parse(body: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise OAuthError(f"{where} did not answer with JSON") from None
    if not isinstance(data, dict):
        raise OAuthError(f"{where} did not answer with a JSON object")
    return data


def error_code(data: dict[str, Any]) -> str | None:
    """The RFC 6749 §5.2 ``error`` of a response, escaped and short, if it has one."""
    code = data.get("error")
    return escape_server_text(code, _MAX_ERROR_CODE) if isinstance(code, str) and code else None


def post_form(
    url: str, fields: dict[str, str], *, timeout: float, ca_file: Path | None
) -> dict[str, Any]:
    """POST *fields* form-encoded to *url*; the JSON object of a 200 answer.

    Raises:
        OAuthError: unreachable, TLS failure, timeout, body too large or not
            a JSON object, a redirect or 5xx (``code`` None), or an error
            answer (400/401 with an RFC 6749 §5.2 ``error``: ``code`` set).
    """
    where = f"token endpoint {escape_server_text(urlsplit(url).hostname or '?')}"
    deadline = time.monotonic() + timeout
    target = urlsplit(url)
    path = target.path or "/"
    if target.query:
        path += f"?{target.query}"
    body = urlencode(fields).encode("ascii")
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
        "User-Agent": "popsync",
    }
    connection = _connect(url, timeout, ca_file)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        data = _read_body(connection, response, deadline, where)
        status = response.status
    except TimeoutError:
        raise OAuthError(f"{where} did not answer within {timeout:g} seconds") from None
    except ssl.SSLError as exc:
        raise OAuthError(f"{where}: TLS failed: {exc.reason or exc}") from None
    except (OSError, http.client.HTTPException) as exc:
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise OAuthError(f"{where}: {what}") from None
    finally:
        connection.close()
    if status == 200:
        return _parse(data, where)
    if status in (400, 401):
        code = error_code(_parse(data, where))
        if code:
            raise OAuthError(f"{where} refused: {code}", code=code)
    raise OAuthError(f"{where} answered HTTP {status}")
