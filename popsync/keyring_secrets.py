"""Secrets in the desktop keyring (``password_keyring: true``).

Through the ``keyring`` library (the optional extra ``popsync[keyring]``):
the Secret Service (GNOME Keyring, KWallet), the macOS Keychain, or any
backend ``PYTHON_KEYRING_BACKEND`` names.  An account's secret is stored
under service :data:`SERVICE` and user name = the account's name.

Errors say what to do, in one line, and never quote a secret:

* :class:`KeyringMissing` -- the library is not installed.
* :class:`NoKeyringBackend` -- installed, but no usable backend (a headless
  box without a Secret Service, a locked or refused keyring).
* ValueError -- nothing stored for that name, or what is stored is not one
  clean line.
"""

from __future__ import annotations

from typing import Any, Final

from popsync.credentials import LINE_BREAKERS

__all__ = [
    "SERVICE",
    "KeyringMissing",
    "NoKeyringBackend",
    "backend_problem",
    "keyring_problem",
    "read_keyring_secret",
    "store_keyring_secret",
]

#: The keyring service every popsync secret is stored under.
SERVICE: Final = "popsync"

_NEEDS: Final = "needs popsync[keyring] (pip install 'popsync[keyring]')"
_BACKEND_HINT: Final = (
    "no usable keyring backend: run a Secret Service (GNOME Keyring, KWallet, KeePassXC) "
    "and unlock it, or name a backend in PYTHON_KEYRING_BACKEND"
)


class KeyringMissing(ValueError):
    """The ``keyring`` library is not installed."""

    def __init__(self) -> None:
        super().__init__(_NEEDS)


class NoKeyringBackend(ValueError):
    """``keyring`` found no backend it can use, or the backend failed."""


def _keyring() -> Any:
    try:
        import keyring
    except ImportError:
        raise KeyringMissing from None
    return keyring


def keyring_problem() -> str | None:
    """Why ``password_keyring`` cannot work here (library missing), else None.

    Only the import is checked: asking a backend may unlock a wallet or pop
    up a prompt, which loading a config must not do.
    """
    try:
        _keyring()
    except KeyringMissing:
        return _NEEDS
    return None


def backend_problem() -> str | None:
    """Why no secret can be stored or read here (no library, no backend), else None."""
    try:
        keyring = _keyring()
    except KeyringMissing:
        return f"password_keyring {_NEEDS}"
    from keyring.backends.fail import Keyring as NoBackend

    if isinstance(keyring.get_keyring(), NoBackend):
        return _BACKEND_HINT
    return None


def read_keyring_secret(user: str) -> str:
    """The secret stored for *user* under :data:`SERVICE`.

    Raises KeyringMissing, NoKeyringBackend, or ValueError when nothing is
    stored or the stored value is empty or not one line.
    """
    keyring = _keyring()
    from keyring.errors import KeyringError, NoKeyringError

    try:
        secret = keyring.get_password(SERVICE, user)
    except NoKeyringError:
        raise NoKeyringBackend(_BACKEND_HINT) from None
    except KeyringError as exc:
        raise NoKeyringBackend(f"the keyring refused: {type(exc).__name__}") from None
    if secret is None:
        raise ValueError(
            f"nothing stored in the keyring for service {SERVICE!r}, user {user!r}; "
            f"run: popsync set-password {user}"
        )
    if not isinstance(secret, str) or not secret or LINE_BREAKERS.intersection(secret):
        raise ValueError(
            f"the keyring entry for {user!r} is empty or not one line; "
            f"run: popsync set-password {user}"
        )
    return secret


def store_keyring_secret(user: str, secret: str) -> None:
    """Store *secret* for *user* under :data:`SERVICE`, replacing any old one.

    Raises KeyringMissing or NoKeyringBackend.
    """
    keyring = _keyring()
    from keyring.errors import KeyringError, NoKeyringError, PasswordSetError

    try:
        keyring.set_password(SERVICE, user, secret)
    except NoKeyringError:
        raise NoKeyringBackend(_BACKEND_HINT) from None
    except (PasswordSetError, KeyringError) as exc:
        raise NoKeyringBackend(f"the keyring refused to store it: {type(exc).__name__}") from None
