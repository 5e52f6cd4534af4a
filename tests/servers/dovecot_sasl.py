"""A private, real Dovecot for the SASL and TLS-control tests.

:class:`SaslDovecot` is a :class:`~tests.servers.dovecot.Dovecot` that also
offers ``SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5`` (after ``PLAIN LOGIN``), and
stores each user's password in the scheme the test asks for
(:meth:`SaslDovecot.add_user_with_scheme`): ``PLAIN`` serves every mechanism,
``SCRAM-SHA-256`` / ``SCRAM-SHA-1`` hashes (made by ``doveadm pw``) serve
PLAIN, LOGIN and that SCRAM, and ``SHA512-CRYPT`` serves only PLAIN and LOGIN
-- Dovecot still offers SCRAM then, and refuses it at login.

*extra_config* is appended to ``dovecot.conf`` (client-certificate settings,
say).  Like its base, it imports no pytest.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.servers.dovecot import Dovecot, DovecotError

__all__ = ["SaslDovecot"]

#: Schemes a test may store a password in.
SCHEMES = frozenset({"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-1", "SHA512-CRYPT"})


class SaslDovecot(Dovecot):
    """Dovecot with SCRAM and CRAM-MD5 enabled and per-user password schemes."""

    def __init__(self, workdir: Path, *, extra_config: str = "", **kwargs: Any) -> None:
        self._schemes: dict[str, str] = {}
        self._extra = extra_config
        super().__init__(workdir, **kwargs)

    def add_user_with_scheme(self, user: str, password: str, scheme: str) -> None:
        """Add *user* with *password* stored as a *scheme* hash (see the module
        docstring).

        Raises:
            DovecotError: an unknown scheme, ``doveadm pw`` failing, or what
                :meth:`Dovecot.add_user` raises.
        """
        if scheme not in SCHEMES:
            raise DovecotError(f"unknown password scheme for the test: {scheme}")
        self._schemes[user] = scheme
        self.add_user(user, password)

    def _password_field(self, user: str) -> str:
        scheme = self._schemes.get(user, "PLAIN")
        password = self.users[user]
        if scheme == "PLAIN":
            return f"{{PLAIN}}{password}"
        try:
            out = subprocess.run(
                ["doveadm", "-c", "/dev/null", "pw", "-s", scheme],
                input=f"{password}\n{password}\n".encode(),
                capture_output=True,
                check=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise DovecotError(f"doveadm pw -s {scheme} failed: {exc}") from exc
        return out.stdout.decode("ascii").strip()

    def _extra_config(self) -> str:
        return (
            super()._extra_config()
            + "auth_mechanisms = plain login scram-sha-256 scram-sha-1 cram-md5\n"
            + self._extra
        )
