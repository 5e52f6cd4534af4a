"""SASL mechanisms as small state machines the session drives (RFC 4422, RFC 5034).

A :class:`Mechanism` knows its name, its optional initial response, how to
answer each server challenge (raw bytes in, raw bytes out -- base64 is the
wire's business, :mod:`.commands`), and whether the exchange it saw may be
trusted once the server says ``+OK``.  It does no I/O, so the session owns
sending, reading, deadlines and cancelling (``*``).

What a mechanism raises while answering:

* :class:`RemoteProtocolError` -- the server's message is malformed or asks
  for something we never agreed to (a challenge where none is due, a SCRAM
  iteration count meant to burn our CPU).
* :class:`SecurityError` -- the server could not prove it knows the password
  (SCRAM server signature, RFC 5802 §5.1 ``v=``).  Permanent: the next poll
  would meet the same server.
* :class:`ConfigError` -- the password or user name cannot be used with this
  mechanism (SCRAM's SASLprep, RFC 4013, prohibits some characters).

The secret never appears in an error text or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any, Final, Protocol

from popsync.errors import ConfigError, RemoteProtocolError, SecurityError

__all__ = [
    "MAX_SCRAM_ITERATIONS",
    "SCRAM_MECHANISMS",
    "CramMd5",
    "Mechanism",
    "Scram",
    "Scripted",
    "additional_data",
]

#: SCRAM mechanisms popsync speaks, strongest first (RFC 7677, RFC 5802).
SCRAM_MECHANISMS: Final = ("SCRAM-SHA-256", "SCRAM-SHA-1")

#: Most PBKDF2 rounds a server may ask of us.  The count is the server's to
#: choose (RFC 5802 §5.1 ``i=``), and each round costs our CPU: a hostile
#: server could otherwise hold a poll for hours.  A million SHA-256 rounds
#: take about a second of one busy core; real servers use 4096 (Dovecot's
#: default) to a few hundred thousand.
MAX_SCRAM_ITERATIONS: Final = 1_000_000


class Mechanism(Protocol):
    """One SASL client exchange."""

    #: The name sent after AUTH, upper case.
    name: str

    def initial(self) -> bytes | None:
        """The initial response (RFC 4422 §3.3), or None to wait for a challenge."""
        ...

    def respond(self, challenge: bytes) -> bytes | None:
        """The answer to *challenge* (decoded), or None to cancel the exchange."""
        ...

    def succeeded(self, additional: bytes | None) -> None:
        """The server said ``+OK``; *additional* is data it sent with it, if any.

        Raises SecurityError if the exchange did not prove the server genuine.
        """
        ...


class Scripted:
    """A mechanism whose answers are known in advance (PLAIN, LOGIN, XOAUTH2,
    OAUTHBEARER): the initial response, then one answer per challenge, and a
    cancel once they run out (an XOAUTH2 server's error challenge)."""

    def __init__(self, name: str, initial: bytes | None, answers: list[bytes]) -> None:
        self.name = name
        self._initial = initial
        self._answers = list(answers)

    def __repr__(self) -> str:
        return f"Scripted({self.name!r})"

    def initial(self) -> bytes | None:
        return self._initial

    def respond(self, challenge: bytes) -> bytes | None:
        return self._answers.pop(0) if self._answers else None

    def succeeded(self, additional: bytes | None) -> None:
        return None


class CramMd5:
    """CRAM-MD5 (RFC 2195): ``user SP hex(HMAC-MD5(password, challenge))``.

    Only ever used when configured: it rests on MD5 and needs the server to
    keep the password in clear; unlike PLAIN it at least never sends it.
    """

    name = "CRAM-MD5"

    def __init__(self, user: str, password: str) -> None:
        self._user = user
        self._key = password.encode("utf-8")
        self._answered = False

    def __repr__(self) -> str:
        return "CramMd5()"

    def initial(self) -> bytes | None:
        return None

    def respond(self, challenge: bytes) -> bytes | None:
        if self._answered:  # RFC 2195 has exactly one challenge
            raise RemoteProtocolError("AUTH CRAM-MD5: a second challenge")
        self._answered = True
        digest = hmac.new(self._key, challenge, hashlib.md5).hexdigest()
        return f"{self._user} {digest}".encode()

    def succeeded(self, additional: bytes | None) -> None:
        return None


class Scram:
    """SCRAM-SHA-256 or SCRAM-SHA-1 (RFC 5802, RFC 7677), without channel
    binding; the arithmetic is the ``scramp`` library's.

    Three steps: the initial response is client-first; the first challenge
    (server-first: nonce, salt, iteration count) gets client-final, which
    proves we know the password; the second challenge (server-final) must
    carry the server's signature, proof that it knows the password too --
    it is answered with an empty response.  ``+OK`` before that proof is a
    SecurityError: an impostor may have let us in to see what we fetch.
    """

    def __init__(self, name: str, user: str, password: str) -> None:
        from scramp import ScramClient, ScramException

        if name not in SCRAM_MECHANISMS:
            raise ValueError(f"not a SCRAM mechanism popsync speaks: {name}")
        self.name = name
        try:
            self._client: Any = ScramClient([name], user, password)
        except ScramException:
            raise ConfigError(
                f"the user name or password cannot be used with {name} "
                "(it holds characters SASLprep, RFC 4013, prohibits)"
            ) from None
        self._step = 0
        self._verified = False

    def __repr__(self) -> str:
        return f"Scram({self.name!r})"

    def initial(self) -> bytes | None:
        self._step = 1
        return str(self._client.get_client_first()).encode("utf-8")

    def respond(self, challenge: bytes) -> bytes | None:
        if self._step == 1:
            self._step = 2
            return self._client_final(challenge)
        if self._step == 2:
            self._step = 3
            if not challenge.startswith(b"e="):  # a refusal; the -ERR follows
                self._verify(challenge)
            return b""
        raise RemoteProtocolError(f"AUTH {self.name}: a challenge after the server's final one")

    def succeeded(self, additional: bytes | None) -> None:
        if not self._verified and additional and self._step == 2:
            self._verify(additional)  # server-final carried in the +OK itself
        if not self._verified:
            raise SecurityError(
                f"AUTH {self.name}: the server let us in without proving it knows the "
                "password (no SCRAM server signature); not trusting this server"
            )

    def _client_final(self, challenge: bytes) -> bytes:
        from scramp import ScramException

        text = _text(challenge, self.name)
        try:
            self._client.set_server_first(text)
        except ScramException as exc:
            raise RemoteProtocolError(f"AUTH {self.name}: bad server-first message") from exc
        iterations = int(self._client.iterations)
        if iterations > MAX_SCRAM_ITERATIONS:
            raise RemoteProtocolError(
                f"AUTH {self.name}: the server asks for {iterations} iterations "
                f"(at most {MAX_SCRAM_ITERATIONS} are done)"
            )
        return str(self._client.get_client_final()).encode("utf-8")

    def _verify(self, server_final: bytes) -> None:
        from scramp import ScramException

        text = _text(server_final, self.name)
        try:
            self._client.set_server_final(text)
        except ScramException:
            raise SecurityError(
                f"AUTH {self.name}: the server could not prove it knows the password "
                "(its SCRAM signature does not match); not trusting this server"
            ) from None
        self._verified = True


def _text(message: bytes, mechanism: str) -> str:
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"AUTH {mechanism}: server message is not UTF-8") from None


def additional_data(ok_text: bytes) -> bytes | None:
    """Data a server may have put in its ``+OK`` after a SASL exchange, if the
    text is base64 at all (most servers write words there: then None)."""
    word = ok_text.strip()
    if not word or b" " in word:
        return None
    try:
        return base64.b64decode(word, validate=True)
    except (binascii.Error, ValueError):
        return None
