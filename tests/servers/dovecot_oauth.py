"""A private Dovecot whose XOAUTH2 and OAUTHBEARER logins are checked by an
OAuth2 server's RFC 7662 introspection endpoint (Dovecot 2.3 ``oauth2`` passdb).

The passwd-file passdb of :class:`~tests.servers.dovecot.Dovecot` stays
first; for an OAuth2 mechanism its password check fails and Dovecot goes on
(``result_failure = continue`` is the default) to the ``oauth2`` passdb,
which POSTs the token to ``introspection_url`` and accepts the login only
when the answer is ``"active": true`` with ``"username"`` equal to the
user.  So a token is accepted or refused by Dovecot itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tests.servers.dovecot import Dovecot

__all__ = ["OAuthDovecot"]


class OAuthDovecot(Dovecot):
    """:class:`Dovecot` plus XOAUTH2/OAUTHBEARER against *introspection_url*."""

    def __init__(
        self,
        workdir: Path,
        introspection_url: str,
        users: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(workdir, users)
        self.introspection_url = introspection_url

    def _extra_config(self) -> str:
        args = self.workdir / "oauth2.conf.ext"
        args.write_text(
            f"introspection_mode = post\n"
            f"introspection_url = {self.introspection_url}/introspect\n"
            "force_introspection = yes\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n",
            "utf-8",
        )
        return (
            "auth_mechanisms = plain login xoauth2 oauthbearer\n"
            "passdb {\n"
            "  driver = oauth2\n"
            "  mechanisms = xoauth2 oauthbearer\n"
            f"  args = {args}\n"
            "}\n"
        )
