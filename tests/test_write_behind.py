"""Writing behind: a Maildir message hashed and written on a worker thread.

Real Maildirs and real threads. ``os.write`` is wrapped (for one test at a
time) to see which thread writes a file, to hold a write, or to fail it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from popsync.deliver.maildir import DeliveryPipeline, Maildir, unique_name
from popsync.deliver.maildir.behind import DEPTH, WriteBehind
from popsync.errors import DeliveryError
from tests.helpers import RSS_PROBE_PRELUDE

#: Bound on every wait for a background step; generous, never reached when things work.
WAIT = 10.0
#: Chunks this large bypass the message's write buffer: one os.write each.
CHUNK = 256 * 1024


@pytest.fixture(autouse=True)
def _umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def md(tmp_path: Path) -> Iterator[Maildir]:
    with Maildir(tmp_path / "Mail") as maildir:
        yield maildir


def name_for(n: int) -> str:
    return unique_name("home", f"UID-{n}".encode(), 0, 1_700_000_000, host="mx1.example.org")


def _fd_name(fd: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return ""


def wrap_write(
    monkeypatch: pytest.MonkeyPatch, name: str, before: Callable[[int], None]
) -> list[str]:
    """Call *before(n)* ahead of the n-th os.write to tmp/<name>; return the writers' threads."""
    real = os.write
    threads: list[str] = []

    def write(fd: int, data: bytes | memoryview) -> int:
        if _fd_name(fd) == name:
            threads.append(threading.current_thread().name)
            before(len(threads))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return threads


def test_chunks_are_hashed_and_written_in_order_on_the_writer_thread(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = name_for(1)
    threads = wrap_write(monkeypatch, name, lambda n: None)
    chunks = [bytes([65 + i]) * CHUNK + b"\n" for i in range(3 * DEPTH)]
    with DeliveryPipeline(md) as pipe:
        tmp = pipe.open(name)
        for chunk in chunks:
            tmp.write(chunk)
        pipe.finish(tmp)
        assert pipe.complete() == [tmp]
        md.deliver(tmp)
    whole = b"".join(chunks)
    assert (md.path / "new" / name).read_bytes() == whole
    assert tmp.sha256_hex == hashlib.sha256(whole).hexdigest()
    assert tmp.size == len(whole)
    assert threads and set(threads) == {"popsync-write_0"}


def test_the_caller_runs_ahead_of_a_held_write_but_only_depth_chunks(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = name_for(1)
    held, release = threading.Event(), threading.Event()

    def hold_the_first(n: int) -> None:
        if n == 1:
            held.set()
            assert release.wait(WAIT), "the test never released the write"

    wrap_write(monkeypatch, name, hold_the_first)
    returned: list[int] = []  # writes of the caller that returned, in order
    progress = threading.Condition()
    with DeliveryPipeline(md) as pipe:
        tmp = pipe.open(name)

        def caller() -> None:
            for i in range(DEPTH + 2):
                tmp.write(bytes([65 + i]) * CHUNK)
                with progress:
                    returned.append(i)
                    progress.notify_all()

        thread = threading.Thread(target=caller)
        thread.start()
        assert held.wait(WAIT)
        # The first write is held on the writer thread, yet the caller went
        # on: its first DEPTH writes returned.  The next one must wait for
        # the held write (a bounded queue), so it cannot have returned yet.
        with progress:
            assert progress.wait_for(lambda: len(returned) >= DEPTH, WAIT)
            assert returned == list(range(DEPTH))
        release.set()
        thread.join(WAIT)
        assert returned == list(range(DEPTH + 2))
        pipe.finish(tmp)
        pipe.complete()
    expected = b"".join(bytes([65 + i]) * CHUNK for i in range(DEPTH + 2))
    assert tmp.sha256_hex == hashlib.sha256(expected).hexdigest()


def test_a_failed_write_on_the_writer_thread_surfaces_as_the_delivery_error(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = name_for(1)

    def disk_full(n: int) -> None:
        if n == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    threads = wrap_write(monkeypatch, name, disk_full)
    with DeliveryPipeline(md) as pipe:
        tmp = pipe.open(name)
        with pytest.raises(DeliveryError, match=f"cannot write .*{name}.*ENOSPC") as info:
            for i in range(4 * DEPTH):  # the error comes back on a later write
                tmp.write(bytes([65 + i]) * CHUNK)
        assert threads == ["popsync-write_0", "popsync-write_0"]  # nothing after the failure
        assert "ENOSPC" in str(info.value)
        assert os.listdir(md.path / "tmp") == []  # discarded, never to be linked
        with pytest.raises(ValueError, match="discarded"):
            tmp.write(b"more")


def test_a_failed_last_write_surfaces_at_complete_and_the_batch_is_discarded(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = name_for(1)

    def fail_the_last(n: int) -> None:
        if n == 2:  # the final flush, on the writer thread: after the last write() returned
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    wrap_write(monkeypatch, name, fail_the_last)
    with DeliveryPipeline(md) as pipe:
        tmp = pipe.open(name)
        tmp.write(b"x" * CHUNK)
        tmp.write(b"small tail\n")  # gathered, then flushed at finish
        pipe.finish(tmp)
        with pytest.raises(DeliveryError, match=r"cannot write .*EIO"):
            pipe.complete()
    assert os.listdir(md.path / "tmp") == []
    assert os.listdir(md.path / "new") == []


def test_write_behind_keeps_the_first_error_and_skips_the_rest() -> None:
    done: list[bytes] = []

    def work(chunk: bytes) -> None:
        if chunk == b"bad":
            raise DeliveryError("cannot write: bad")
        done.append(chunk)

    with ThreadPoolExecutor(1) as executor:
        behind = WriteBehind(executor, work, depth=2)
        behind.submit(b"a")
        behind.submit(b"bad")
        behind.wait()
        with pytest.raises(DeliveryError, match="bad"):
            behind.submit(b"c")
        with pytest.raises(DeliveryError, match="bad"):
            behind.drain()
    assert done == [b"a"]


# -- memory: a 200 MiB message into a Maildir, measured in a subprocess ------------

RSS_PROBE = (
    RSS_PROBE_PRELUDE
    + """
from pathlib import Path

from popsync.deliver.maildir.target import open_maildir_target

size, path = int(sys.argv[1]), Path(sys.argv[2])
piece = bytearray(b"A" * 1000 + b"\\n") * 256  # a fresh copy is queued per write
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
