"""Micro-benchmark of popsync.deliver.maildir delivery (not part of the test run).

Delivers N messages of SIZE bytes into a fresh Maildir, once with a per-file
fsync and once without, plus a run of 2 MiB messages for raw throughput, and
prints messages/s and MB/s. One ``sync_new()`` (directory fsync) closes each
run, as a sync batch would.

    PYTHONPATH=. python benchmarks/maildir_micro.py [-n 2000] [--size 4096] [--dir PATH]

(or without PYTHONPATH once popsync is installed, e.g. ``pip install -e .``).

--dir picks the file system to measure (default: a temporary directory under
/var/tmp, which is usually on real disk rather than tmpfs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from popsync.deliver.maildir import Maildir, unique_name


def run(root: Path, label: str, count: int, size: int, *, fsync: bool) -> None:
    payload = os.urandom(size)
    target = root / label
    with Maildir(target) as md:
        start = time.perf_counter()
        for i in range(count):
            name = unique_name("bench", f"uid-{i}".encode(), 0, 1_700_000_000, host="bench")
            with md.open_tmp(name) as tmp:
                tmp.write(payload)
                tmp.finish(fsync=fsync)
                md.deliver(tmp)
        md.sync_new()
        elapsed = time.perf_counter() - start
        fstype = md.filesystem_type()
    shutil.rmtree(target)
    rate = count / elapsed
    mbps = count * size / elapsed / 1e6
    print(
        f"{label:<28} {count:>6} x {size:>8} B  {elapsed:8.3f} s  "
        f"{rate:>9.0f} msgs/s  {mbps:>8.1f} MB/s  ({fstype})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="messages per run (default 2000)")
    parser.add_argument("--size", type=int, default=4096, help="message size (default 4096)")
    parser.add_argument("--big", type=int, default=100, help="number of 2 MiB messages")
    parser.add_argument("--dir", type=Path, default=None, help="where to create the Maildirs")
    args = parser.parse_args()
    base = args.dir or Path("/var/tmp")
    root = Path(tempfile.mkdtemp(prefix="popsync-bench-", dir=base))
    try:
        run(root, "per-file fsync", args.n, args.size, fsync=True)
        run(root, "no file fsync", args.n, args.size, fsync=False)
        run(root, "2 MiB, per-file fsync", args.big, 2 * 1024 * 1024, fsync=True)
        run(root, "2 MiB, no file fsync", args.big, 2 * 1024 * 1024, fsync=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
