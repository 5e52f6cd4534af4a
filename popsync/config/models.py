"""The validated config: :class:`Account` and :class:`Config`, frozen pydantic models.

Invariants once a model exists:

* Every path (``maildir``, ``ca_file``, ``password_file``, the sqlite ledger
  file) is absolute (see :mod:`popsync.config.paths`).
* ``Account.port`` is an int (995 for implicit TLS, 110 otherwise, when
  absent); ``interval`` is whole seconds, ``timeout`` and ``poll_timeout``
  seconds (``poll_timeout >= timeout``), ``min_rate`` bytes per second.
* Each account has exactly one secret source.  A ``password`` is a
  :class:`SecretStr`; the file and command sources are read only by
  :meth:`Account.secret`, afresh on each call.  ``oauth2`` is a source too,
  only with ``auth: xoauth2`` or ``oauthbearer`` (which may instead take the
  access token from a password source).
* ``tls: none`` is refused unless ``allow_plaintext: true``: credentials
  cross the network in clear only when the user asked for it.
* Unknown keys are refused at every level; account names are unique.

Validation reads ``base_dir`` (the config file's directory), ``environ`` and
``source`` (the file) from the pydantic validation context; without one (a
model built in code) paths are relative to the current directory and
variables come from ``os.environ``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Final

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from popsync.config.oauth2 import OAuth2Settings
from popsync.config.paths import ledger_url, resolve_path, sqlite_file, state_dir
from popsync.config.secrets import (
    PASSWORD_COMMAND_TIMEOUT,
    SecretSource,
    TlsLoginRules,
    context_of,
)
from popsync.config.targets import TARGET_KEYS, ImapTarget, check_lmtp, check_mda, one_target
from popsync.config.tls import TlsControls
from popsync.config.values import (
    AccountName,
    Days,
    FetchLimit,
    HostName,
    Interval,
    KeyedValueError,
    LineLength,
    Listen,
    ListenAddress,
    MessageSize,
    Port,
    Rate,
    Timeout,
    Window,
    WireText,
    parse_duration,
)
from popsync.errors import ConfigError
from popsync.options import AuthMethod, TlsMode

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_MIN_RATE",
    "DEFAULT_POLL_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "PASSWORD_COMMAND_TIMEOUT",
    "Account",
    "Config",
    "duplicate_names",
]

DEFAULT_INTERVAL: Final = 300
DEFAULT_TIMEOUT: Final = 60.0
DEFAULT_MAX_LINE_LENGTH: Final = 65536
#: Longest one poll may stay connected.  An hour: a first sync of a large
#: mailbox over a slow link may need that, and cutting it is harmless anyway
#: (what was stored stays stored; the next poll goes on from there), while a
#: server that stalls on purpose holds the account for this long at most.
DEFAULT_POLL_TIMEOUT: Final = 3600.0
#: Bytes per second a listing or a body must average once ``timeout`` has
#: passed: far below any real link (a 20 KB/s mobile link is 20 times faster),
#: far above a server that trickles a byte at a time to hold popsync up.
DEFAULT_MIN_RATE: Final = 1024


def _source(info: ValidationInfo) -> Path | None:
    """The config file named in the validation context, if any."""
    source = info.context.get("source") if isinstance(info.context, Mapping) else None
    return source if isinstance(source, Path) else None


class Account(TlsControls, SecretSource, TlsLoginRules):
    """One POP3 account: where to connect, how to log in, where mail goes, what to delete."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AccountName
    host: HostName
    tls: TlsMode = TlsMode.IMPLICIT
    # The default 0 is never used: _default_port fills the port in from tls
    # before validation; the default only makes `port` optional in __init__.
    port: Port = 0
    ca_file: Path | None = None
    username: WireText
    auth: AuthMethod = AuthMethod.AUTO
    allow_plaintext: bool = Field(default=False, validate_default=True)
    # The delivery target: exactly one of these (see popsync.config.targets).
    maildir: Path | None = None
    # Make the Maildir's missing parent directories too (by default only the
    # Maildir itself is made, so a typo in the path is an error, not a tree).
    create: bool = False
    mbox: Path | None = None
    mda: str | None = None
    lmtp: str | None = None
    lmtp_recipient: WireText | None = None
    imap: ImapTarget | None = None
    received_header: bool = Field(default=False, validate_default=True)
    delete_after_days: Days | None = None
    interval: Interval = DEFAULT_INTERVAL
    max_message_size: MessageSize | None = None
    # At most this many messages fetched per poll; the rest wait for the next.
    fetch_limit: FetchLimit | None = None
    timeout: Timeout = DEFAULT_TIMEOUT
    # Absent, it is filled in by _default_poll_timeout (never below `timeout`).
    poll_timeout: Timeout = DEFAULT_POLL_TIMEOUT
    min_rate: Rate = DEFAULT_MIN_RATE
    max_line_length: LineLength = DEFAULT_MAX_LINE_LENGTH
    # Absent: each session picks it from the round trip it measures.
    pipeline_window: Window | None = None
    # Declared last: its validator sees every other key (the secret rule).
    oauth2: OAuth2Settings | None = Field(default=None, validate_default=True)

    _OTHER_SOURCE: ClassVar[str | None] = "oauth2"
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("port") is None:
            implicit = data.get("tls", TlsMode.IMPLICIT) == TlsMode.IMPLICIT
            data = {**data, "port": 995 if implicit else 110}
        return data

    @model_validator(mode="before")
    @classmethod
    def _default_poll_timeout(cls, data: Any) -> Any:
        # An absent poll_timeout is the default, or `timeout` if that is longer,
        # so raising `timeout` alone never makes the config invalid.
        if isinstance(data, dict) and data.get("poll_timeout") is None:
            try:
                timeout = parse_duration(data.get("timeout", DEFAULT_TIMEOUT))
            except ValueError:
                return data  # `timeout` reports its own error
            data = {**data, "poll_timeout": max(DEFAULT_POLL_TIMEOUT, timeout)}
        return data

    @field_validator("poll_timeout")
    @classmethod
    def _poll_outlasts_one_operation(cls, value: float, info: ValidationInfo) -> float:
        timeout = info.data.get("timeout")
        if timeout is not None and value < timeout:
            raise ValueError(f"must be at least timeout ({timeout:.10g} s)")
        return value

    @field_validator("maildir", "mbox", mode="before")
    @classmethod
    def _expand_path(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else resolve_path(value, *context_of(info))

    @field_validator("mda")
    @classmethod
    def _mda_words(cls, value: str | None) -> str | None:
        return check_mda(value)

    @field_validator("lmtp")
    @classmethod
    def _lmtp_address(cls, value: str | None) -> str | None:
        return check_lmtp(value)

    @field_validator("received_header")
    @classmethod
    def _exactly_one_target(cls, value: bool, info: ValidationInfo) -> bool:
        # Declared after every target key, so info.data holds them all (a key
        # that failed its own validation is absent: count it as given).
        given: dict[str, object] = {key: info.data.get(key, True) for key in TARGET_KEYS}
        kind = one_target(given)
        recipient = info.data.get("lmtp_recipient")
        if kind == "lmtp" and recipient is None and "lmtp_recipient" in info.data:
            raise KeyedValueError("missing: lmtp needs lmtp_recipient", key="lmtp_recipient")
        if kind != "lmtp" and recipient is not None:
            raise KeyedValueError("only with lmtp", key="lmtp_recipient")
        return value

    @field_validator("oauth2")
    @classmethod
    def _one_credential_source(
        cls, value: OAuth2Settings | None, info: ValidationInfo
    ) -> OAuth2Settings | None:
        # A password key that failed its own validation is absent from
        # info.data: it was given all the same.
        passwords = [
            key
            for key in ("password", "password_file", "password_command")
            if key not in info.data or info.data[key] is not None
        ]
        if info.data.get("password_keyring", True):
            passwords.append("password_keyring")
        if value is None and not passwords:
            raise KeyedValueError(
                "missing: give one of password, password_file, password_command, "
                "password_keyring or oauth2",
                key="password",
            )
        if value is not None and passwords:
            raise KeyedValueError(
                f"give only one of {', '.join(passwords)}, oauth2 (with oauth2, popsync "
                "gets the access token itself)",
                key="oauth2",
            )
        auth = info.data.get("auth")
        if value is not None and auth not in (AuthMethod.XOAUTH2, AuthMethod.OAUTHBEARER):
            raise ValueError("needs auth: xoauth2 or auth: oauthbearer")
        return value

    @property
    def target(self) -> str:
        """The kind of delivery target: maildir, mbox, mda, lmtp or imap."""
        return next(key for key in TARGET_KEYS if getattr(self, key) is not None)

    def keyring_user(self) -> str:
        """``password_keyring``: the secret is stored under the account's name."""
        return self.name

    def secret(self) -> str:
        """The password or OAuth token, read afresh from its source on every call
        (see :meth:`SecretSource.read_secret`)."""
        return self.read_secret(f"account {self.name!r}")


#: Targets that are files on the host of the worker that polls.
_LOCAL_TARGETS: Final = ("maildir", "mbox")
#: How many accounts a warning names before "and N more".
_MAX_NAMED: Final = 5


#: Seconds a worker's lease on an account lasts unless renewed.
DEFAULT_LEASE: Final = 10.0
#: The shortest lease accepted.
MIN_LEASE: Final = 1.0


class Config(BaseModel):
    """The whole file: the ledger URL, the accounts, where ``popsync run``
    serves its Prometheus metrics, and the ``lease`` (seconds) by which
    workers sharing a PostgreSQL ledger hold the accounts they poll.

    ``metrics`` (``HOST:PORT``, see :func:`~popsync.config.values.parse_listen_address`)
    must be a loopback address unless ``metrics_allow_remote: true``: the
    metrics name every account and show when mail arrives, and the endpoint
    has no authentication, so exposing it to the network is a choice the file
    must state, as ``allow_plaintext`` is for a clear-text login.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # After validation: the effective SQLAlchemy URL (the default filled in by
    # _default_ledger, a sqlite path made absolute). "" is never kept.
    ledger: str = ""
    accounts: tuple[Account, ...]
    metrics: Listen | None = None
    metrics_allow_remote: bool = Field(default=False, validate_default=True)
    # Seconds a worker's claim on an account lasts on a PostgreSQL ledger
    # without renewal (popsync.ledger.leases): a dead worker's accounts are
    # taken over by the others this long after it stopped renewing.
    lease: Timeout = DEFAULT_LEASE

    _state_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _default_ledger(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and data.get("ledger") is None:
            state = state_dir(context_of(info)[1])
            data = {**data, "ledger": f"sqlite:///{state / 'ledger.db'}"}
        return data

    @field_validator("ledger")
    @classmethod
    def _absolute_ledger(cls, value: str, info: ValidationInfo) -> str:
        return ledger_url(value, *context_of(info))

    @field_validator("accounts", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        # Checked here, not with min_length: pydantic would also report
        # "too short" whenever an account is invalid.
        if isinstance(value, list | tuple) and not value:
            raise ValueError("must list at least one account")
        return value

    @field_validator("accounts")
    @classmethod
    def _unique_names(cls, value: tuple[Account, ...]) -> tuple[Account, ...]:
        problems = duplicate_names([account.name for account in value])
        if problems:
            where, text = problems[0]
            raise KeyedValueError(text, key="name", where=where)
        return value

    @field_validator("lease")
    @classmethod
    def _lease_long_enough(cls, value: float) -> float:
        # Renewed every third of it, and claims look every second: shorter
        # would make a worker's claim loop a busy loop.
        if value < MIN_LEASE:
            raise ValueError(f"must be at least {MIN_LEASE:.10g} s")
        return value

    @field_validator("metrics_allow_remote")
    @classmethod
    def _metrics_stay_local(cls, value: bool, info: ValidationInfo) -> bool:
        # Declared after `metrics`, so info.data holds it (absent: it failed).
        if "metrics" not in info.data:
            return value
        address: ListenAddress | None = info.data["metrics"]
        if address is None:
            if value:
                raise ValueError("only with metrics")
        elif not address.loopback and not value:
            raise KeyedValueError(
                "is not a loopback address, so anyone who can reach it could read the "
                "account names and their activity; use 127.0.0.1 or [::1], or set "
                "metrics_allow_remote: true",
                key="metrics",
            )
        return value

    @model_validator(mode="after")
    def _locate_files(self, info: ValidationInfo) -> Config:
        database = sqlite_file(self.ledger)
        if database is not None:
            self._state_dir = database.parent
        else:
            self._state_dir = state_dir(context_of(info)[1])
        self._source = _source(info)
        return self

    @property
    def ledger_url(self) -> str:
        """The SQLAlchemy URL of the ledger, default filled in, sqlite path absolute."""
        return self.ledger

    @property
    def ledger_shown(self) -> str:
        """The ledger URL for messages and logs: a password in it shown as ``***``."""
        from sqlalchemy import make_url

        return make_url(self.ledger).render_as_string(hide_password=True)

    @property
    def shared_ledger(self) -> bool:
        """Whether the ledger is a database server's (PostgreSQL) that workers on
        several hosts can share, rather than a file on this host."""
        scheme = self.ledger.partition(":")[0]
        return scheme.partition("+")[0].lower() == "postgresql"

    def warnings(self) -> list[str]:
        """Things that work but are likely a mistake, one line each (``check`` shows them).

        On a PostgreSQL ledger: accounts delivering to a Maildir or an mbox file,
        which is on the host of whichever worker polls, so several workers would
        each hold part of the mailbox.
        """
        if not self.shared_ledger:
            return []
        local = [a for a in self.accounts if a.target in _LOCAL_TARGETS]
        if not local:
            return []
        shown = ", ".join(f"{a.name} ({a.target})" for a in local[:_MAX_NAMED])
        if len(local) > _MAX_NAMED:
            shown += f" and {len(local) - _MAX_NAMED} more"
        plural = "s" if len(local) > 1 else ""
        return [
            f"account{plural} {shown} on a PostgreSQL ledger: a Maildir local to one worker "
            "would split the mailbox; use lmtp or imap when several workers share the ledger"
        ]

    @property
    def state_dir(self) -> Path:
        """Where lock files and other state live: beside a sqlite ledger, else
        ``$XDG_STATE_HOME/popsync``. Never inside a Maildir. Not created here."""
        return self._state_dir

    @property
    def source(self) -> Path | None:
        """The file this config was loaded from (None when built in code)."""
        return self._source

    def select(self, names: Iterable[str]) -> list[Account]:
        """The named accounts in the order named (duplicates once), or all when
        *names* is empty. Raises ConfigError naming every unknown name at once."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return list(self.accounts)
        by_name = {account.name: account for account in self.accounts}
        unknown = [name for name in wanted if name not in by_name]
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            shown = ", ".join(repr(name) for name in unknown)
            known = ", ".join(by_name)
            raise ConfigError(f"unknown account{plural} {shown} (known: {known})")
        return [by_name[name] for name in wanted]


def duplicate_names(names: list[object]) -> list[tuple[str, str]]:
    """(where, text) for each account whose name an earlier account already uses."""
    first: dict[str, int] = {}
    problems = []
    for index, name in enumerate(names):
        if not isinstance(name, str):
            continue
        if name in first:
            problems.append(
                (f"account #{index + 1}", f"{name!r} is already used by account #{first[name] + 1}")
            )
        else:
            first[name] = index
    return problems
