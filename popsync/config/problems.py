"""pydantic's validation errors, translated into one short line each.

pydantic's own text spans lines, names internal types and may quote the
input (which may be a secret).  :func:`validation_problems` gives instead,
for each error, ``FILE: [account X: ]KEY: phrase``, where ``X`` is the
account's name when it is usable and unique, else ``#N`` counted from 1.
Input values are never shown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from popsync.config.models import Account, Config, duplicate_names
from popsync.config.targets import ImapTarget
from popsync.config.values import KeyedValueError, account_name_problem

__all__ = ["validation_problems"]

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


def _account_label(raw_accounts: object, index: int) -> str:
    """``account 'name'`` when the raw item has a usable, unique name, else ``account #N``."""
    if isinstance(raw_accounts, list) and 0 <= index < len(raw_accounts):
        item = raw_accounts[index]
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str) and account_name_problem(name) is None:
            twins = sum(isinstance(it, dict) and it.get("name") == name for it in raw_accounts)
            return f"account #{index + 1} ({name!r})" if twins > 1 else f"account {name!r}"
    return f"account #{index + 1}"


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
        known = ImapTarget.model_fields if loc[:1] == ("imap",) else Account.model_fields
    key = ".".join(str(part) for part in loc)
    custom = (error.get("ctx") or {}).get("error")
    if isinstance(custom, KeyedValueError):
        where = custom.where or where
        if custom.key:  # the key it names sits beside the one validated
            prefix = ".".join(str(part) for part in loc[:-1])
            key = f"{prefix}.{custom.key}" if prefix else custom.key
    parts = [str(path), where, key, _phrase(error, known)]
    return ": ".join(part for part in parts if part)


def validation_problems(path: Path, data: Mapping[str, Any], exc: ValidationError) -> list[str]:
    """One line per problem in *exc*, raised validating *data* read from *path*."""
    errors = exc.errors(include_url=False, include_input=False)
    problems = [_describe(path, data, error) for error in errors]
    # The duplicate-name check runs only once every account is valid;
    # repeat it on the raw data so all problems show in one go.
    raw = data.get("accounts")
    if isinstance(raw, list):
        names = [item.get("name") if isinstance(item, dict) else None for item in raw]
        problems.extend(f"{path}: {where}: name: {text}" for where, text in duplicate_names(names))
    return problems
