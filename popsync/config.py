"""Configuration: the YAML of DESIGN §6, validated into frozen pydantic models.

Contract
--------
* :func:`resolve_config_path` picks the file: ``-c``, else ``$POPSYNC_CONFIG``,
  else ``$XDG_CONFIG_HOME/popsync/config.yaml``.
* :func:`load_config` reads it and returns a :class:`Config`, or raises
  :class:`~popsync.errors.ConfigError` whose message holds one line per problem,
  each naming the file, the account (by name, or ``#N`` counted from 1 when the
  name is unusable) and the key::

      /etc/popsync.yaml: account 'home': port: must be between 1 and 65535

  Every user mistake ends in that error -- never in a traceback, and never in
  pydantic's own multi-line text, which is translated into short phrases.

Invariants
----------
* After validation every path (``maildir``, ``ca_file``, ``password_file``, the
  sqlite ledger file) is absolute: ``~`` and ``$VAR`` / ``${VAR}`` are expanded
  (an unset variable is an error, ``$$`` is a literal ``$``) and a relative path
  is taken relative to the config file's directory.
* ``Account.port`` is always an int (995 for implicit TLS, 110 otherwise, when
  absent); ``Account.interval`` is whole seconds, ``Account.timeout`` and
  ``Account.poll_timeout`` seconds (``poll_timeout >= timeout``), and
  ``Account.min_rate`` bytes per second.
* Each account has exactly one secret source, and a secret never reaches a
  message, a ``repr`` or a log line: ``password`` is a :class:`SecretStr`, the
  file and command sources are only read by :meth:`Account.secret` (through
  :mod:`popsync.credentials`), and error
  texts never quote input values.
* Credentials never go out in clear by accident: ``tls: none`` is refused unless
  ``allow_plaintext: true`` (DESIGN I3). A config file holding a ``password``
  and a ``password_file`` must not be readable by group or others (as fetchmail
  insists); the file modes are checked at load time and again when read.
* Whoever can write the config can make popsync run commands: like OpenSSH's
  ``~/.ssh/config``, the file must be owned by the user or root and not be
  writable by group or others.
* Models are frozen and reject unknown keys at every level.

Only pydantic and PyYAML are imported at module level; ``subprocess``, ``pwd``
and ``difflib`` are imported where they are needed, to keep start-up fast.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from popsync.credentials import (
    GROUP_OTHER_READ,
    LINE_BREAKERS,
    mode_problem,
    read_password_file,
    run_password_command,
)
from popsync.errors import ConfigError, escape_server_text
from popsync.options import AuthMethod, TlsMode

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_MIN_RATE",
    "DEFAULT_PIPELINE_WINDOW",
    "DEFAULT_POLL_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "PASSWORD_COMMAND_TIMEOUT",
    "Account",
    "AuthMethod",
    "Config",
    "TlsMode",
    "load_config",
    "parse_duration",
    "parse_size",
    "resolve_config_path",
]

DEFAULT_INTERVAL: Final = 300
DEFAULT_TIMEOUT: Final = 60.0
DEFAULT_MAX_LINE_LENGTH: Final = 65536
DEFAULT_PIPELINE_WINDOW: Final = 32
#: Longest one poll may stay connected.  An hour: a first sync of a large
#: mailbox over a slow link may need that, and cutting it is harmless anyway
#: (what was stored stays stored; the next poll goes on from there), while a
#: server that stalls on purpose holds the account for this long at most.
DEFAULT_POLL_TIMEOUT: Final = 3600.0
#: Bytes per second a listing or a body must average once ``timeout`` has
#: passed: far below any real link (a 20 KB/s mobile link is 20 times faster),
#: far above a server that trickles a byte at a time to hold popsync up.
DEFAULT_MIN_RATE: Final = 1024
#: Seconds a ``password_command`` may run before it is killed.
PASSWORD_COMMAND_TIMEOUT: Final = 30.0
#: A config file larger than this is surely not a config file.
MAX_CONFIG_BYTES: Final = 1 << 20
#: Longest duration accepted for ``interval`` and ``timeout`` (366 days), so a
#: typo cannot overflow a socket timeout or a scheduler's timedelta.
MAX_DURATION: Final = 366 * 86400

_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DURATION_RE: Final = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", re.ASCII)
_SIZE_RE: Final = re.compile(r"(\d+)\s*([KMG]?)", re.IGNORECASE | re.ASCII)
_VAR_RE: Final = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))?")
_SQLITE_RE: Final = re.compile(r"(sqlite(?:\+\w+)?)://(/[^?]*)?(\?.*)?", re.ASCII)
_URL_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


class _KeyedValueError(ValueError):
    """A validator's complaint about a key other than the one it validates.

    ``where`` replaces the account label (duplicate names are best told by
    position), ``key`` the key; either may be ``None`` to keep pydantic's.
    """

    def __init__(self, text: str, *, key: str | None = None, where: str | None = None) -> None:
        super().__init__(text)
        self.key = key
        self.where = where


# --------------------------------------------------------------------------
# Expansion of ~ and environment variables


def _home(user: str, environ: Mapping[str, str]) -> str:
    """The home directory for ``~`` (empty *user*) or ``~user``; ValueError if unknown."""
    import pwd

    if not user and environ.get("HOME"):
        return environ["HOME"]
    try:
        entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
    except KeyError:
        raise ValueError(f"unknown user in '~{user}'") from None
    return entry.pw_dir


def _expand_vars(text: str, environ: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(1) is None:
            raise ValueError("a '$' must start $NAME or ${NAME} (write $$ for a '$')")
        if match.group(1) == "$":
            return "$"
        name = match.group(2) or match.group(3)
        if name not in environ:
            raise ValueError(f"environment variable ${name} is not set")
        return environ[name]

    return _VAR_RE.sub(substitute, text)


def _expand(text: str, environ: Mapping[str, str]) -> str:
    """Expand a leading ``~``/``~user``, then variables (as a shell would, once).

    The home directory is not itself expanded again, so a ``$`` in it is kept.
    """
    if not text.startswith("~"):
        return _expand_vars(text, environ)
    user, slash, rest = text[1:].partition("/")
    return _home(user, environ) + slash + _expand_vars(rest, environ)


def _context(info: ValidationInfo) -> tuple[Path, Mapping[str, str]]:
    """(config directory, environment) from the validation context.

    Without a context (a model built in code) paths are relative to the
    current directory and variables come from ``os.environ``.
    """
    ctx = info.context if isinstance(info.context, Mapping) else {}
    base = ctx.get("base_dir")
    environ = ctx.get("environ")
    return (
        base if isinstance(base, Path) else Path.cwd(),
        environ if isinstance(environ, Mapping) else os.environ,
    )


def _resolve_path(value: object, info: ValidationInfo) -> Path:
    """A user-written path made absolute: expanded, relative to the config directory."""
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("must be a path (a string)")
    if not value.strip():
        raise ValueError("must not be empty")
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    base, environ = _context(info)
    path = Path(_expand(value, environ))
    return path if path.is_absolute() else base / path


def _xdg_dir(environ: Mapping[str, str], variable: str, fallback: str) -> Path:
    """An XDG base directory; unset, empty or relative values mean the default."""
    value = environ.get(variable, "")
    if value and os.path.isabs(value):
        return Path(value)
    return Path(_home("", environ)) / fallback


# --------------------------------------------------------------------------
# Numbers, durations, sizes


def _whole(value: object) -> int:
    """A whole number from YAML (int, or a string of digits); never a bool."""
    if isinstance(value, bool):
        raise ValueError("must be a whole number, not true/false")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    raise ValueError("must be a whole number")


def parse_duration(value: object) -> float:
    """Seconds from a number or a duration string such as ``90s``, ``5m``, ``1h30m``, ``2d``.

    Raises ValueError (with a short reason) for anything else, for negative,
    non-finite or longer than :data:`MAX_DURATION` values.
    """
    if isinstance(value, bool):
        raise ValueError("must be a number of seconds, not true/false")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = "".join(value.split())
        match = _DURATION_RE.fullmatch(text)
        if text.isascii() and text.isdigit():
            seconds = float(text)
        elif text and match:
            days, hours, minutes, secs = (int(part or 0) for part in match.groups())
            seconds = float(((days * 24 + hours) * 60 + minutes) * 60 + secs)
        else:
            raise ValueError("must be seconds or a duration such as 90s, 5m, 1h30m")
    else:
        raise ValueError("must be seconds or a duration such as 90s, 5m, 1h30m")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("must be a duration of zero or more seconds")
    if seconds > MAX_DURATION:
        raise ValueError("must be at most 366 days")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an int or a string with an optional K/M/G suffix (powers of 1024).

    Raises ValueError for anything else.
    """
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError("must be a number of bytes, optionally with K, M or G (as 50M)")
        power = " KMG".index(match.group(2).upper() or " ")
        return int(match.group(1)) << (10 * power)
    return _whole(value)


def _whole_seconds(value: object) -> int:
    seconds = parse_duration(value)
    if not seconds.is_integer():
        raise ValueError("must be a whole number of seconds")
    return int(seconds)


def _between(low: int, high: int | None = None) -> Callable[[int], int]:
    def check(value: int) -> int:
        if high is not None and not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        if value < low:
            raise ValueError(f"must be at least {low}")
        return value

    return check


def _positive_seconds(value: float) -> float:
    if value <= 0:
        raise ValueError("must be more than 0 seconds")
    return value


def _check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError("must be 1-64 letters, digits, '.', '_' or '-'")
    if value in (".", ".."):
        # Names become lock-file and log names; these two are path tricks.
        raise ValueError("must not be '.' or '..'")
    return value


def _check_wire_text(value: str) -> str:
    """Text that is sent to the server or used as a host name: one clean line."""
    if not value:
        raise ValueError("must not be empty")
    if any(ch < " " or ch == "\x7f" for ch in value):
        raise ValueError("must not contain control characters or line breaks")
    return value


def _check_host(value: str) -> str:
    _check_wire_text(value)
    if any(ch.isspace() for ch in value):
        raise ValueError("must be a host name or an IP address, without spaces")
    return value


_Name = Annotated[str, AfterValidator(_check_name)]
_Host = Annotated[str, AfterValidator(_check_host)]
_WireText = Annotated[str, AfterValidator(_check_wire_text)]
_Port = Annotated[int, BeforeValidator(_whole), AfterValidator(_between(1, 65535))]
_Days = Annotated[int, BeforeValidator(_whole), AfterValidator(_between(0))]
_Interval = Annotated[int, BeforeValidator(_whole_seconds), AfterValidator(_between(1))]
_Timeout = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive_seconds)]
_MessageSize = Annotated[int, BeforeValidator(parse_size), AfterValidator(_between(1))]
_LineLength = Annotated[int, BeforeValidator(parse_size), AfterValidator(_between(1024))]
_Window = Annotated[int, BeforeValidator(_whole), AfterValidator(_between(1, 256))]
_Rate = Annotated[int, BeforeValidator(parse_size), AfterValidator(_between(1))]


# --------------------------------------------------------------------------
# The models


class Account(BaseModel):
    """One POP3 account: where to connect, how to log in, where mail goes, what to delete."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _Name
    host: _Host
    tls: TlsMode = TlsMode.IMPLICIT
    # The default 0 is never used: _default_port fills the port in from tls
    # before validation; the default only makes `port` optional in __init__.
    port: _Port = 0
    ca_file: Path | None = None
    username: _WireText
    password: SecretStr | None = None
    password_file: Path | None = None
    password_command: str | None = Field(default=None, validate_default=True)
    auth: AuthMethod = AuthMethod.AUTO
    allow_plaintext: bool = Field(default=False, validate_default=True)
    maildir: Path
    delete_after_days: _Days | None = None
    interval: _Interval = DEFAULT_INTERVAL
    max_message_size: _MessageSize | None = None
    timeout: _Timeout = DEFAULT_TIMEOUT
    # Absent, it is filled in by _default_poll_timeout (never below `timeout`).
    poll_timeout: _Timeout = DEFAULT_POLL_TIMEOUT
    min_rate: _Rate = DEFAULT_MIN_RATE
    max_line_length: _LineLength = DEFAULT_MAX_LINE_LENGTH
    pipeline_window: _Window = DEFAULT_PIPELINE_WINDOW

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

    @field_validator("maildir", "ca_file", "password_file", mode="before")
    @classmethod
    def _expand_path(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else _resolve_path(value, info)

    @field_validator("ca_file")
    @classmethod
    def _ca_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value}: no such file")
        return value

    @field_validator("password_file")
    @classmethod
    def _password_file_safe(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                mode = value.stat().st_mode
            except OSError as exc:
                raise ValueError(f"{value}: {exc.strerror}") from None
            problem = mode_problem(value, mode)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("password")
    @classmethod
    def _password_one_line(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            secret = value.get_secret_value()
            if not secret:
                raise ValueError("must not be empty")
            if LINE_BREAKERS.intersection(secret):
                raise ValueError("must not contain line breaks or NUL characters")
        return value

    @field_validator("password_command")
    @classmethod
    def _exactly_one_secret(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            try:
                argv = shlex.split(value)
            except ValueError as exc:  # "No closing quotation", "No escaped character"
                raise ValueError(f"cannot be split into words: {str(exc).lower()}") from None
            if not argv:
                raise ValueError("must not be empty")
        # A secret key that failed its own validation is absent from info.data;
        # it was given all the same, so count it (and let its own error speak).
        given = [
            key
            for key in ("password", "password_file")
            if key not in info.data or info.data[key] is not None
        ]
        if value is not None:
            given.append("password_command")
        if not given:
            raise _KeyedValueError(
                "missing: give one of password, password_file or password_command",
                key="password",
            )
        if len(given) > 1:
            raise _KeyedValueError(
                "give only one of password, password_file, password_command",
                key=", ".join(given),
            )
        return value

    @field_validator("allow_plaintext")
    @classmethod
    def _plaintext_consent(cls, value: bool, info: ValidationInfo) -> bool:
        # DESIGN I3: credentials cross the network in clear only when asked.
        if info.data.get("tls") == TlsMode.NONE and not value:
            raise _KeyedValueError(
                "'none' would send the password in clear; set allow_plaintext: true "
                "to accept that, or use tls: implicit or starttls",
                key="tls",
            )
        return value

    @model_validator(mode="after")
    def _remember_base_dir(self, info: ValidationInfo) -> Account:
        self._base_dir = _context(info)[0]
        return self

    def secret(self, *, timeout: float | None = None) -> str:
        """The password or OAuth token, read afresh from its source on every call.

        ``password_command`` runs with ``shlex.split`` (no shell), stdin closed,
        the config file's directory as working directory, and *timeout* seconds
        (default :data:`PASSWORD_COMMAND_TIMEOUT`). Raises ConfigError, naming
        the account and the key but never the secret, when the file is missing,
        readable by group or others, empty or not one clean line, or when the
        command cannot run, fails, times out, prints nothing or more than a line.
        """
        try:
            if self.password is not None:
                return self.password.get_secret_value()
            if self.password_file is not None:
                return read_password_file(self.password_file)
            if self.password_command is not None:
                limit = PASSWORD_COMMAND_TIMEOUT if timeout is None else timeout
                argv = shlex.split(self.password_command)
                return run_password_command(argv, self._base_dir, limit)
        except ValueError as exc:
            key = "password_file" if self.password_file is not None else "password_command"
            raise ConfigError(f"account {self.name!r}: {key}: {exc}") from None
        raise ConfigError(f"account {self.name!r}: password: no secret is configured")


class Config(BaseModel):
    """The whole file: the ledger URL and the accounts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # After validation: the effective SQLAlchemy URL (the default filled in by
    # _default_ledger, a sqlite path made absolute). "" is never kept.
    ledger: str = ""
    accounts: tuple[Account, ...]

    _state_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _default_ledger(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and data.get("ledger") is None:
            state = _xdg_dir(_context(info)[1], "XDG_STATE_HOME", ".local/state")
            data = {**data, "ledger": f"sqlite:///{state / 'popsync' / 'ledger.db'}"}
        return data

    @field_validator("ledger")
    @classmethod
    def _absolute_ledger(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip()
        sqlite = _SQLITE_RE.fullmatch(value)
        if sqlite is None:
            if not _URL_RE.fullmatch(value):
                raise ValueError("must be an SQLAlchemy URL such as sqlite:////var/lib/popsync.db")
            return value
        scheme, path, query = sqlite.groups()
        if _sqlite_file(value) is None:
            return value
        return f"{scheme}:///{_resolve_path(path[1:], info)}{query or ''}"

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
        problems = _duplicate_names([account.name for account in value])
        if problems:
            where, text = problems[0]
            raise _KeyedValueError(text, key="name", where=where)
        return value

    @model_validator(mode="after")
    def _locate_state(self, info: ValidationInfo) -> Config:
        database = _sqlite_file(self.ledger)
        if database is not None:
            self._state_dir = database.parent
        else:
            self._state_dir = _xdg_dir(_context(info)[1], "XDG_STATE_HOME", ".local/state")
            self._state_dir /= "popsync"
        return self

    @property
    def ledger_url(self) -> str:
        """The SQLAlchemy URL of the ledger, default filled in, sqlite path absolute."""
        return self.ledger

    @property
    def state_dir(self) -> Path:
        """Where lock files and other state live: beside a sqlite ledger, else
        ``$XDG_STATE_HOME/popsync``. Never inside a Maildir. Not created here."""
        return self._state_dir

    @property
    def source(self) -> Path | None:
        """The file this config was loaded from (None when built in code)."""
        return self._source

    def account(self, name: str) -> Account:
        """The account called *name*. Raises ConfigError ``unknown account 'x'``."""
        for account in self.accounts:
            if account.name == name:
                return account
        raise ConfigError(f"unknown account {name!r}")

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


def _sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite URL, or None (another database, ``:memory:``, a URI)."""
    match = _SQLITE_RE.fullmatch(url)
    if match is None:
        return None
    path = (match.group(2) or "/")[1:]
    if path in ("", ":memory:") or path.startswith("file:"):
        return None
    return Path(path)


def _duplicate_names(names: list[object]) -> list[tuple[str, str]]:
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


# --------------------------------------------------------------------------
# Finding and loading the file


def resolve_config_path(cli_value: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """The config file to use: *cli_value* (``-c``), else ``$POPSYNC_CONFIG``, else
    ``$XDG_CONFIG_HOME/popsync/config.yaml`` (``~/.config`` when that is unset).

    ``~`` is expanded in the first two. Raises ConfigError only when the home
    directory is needed and cannot be found.
    """
    env = os.environ if environ is None else environ
    try:
        for given in (cli_value, env.get("POPSYNC_CONFIG")):
            if given:
                if given.startswith("~"):
                    user, slash, rest = given[1:].partition("/")
                    return Path(_home(user, env) + slash + rest)
                return Path(given)
        return _xdg_dir(env, "XDG_CONFIG_HOME", ".config") / "popsync" / "config.yaml"
    except ValueError as exc:
        raise ConfigError(f"cannot locate the config file: {exc}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one,
    which would hide, say, a second ``password``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {escape_server_text(key_node.value, 64)!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _trust_problem(path: Path, st: os.stat_result) -> str | None:
    """Why another user could change the config file, or None.

    A config names commands popsync runs (``password_command``) and where mail
    goes, so whoever can write it can run code as the popsync user. As OpenSSH
    does for ``~/.ssh/config``, the file must be owned by this user or root and
    not be writable by group or others. The checks use the open descriptor's
    fstat, so they apply to the file actually read.
    """
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        return (
            f"{path}: is owned by uid {st.st_uid}, not by you (uid {me}) or root, and whoever "
            "can change it can make popsync run their commands; use a config file you own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"{path}: is writable by group or others, who could make popsync run their "
            f"commands; run: chmod go-w {shlex.quote(str(path))}"
        )
    return None


def _read_file(path: Path) -> tuple[str, int]:
    """(text, st_mode) of the config file; ConfigError with one line otherwise.

    Refuses a file another user could change (see :func:`_trust_problem`).
    """
    try:
        with path.open("rb") as stream:
            st = os.fstat(stream.fileno())
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(21, "is a directory")
            problem = _trust_problem(path, st)
            if problem:
                raise ConfigError(problem)
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file (create it, or name another with -c or $POPSYNC_CONFIG)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read it: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a config file?")
    try:
        return data.decode("utf-8-sig"), mode
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text") from None


def _parse_yaml(path: Path, text: str) -> object:
    """The YAML document; syntax errors become ``FILE:LINE:COLUMN: problem``.

    Only PyYAML's ``problem`` and position are shown, never its snippet of the
    offending line: that line may hold a password.
    """
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            f"{path}:{line}: character #x{exc.character:04x} is not allowed"
        ) from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: YAML syntax error") from None


def _account_label(raw_accounts: object, index: int) -> str:
    """``account 'name'`` when the raw item has a usable, unique name, else ``account #N``."""
    if isinstance(raw_accounts, list) and 0 <= index < len(raw_accounts):
        item = raw_accounts[index]
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str) and _NAME_RE.fullmatch(name) and name not in (".", ".."):
            twins = sum(isinstance(it, dict) and it.get("name") == name for it in raw_accounts)
            return f"account #{index + 1} ({name!r})" if twins > 1 else f"account {name!r}"
    return f"account #{index + 1}"


# pydantic error types -> our short phrases. Anything else falls back to the
# pydantic text with "Input should be" turned into "must be"; input values are
# never shown (they may be secrets).
_PHRASES: Final = {
    "missing": "missing (this key is required)",
    "string_type": "must be text (put it in quotes)",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "model_type": "must be a mapping (key: value lines)",
    "model_attributes_type": "must be a mapping (key: value lines)",
    "dict_type": "must be a mapping (key: value lines)",
    "string_too_short": "must not be empty",
    "path_type": "must be a path",
}


def _phrase(error: Mapping[str, Any], known_keys: Iterable[str]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "value_error":
        return str(ctx.get("error", "invalid value"))
    if kind in ("enum", "literal_error"):
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "extra_forbidden":
        import difflib

        close = difflib.get_close_matches(str(error["loc"][-1]), list(known_keys), n=1)
        return f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"
    if kind in _PHRASES:
        return _PHRASES[kind]
    message = str(error.get("msg", "invalid value"))
    return message.replace("Input should be", "must be", 1)


def _describe(path: Path, data: Mapping[str, Any], error: Mapping[str, Any]) -> str:
    """One line for one pydantic error: ``FILE: [account X: ]KEY: phrase``."""
    loc = tuple(error["loc"])
    raw_accounts = data.get("accounts")
    where: str | None = None
    known: Iterable[str] = Config.model_fields
    if len(loc) >= 2 and loc[0] == "accounts" and isinstance(loc[1], int):
        where = _account_label(raw_accounts, loc[1])
        loc = loc[2:]
        known = Account.model_fields
    key = ".".join(str(part) for part in loc)
    custom = (error.get("ctx") or {}).get("error")
    if isinstance(custom, _KeyedValueError):
        where = custom.where or where
        key = custom.key or key
    parts = [str(path), where, key, _phrase(error, known)]
    return ": ".join(part for part in parts if part)


def _holds_password(data: Mapping[str, Any]) -> bool:
    accounts = data.get("accounts")
    return isinstance(accounts, list) and any(
        isinstance(item, dict) and "password" in item for item in accounts
    )


def load_config(path: Path) -> Config:
    """Read, parse and validate the config file at *path*.

    Raises ConfigError with one line per problem, each naming *path*, the
    account and the key: a missing, unreadable, oversized, non-UTF-8 or empty
    file; a file owned by another user (but root) or writable by group or
    others; a YAML syntax error or duplicate key (with ``file:line:column``); a
    top level that is not a mapping; a file holding a ``password`` that group
    or others can read; every invalid value, unknown key, missing secret or
    duplicate account name.
    """
    text, mode = _read_file(path)
    data = _parse_yaml(path, text)
    if data is None:
        raise ConfigError(f"{path}: is empty; it needs an 'accounts' list")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping with 'accounts' (and optionally 'ledger')"
        )
    problems: list[str] = []
    if _holds_password(data) and mode & GROUP_OTHER_READ:
        problems.append(
            f"{path}: holds a password but is readable by group or others; "
            f"run: chmod 600 {shlex.quote(str(path))} (or use password_file or password_command)"
        )
    context = {"base_dir": Path(os.path.abspath(path)).parent, "environ": dict(os.environ)}
    config: Config | None = None
    try:
        config = Config.model_validate(data, context=context)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        problems.extend(_describe(path, data, error) for error in errors)
        # The duplicate-name check runs only once every account is valid;
        # repeat it on the raw data so all problems show in one go.
        raw = data.get("accounts")
        if isinstance(raw, list):
            names = [item.get("name") if isinstance(item, dict) else None for item in raw]
            problems.extend(
                f"{path}: {where}: name: {text}" for where, text in _duplicate_names(names)
            )
    if problems or config is None:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    config._source = path
    return config
