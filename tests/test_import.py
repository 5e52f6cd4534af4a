"""``popsync import``: state files written by the real fetchmail, getmail6 and
mpop against the project's POP3 test server, then adopted, then a real poll.

The three tools run as child processes against 127.0.0.1, keeping mail on
the server and delivering to a throw-away command; getmail refuses to run as
root, so under root it runs as ``nobody`` (``setpriv``).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from popsync.adopt import (
    StateFileError,
    parse_fetchmail,
    parse_getmail,
    parse_mpop,
    read_state_file,
    select,
)
from popsync.config import Account
from popsync.testing.samples import sample_messages
from popsync.testing.server import MailStore, POP3TestServer
from tests.helpers import load, maildir_files, write_config

USER = "erin@example.org"
PASSWORD = "pw-erin"
DISCARD = "/bin/sh -c 'cat > /dev/null'"


def needs(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        shutil.which(tool) is None, reason=f"{tool} is not installed (scripts/test.sh installs it)"
    )


@pytest.fixture
def server() -> Iterator[POP3TestServer]:
    store = MailStore(sample_messages()[:3])
    store.add(b"Subject: slash\r\n\r\nbody\r\n", uid=b"x/y")
    with POP3TestServer(store, username=USER, password=PASSWORD) as srv:
        yield srv


def popsync(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def make_config(tmp: Path, port: int, **extra: object) -> Path:
    return write_config(
        tmp,
        [{"name": "erin", "port": port, "username": USER, "secret": PASSWORD, **extra}],
    )


def ledger_rows(config: Path) -> list[tuple[bytes, int, str, str | None, str | None]]:
    db = Path(load(config).ledger_url.removeprefix("sqlite:///"))
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT uid, occurrence, state, receipt, sha256 FROM messages ORDER BY uid"
        ).fetchall()
    return [(bytes(r[0]), r[1], r[2], r[3], r[4]) for r in rows]


def run_tool(argv: list[str], *, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, (argv, done.stdout, done.stderr)


def fetchmail_ids(tmp: Path, port: int) -> Path:
    """``.fetchids`` written by the real fetchmail (``keep`` + ``uidl``)."""
    home = tmp / "fetchmail"
    home.mkdir()
    rc = home / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\n"
        f"poll erinhost via 127.0.0.1 protocol pop3 port {port} uidl\n"
        f'  user "{USER}" password "{PASSWORD}" keep sslproto \'\' mda "{DISCARD}"\n'
    )
    rc.chmod(0o600)
    ids = home / ".fetchids"
    env = {**os.environ, "FETCHMAILHOME": str(home), "HOME": str(home)}
    run_tool(["fetchmail", "-f", str(rc), "-i", str(ids), "--nosslcertck"], env=env)
    return ids


def mpop_uidls(tmp: Path, port: int) -> Path:
    """The UIDLs file written by the real mpop (``keep on``)."""
    home = tmp / "mpop"
    home.mkdir()
    rc = home / "mpoprc"
    uidls = home / "uidls"
    rc.write_text(
        f"account erin\nhost 127.0.0.1\nport {port}\nuser {USER}\npassword {PASSWORD}\n"
        f'tls off\nauth user\nkeep on\nuidls_file {uidls}\ndelivery mda "{DISCARD}"\n'
    )
    rc.chmod(0o600)
    run_tool(["mpop", "-C", str(rc), "--quiet", "erin"])
    return uidls


def getmail_oldmail(tmp: Path, port: int) -> Path:
    """The oldmail file written by the real getmail6 (``delete = false``)."""
    # getmail refuses root: run it as nobody in a directory nobody can reach
    # (pytest's own tmp directories are private to their owner).
    gdir = Path(tempfile.mkdtemp(prefix="popsync-getmail-"))
    try:
        (gdir / "getmailrc").write_text(
            "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\n"
            f"port = {port}\nusername = {USER}\npassword = {PASSWORD}\n"
            "[destination]\ntype = MDA_external\npath = /bin/sh\n"
            'arguments = ("-c", "cat > /dev/null")\n'
            "[options]\ndelete = false\nread_all = false\n"
        )
        argv = ["getmail", "--getmaildir", str(gdir), "--rcfile", "getmailrc", "--quiet"]
        if os.geteuid() == 0:
            gdir.chmod(0o755)
            shutil.chown(gdir, "nobody")
            shutil.chown(gdir / "getmailrc", "nobody")
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
        run_tool(argv, env={"PATH": os.environ["PATH"], "HOME": str(gdir)})
        (found,) = gdir.glob("oldmail-*")
        dest = tmp / found.name
        shutil.copyfile(found, dest)
        return dest
    finally:
        shutil.rmtree(gdir)


TOOLS = {"fetchmail": fetchmail_ids, "getmail": getmail_oldmail, "mpop": mpop_uidls}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_real_tools_state_file_is_adopted_and_nothing_is_fetched_again(
    tool: str, tmp_path: Path, server: POP3TestServer
) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/test.sh installs it)")
    state = TOOLS[tool](tmp_path, server.port)
    config = make_config(tmp_path, server.port)

    done = popsync(config, "import", "erin", "--from", tool, str(state))
    assert done.returncode == 0, done.stderr
    assert "erin: adopted 4, already known 0, ignored 0 (other accounts)" in done.stdout
    rows = ledger_rows(config)
    assert {r[2] for r in rows} == {"delivered"}
    assert {r[3] for r in rows} == {f"imported from {tool}"}
    assert all(r[1] == 0 and r[4] is None for r in rows)

    synced = popsync(config, "sync", "--no-progress")
    assert synced.returncode == 0, synced.stderr
    # getmail writes the server's "x/y" as "x-y": that one message is
    # fetched again (a duplicate at worst, never a loss); the others are not.
    again = 1 if tool == "getmail" else 0
    assert f"{again} fetched" in synced.stdout, synced.stdout
    assert len(maildir_files(tmp_path / "Maildir" / "erin")) == again

    server_store = server.store
    server_store.add(b"Subject: new after the switch\r\n\r\nhello\r\n")
    synced = popsync(config, "sync", "--no-progress")
    assert "1 fetched" in synced.stdout, synced.stdout

    done = popsync(config, "import", "erin", "--from", tool, str(state))
    assert "adopted 0, already known 4" in done.stdout


@needs("fetchmail")
def test_imported_messages_are_never_deleted(tmp_path: Path, server: POP3TestServer) -> None:
    ids = fetchmail_ids(tmp_path, server.port)
    fetchmails = len(server.sessions)  # fetchmail itself sends TOP
    config = make_config(tmp_path, server.port, delete_after_days=0)
    done = popsync(config, "import", "erin", "--from", "fetchmail", str(ids))
    assert done.returncode == 0
    assert "popsync never deletes adopted messages" in done.stdout
    new_uid = server.store.add(b"Subject: new\r\n\r\nhello\r\n")

    synced = popsync(config, "sync", "--no-progress")
    assert "1 fetched" in synced.stdout and "1 deleted" in synced.stdout, synced

    # No stored copy to compare with: the adopted messages stay on the server,
    # without a TOP to try, or a warning on every poll.
    assert len(server.store) == 4
    assert new_uid not in server.store.uids()
    synced = popsync(config, "sync", "--no-progress")
    assert "0 deleted" in synced.stdout
    assert len(server.store) == 4
    assert "WARNING" not in synced.stderr
    sent = [line for record in server.sessions[fetchmails:] for line, _ in record.commands]
    assert not [line for line in sent if line.upper().startswith(b"TOP")]


def test_only_this_accounts_entries_are_adopted(tmp_path: Path) -> None:
    config = make_config(tmp_path, 110)
    ids = tmp_path / ".fetchids"
    ids.write_bytes(
        b"bob@mail.example.net u1\n"
        b"ERIN@example.org@127.0.0.1 mine1\n"  # user and host compare case-insensitively
        b"erin@example.org@127.0.0.1 mine2\n"
        b"erin@example.org@other.example u3\n"
        b"bob@mail.example.net u2\n"
    )
    done = popsync(config, "import", "erin", "--from", "fetchmail", str(ids))
    assert done.returncode == 0, done.stderr
    assert "erin: adopted 2, already known 0, ignored 3 (other accounts)" in done.stdout
    assert [r[0] for r in ledger_rows(config)] == [b"mine1", b"mine2"]

    uidls = tmp_path / "uidls"
    uidls.write_bytes(
        b"# generated by mpop\n#\n"
        b" 2 mail.example.net bob\nb1\nb2\n"
        b" 3 127.0.0.1 erin@example.org\nmine1 1700000000\nmine3 1700000000\nmine4 1700000001\n"
    )
    done = popsync(config, "import", "erin", "--from", "mpop", str(uidls))
    assert "erin: adopted 2, already known 1, ignored 2 (other accounts)" in done.stdout


def test_a_garbage_file_exits_2_and_leaves_the_ledger_unchanged(tmp_path: Path) -> None:
    config = make_config(tmp_path, 110)
    good = tmp_path / "uidls"
    good.write_bytes(b" 1 127.0.0.1 erin@example.org\nkept\n")
    assert popsync(config, "import", "erin", "--from", "mpop", str(good)).returncode == 0
    before = ledger_rows(config)

    garbage = tmp_path / "garbage"
    garbage.write_bytes(b" 3 127.0.0.1 erin@example.org\nnew1\nnew2\n")  # one UID short
    done = popsync(config, "import", "erin", "--from", "mpop", str(garbage))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"popsync: {garbage}: not a mpop state file: line 1 announces 3 UIDs; the file ends first"
    ]
    garbage.write_bytes(os.urandom(64) + b"\n")
    for tool in ("fetchmail", "getmail", "mpop"):
        done = popsync(config, "import", "erin", "--from", tool, str(garbage))
        assert done.returncode == 2, (tool, done.stdout)
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    done = popsync(config, "import", "erin", "--from", "fetchmail", str(tmp_path / "absent"))
    assert done.returncode == 2 and "cannot read it" in done.stderr
    assert ledger_rows(config) == before


def test_a_file_with_nothing_for_the_account_says_what_it_holds(tmp_path: Path) -> None:
    config = make_config(tmp_path, 110)
    ids = tmp_path / ".fetchids"
    ids.write_bytes(b"bob@mail.example.net u1\nbob@mail.example.net u2\n")
    done = popsync(config, "import", "erin", "--from", "fetchmail", str(ids))
    assert done.returncode == 2
    assert done.stderr == (
        f"popsync: {ids}: holds 2 UIDs for bob@mail.example.net, "
        "none for erin@example.org@127.0.0.1 (account erin)\n"
    )
    assert ledger_rows(config) == []


def test_dry_run_shows_what_would_be_adopted_and_writes_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path, 110)
    name = f"oldmail-127.0.0.1-110-{USER}"
    oldmail = tmp_path / name
    oldmail.write_bytes(b"u1\x001700000000\nu2\x001700000000\n")
    assert popsync(config, "check").returncode == 0
    before = ledger_rows(config)
    done = popsync(config, "import", "erin", "--from", "getmail", str(oldmail), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "would adopt u1",
        "would adopt u2",
        "erin: would adopt 2, already known 0, ignored 0 (other accounts)",
    ]
    assert ledger_rows(config) == before


def account(port: int = 110) -> Account:
    return Account.model_validate(
        {
            "name": "erin",
            "host": "Mail.Example.org",
            "port": port,
            "tls": "none",
            "allow_plaintext": True,
            "username": USER,
            "password": "x",
            "maildir": "/tmp/unused",
        }
    )


def test_fetchmail_user_with_at_signs_and_several_accounts() -> None:
    state = parse_fetchmail(
        Path(".fetchids"),
        b"erin@example.org@mail.example.org a\nerin@example.org@mail.example.org b\n"
        b"erin@mail.example.org c\n",
    )
    chosen = select(state, account())
    assert (chosen.mine, chosen.ignored) == ([b"a", b"b"], 1)


def test_mpop_reads_both_formats_and_dedups() -> None:
    old = parse_mpop(Path("u"), b" 2 mail.example.org erin@example.org\na\nb\n")
    new = parse_mpop(Path("u"), b"# c\n 3 mail.example.org erin@example.org\na 1\nb 2\nb 3\n")
    assert select(old, account()).mine == select(new, account()).mine == [b"a", b"b"]
    with pytest.raises(StateFileError, match=r"line 2: expected UID or 'UID TIME'"):
        parse_mpop(Path("u"), b" 1 mail.example.org erin@example.org\na b\n")


def test_getmail_matches_server_port_and_user_from_the_file_name() -> None:
    name = Path("oldmail-mail.example.org-110-erin@example.org")
    state = parse_getmail(name, b"a\x001\n")
    assert select(state, account(110)).mine == [b"a"]
    with pytest.raises(
        StateFileError, match=r"holds 1 UID for erin@example\.org@mail\.example\.org:110"
    ):
        select(state, account(995))
    with pytest.raises(StateFileError, match="line 1: expected UID, NUL, a time"):
        parse_getmail(name, b"a 1\n")


def test_unknown_tool_and_bad_uids_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"erin@example.org@mail.example.org a\x01b\n")
    with pytest.raises(StateFileError, match="line 1: bad unique-id"):
        read_state_file("fetchmail", path)
    with pytest.raises(StateFileError, match="unknown tool 'pine'"):
        read_state_file("pine", path)
