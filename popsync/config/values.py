"""The config's scalar values: parsers, rules, and the annotated types that apply them.

Each parser or rule takes what YAML gave (or a value pydantic already typed)
and returns the clean value, or raises :class:`ValueError` with a short
reason that never quotes the input (it may be a secret).  The annotated types
at the end bind them to model fields; :mod:`popsync.config.problems` turns the
reasons into ``FILE: account 'x': key: reason`` lines.

:func:`account_name_problem` is the one rule for account names: names
become lock-file and log names, so :mod:`popsync.locks` relies on it too.
"""

from __future__ import annotations

import ipaddress
import math
import re
import shlex
from collections.abc import Callable
from typing import Annotated, Final, NamedTuple

from pydantic import AfterValidator, BeforeValidator

__all__ = [
    "MAX_DURATION",
    "AccountName",
    "Days",
    "FetchLimit",
    "HostName",
    "Interval",
    "KeyedValueError",
    "LineLength",
    "Listen",
    "ListenAddress",
    "MessageSize",
    "Port",
    "Rate",
    "Timeout",
    "Window",
    "WireText",
    "account_name_problem",
    "between",
    "check_account_name",
    "check_host",
    "check_wire_text",
    "parse_duration",
    "parse_listen_address",
    "parse_size",
    "positive_seconds",
    "some_messages",
    "whole",
    "whole_seconds",
]

#: Longest duration accepted for ``interval`` and ``timeout`` (366 days), so a
#: typo cannot overflow a socket timeout or a scheduler's timedelta.
MAX_DURATION: Final = 366 * 86400

_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DURATION_RE: Final = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", re.ASCII)
_SIZE_RE: Final = re.compile(r"(\d+)\s*([KMG]?)", re.IGNORECASE | re.ASCII)
_LISTEN_RE: Final = re.compile(r"(?:\[([^\]]*)\]|([^:\[\]]*)):(\d{1,5})", re.ASCII)
_LISTEN_FORM: Final = "must be HOST:PORT, as 127.0.0.1:9464, [::1]:9464 or localhost:9464"


class KeyedValueError(ValueError):
    """A validator's complaint about a key other than the one it validates.

    ``where`` replaces the account label (duplicate names are best told by
    position), ``key`` the key; either may be ``None`` to keep pydantic's.
    """

    def __init__(self, text: str, *, key: str | None = None, where: str | None = None) -> None:
        super().__init__(text)
        self.key = key
        self.where = where


# --------------------------------------------------------------------------
# Numbers, durations, sizes


def whole(value: object) -> int:
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
    return whole(value)


def whole_seconds(value: object) -> int:
    """A duration (as :func:`parse_duration`) that must be whole seconds."""
    seconds = parse_duration(value)
    if not seconds.is_integer():
        raise ValueError("must be a whole number of seconds")
    return int(seconds)


def between(low: int, high: int | None = None) -> Callable[[int], int]:
    """A check that an int is at least *low* (and at most *high*, if given)."""

    def check(value: int) -> int:
        if high is not None and not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        if value < low:
            raise ValueError(f"must be at least {low}")
        return value

    return check


def some_messages(value: int) -> int:
    """A message count that must be at least 1; "no limit" is the key left out."""
    if value < 1:
        raise ValueError("must be at least 1 (leave the key out for no limit)")
    return value


def positive_seconds(value: float) -> float:
    """A duration that must be more than zero."""
    if value <= 0:
        raise ValueError("must be more than 0 seconds")
    return value


# --------------------------------------------------------------------------
# Names and text


def account_name_problem(name: str) -> str | None:
    """Why *name* cannot be an account name, or None if it can.

    The one rule, for the config and for :mod:`popsync.locks`: names become
    lock-file names (``<state_dir>/locks/<name>.lock``), so they are short and
    made of characters that are safe in a file name, and they do not start
    with a dot (``.`` and ``..`` are path tricks, ``.x`` a hidden file).
    """
    if not _NAME_RE.fullmatch(name):
        return "must be 1-64 letters, digits, '.', '_' or '-'"
    if name.startswith("."):
        return "must not start with '.'"
    return None


def check_command_words(value: str | None) -> str | None:
    """A command line popsync runs without a shell (``mda``,
    ``password_command``, ``client_secret_command``): it must split into words
    (``shlex``) and not be empty."""
    if value is not None:
        try:
            argv = shlex.split(value)
        except ValueError as exc:  # "No closing quotation", "No escaped character"
            raise ValueError(f"cannot be split into words: {str(exc).lower()}") from None
        if not argv:
            raise ValueError("must not be empty")
    return value


def check_account_name(value: str) -> str:
    """*value* if it is a valid account name; ValueError with the reason otherwise."""
    problem = account_name_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def check_wire_text(value: str) -> str:
    """Text that is sent to the server or used as a host name: one clean line."""
    if not value:
        raise ValueError("must not be empty")
    if any(ch < " " or ch == "\x7f" for ch in value):
        raise ValueError("must not contain control characters or line breaks")
    return value


def check_host(value: str) -> str:
    """A host name or address: one clean line without spaces."""
    check_wire_text(value)
    if any(ch.isspace() for ch in value):
        raise ValueError("must be a host name or an IP address, without spaces")
    return value


# --------------------------------------------------------------------------
# Addresses to listen on


class ListenAddress(NamedTuple):
    """An address a server of popsync's listens on: an IP literal and a port.

    ``host`` is always an IP address (``localhost`` is read as ``127.0.0.1``),
    so binding it never asks DNS and the config says exactly which interface
    is exposed.
    """

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        """True when only this machine can connect (127.0.0.0/8 or ::1)."""
        return ipaddress.ip_address(self.host.partition("%")[0]).is_loopback

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen_address(value: object) -> ListenAddress:
    """A :class:`ListenAddress` from ``HOST:PORT``: an IPv4 address, an IPv6
    address in brackets (``[::1]:9464``) or ``localhost``, and a port 1-65535.

    A host name other than ``localhost`` is refused: resolving it could pick
    an interface the user did not mean.  Raises ValueError with a short
    reason (the input is never quoted).
    """
    if isinstance(value, ListenAddress):
        return value
    if not isinstance(value, str):
        raise ValueError(_LISTEN_FORM)
    match = _LISTEN_RE.fullmatch(value.strip())
    if match is None:
        if value.count(":") > 1 and "[" not in value:
            raise ValueError("write an IPv6 address in brackets, as [::1]:9464")
        raise ValueError(_LISTEN_FORM)
    bracketed, plain, port_text = match.groups()
    port = between(1, 65535)(int(port_text))
    if plain is not None and plain.lower() == "localhost":
        return ListenAddress("127.0.0.1", port)
    try:
        address = ipaddress.ip_address(bracketed if bracketed is not None else plain)
    except ValueError:
        raise ValueError(
            "the host must be an IP address or localhost (a name could resolve anywhere)"
        ) from None
    if bracketed is not None and address.version != 6:
        raise ValueError("only an IPv6 address goes in brackets")
    return ListenAddress(str(address), port)


AccountName = Annotated[str, AfterValidator(check_account_name)]
HostName = Annotated[str, AfterValidator(check_host)]
WireText = Annotated[str, AfterValidator(check_wire_text)]
Port = Annotated[int, BeforeValidator(whole), AfterValidator(between(1, 65535))]
Days = Annotated[int, BeforeValidator(whole), AfterValidator(between(0))]
FetchLimit = Annotated[int, BeforeValidator(whole), AfterValidator(some_messages)]
Interval = Annotated[int, BeforeValidator(whole_seconds), AfterValidator(between(1))]
Timeout = Annotated[float, BeforeValidator(parse_duration), AfterValidator(positive_seconds)]
MessageSize = Annotated[int, BeforeValidator(parse_size), AfterValidator(between(1))]
LineLength = Annotated[int, BeforeValidator(parse_size), AfterValidator(between(1024))]
Window = Annotated[int, BeforeValidator(whole), AfterValidator(between(1, 256))]
Rate = Annotated[int, BeforeValidator(parse_size), AfterValidator(between(1))]
Listen = Annotated[ListenAddress, BeforeValidator(parse_listen_address)]
