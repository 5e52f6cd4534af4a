"""Helpers for the mbox target's tests: a config with an ``mbox:`` target, and
reading an mbox back the way a mail reader does (two independent readers)."""

from __future__ import annotations

import mailbox
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import write_config

_SEPARATOR = re.compile(rb"(?m)^From [^\n]*\n")
_QUOTED = re.compile(rb"(?m)^>(>*From )")


def mbox_config(tmp: Path, accounts: list[dict[str, Any]]) -> Path:
    """A real config file whose accounts deliver into the mbox each names."""
    path = write_config(tmp, accounts)
    doc = yaml.safe_load(path.read_text())
    for acc in doc["accounts"]:
        if "mbox" in acc:
            del acc["maildir"]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def read_mbox(path: Path) -> list[bytes]:
    """Each message in *path*, unquoted, as CPython's ``mailbox.mbox`` splits
    them (it does not unquote mboxrd itself)."""
    if not path.exists():
        return []
    box = mailbox.mbox(str(path), create=False)
    try:
        return [_QUOTED.sub(rb"\1", box.get_bytes(key)) for key in box.keys()]  # noqa: SIM118 - iterating yields messages
    finally:
        box.close()


def split_mbox(data: bytes) -> list[tuple[bytes, bytes]]:
    """A strict reader: (separator line, unquoted message) per entry.

    Every separator must open the file or follow a blank line, and every
    entry must end with the blank line before the next one (or the end).
    """
    starts = [m.start() for m in _SEPARATOR.finditer(data)]
    assert not data or starts[:1] == [0], "the mbox does not start with a separator"
    entries = []
    for begin, end in zip(starts, [*starts[1:], len(data)], strict=True):
        chunk = data[begin:end]
        assert chunk.endswith(b"\n\n"), f"entry at {begin} does not end with a blank line"
        line, _, body = chunk.partition(b"\n")
        entries.append((line, _QUOTED.sub(rb"\1", body[:-1])))
    return entries


def mbox_contents(path: Path) -> Counter[bytes]:
    """Each message's bytes, counted (a count of 2 is a duplicate delivery)."""
    if not path.exists():
        return Counter()
    return Counter(body for _, body in split_mbox(path.read_bytes()))
