"""Tests for popsync.deliver.maildir: real files, real directories, real tmpfs mounts where allowed.

Fault injection wraps os.write / os.fsync / os.link so that only calls on the
Maildir under test fail; everything else (pytest's own output) is untouched.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import stat
import subprocess
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popsync.deliver.maildir import (
    DeliveryConflict,
    Maildir,
    TmpMessage,
    delivery_hash,
    file_digest,
    name_hash,
    unique_name,
)
from popsync.deliver.maildir.mounts import fs_type_from_mountinfo, fs_type_from_mounts
from popsync.errors import DeliveryError

SAFE_NAME = re.compile(r"[0-9]+\.P[0-9a-f]{32}\.[A-Za-z0-9.\\-]+")
HOSTILE_UIDS = [
    b"../x",
    b"a/b",
    b":2,S",
    b"../../../../etc/passwd",
    b"\x00\x01\x1b[31m\r\n",
    bytes(range(0x80, 0x100)),
    b"A" * 70,
    b"B" * 500,
    b"",
    b".",
]


@pytest.fixture(autouse=True)
def _umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def md(tmp_path: Path) -> Iterator[Maildir]:
    with Maildir(tmp_path / "Mail") as maildir:
        yield maildir


def name_for(uid: bytes = b"UID-1", occurrence: int = 0) -> str:
    return unique_name("home", uid, occurrence, 1_700_000_000, host="mx1.example.org")


def deliver_bytes(md: Maildir, name: str, data: bytes) -> Path:
    with md.open_tmp(name) as tmp:
        tmp.write(data)
        tmp.finish()
        return md.deliver(tmp)


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a private tmpfs with the given options (root only; skip otherwise)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            pytest.skip(f"mount -t tmpfs failed: {proc.stderr.decode(errors='replace')}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        if subprocess.run(["umount", str(point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], check=False)


# ------------------------------------------------------------------- names


def test_unique_name_follows_the_documented_formula() -> None:
    raw = b"home\x00UID-1\x000"
    expected = hashlib.sha256(raw).hexdigest()[:32]
    assert name_for() == f"1700000000.P{expected}.mx1.example.org"
    assert delivery_hash("home", b"UID-1", 0) == f"P{expected}"


def test_names_are_deterministic_and_distinct() -> None:
    assert name_for() == name_for()
    names = {
        name_for(b"UID-1", 0),
        name_for(b"UID-1", 1),
        name_for(b"UID-2", 0),
        unique_name("work", b"UID-1", 0, 1_700_000_000, host="mx1.example.org"),
    }
    assert len(names) == 4


@pytest.mark.parametrize("uid", HOSTILE_UIDS, ids=repr)
def test_hostile_uids_never_reach_a_path(md: Maildir, tmp_path: Path, uid: bytes) -> None:
    name = unique_name("home", uid, 0, 1_700_000_000)
    assert SAFE_NAME.fullmatch(name), name
    assert ":" not in name and "/" not in name and not name.startswith(".")
    assert len(name) <= 200
    delivered = deliver_bytes(md, name, b"Subject: x\n\nbody\n")
    assert delivered == md.path / "new" / name
    everything = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert everything == [
        Path("Mail"),
        Path("Mail/cur"),
        Path("Mail/new"),
        Path("Mail/new") / name,
        Path("Mail/tmp"),
    ]


def test_host_part_is_escaped_as_the_maildir_spec_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique_name("home", b"u", 0, 5, host="a/b:c d\\é")
    assert name.endswith(".a\\057b\\072c\\040d\\134\\303\\251")
    monkeypatch.setattr(socket, "gethostname", lambda: "evil/host:1")
    assert unique_name("home", b"u", 0, 5).endswith(".evil\\057host\\0721")
    assert unique_name("home", b"u", 0, 5, host="").endswith(".localhost")


def test_long_host_is_cut_on_an_escape_boundary() -> None:
    name = unique_name("home", b"u", 0, 5, host="é" * 100)
    host = name.split(".", 2)[2]
    assert len(host) <= 64
    assert re.fullmatch(r"(\\[0-7]{3})+", host), host


def test_name_hash_ignores_time_host_and_info() -> None:
    a = unique_name("home", b"UID-1", 0, 1, host="old-host")
    b = unique_name("home", b"UID-1", 0, 999_999, host="new-host")
    assert a != b
    assert (
        name_hash(a) == name_hash(b) == name_hash(b + ":2,FS") == delivery_hash("home", b"UID-1", 0)
    )
    assert name_hash(b + ";2,S", info_sep=";") == name_hash(a)
    for foreign in ("1700000000.M1P2Q3.host", ".hidden", "x"):
        with pytest.raises(ValueError):
            name_hash(foreign)


@pytest.mark.parametrize(
    "args",
    [("", b"u", 0, 1), ("a\0b", b"u", 0, 1), ("home", b"u", -1, 1), ("home", b"u", 0, -1)],
)
def test_unique_name_rejects_bad_arguments(args: tuple[str, bytes, int, int]) -> None:
    with pytest.raises(ValueError):
        unique_name(*args, host="h")


@settings(max_examples=200, deadline=None)
@given(
    account=st.text(min_size=1, max_size=40).filter(lambda s: "\0" not in s),
    uid=st.binary(max_size=600),
    other=st.binary(max_size=600),
    occurrence=st.integers(0, 1000),
    first_seen=st.integers(0, 2**40),
    host=st.text(max_size=100),
)
def test_any_input_gives_a_safe_distinct_name(
    account: str, uid: bytes, other: bytes, occurrence: int, first_seen: int, host: str
) -> None:
    name = unique_name(account, uid, occurrence, first_seen, host=host)
    assert SAFE_NAME.fullmatch(name)
    assert name_hash(name) == delivery_hash(account, uid, occurrence)
    if other != uid:
        assert unique_name(account, other, occurrence, first_seen, host=host) != name


# ------------------------------------------------------------ construction


def test_creates_private_directories_and_files(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "Mail"
    with Maildir(path, parents=True) as md:
        for sub in ("", "tmp", "new", "cur"):
            assert stat.S_IMODE((path / sub).stat().st_mode) == 0o700, sub
        with md.open_tmp(name_for()) as tmp:
            assert stat.S_IMODE(tmp.path.stat().st_mode) == 0o600
            tmp.write(b"x")
            tmp.finish()
            delivered = md.deliver(tmp)
    assert stat.S_IMODE(delivered.stat().st_mode) == 0o600


def test_reopens_an_existing_maildir_and_accepts_a_symlinked_root(tmp_path: Path) -> None:
    with Maildir(tmp_path / "Mail") as md:
        first = deliver_bytes(md, name_for(), b"one")
    (tmp_path / "link").symlink_to(tmp_path / "Mail")
    with Maildir(tmp_path / "link", create=False) as again:
        assert again.find(name_for()) == tmp_path / "link" / "new" / first.name


def test_refuses_a_file_in_place_of_the_maildir(tmp_path: Path) -> None:
    (tmp_path / "Mail").write_text("not a maildir")
    for create in (True, False):
        with pytest.raises(DeliveryError, match="not a directory"):
            Maildir(tmp_path / "Mail", create=create)


def test_refuses_missing_maildir_without_create(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError, match="does not exist"):
        Maildir(tmp_path / "nope", create=False)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tmp").mkdir()
    with pytest.raises(DeliveryError, match="missing"):
        Maildir(tmp_path / "half", create=False)
    assert listing(tmp_path / "half") == ["tmp"]


@pytest.mark.parametrize("sub", ["tmp", "new", "cur"])
def test_refuses_symlinked_subdirectories(tmp_path: Path, sub: str) -> None:
    root = tmp_path / "Mail"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root.mkdir()
    for s in ("tmp", "new", "cur"):
        if s == sub:
            (root / s).symlink_to(elsewhere)
        else:
            (root / s).mkdir()
    with pytest.raises(DeliveryError, match="symlink"):
        Maildir(root)
    assert listing(elsewhere) == []


def test_refuses_a_subdirectory_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "Mail"
    root.mkdir()
    (root / "new").write_text("x")
    with pytest.raises(DeliveryError, match="not a directory"):
        Maildir(root)


def test_refuses_an_unwritable_maildir(tmp_path: Path, tmpfs: Callable[[str], Path]) -> None:
    point = tmpfs("size=1m,mode=0700")
    Maildir(point / "Mail").close()
    remount = subprocess.run(["mount", "-o", "remount,ro", str(point)], check=False)
    if remount.returncode != 0:
        pytest.skip("cannot remount read-only")
    with pytest.raises(DeliveryError, match="not writable"):
        Maildir(point / "Mail")


def test_rejects_an_unusable_info_separator(tmp_path: Path) -> None:
    for sep in ("", "/", ".", "a", "-", "::"):
        with pytest.raises(ValueError):
            Maildir(tmp_path / "Mail", info_sep=sep)


def test_closed_maildir_refuses_work(tmp_path: Path) -> None:
    md = Maildir(tmp_path / "Mail")
    md.close()
    md.close()
    with pytest.raises(ValueError, match="closed"):
        md.open_tmp(name_for())


# ---------------------------------------------------------------- open_tmp


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".x", "x:2,S", "x\n", "x y", "é", "x" * 201])
def test_open_tmp_and_find_reject_unsafe_names(md: Maildir, bad: str) -> None:
    with pytest.raises(ValueError):
        md.open_tmp(bad)
    with pytest.raises(ValueError):
        md.find(bad)


@pytest.mark.parametrize("dangling", [False, True])
def test_open_tmp_refuses_a_planted_symlink(md: Maildir, tmp_path: Path, dangling: bool) -> None:
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_bytes(b"precious")
    planted = md.path / "tmp" / name_for()
    planted.symlink_to(victim)
    with pytest.raises(DeliveryError, match="not a regular file"):
        md.open_tmp(name_for())
    assert planted.is_symlink()
    if dangling:
        assert not victim.exists()
    else:
        assert victim.read_bytes() == b"precious"
        assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_open_tmp_replaces_our_own_crash_leftover(md: Maildir) -> None:
    leftover = md.path / "tmp" / name_for()
    leftover.write_bytes(b"half a message from a crashed run" * 100)
    delivered = deliver_bytes(md, name_for(), b"the real one\n")
    assert delivered.read_bytes() == b"the real one\n"
    assert listing(md.path / "tmp") == []


def test_leaving_the_block_undelivered_removes_the_tmp_file(md: Maildir) -> None:
    with pytest.raises(RuntimeError), md.open_tmp(name_for()) as tmp:
        tmp.write(b"partial")
        raise RuntimeError("connection dropped mid-RETR")
    with md.open_tmp(name_for(b"other")) as tmp2:
        tmp2.write(b"x")
        tmp2.finish()
    assert listing(md.path / "tmp") == []
    assert listing(md.path / "new") == []
    with pytest.raises(ValueError):
        md.deliver(tmp2)


def test_size_and_hash_track_every_write_path(md: Maildir) -> None:
    pieces: list[bytes | memoryview] = [
        b"a",
        b"b" * 100_000,
        b"c" * 300_000,
        b"",
        memoryview(b"d" * 200_000),
        b"e" * 70_000,
    ]
    whole = b"".join(bytes(p) for p in pieces)
    with md.open_tmp(name_for()) as tmp:
        for piece in pieces:
            tmp.write(piece)
        assert tmp.size == len(whole)
        assert tmp.sha256_hex == hashlib.sha256(whole).hexdigest()
        tmp.finish()
        delivered = md.deliver(tmp)
    assert delivered.read_bytes() == whole
    assert file_digest(delivered) == (len(whole), hashlib.sha256(whole).hexdigest())


# ----------------------------------------------------------------- deliver


def test_deliver_is_idempotent(md: Maildir) -> None:
    first = deliver_bytes(md, name_for(), b"Subject: hi\n\nbody\n")
    second = deliver_bytes(md, name_for(), b"Subject: hi\n\nbody\n")
    assert first == second == md.path / "new" / name_for()
    assert listing(md.path / "new") == [name_for()]
    assert listing(md.path / "tmp") == []
    with Maildir(md.path) as fresh:  # a later run, with its own index
        assert deliver_bytes(fresh, name_for(), b"Subject: hi\n\nbody\n") == first
    assert listing(md.path / "new") == [name_for()]


@pytest.mark.parametrize("second", [b"Subject: hi\n\nBODY\n", b"Subject: hi\n\nbody\n+more\n"])
def test_different_content_under_the_same_name_is_never_overwritten(
    md: Maildir, second: bytes
) -> None:
    first = deliver_bytes(md, name_for(), b"Subject: hi\n\nbody\n")
    with pytest.raises(DeliveryConflict) as info:
        deliver_bytes(md, name_for(), second)
    assert info.value.existing == first
    assert info.value.temporary is False
    assert first.read_bytes() == b"Subject: hi\n\nbody\n"
    assert listing(md.path / "new") == [name_for()]
    assert listing(md.path / "tmp") == []


@pytest.mark.parametrize("fresh_object", [False, True])
def test_a_copy_moved_to_cur_counts_as_delivered(md: Maildir, fresh_object: bool) -> None:
    name = name_for()
    deliver_bytes(md, name, b"mail\n")
    moved = md.path / "cur" / f"{name}:2,FS"
    os.rename(md.path / "new" / name, moved)  # what a mail reader does
    target = Maildir(md.path) if fresh_object else md
    try:
        assert target.find(name) == moved
        snap = target.snapshot()
        assert snap.find(name) == moved
        assert snap.find_hash(name_hash(name)) == moved
        assert deliver_bytes(target, name, b"mail\n") == moved
        assert listing(md.path / "new") == []
        with pytest.raises(DeliveryConflict):
            deliver_bytes(target, name, b"other mail\n")
        assert moved.read_bytes() == b"mail\n"
        assert listing(md.path / "new") == []
        assert listing(md.path / "tmp") == []
    finally:
        if fresh_object:
            target.close()


def test_custom_info_separator(tmp_path: Path) -> None:
    with Maildir(tmp_path / "Mail", info_sep=";") as md:
        name = name_for()
        deliver_bytes(md, name, b"mail\n")
        moved = md.path / "cur" / f"{name};2,S"
        os.rename(md.path / "new" / name, moved)
        assert md.find(name) == moved
        assert md.snapshot().find(name) == moved
        assert deliver_bytes(md, name, b"mail\n") == moved
        assert listing(md.path / "new") == []
        with pytest.raises(ValueError):
            md.open_tmp("x:y")  # ":" never, whatever the separator


def test_find_and_snapshot(md: Maildir) -> None:
    names = [name_for(str(i).encode()) for i in range(5)]
    for name in names:
        deliver_bytes(md, name, name.encode())
    os.rename(md.path / "new" / names[1], md.path / "cur" / names[1])
    os.rename(md.path / "new" / names[2], md.path / "cur" / f"{names[2]}:2,RS")
    # Dovecot may append ",S=<size>" to a name; the hash still finds it.
    os.rename(md.path / "new" / names[3], md.path / "cur" / f"{names[3]},S=42:2,")
    (md.path / "cur" / ".hidden").write_text("skip me")
    (md.path / "cur" / "1234.M5P6.host:2,S").write_text("another program's mail")
    snap = md.snapshot()
    expected = {
        names[0]: md.path / "new" / names[0],
        names[1]: md.path / "cur" / names[1],
        names[2]: md.path / "cur" / f"{names[2]}:2,RS",
    }
    for name, path in expected.items():
        assert md.find(name) == path
        assert snap.find(name) == path
        assert snap.find_hash(name_hash(name)) == path
    assert snap.find_hash(name_hash(names[3])) == md.path / "cur" / f"{names[3]},S=42:2,"
    assert md.find(name_for(b"never")) is None
    assert snap.find(name_for(b"never")) is None
    assert snap.find(".hidden") is None
    assert "1234.M5P6.host" in snap
    assert len(snap) == 6


def test_link_reporting_failure_although_it_worked(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link

    def nfs_link(*args: object, **kwargs: object) -> None:
        real_link(*args, **kwargs)  # type: ignore[arg-type]
        raise OSError(errno.EIO, "RPC reply lost")

    monkeypatch.setattr(os, "link", nfs_link)
    delivered = deliver_bytes(md, name_for(), b"mail\n")
    assert delivered.read_bytes() == b"mail\n"
    assert listing(md.path / "tmp") == []


def test_link_failure_leaves_nothing(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_link(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(DeliveryError, match=r"EIO"):
        deliver_bytes(md, name_for(), b"mail\n")
    assert listing(md.path / "tmp") == []
    assert listing(md.path / "new") == []


# ------------------------------------------------------- write/fsync errors


def _fails_for(directory: Path, real: Callable[..., object], code: int) -> Callable[..., object]:
    """Wrap os.write/os.fsync so calls on fds inside *directory* fail with *code*."""
    prefix = str(directory)

    def wrapper(fd: int, *args: object) -> object:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target == prefix or target.startswith(prefix + "/"):
            raise OSError(code, os.strerror(code))
        return real(fd, *args)

    return wrapper


@pytest.mark.parametrize("chunk", [1024 * 1024, 1000], ids=["direct", "buffered"])
def test_write_error_discards_the_tmp_file(
    md: Maildir, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(os, "write", _fails_for(md.path / "tmp", os.write, errno.ENOSPC))
    tmp = md.open_tmp(name_for())
    with pytest.raises(DeliveryError) as info:
        tmp.write(b"x" * chunk)
        tmp.finish()
    message = str(info.value)
    assert name_for() in message and "ENOSPC" in message and "No space left" in message
    assert listing(md.path / "tmp") == []
    tmp.abort()
    tmp.abort()
    with pytest.raises(ValueError):
        md.deliver(tmp)
    assert listing(md.path / "new") == []


def test_fsync_error_discards_and_never_links(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", _fails_for(md.path / "tmp", os.fsync, errno.EIO))
    tmp = md.open_tmp(name_for())
    tmp.write(b"mail\n")
    with pytest.raises(DeliveryError, match=r"fsync .*EIO"):
        tmp.finish()
    assert listing(md.path / "tmp") == []
    with pytest.raises(ValueError):
        md.deliver(tmp)
    assert listing(md.path / "new") == []


def test_directory_fsync_error_is_reported(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    deliver_bytes(md, name_for(), b"mail\n")
    md.sync_new()
    monkeypatch.setattr(os, "fsync", _fails_for(md.path / "new", os.fsync, errno.EIO))
    with pytest.raises(DeliveryError, match="EIO"):
        md.sync_new()


def test_real_disk_full_on_a_tiny_tmpfs(tmpfs: Callable[[str], Path]) -> None:
    point = tmpfs("size=64k,mode=0700")
    with Maildir(point / "Mail") as md:
        tmp = md.open_tmp(name_for())
        with pytest.raises(DeliveryError) as info:
            for _ in range(64):
                tmp.write(b"y" * 16384)
            tmp.finish()
        assert "ENOSPC" in str(info.value)
        assert listing(md.path / "tmp") == []
        assert listing(md.path / "new") == []
        # The space came back: the failed file really is gone.
        delivered = deliver_bytes(md, name_for(b"small"), b"z" * 32768)
        assert delivered.stat().st_size == 32768
        assert md.filesystem_type() == "tmpfs"
        assert not md.is_on_nfs()


def test_large_message_keeps_memory_flat(md: Maildir) -> None:
    block = os.urandom(1024 * 1024)
    small = block[:65536]
    expected = hashlib.sha256()
    total = 0
    tracemalloc.start()
    try:
        with md.open_tmp(name_for()) as tmp:
            for i in range(50):
                piece = block if i % 2 else small
                reps = 1 if i % 2 else 16
                for _ in range(reps):
                    tmp.write(piece)
                    expected.update(piece)
                    total += len(piece)
            tmp.finish()
            delivered = md.deliver(tmp)
        assert file_digest(delivered) == (total, expected.hexdigest())
        # Deliver again: the EEXIST path reads the existing file back in chunks.
        with md.open_tmp(name_for()) as again:
            for i in range(50):
                piece = block if i % 2 else small
                for _ in range(1 if i % 2 else 16):
                    again.write(piece)
            again.finish()
            assert md.deliver(again) == delivered
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 50 * 1024 * 1024
    assert peak < 4 * 1024 * 1024, peak


# ------------------------------------------------------------ file_digest


def test_file_digest_refuses_fifos_and_symlinks(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DeliveryError, match="not a regular file"):
        file_digest(fifo)  # must not block waiting for a writer
    real = tmp_path / "real"
    real.write_bytes(b"abc")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(DeliveryError, match="ELOOP"):
        file_digest(tmp_path / "link")
    assert file_digest(real) == (3, hashlib.sha256(b"abc").hexdigest())
    with pytest.raises(DeliveryError, match="ENOENT"):
        file_digest(tmp_path / "missing")


# ------------------------------------------------------------------ sweep


def test_sweep_removes_only_our_stale_files(md: Maildir, tmp_path: Path) -> None:
    tmpdir = md.path / "tmp"
    old = time.time() - 7200
    ours_stale = tmpdir / name_for(b"stale")
    ours_stale.write_bytes(b"leftover")
    ours_fresh = tmpdir / name_for(b"fresh")
    ours_fresh.write_bytes(b"being written")
    foreign = tmpdir / "1700000000.M123P456Q1.mx1"
    foreign.write_bytes(b"another MDA")
    dotted = tmpdir / f".{name_for(b'dot')}"
    dotted.write_bytes(b"x")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmpdir / name_for(b"link")
    link.symlink_to(victim)
    directory = tmpdir / name_for(b"dir")
    directory.mkdir()
    for path in (ours_stale, foreign, dotted, directory, victim):
        os.utime(path, (old, old))
    os.utime(link, (old, old), follow_symlinks=False)
    with md.open_tmp(name_for(b"open")) as active:
        active.write(b"in progress")
        assert md.sweep_tmp(max_age=3600) == 1
        assert active.path.exists()
    assert not ours_stale.exists()
    assert ours_fresh.read_bytes() == b"being written"
    assert foreign.read_bytes() == b"another MDA"
    assert dotted.exists() and directory.is_dir() and link.is_symlink()
    assert victim.read_bytes() == b"precious"
    assert md.sweep_tmp(max_age=0) == 1  # now the fresh one of ours, nothing else
    assert sorted(os.listdir(tmpdir)) == sorted(p.name for p in (foreign, dotted, link, directory))


# ---------------------------------------------------------------- file system


def test_filesystem_type_of_an_ordinary_directory(md: Maildir) -> None:
    assert md.filesystem_type() is not None
    assert md.is_on_nfs() is False


def test_mountinfo_is_matched_by_device_number() -> None:
    dev = os.makedev(0, 53)
    text = (
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        "97 27 0:53 /export /home/alice/Mail rw,relatime shared:42 - nfs4 srv:/export rw,vers=4.2\n"
        "98 27 8:1 / /home rw,relatime - ext4 /dev/sda1 rw\n"
    )
    assert fs_type_from_mountinfo(text, dev) == "nfs4"
    assert fs_type_from_mountinfo(text, os.makedev(8, 1)) == "ext4"
    assert fs_type_from_mountinfo(text, os.makedev(9, 9)) is None


def test_proc_mounts_fallback_uses_the_longest_prefix() -> None:
    text = (
        "/dev/sda1 / ext4 rw 0 0\n"
        "srv:/mail /home/al\\040ice/Mail nfs rw 0 0\n"
        "srv:/x /home/al nfs4 rw 0 0\n"
    )
    assert fs_type_from_mounts(text, "/home/al ice/Mail/new") == "nfs"
    assert fs_type_from_mounts(text, "/home/al ice/Mailbox") == "ext4"
    assert fs_type_from_mounts(text, "/home/al/x") == "nfs4"


def test_tmp_message_repr_and_state(md: Maildir) -> None:
    tmp: TmpMessage = md.open_tmp(name_for())
    try:
        assert not tmp.finished
        tmp.write(b"abc")
        tmp.finish()
        assert tmp.finished
        with pytest.raises(ValueError):
            tmp.write(b"more")
        with pytest.raises(ValueError):
            tmp.finish()
    finally:
        tmp.abort()
    assert listing(md.path / "tmp") == []
