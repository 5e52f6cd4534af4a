"""Helpers shared by the sync, crash and interop tests: real config files,
Maildir inspection, and the stored form of a server message."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from popsync.config import Config, load_config
from popsync.testing.mailstore import to_crlf


def stored_form(data: bytes) -> bytes:
    """What popsync stores for a message the server holds: LF line ends (DESIGN I5)."""
    return to_crlf(data).replace(b"\r\n", b"\n")


def write_config(tmp: Path, accounts: list[dict[str, Any]], *, ledger: Path | None = None) -> Path:
    """A real config file (mode 0600) with one password file per account."""
    out = []
    for acc in accounts:
        acc = dict(acc)  # noqa: PLW2901
        secret = acc.pop("secret", "pass")
        if "password_file" not in acc and "password" not in acc and "password_command" not in acc:
            pw = tmp / f"{acc['name']}.pass"
            pw.write_text(secret + "\n")
            pw.chmod(0o600)
            acc["password_file"] = str(pw)
        acc.setdefault("host", "127.0.0.1")
        acc.setdefault("tls", "none")
        if acc["tls"] == "none":
            acc.setdefault("allow_plaintext", True)
        acc.setdefault("username", "user")
        acc.setdefault("maildir", str(tmp / "Maildir" / acc["name"]))
        acc.setdefault("timeout", 10)
        out.append(acc)
    path = tmp / "config.yaml"
    doc = {"ledger": f"sqlite:///{ledger or tmp / 'state' / 'ledger.db'}", "accounts": out}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


def load(path: Path) -> Config:
    return load_config(path)


def maildir_files(maildir: Path) -> list[Path]:
    return sorted(
        p for sub in ("new", "cur") if (maildir / sub).is_dir() for p in (maildir / sub).iterdir()
    )


def maildir_contents(maildir: Path) -> Counter[bytes]:
    """Each stored message's bytes, counted (a count of 2 is a duplicate delivery)."""
    return Counter(p.read_bytes() for p in maildir_files(maildir))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
