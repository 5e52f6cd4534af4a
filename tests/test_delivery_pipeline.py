"""DeliveryPipeline: background creates and fsyncs, with the Maildir's safety kept.

Real Maildirs in a temporary directory. Failures are injected by replacing
``os.fsync`` (for this test only) with a wrapper that fails or blocks for the
named tmp files and passes every other call through.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from popsync.deliver.maildir import DeliveryPipeline, Maildir, TmpMessage, unique_name
from popsync.errors import DeliveryError

#: Bound on every wait for a background step; generous, never reached when things work.
WAIT = 10.0


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


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def _fd_name(fd: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return ""


def fsync_failing_for(names: set[str], seen: list[tuple[str, str]]) -> Callable[[int], None]:
    """An os.fsync that fails with EIO for the tmp files in *names*.

    Records (file name, thread name) of every fsync of those files in *seen*.
    """
    real = os.fsync

    def fsync(fd: int) -> None:
        name = _fd_name(fd)
        if name in names:
            seen.append((name, threading.current_thread().name))
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    return fsync


def write_and_finish(pipe: DeliveryPipeline, name: str, data: bytes) -> TmpMessage:
    tmp = pipe.open(name)
    tmp.write(data)
    pipe.finish(tmp)
    return tmp


# ------------------------------------------------------------ the happy path


def test_reserve_open_finish_complete_then_the_caller_links(md: Maildir) -> None:
    names = [name_for(n) for n in range(5)]
    with DeliveryPipeline(md, workers=3) as pipe:
        for name in names:
            pipe.reserve(name)
        finished = [
            write_and_finish(pipe, name, f"Subject: {name}\n\nbody\n".encode()) for name in names
        ]
        done = pipe.complete()

        # In finish order, each one fsynced and closed, none linked yet.
        assert [tmp.name for tmp in done] == names
        assert done == finished
        assert all(tmp.finished for tmp in done)
        assert listing(md.path / "new") == []
        assert listing(md.path / "tmp") == sorted(names)

        for tmp in done:
            md.deliver(tmp)
        md.sync_new()

    assert listing(md.path / "new") == sorted(names)
    assert listing(md.path / "tmp") == []
    for name in names:
        assert (md.path / "new" / name).read_bytes() == f"Subject: {name}\n\nbody\n".encode()


def test_reserve_creates_the_file_on_the_pool_and_open_hands_it_over(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[tuple[TmpMessage, str]] = []
    real_open_tmp = md.open_tmp

    def open_tmp(name: str) -> TmpMessage:
        tmp = real_open_tmp(name)
        created.append((tmp, threading.current_thread().name))
        return tmp

    monkeypatch.setattr(md, "open_tmp", open_tmp)
    name = name_for(1)
    with DeliveryPipeline(md) as pipe:
        pipe.reserve(name)
        pipe.reserve(name)  # a second reservation of the same name is the same file
        tmp = pipe.open(name)
        assert [(made, thread.startswith("popsync-io")) for made, thread in created] == [
            (tmp, True)
        ]
        assert listing(md.path / "tmp") == [name]
        tmp.write(b"x\n")
        pipe.finish(tmp)
        assert pipe.complete() == [tmp]


def test_open_without_reserve_creates_the_file_now(md: Maildir) -> None:
    with DeliveryPipeline(md) as pipe:
        tmp = write_and_finish(pipe, name_for(1), b"x\n")
        assert pipe.complete() == [tmp]
        assert pipe.complete() == []  # each batch is handed out once


def test_finish_returns_while_the_fsync_runs_in_the_background(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = name_for(1)
    entered, release = threading.Event(), threading.Event()
    real = os.fsync

    def slow_fsync(fd: int) -> None:
        if _fd_name(fd) == name:
            entered.set()
            assert release.wait(WAIT), "the test never released the fsync"
        real(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    with DeliveryPipeline(md) as pipe:
        tmp = pipe.open(name)
        tmp.write(b"x\n")
        pipe.finish(tmp)  # returns although the fsync is held
        assert entered.wait(WAIT)
        assert not tmp.finished
        release.set()
        assert pipe.complete() == [tmp]
        assert tmp.finished


# -------------------------------------------------------------------- errors


def test_complete_raises_the_first_error_on_the_callers_thread_and_keeps_nothing(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [name_for(n) for n in range(4)]
    seen: list[tuple[str, str]] = []
    later_failed = threading.Event()
    failing = fsync_failing_for({names[1], names[3]}, seen)

    def fsync(fd: int) -> None:
        # names[3] fails first in time, names[1] only after it: "first" must
        # mean first in finish order, not first to fail.
        if _fd_name(fd) == names[1]:
            assert later_failed.wait(WAIT)
        try:
            failing(fd)
        finally:
            if _fd_name(fd) == names[3]:
                later_failed.set()

    monkeypatch.setattr(os, "fsync", fsync)
    with DeliveryPipeline(md, workers=4) as pipe:
        batch = [write_and_finish(pipe, name, b"body\n") for name in names]
        with pytest.raises(DeliveryError) as info:
            pipe.complete()

        assert str(info.value).startswith(f"cannot fsync {md.path / 'tmp' / names[1]}: EIO")
        # The fsyncs failed on the pool's threads; the error arrived on this one.
        assert [name for name, _ in seen] == [names[3], names[1]]
        assert all(thread.startswith("popsync-io") for _, thread in seen)

        # The whole batch is discarded, the good files too: nothing can be linked.
        assert listing(md.path / "tmp") == []
        for tmp in batch:
            assert not tmp.finished
            with pytest.raises(ValueError, match="discarded"):
                md.deliver(tmp)
        assert listing(md.path / "new") == []

        # The pipeline goes on with the next batch.
        again = write_and_finish(pipe, name_for(9), b"next\n")
        assert pipe.complete() == [again]


def test_a_failed_reservation_surfaces_when_the_file_is_opened(md: Maildir) -> None:
    name = name_for(1)
    os.symlink("/etc/passwd", md.path / "tmp" / name)
    with DeliveryPipeline(md) as pipe:
        pipe.reserve(name)
        with pytest.raises(DeliveryError, match="not a regular file"):
            pipe.open(name)
    assert os.path.islink(md.path / "tmp" / name)  # left alone, never followed


# --------------------------------------------------------------------- close


def test_close_discards_reserved_and_unfinished_files(md: Maildir) -> None:
    reserved = [name_for(n) for n in range(6)]
    pipe = DeliveryPipeline(md, workers=2)
    for name in reserved:
        pipe.reserve(name)
    write_and_finish(pipe, name_for(7), b"never completed\n")
    pipe.close()
    assert listing(md.path / "tmp") == []
    assert listing(md.path / "new") == []


def test_close_never_raises(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    planted, bad_fsync = name_for(1), name_for(2)
    os.symlink("/etc/passwd", md.path / "tmp" / planted)
    monkeypatch.setattr(os, "fsync", fsync_failing_for({bad_fsync}, []))
    pipe = DeliveryPipeline(md)
    pipe.reserve(planted)  # fails with DeliveryError in the pool
    pipe.reserve("../escape")  # fails with ValueError in the pool
    pipe.reserve(name_for(3))  # fine, but never used
    write_and_finish(pipe, bad_fsync, b"fails\n")
    pipe.close()  # must not raise any of those
    pipe.close()  # and may be called again
    assert listing(md.path / "tmp") == [planted]
    assert not (md.path.parent / "escape").exists()
