"""Reading the config file: the file checks, the YAML, then validation.

:func:`load_config` is the only way a file becomes a :class:`Config`.  It
refuses, each with one line naming the file:

* a file another user could change: it names commands popsync runs
  (``password_command``) and where mail goes, so, as OpenSSH does for
  ``~/.ssh/config``, it must be owned by this user or root and not be
  writable by group or others;
* a file holding a ``password`` that group or others can read (as fetchmail
  insists);
* a missing, unreadable, oversized or non-UTF-8 file, a YAML syntax error
  (shown by line and column, never with the offending line, which may hold a
  password) and a duplicate key (PyYAML would silently keep the last one).
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import ValidationError

from popsync.config.models import Config
from popsync.config.problems import validation_problems
from popsync.credentials import GROUP_OTHER_READ
from popsync.errors import ConfigError, escape_server_text

__all__ = ["MAX_CONFIG_BYTES", "load_config"]

#: A config file larger than this is surely not a config file.  16 MiB holds
#: about 100,000 accounts of ~150 bytes: the workers sharing a PostgreSQL
#: ledger serve thousands of accounts from one file.
MAX_CONFIG_BYTES: Final = 16 << 20


class _UniqueKeys(yaml.constructor.SafeConstructor):
    """Refuses duplicate keys (PyYAML silently keeps the last one, which would
    hide, say, a second ``password``)."""

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


class _UniqueKeyLoader(_UniqueKeys, yaml.SafeLoader):
    """The pure-Python SafeLoader with :class:`_UniqueKeys`: its error texts and
    positions are the ones popsync shows."""


#: libyaml's parser, when PyYAML was built with it: about 3 times faster and
#: half the memory on a config of 10,000 accounts.  It words some syntax
#: errors differently, so a document it refuses is parsed again by
#: :class:`_UniqueKeyLoader`, whose message is the one shown.
_FastLoader: type | None = None
if yaml.__with_libyaml__:

    class _CUniqueKeyLoader(_UniqueKeys, yaml.CSafeLoader):
        """libyaml's SafeLoader with :class:`_UniqueKeys`."""

    _FastLoader = _CUniqueKeyLoader


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
    if _FastLoader is not None:
        try:
            return yaml.load(text, Loader=_FastLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError:
            pass  # parsed again below, for the message popsync words
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
    context = {
        "base_dir": Path(os.path.abspath(path)).parent,
        "environ": dict(os.environ),
        "source": path,
    }
    config: Config | None = None
    try:
        config = Config.model_validate(data, context=context)
    except ValidationError as exc:
        problems.extend(validation_problems(path, data, exc))
    if problems or config is None:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return config
