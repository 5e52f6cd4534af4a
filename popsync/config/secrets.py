"""Where a secret comes from: exactly one of ``password``, ``password_file``,
``password_keyring``, ``password_command`` -- for an account, and for an IMAP
delivery target.

A ``password`` is a :class:`SecretStr` (never in a ``repr`` or a message); a
file must not be readable by group or others; ``password_keyring: true``
needs the ``keyring`` library (popsync[keyring]); a command is split like a
shell would -- it runs WITHOUT a shell, so pipes, ``$VAR`` and ``~`` are not
expanded (write ``sh -c '...'`` for those) -- and must not be empty.  The
file, the keyring and the command are read only by
:meth:`SecretSource.read_secret`, afresh on each call.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Final

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from popsync.config.paths import resolve_path
from popsync.config.values import KeyedValueError, check_command_words
from popsync.credentials import (
    LINE_BREAKERS,
    mode_problem,
    read_password_file,
    run_password_command,
)
from popsync.errors import ConfigError
from popsync.keyring_secrets import keyring_problem, read_keyring_secret
from popsync.options import TlsMode

#: Seconds a ``password_command`` may run before it is killed.
PASSWORD_COMMAND_TIMEOUT: Final = 30.0


def context_of(info: ValidationInfo) -> tuple[Path, Mapping[str, str]]:
    """(config directory, environment) from the validation context."""
    ctx = info.context if isinstance(info.context, Mapping) else {}
    base = ctx.get("base_dir")
    environ = ctx.get("environ")
    return (
        base if isinstance(base, Path) else Path.cwd(),
        environ if isinstance(environ, Mapping) else os.environ,
    )


class SecretSource(BaseModel):
    """The three secret keys and their rules; a model that logs in inherits them."""

    password: SecretStr | None = None
    password_file: Path | None = None
    #: The secret is in the desktop keyring: service "popsync", user
    #: :meth:`keyring_user` (an account's name).
    password_keyring: bool = False
    password_command: str | None = Field(default=None, validate_default=True)

    #: A model with another credential source (an account's ``oauth2``)
    #: checks "none given" itself, once that key is validated too.
    _OTHER_SOURCE: ClassVar[str | None] = None

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("password_file", mode="before")
    @classmethod
    def _expand_password_file(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else resolve_path(value, *context_of(info))

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

    @field_validator("password_keyring")
    @classmethod
    def _keyring_installed(cls, value: bool) -> bool:
        problem = keyring_problem() if value else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("password_command")
    @classmethod
    def _exactly_one_secret(cls, value: str | None, info: ValidationInfo) -> str | None:
        check_command_words(value)
        # A secret key that failed its own validation is absent from info.data;
        # it was given all the same, so count it (and let its own error speak).
        given = [
            key
            for key in ("password", "password_file")
            if key not in info.data or info.data[key] is not None
        ]
        if info.data.get("password_keyring", True):
            given.append("password_keyring")
        if value is not None:
            given.append("password_command")
        if not given and cls._OTHER_SOURCE is None:
            raise KeyedValueError(
                "missing: give one of password, password_file, password_keyring "
                "or password_command",
                key="password",
            )
        if len(given) > 1:
            raise KeyedValueError(
                "give only one of password, password_file, password_keyring, password_command",
                key=", ".join(given),
            )
        return value

    @model_validator(mode="after")
    def _remember_base_dir(self, info: ValidationInfo) -> SecretSource:
        self._base_dir = context_of(info)[0]
        return self

    def keyring_user(self) -> str:
        """The keyring user name this source's secret is stored under."""
        raise NotImplementedError  # each model that logs in names its own

    def read_secret(self, owner: str) -> str:
        """The secret, read afresh from its source; *owner* names it in errors.

        ``password_command`` runs with ``shlex.split`` -- no shell, so no pipes,
        variables or ``~`` -- stdin closed, the config file's directory as
        working directory, and at most :data:`PASSWORD_COMMAND_TIMEOUT`
        seconds.  Raises ConfigError, naming *owner* and the key but never the
        secret, when the file is missing, readable by group or others, empty or
        not one clean line; when the keyring has no usable backend or nothing
        stored; or when the command cannot run, fails, times out, prints
        nothing or more than a line (with a hint when it looks like a shell
        pipeline written without ``sh -c``).
        """
        key = "password"
        try:
            if self.password is not None:
                return self.password.get_secret_value()
            if self.password_file is not None:
                key = "password_file"
                return read_password_file(self.password_file)
            if self.password_keyring:
                key = "password_keyring"
                return read_keyring_secret(self.keyring_user())
            if self.password_command is not None:
                key = "password_command"
                argv = shlex.split(self.password_command)
                timeout = PASSWORD_COMMAND_TIMEOUT
                return run_password_command(argv, self._base_dir, timeout)
        except ValueError as exc:
            raise ConfigError(f"{owner}: {key}: {exc}") from None
        raise ConfigError(f"{owner}: password: no secret is configured")


class TlsLoginRules(BaseModel):
    """The rules every model that logs in to a server keeps (an account, an
    IMAP target): ``ca_file`` expanded and present, and ``tls: none`` only with
    ``allow_plaintext: true`` -- credentials cross the network in clear only
    when the user asked for it.  Declares no fields: the model has them."""

    @field_validator("ca_file", mode="before", check_fields=False)
    @classmethod
    def _expand_ca_file(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else resolve_path(value, *context_of(info))

    @field_validator("ca_file", check_fields=False)
    @classmethod
    def _ca_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value}: no such file")
        return value

    @field_validator("allow_plaintext", check_fields=False)
    @classmethod
    def _plaintext_consent(cls, value: bool, info: ValidationInfo) -> bool:
        if info.data.get("tls") == TlsMode.NONE and not value:
            raise KeyedValueError(
                "'none' would send the password in clear; set allow_plaintext: true "
                "to accept that, or use tls: implicit or starttls",
                key="tls",
            )
        return value
