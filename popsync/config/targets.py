"""Where an account's mail goes: exactly one delivery target per account.

* ``maildir: PATH`` -- durable, exactly once;
* ``mbox: PATH`` -- mboxrd, locked, appended, fsynced;
* ``mda: COMMAND`` -- run without a shell, the message on its stdin;
* ``lmtp: unix:PATH | HOST:PORT`` with ``lmtp_recipient``;
* ``imap:`` a mapping (:class:`ImapTarget`): APPEND into a mailbox on another
  host, with the same TLS and credential keys as an account.

Two targets, or none, is a config error naming the account and the keys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

from pydantic import ConfigDict, Field, model_validator

from popsync.config.secrets import SecretSource, TlsLoginRules
from popsync.config.tls import TlsControls
from popsync.config.values import HostName, KeyedValueError, Port, WireText, check_command_words
from popsync.options import TlsMode

#: The target keys of an account, in the order they are named in errors.
TARGET_KEYS: Final = ("maildir", "mbox", "mda", "lmtp", "imap")

_LMTP_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>[0-9]{1,5})")


class ImapTarget(TlsControls, SecretSource, TlsLoginRules):
    """``imap:``: APPEND into *mailbox* on another host (a migration's new home)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: HostName
    tls: TlsMode = TlsMode.IMPLICIT
    # Filled in from tls before validation (993 implicit, else 143).
    port: Port = 0
    ca_file: Path | None = None
    username: WireText
    allow_plaintext: bool = Field(default=False, validate_default=True)
    mailbox: WireText = "INBOX"

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("port") is None:
            implicit = data.get("tls", TlsMode.IMPLICIT) == TlsMode.IMPLICIT
            data = {**data, "port": 993 if implicit else 143}
        return data

    def keyring_user(self) -> str:
        """``password_keyring``: the secret is stored as ``imap:USER@HOST``."""
        return f"imap:{self.username}@{self.host}"

    def secret(self) -> str:
        """The IMAP password, read afresh (see :meth:`SecretSource.read_secret`)."""
        return self.read_secret(f"imap target {self.username}@{self.host}")


def check_mda(value: str | None) -> str | None:
    """``mda``: a command line that splits into words (it runs without a shell)."""
    return check_command_words(value)


def check_lmtp(value: str | None) -> str | None:
    """``lmtp``: ``unix:/absolute/path`` or ``host:port``."""
    if value is None:
        return None
    if value.startswith("unix:"):
        if not value[5:].startswith("/"):
            raise ValueError("unix: needs an absolute path, e.g. unix:/run/dovecot/lmtp")
        return value
    match = _LMTP_HOST_PORT.fullmatch(value)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise ValueError("must be unix:/path/to/socket or host:port")
    return value


def one_target(given: dict[str, object]) -> str:
    """The one target key given (values not None), or a KeyedValueError."""
    named = [key for key in TARGET_KEYS if given.get(key) is not None]
    if not named:
        raise KeyedValueError(
            "missing: give one delivery target: " + ", ".join(TARGET_KEYS), key="maildir"
        )
    if len(named) > 1:
        raise KeyedValueError(
            "give only one delivery target (" + ", ".join(TARGET_KEYS) + ")",
            key=", ".join(named),
        )
    return named[0]
