"""Local attacks on popsync, each closed and checked with real files, real
processes and real polls against the test server:

* a Maildir another user can write (they could swap a tmp file between its
  fsync and its link, so a forged message lands and the real one is DELEd);
* a ledger path that is a symlink (SQLite would follow it, mode 0644);
* a config file another user can change (``password_command`` runs code);
* a password command that prints without end, or prints the secret on stderr;
* root following a user's symlink out of the user's Maildir.

CI runs the tests as root, where root owns everything: "another user" is
uid 65534, given files with ``os.chown``/``os.lchown``.  The ordinary-user
paths run in a forked child that has become uid 65534 (the interpreter may
live where that user cannot reach, so the child does not exec).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from popsync.config import load_config
from popsync.credentials import MAX_PASSWORD_COMMAND_OUTPUT, run_password_command
from popsync.deliver.maildir import Maildir, UnsafeMaildir, unique_name
from popsync.errors import ConfigError, DeliveryError, LedgerError
from popsync.ledger import Ledger
from popsync.sync import PollReport, run_account
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import sample_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import load, maildir_contents, maildir_files, stored_form, write_config

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
SECRET = "hunter2-very-secret"

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another uid")


def popsync_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``popsync`` command."""
    return subprocess.run(
        [sys.executable, "-m", "popsync", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def as_nobody(work: Callable[[], str]) -> str:
    """Run *work* in a forked child that has dropped to uid/gid 65534; its result.

    Any exception in the child comes back as ``"raised: <type>: <text>"``.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                result = work()
            except Exception as exc:  # reported to the parent
                result = f"raised: {type(exc).__name__}: {exc}"
            os.write(write_end, result.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


def assert_one_clean_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def name_for(uid: bytes = b"UID-1") -> str:
    return unique_name("home", uid, 0, 1_700_000_000, host="mx1.example.org")


# --------------------------------------------------------------- fixtures


class Poller:
    """One account on one test server, polled through run_account."""

    def __init__(self, tmp: Path, server: POP3TestServer, account: dict[str, Any]) -> None:
        self.server = server
        self.config_path = write_config(tmp, [{"name": "acct", "port": server.port, **account}])
        self.config = load(self.config_path)
        self.account = self.config.accounts[0]
        self.ledger = Ledger.open(self.config.ledger_url)

    def poll(self) -> PollReport:
        return run_account(self.account, self.ledger, self.config.state_dir)


@pytest.fixture
def make_poller(tmp_path: Path) -> Iterator[Callable[..., Poller]]:
    made: list[Poller] = []

    def factory(**account: Any) -> Poller:
        server = POP3TestServer(MailStore(sample_messages())).start()
        made.append(Poller(tmp_path, server, account))
        return made[-1]

    yield factory
    for poller in made:
        poller.ledger.close()
        poller.server.stop()


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory owned by uid 65534 that uid 65534 can reach (not under root's 0700 tmp)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    path = Path(tempfile.mkdtemp(prefix="popsync-nobody-"))
    os.chmod(path, 0o700)
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def assert_untouched(poller: Poller, report: PollReport) -> None:
    """The poll failed permanently before connecting: nothing fetched or deleted."""
    assert not report.ok
    assert report.temporary is False
    assert "\n" not in (report.error or "")
    assert poller.server.sessions == []
    assert len(poller.server.store) == len(sample_messages())


# ----------------------------------------------- 1a. who may write the Maildir


@pytest.mark.parametrize("sub", ["", "tmp", "new", "cur"])
@pytest.mark.parametrize("mode", [0o770, 0o707, 0o730], ids=oct)
def test_maildir_writable_by_group_or_others_is_refused(
    make_poller: Callable[..., Poller], tmp_path: Path, sub: str, mode: int
) -> None:
    maildir = tmp_path / "Mail"
    Maildir(maildir).close()
    (maildir / sub).chmod(mode)
    poller = make_poller(maildir=str(maildir))
    report = poller.poll()
    assert_untouched(poller, report)
    shown = maildir / sub if sub else maildir
    assert report.error == (
        f"Maildir directory {shown} is writable by group or others, who could swap "
        f"messages as they are delivered; run: chmod go-w {shown}"
    )
    assert maildir_files(maildir) == []
    # Following the advice fixes it.
    (maildir / sub).chmod(mode & ~0o022)
    fixed = poller.poll()
    assert fixed.ok, fixed.error
    assert sum(maildir_contents(maildir).values()) == len(sample_messages())


@as_root
@pytest.mark.parametrize("sub", ["", "tmp", "new", "cur"])
def test_maildir_owned_by_another_user_is_refused(
    make_poller: Callable[..., Poller], tmp_path: Path, sub: str
) -> None:
    maildir = tmp_path / "Mail"
    Maildir(maildir).close()
    os.chown(maildir / sub, NOBODY, NOBODY)
    poller = make_poller(maildir=str(maildir))
    report = poller.poll()
    assert_untouched(poller, report)
    shown = maildir / sub if sub else maildir
    assert report.error is not None
    assert report.error.startswith(
        f"Maildir directory {shown} is owned by uid {NOBODY}, but popsync runs as uid 0"
    )
    assert maildir_files(maildir) == []


def test_unsafe_maildir_through_the_cli_is_one_line(tmp_path: Path) -> None:
    with POP3TestServer(MailStore(sample_messages())) as server:
        maildir = tmp_path / "Mail"
        Maildir(maildir).close()
        (maildir / "tmp").chmod(0o1777)  # sticky does not help: the owner of a file may rename
        account = {"name": "acct", "port": server.port, "maildir": str(maildir)}
        config = write_config(tmp_path, [account])
        proc = popsync_cli("-c", str(config), "sync", "--no-progress")
        assert server.sessions == []
    assert proc.returncode != 0
    line = assert_one_clean_line(proc.stdout + proc.stderr)
    assert f"run: chmod go-w {maildir / 'tmp'}" in line
    assert line.startswith("popsync: acct: FAILED")


def test_unsafe_maildir_is_refused_before_creating_anything(tmp_path: Path) -> None:
    maildir = tmp_path / "Mail"
    maildir.mkdir(mode=0o700)
    maildir.chmod(0o777)
    with pytest.raises(UnsafeMaildir, match="writable by group or others") as info:
        Maildir(maildir)
    assert info.value.temporary is False
    assert isinstance(info.value, DeliveryError)
    assert sorted(os.listdir(maildir)) == []


# ------------------------------------------------ 1b. link the file written


def finished_tmp(md: Maildir, data: bytes) -> Any:
    tmp = md.open_tmp(name_for())
    tmp.write(data)
    tmp.finish()
    return tmp


def test_a_tmp_file_replaced_after_fsync_is_not_linked(tmp_path: Path) -> None:
    with Maildir(tmp_path / "Mail") as md:
        tmp = finished_tmp(md, b"Subject: real\n\nthe real message\n")
        forged = md.path / "tmp" / "forged"
        forged.write_bytes(b"Subject: forged\n\nsend your password\n")
        os.rename(forged, tmp.path)
        with pytest.raises(DeliveryError, match=r"was replaced or linked elsewhere") as info:
            md.deliver(tmp)
        assert "\n" not in str(info.value)
        assert os.listdir(md.path / "new") == []
        assert os.listdir(md.path / "tmp") == []


def test_a_tmp_file_linked_elsewhere_is_not_delivered(tmp_path: Path) -> None:
    # A second name would let its holder rewrite the message after delivery.
    with Maildir(tmp_path / "Mail") as md:
        tmp = finished_tmp(md, b"mail\n")
        os.link(tmp.path, tmp_path / "extra-name")
        with pytest.raises(DeliveryError, match=r"was replaced or linked elsewhere"):
            md.deliver(tmp)
        assert os.listdir(md.path / "new") == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("swap", ["moved-away", "renamed-over"])
def test_a_swap_after_the_check_still_links_only_the_file_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    """An attacker who wins the race right after the inode check gets nothing
    linked but the message popsync wrote (the link is made from its descriptor)."""
    real_data = b"Subject: real\n\nthe real message\n"
    with Maildir(tmp_path / "Mail") as md:
        tmp = finished_tmp(md, real_data)
        real_lstat = os.lstat
        swapped: list[bool] = []

        def lstat_then_swap(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            result = real_lstat(path, *args, **kwargs)
            if path == tmp.name and kwargs.get("dir_fd") is not None and not swapped:
                swapped.append(True)
                forged = md.path / "tmp" / "forged"
                forged.write_bytes(b"Subject: forged\n\nsend your password\n")
                if swap == "moved-away":
                    os.rename(tmp.path, md.path / "tmp" / "moved")
                os.rename(forged, tmp.path)
            return result

        monkeypatch.setattr(os, "lstat", lstat_then_swap)
        try:
            delivered = md.deliver(tmp)
        except DeliveryError:
            delivered = None
        monkeypatch.undo()
        assert swapped
        in_new = [p.read_bytes() for p in (md.path / "new").iterdir()]
        if swap == "moved-away":  # our inode still has a name: linked, from the fd
            assert delivered is not None and in_new == [real_data]
        else:  # our inode has no name left: link() fails, nothing is linked
            assert delivered is None and in_new == []


def open_under(root: Path) -> list[str]:
    """What this process holds open under *root*, from /proc/self/fd.

    Only descriptors on *root*'s files count: other threads of the test run
    (servers, daemons, SQLite) open and close their own at any moment.
    """
    root = root.resolve()  # the kernel shows resolved paths
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since listdir
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target == str(root) or target.startswith(f"{root}/"):
                found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_deliveries_leave_no_descriptor_open(tmp_path: Path) -> None:
    assert open_under(tmp_path) == []
    with Maildir(tmp_path / "Mail") as md:
        for n in range(30):
            tmp = md.open_tmp(name_for(str(n).encode()))
            tmp.write(b"x%d\n" % n)
            tmp.finish()
            if n % 3 == 0:
                md.deliver(tmp)
            elif n % 3 == 1:
                tmp.abort()  # finished but discarded
            # else: finished, then dropped (a poll that failed before linking it)
            del tmp
        gc.collect()
        md.sync_new()
        assert len(os.listdir(md.path / "new")) == 10
        assert len(os.listdir(md.path / "tmp")) == 10  # swept by a later poll
    assert open_under(tmp_path) == []


# ------------------------------------------------------------ 2. ledger file


def ledger_url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.mark.parametrize("dangling", [True, False])
def test_a_symlinked_ledger_is_refused(tmp_path: Path, dangling: bool) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "elsewhere.db"
    if not dangling:
        Ledger.open(ledger_url(target)).close()
    (state / "ledger.db").symlink_to(target)
    with pytest.raises(LedgerError) as info:
        Ledger.open(ledger_url(state / "ledger.db"))
    assert str(info.value).startswith(f"ledger {state / 'ledger.db'} is a symbolic link;")
    assert "\n" not in str(info.value)
    assert target.exists() is not dangling  # the target was not created
    assert sorted(os.listdir(state)) == ["ledger.db"]


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_symlinked_companion_file_is_refused(tmp_path: Path, suffix: str) -> None:
    db = tmp_path / "ledger.db"
    Ledger.open(ledger_url(db)).close()
    companion = tmp_path / f"ledger.db{suffix}"
    companion.unlink(missing_ok=True)
    victim = tmp_path / "victim"
    companion.symlink_to(victim)
    with pytest.raises(LedgerError, match=rf"ledger {companion} is a symbolic link"):
        Ledger.open(ledger_url(db))
    assert not victim.exists()


def test_symlinked_ledger_through_the_cli(tmp_path: Path) -> None:
    target = tmp_path / "target.db"
    ledger = tmp_path / "state" / "ledger.db"
    ledger.parent.mkdir(mode=0o700)
    ledger.symlink_to(target)
    config = write_config(tmp_path, [{"name": "acct", "port": 9}], ledger=ledger)
    proc = popsync_cli("-c", str(config), "sync", "--no-progress")
    assert proc.returncode != 0
    line = assert_one_clean_line(proc.stderr)
    assert f"ledger {ledger} is a symbolic link" in line
    assert not target.exists()


def test_a_new_ledger_and_its_companions_are_private_whatever_the_umask(tmp_path: Path) -> None:
    db = tmp_path / "state" / "ledger.db"
    old = os.umask(0)
    try:
        with Ledger.open(ledger_url(db)) as led:
            led.start_poll("acct", 1.0)
            for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
                assert stat.S_IMODE((db.parent / name).stat().st_mode) == 0o600, name
    finally:
        os.umask(old)


# ------------------------------------------------------------ 3. config file


def plain_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, [{"name": "acct", "port": 9}])


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o664, 0o666], ids=oct)
def test_a_config_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    config = plain_config(tmp_path)
    config.chmod(mode)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value) == (
        f"{config}: is writable by group or others, who could make popsync run their "
        f"commands; run: chmod go-w {config}"
    )
    proc = popsync_cli("-c", str(config), "check")
    assert proc.returncode == 2
    assert assert_one_clean_line(proc.stderr) == f"popsync: {info.value}"
    config.chmod(mode & ~0o022)
    assert popsync_cli("-c", str(config), "check").returncode == 0


@as_root
def test_a_config_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    config = plain_config(tmp_path)
    os.chown(config, NOBODY, NOBODY)
    proc = popsync_cli("-c", str(config), "check")
    assert proc.returncode == 2
    line = assert_one_clean_line(proc.stderr)
    assert line.startswith(f"popsync: {config}: is owned by uid {NOBODY}, not by you (uid 0)")


def test_a_config_owned_by_root_is_trusted_by_other_users(nobody_dir: Path) -> None:
    pw = nobody_dir / "acct.pass"
    pw.write_text("pass\n")
    pw.chmod(0o600)
    os.chown(pw, NOBODY, NOBODY)
    config = nobody_dir / "config.yaml"
    doc = {
        "ledger": f"sqlite:///{nobody_dir / 'ledger.db'}",
        "accounts": [
            {
                "name": "acct",
                "host": "127.0.0.1",
                "port": 9,
                "tls": "none",
                "allow_plaintext": True,
                "username": "user",
                "password_file": str(pw),
                "maildir": str(nobody_dir / "Mail"),
            }
        ],
    }
    config.write_text(yaml.safe_dump(doc))
    config.chmod(0o644)  # root's, readable by all, writable by root only
    assert as_nobody(lambda: load_config(config).accounts[0].name) == "acct"
    os.chown(config, 1, 1)  # another user's: refused
    refused = as_nobody(lambda: load_config(config).accounts[0].name)
    assert refused.startswith(
        f"raised: ConfigError: {config}: is owned by uid 1, not by you (uid {NOBODY}) or root"
    )


# ----------------------------------------------------- 4. password commands


def python_command(code: str) -> str:
    return f"{sys.executable} -c {code!r}"


def test_endless_password_command_output_is_capped_and_the_command_killed(
    tmp_path: Path,
) -> None:
    code = (
        "import os, sys\n"
        "open('pid', 'w').write(str(os.getpid()))\n"
        "chunk = b'x' * 65536\n"
        "for _ in range(3200): sys.stdout.buffer.write(chunk)\n"  # 200 MiB
    )
    argv = [sys.executable, "-c", code]
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ValueError) as info:
            run_password_command(argv, tmp_path, timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value) == (
        f"printed more than {MAX_PASSWORD_COMMAND_OUTPUT} bytes; the secret must be one short line"
    )
    assert time.monotonic() - started < 20
    assert peak < 4 * MAX_PASSWORD_COMMAND_OUTPUT, peak
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped


def test_a_failing_password_command_never_shows_its_stderr(tmp_path: Path) -> None:
    code = f"import sys; sys.stderr.write({SECRET!r} + '\\n'); sys.exit(1)"
    with POP3TestServer(MailStore(sample_messages())) as server:
        config = write_config(
            tmp_path,
            [{"name": "acct", "port": server.port, "password_command": python_command(code)}],
        )
        proc = popsync_cli("-c", str(config), "sync", "--no-progress")
        assert server.sessions == []  # the secret failed before connecting
    assert proc.returncode != 0
    line = assert_one_clean_line(proc.stdout + proc.stderr)
    assert "password_command: exited with status 1 (run it by hand" in line
    assert SECRET not in proc.stdout + proc.stderr
    # ... nor in the poll history the ledger keeps.
    db = sqlite3.connect(tmp_path / "state" / "ledger.db")
    try:
        polls = db.execute("SELECT * FROM polls").fetchall()
    finally:
        db.close()
    assert polls, "the failed poll is recorded"
    assert all(SECRET not in str(value) for row in polls for value in row)
    assert any("exited with status 1" in str(value) for row in polls for value in row)


def test_a_password_command_that_prints_a_token_still_works(tmp_path: Path) -> None:
    token = "ya29." + "A" * 2000  # an OAuth access token is long, but far below the cap
    code = f"print({token!r})"
    assert run_password_command([sys.executable, "-c", code], tmp_path, timeout=30) == token


# ------------------------------------------------------- 5. running as root


@as_root
def test_root_refuses_a_users_symlink_to_a_root_only_directory(
    make_poller: Callable[..., Poller], tmp_path: Path
) -> None:
    root_only = tmp_path / "root-only"
    root_only.mkdir(mode=0o700)
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    link = home / "Mail"
    link.symlink_to(root_only)
    os.lchown(link, NOBODY, NOBODY)
    poller = make_poller(maildir=str(link))
    report = poller.poll()
    assert_untouched(poller, report)
    assert report.error == (
        f"Maildir {link} is a symlink owned by uid {NOBODY}, and popsync running as "
        "root follows only root's symlinks; run popsync as the Maildir's owner, or name the "
        "real directory"
    )
    assert os.listdir(root_only) == []


@as_root
def test_root_refuses_another_users_symlink_anywhere_on_the_path(tmp_path: Path) -> None:
    root_only = tmp_path / "root-only"
    root_only.mkdir(mode=0o700)
    link = tmp_path / "shortcut"
    link.symlink_to(root_only)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(UnsafeMaildir, match=rf"{link} is a symlink owned by uid {NOBODY}"):
        Maildir(link / "deep" / "Mail", parents=True)
    assert os.listdir(root_only) == []  # nothing created on the way either


@as_root
def test_root_follows_its_own_symlinks_relative_and_absolute(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "abs").symlink_to(real)
    (tmp_path / "rel").symlink_to("x/../real")
    (tmp_path / "x").mkdir()
    (tmp_path / "chain").symlink_to("abs")
    for via in ("abs", "rel", "chain"):
        with Maildir(tmp_path / via / "Mail", parents=True) as md:
            md.deliver(finished_tmp(md, b"same message\n"))
    assert sorted(os.listdir(real / "Mail" / "new")) == [name_for()]
    assert stat.S_IMODE((real / "Mail").stat().st_mode) == 0o700


@as_root
def test_root_refuses_a_symlink_loop_and_a_file_on_the_path(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(DeliveryError, match="too many levels of symbolic links"):
        Maildir(tmp_path / "a" / "Mail", parents=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DeliveryError, match=r"Maildir .*: .*file is not a directory"):
        Maildir(tmp_path / "file" / "Mail", parents=True)
    with pytest.raises(DeliveryError, match="does not exist"):
        Maildir(tmp_path / "missing" / "Mail", create=False)


# ------------------------------------------------------ as an ordinary user


def test_an_ordinary_user_syncs_exactly_once(nobody_dir: Path) -> None:
    """The non-root paths: Maildir created with makedirs, each message linked
    from its descriptor through /proc by an unprivileged process."""
    messages = sample_messages()

    def poll_twice() -> str:
        config = load(nobody_dir / "config.yaml")
        with Ledger.open(config.ledger_url) as ledger:
            reports = [run_account(config.accounts[0], ledger, config.state_dir) for _ in "12"]
        return "; ".join(f"{r.ok} {r.counts.fetched} {r.error}" for r in reports)

    with POP3TestServer(MailStore(messages)) as server:
        config = write_config(nobody_dir, [{"name": "acct", "port": server.port}])
        for path in (config, nobody_dir / "acct.pass", nobody_dir / "Maildir"):
            os.chown(path, NOBODY, NOBODY)
        assert as_nobody(poll_twice) == f"True {len(messages)} None; True 0 None"
    maildir = nobody_dir / "Maildir" / "acct"
    contents = maildir_contents(maildir)
    assert set(contents) == {stored_form(m) for m in messages}
    assert set(contents.values()) == {1}
    assert {p.stat().st_uid for p in maildir_files(maildir)} == {NOBODY}
