"""Memory: a 200 MiB message into a Maildir target stays within a few receive chunks.

Measured in a subprocess (its own peak RSS, VmHWM), as the hostile-listing
tests do: the message is written in fresh 256 KiB pieces, hashed and
fsynced, and the stored file must match the digest the target reported.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import RSS_PROBE_PRELUDE

RSS_PROBE = (
    RSS_PROBE_PRELUDE
    + """
from pathlib import Path

from popsync.deliver.maildir.target import open_maildir_target

size, path = int(sys.argv[1]), Path(sys.argv[2])
piece = bytearray(b"A" * 1000 + b"\\n") * 256  # mutable: a writer that queues must copy it
with open_maildir_target(path, print) as target:
    draft = target.begin("big", b"big-1")
    written = 0
    while written < size:
        draft.write(piece)
        written += len(piece)
    target.end(draft)
    [receipt] = target.commit([draft])
print(written, draft.sha256_hex, peak_kib())
"""
)


@pytest.mark.slow
def test_a_200_mib_message_keeps_memory_bounded(tmp_path: Path) -> None:
    size = 200 * 1024 * 1024
    probe = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(size), str(tmp_path / "Mail")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    written, sha, peak = probe.stdout.split()
    [stored] = (tmp_path / "Mail" / "new").iterdir()
    assert stored.stat().st_size == int(written) >= size
    digest = hashlib.sha256()
    with stored.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == sha
    assert int(peak) < 60 * 1024, f"peak RSS {peak} KiB"
