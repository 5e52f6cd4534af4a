"""Where an account's tokens are kept: the system keyring, else a private file.

* :class:`KeyringStore` -- the ``keyring`` library (Secret Service, macOS
  Keychain, Windows Credential Locker, KWallet), service ``popsync-oauth``,
  user name = account name.  Used only when a real keyring backend is
  available: ``keyring`` installed and its backend's priority at least 1
  (keyring's "fail" and "null" backends, and keyrings.alt's file backends,
  which are no safer than our own file, rank lower).
* :class:`FileStore` -- ``oauth/ACCOUNT.json`` in the state directory beside
  the ledger (with a PostgreSQL ledger: in ``$XDG_STATE_HOME/popsync``, so
  each machine keeps its own tokens).  The directory is 0700 and the file
  0600; it is written atomically (a new file, fsynced, renamed over the old
  one, the directory fsynced), so a crash leaves the old tokens or the new
  ones, never half of either -- which matters when the provider rotates the
  refresh token: losing the new one would lock the user out.

:func:`open_store` picks the keyring when tokens are already there or no
file exists, else the file.  :meth:`stamp` changes whenever new tokens are
stored; the daemon watches it to resume an account waiting for
``popsync auth``.  Reading a store never raises for a missing entry (None);
a damaged one is :class:`NeedsAuthorization`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Final, Protocol

from pydantic import ValidationError

from popsync.credentials import GROUP_OTHER_READ
from popsync.errors import PopsyncError
from popsync.oauth.errors import NeedsAuthorization, OAuthError
from popsync.oauth.tokens import StoredTokens

__all__ = ["KEYRING_SERVICE", "FileStore", "KeyringStore", "TokenStore", "open_store"]

KEYRING_SERVICE: Final = "popsync-oauth"
_MAX_FILE: Final = 64 << 10
_MIN_KEYRING_PRIORITY: Final = 1


class TokenStore(Protocol):
    """Tokens of one account."""

    #: Where the tokens live, for messages ("the keyring", a path).
    where: str

    def load(self) -> StoredTokens | None: ...

    def save(self, tokens: StoredTokens) -> None: ...

    def stamp(self) -> object:
        """A value that changes whenever tokens are stored (None: nothing stored)."""
        ...


def _parse(raw: bytes | str, account: str, where: str) -> StoredTokens:
    try:
        data: Any = json.loads(raw)
        return StoredTokens.model_validate(data)
    except (ValueError, ValidationError):
        raise NeedsAuthorization(account, f"the tokens in {where} are damaged") from None


class FileStore:
    """``<state_dir>/oauth/<account>.json``, 0600, replaced atomically."""

    def __init__(self, state_dir: Path, account: str) -> None:
        self.account = account
        self.directory = state_dir / "oauth"
        self.path = self.directory / f"{account}.json"
        self.where = str(self.path)

    def load(self) -> StoredTokens | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PopsyncError(
                f"account {self.account}: cannot read {self.path}: {exc.strerror}"
            ) from None
        with os.fdopen(fd, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode) or mode & GROUP_OTHER_READ:
                raise PopsyncError(
                    f"account {self.account}: {self.path} must be a regular file only its "
                    "owner can read (run popsync auth again to rewrite it)"
                )
            raw = file.read(_MAX_FILE + 1)
        if len(raw) > _MAX_FILE:
            raise NeedsAuthorization(self.account, f"{self.path} is too large")
        return _parse(raw, self.account, str(self.path))

    def save(self, tokens: StoredTokens) -> None:
        data = json.dumps(tokens.to_json()).encode()
        tmp = self.directory / f".{self.account}.json.tmp"
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # left by a crash
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise PopsyncError(
                f"account {self.account}: cannot store the tokens in {self.path}: "
                f"{exc.strerror or exc}"
            ) from None

    def stamp(self) -> object:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size)


class KeyringStore:
    """The system keyring, through the ``keyring`` library."""

    def __init__(self, account: str) -> None:
        self.account = account
        self.where = "the system keyring"

    def _call(self, what: str, *args: str) -> str | None:
        import keyring
        import keyring.errors

        try:
            result: str | None = getattr(keyring, what)(KEYRING_SERVICE, self.account, *args)
        except keyring.errors.KeyringError as exc:
            raise OAuthError(f"account {self.account}: the keyring failed: {exc}") from None
        return result

    def load(self) -> StoredTokens | None:
        raw = self._call("get_password")
        return None if raw is None else _parse(raw, self.account, self.where)

    def save(self, tokens: StoredTokens) -> None:
        self._call("set_password", json.dumps(tokens.to_json()))

    def stamp(self) -> object:
        raw = self._call("get_password")
        return None if raw is None else hashlib.sha256(raw.encode()).hexdigest()


def keyring_usable() -> bool:
    """Whether ``keyring`` is installed and has a real backend (see the module docstring)."""
    try:
        import keyring
    except ImportError:
        return False
    try:
        priority = float(getattr(keyring.get_keyring(), "priority", 0))
    except Exception:  # a backend that cannot even say: not usable
        return False
    return priority >= _MIN_KEYRING_PRIORITY


def open_store(state_dir: Path, account: str) -> TokenStore:
    """The store of *account*'s tokens (see the module docstring)."""
    file = FileStore(state_dir, account)
    if keyring_usable():
        keyring_store = KeyringStore(account)
        try:
            in_keyring = keyring_store.stamp() is not None
        except OAuthError:
            return file
        if in_keyring or file.stamp() is None:
            return keyring_store
    return file
