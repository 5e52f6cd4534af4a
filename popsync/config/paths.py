"""Where things are: ``~`` and ``$VAR`` expansion, XDG directories, the ledger URL.

Every path a user writes in the config goes through :func:`resolve_path`:
a leading ``~`` or ``~user`` is expanded, then ``$NAME`` and ``${NAME}`` (an
unset variable is an error, ``$$`` is a literal ``$``), and a relative result
is taken relative to the config file's directory.  The expansion happens
once, as a shell would do it: a ``$`` in a home directory or in a variable's
value is kept as it is.

The functions take the environment as a mapping, so that validation sees
the environment of the moment the file was loaded.  They raise
:class:`ValueError` with a short reason (the caller adds the file and the
key), except :func:`resolve_config_path`, which is called before there is a
file to name and raises :class:`~popsync.errors.ConfigError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from popsync.errors import ConfigError

__all__ = [
    "expand",
    "home_dir",
    "ledger_url",
    "resolve_config_path",
    "resolve_path",
    "sqlite_file",
    "state_dir",
    "xdg_dir",
]

_VAR_RE: Final = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))?")
_SQLITE_RE: Final = re.compile(r"(sqlite(?:\+\w+)?)://(/[^?]*)?(\?.*)?", re.ASCII)
_URL_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def home_dir(user: str, environ: Mapping[str, str]) -> str:
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


def expand(text: str, environ: Mapping[str, str]) -> str:
    """Expand a leading ``~``/``~user``, then variables (as a shell would, once).

    The home directory is not itself expanded again, so a ``$`` in it is kept.
    Raises ValueError for an unknown user, an unset variable or a stray ``$``.
    """
    if not text.startswith("~"):
        return _expand_vars(text, environ)
    user, slash, rest = text[1:].partition("/")
    return home_dir(user, environ) + slash + _expand_vars(rest, environ)


def resolve_path(value: object, base: Path, environ: Mapping[str, str]) -> Path:
    """A user-written path made absolute: expanded, then relative to *base*.

    Raises ValueError for a value that is not a string, is blank, holds a
    NUL, or cannot be expanded.
    """
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("must be a path (a string)")
    if not value.strip():
        raise ValueError("must not be empty")
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    path = Path(expand(value, environ))
    return path if path.is_absolute() else base / path


def xdg_dir(environ: Mapping[str, str], variable: str, fallback: str) -> Path:
    """An XDG base directory; unset, empty or relative values mean ``~/<fallback>``.

    Raises ValueError when the home directory is needed and cannot be found.
    """
    value = environ.get(variable, "")
    if value and os.path.isabs(value):
        return Path(value)
    return Path(home_dir("", environ)) / fallback


def state_dir(environ: Mapping[str, str]) -> Path:
    """popsync's default state directory: ``$XDG_STATE_HOME/popsync``."""
    return xdg_dir(environ, "XDG_STATE_HOME", ".local/state") / "popsync"


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite URL, or None (another database, ``:memory:``, a URI)."""
    match = _SQLITE_RE.fullmatch(url)
    if match is None:
        return None
    path = (match.group(2) or "/")[1:]
    if path in ("", ":memory:") or path.startswith("file:"):
        return None
    return Path(path)


def ledger_url(value: str, base: Path, environ: Mapping[str, str]) -> str:
    """The ``ledger`` URL as used: a sqlite file path expanded and made absolute.

    Other databases' URLs are kept as written.  Raises ValueError for text
    that is not a URL at all, or a sqlite path that cannot be expanded.
    """
    value = value.strip()
    sqlite = _SQLITE_RE.fullmatch(value)
    if sqlite is None:
        if not _URL_RE.fullmatch(value):
            raise ValueError("must be an SQLAlchemy URL such as sqlite:////var/lib/popsync.db")
        return value
    scheme, path, query = sqlite.groups()
    if sqlite_file(value) is None:
        return value
    return f"{scheme}:///{resolve_path(path[1:], base, environ)}{query or ''}"


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
                    return Path(home_dir(user, env) + slash + rest)
                return Path(given)
        return xdg_dir(env, "XDG_CONFIG_HOME", ".config") / "popsync" / "config.yaml"
    except ValueError as exc:
        raise ConfigError(f"cannot locate the config file: {exc}") from None
