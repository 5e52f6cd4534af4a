"""``tls`` and ``auth`` have one definition, from the YAML to the session."""

from __future__ import annotations

from pathlib import Path

import pytest

import popsync.config
import popsync.session
from popsync.options import AuthMethod, TlsMode
from popsync.session import SessionOptions
from popsync.sync import session_options


def test_config_and_session_share_the_enums() -> None:
    assert popsync.config.TlsMode is TlsMode
    assert popsync.config.AuthMethod is AuthMethod
    assert SessionOptions.__annotations__["tls"] == "TlsMode"
    assert SessionOptions.__annotations__["auth"] == "AuthMethod"
    assert vars(popsync.session)["TlsMode"] is TlsMode
    assert vars(popsync.session)["AuthMethod"] is AuthMethod


def test_session_defaults_are_members() -> None:
    options = SessionOptions(host="127.0.0.1", port=1, username="u")
    assert options.tls is TlsMode.IMPLICIT
    assert options.auth is AuthMethod.AUTO


@pytest.mark.parametrize("tls", list(TlsMode))
@pytest.mark.parametrize("auth", [AuthMethod.AUTO, AuthMethod.APOP, AuthMethod.OAUTHBEARER])
def test_an_account_passes_its_members_to_the_session(
    tmp_path: Path, tls: TlsMode, auth: AuthMethod
) -> None:
    account = popsync.config.Account(
        name="home",
        host="127.0.0.1",
        username="u",
        password="p",
        maildir=tmp_path,
        tls=tls,
        auth=auth,
        allow_plaintext=True,
    )
    options = session_options(account)
    assert options.tls is tls and options.auth is auth
    assert (options.ssl_context is None) == (tls is TlsMode.NONE)
