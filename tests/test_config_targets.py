"""Config: exactly one delivery target per account, each key checked, one line per problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from popsync.config import TlsMode, load_config
from tests.test_config import assert_clean, config_file, load_error

BASE = """\
accounts:
  - name: home
    host: pop.example.org
    username: alice
    password_file: home.pass
"""


def account(tmp_path: Path, extra: str) -> Path:
    return config_file(tmp_path, BASE + textwrap.indent(textwrap.dedent(extra), "    "))


@pytest.mark.parametrize(
    ("extra", "kind"),
    [
        ("maildir: Mail\n", "maildir"),
        ("mbox: Mail/inbox.mbox\n", "mbox"),
        ("mda: /usr/bin/procmail -d alice\n", "mda"),
        ("lmtp: unix:/run/dovecot/lmtp\nlmtp_recipient: alice@example.org\n", "lmtp"),
        ("lmtp: '[::1]:24'\nlmtp_recipient: alice\n", "lmtp"),
        ("imap: {host: imap.example.net, username: alice, password: x}\n", "imap"),
    ],
)
def test_each_target_loads(tmp_path: Path, extra: str, kind: str) -> None:
    config = load_config(account(tmp_path, extra))
    assert config.accounts[0].target == kind


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        ("", "maildir: missing: give one delivery target: maildir, mbox, mda, lmtp, imap"),
        (
            "maildir: Mail\nmbox: x.mbox\n",
            "maildir, mbox: give only one delivery target (maildir, mbox, mda, lmtp, imap)",
        ),
        ("lmtp: unix:/run/lmtp\n", "lmtp_recipient: missing: lmtp needs lmtp_recipient"),
        ("maildir: Mail\nlmtp_recipient: a\n", "lmtp_recipient: only with lmtp"),
        ("lmtp: unix:run/lmtp\nlmtp_recipient: a\n", "lmtp: unix: needs an absolute path"),
        ("lmtp: localhost\nlmtp_recipient: a\n", "lmtp: must be unix:/path/to/socket or host:port"),
        ('mda: "\'unclosed"\n', "mda: cannot be split into words: no closing quotation"),
        ("imap: {host: h, password: x}\n", "imap.username: missing (this key is required)"),
        ("imap: {host: h, username: u}\n", "imap.password: missing: give one of password"),
        ("imap: {host: h, username: u, password: x, tls: none}\n", "imap.tls: 'none' would"),
        ("imap: {host: h, username: u, password: x, folder: y}\n", "imap.folder: unknown key"),
    ],
)
def test_target_mistakes_are_one_line_each(tmp_path: Path, extra: str, line: str) -> None:
    message = load_error(account(tmp_path, extra))
    assert len(message.splitlines()) == 1, message
    assert f"account 'home': {line}" in message, message
    assert_clean(message)


def test_imap_defaults_and_secret(tmp_path: Path) -> None:
    plain = load_config(
        account(tmp_path, "imap: {host: h, username: u, password_file: home.pass, tls: starttls}\n")
    ).accounts[0]
    assert plain.imap is not None
    assert (plain.imap.port, plain.imap.mailbox, plain.imap.tls) == (143, "INBOX", TlsMode.STARTTLS)
    assert plain.imap.secret() == (tmp_path / "home.pass").read_text().strip()
    implicit = load_config(account(tmp_path, "imap: {host: h, username: u, password: x}\n"))
    assert implicit.accounts[0].imap is not None and implicit.accounts[0].imap.port == 993
