"""``password_keyring`` and ``popsync set-password``, through the real CLI.

The keyring is keyrings.alt's PlaintextKeyring, a file under a temporary
``XDG_DATA_HOME``, chosen with ``PYTHON_KEYRING_BACKEND`` in the child's
environment: the real ``keyring`` library does the storing and reading.  A
"missing library" is a ``keyring`` module on PYTHONPATH that cannot be
imported; "no backend" is keyring's own ``fail`` backend.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import write_config

SECRET = "k3yring s3cret!"
PLAINTEXT = "keyrings.alt.file.PlaintextKeyring"
NO_BACKEND = "keyring.backends.fail.Keyring"


def popsync(
    tmp_path: Path,
    *args: str,
    backend: str = PLAINTEXT,
    stdin: str = "",
    pythonpath: list[Path] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHON_KEYRING_BACKEND": backend,
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "PYTHONPATH": os.pathsep.join(
            [*(str(p) for p in pythonpath or []), os.environ.get("PYTHONPATH", "")]
        ),
    }
    return subprocess.run(
        [sys.executable, "-m", "popsync", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def keyring_config(tmp_path: Path, port: int = 1, **extra: object) -> Path:
    return write_config(
        tmp_path,
        [{"name": "home", "port": port, "password_keyring": True, "username": "user", **extra}],
    )


def test_set_password_then_sync_reads_it_from_the_keyring(tmp_path: Path) -> None:
    with POP3TestServer(MailStore(generate_messages(2, 500, seed=3)), password=SECRET) as server:
        config = keyring_config(tmp_path, server.port)
        stored = popsync(tmp_path, "-c", str(config), "set-password", "home", stdin=SECRET + "\n")
        assert stored.returncode == 0, stored.stderr
        assert "secret stored in the keyring" in stored.stdout
        synced = popsync(tmp_path, "-c", str(config), "sync", "--no-progress")
    assert synced.returncode == 0, synced.stderr
    assert "2 fetched" in synced.stdout
    forms = [SECRET, base64.b64encode(SECRET.encode()).decode()]
    for out in (stored, synced):
        assert not any(form in out.stdout + out.stderr for form in forms)
    assert not any(
        form.encode() in (tmp_path / "state" / "ledger.db").read_bytes() for form in forms
    )


def test_nothing_stored_is_one_line_naming_the_account_and_the_fix(tmp_path: Path) -> None:
    config = keyring_config(tmp_path)
    done = popsync(tmp_path, "-c", str(config), "sync", "--no-progress")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "account 'home': password_keyring: nothing stored" in line
    assert "run: popsync set-password home" in line


def test_no_usable_backend_exits_1_with_a_hint(tmp_path: Path) -> None:
    config = keyring_config(tmp_path)
    done = popsync(
        tmp_path, "-c", str(config), "set-password", "home", backend=NO_BACKEND, stdin=SECRET
    )
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "no usable keyring backend" in line and "Secret Service" in line
    assert not (tmp_path / "data").exists()


def test_unknown_account_exits_2(tmp_path: Path) -> None:
    config = keyring_config(tmp_path)
    done = popsync(tmp_path, "-c", str(config), "set-password", "nope", stdin=SECRET)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "unknown account 'nope'" in line


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_an_empty_secret_is_refused(tmp_path: Path, stdin: str) -> None:
    config = keyring_config(tmp_path)
    done = popsync(tmp_path, "-c", str(config), "set-password", "home", stdin=stdin)
    assert done.returncode == 2
    assert "must be one non-empty line" in done.stderr


def test_storing_for_an_account_that_does_not_read_the_keyring_says_so(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "home", "port": 1}])
    done = popsync(tmp_path, "-c", str(config), "set-password", "home", stdin=SECRET)
    assert done.returncode == 0
    assert "set password_keyring: true" in done.stderr


def test_without_the_keyring_library_check_says_which_extra(tmp_path: Path) -> None:
    fake = tmp_path / "nolib"
    fake.mkdir()
    (tmp_path / "other").mkdir()
    (fake / "keyring.py").write_text("raise ImportError('not installed')\n")
    config = keyring_config(tmp_path)
    done = popsync(tmp_path, "-c", str(config), "check", pythonpath=[fake])
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "account 'home': password_keyring: needs popsync[keyring]" in line
    stored = popsync(
        tmp_path, "-c", str(config), "set-password", "home", stdin=SECRET, pythonpath=[fake]
    )
    assert stored.returncode == 2  # the config itself cannot be used here
    # An account that does not read the keyring yet: set-password itself says it.
    other = write_config(tmp_path / "other", [{"name": "home", "port": 1}])
    stored = popsync(
        tmp_path, "-c", str(other), "set-password", "home", stdin=SECRET, pythonpath=[fake]
    )
    assert stored.returncode == 1
    (line,) = stored.stderr.strip().splitlines()
    assert (
        line == "popsync: password_keyring needs popsync[keyring] (pip install 'popsync[keyring]')"
    )


def test_keyring_and_another_secret_key_is_a_config_error(tmp_path: Path) -> None:
    config = keyring_config(tmp_path, password="x")
    done = popsync(tmp_path, "-c", str(config), "check")
    assert done.returncode == 2
    assert "give only one of password, password_file, password_keyring" in done.stderr


def run_on_a_terminal(args: list[str], env: dict[str, str], answers: list[str]) -> tuple[int, str]:
    """Run popsync with a pseudo-terminal as its controlling terminal; type each
    of *answers* after each prompt ending in ": ".  (exit status, what it showed)."""
    import fcntl
    import select
    import termios

    main_fd, child_fd = os.openpty()

    def take_terminal() -> None:
        os.setsid()
        fcntl.ioctl(child_fd, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "popsync", *args],
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        env=env,
        preexec_fn=take_terminal,  # noqa: PLW1509 - the child needs the pty as its terminal
    )
    os.close(child_fd)
    shown = b""
    answered = 0
    pending = list(answers)
    try:
        while True:
            ready, _, _ = select.select([main_fd], [], [], 30)
            assert ready, f"no output within 30 s; so far: {shown!r}"
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
            # Answer a prompt only once it is shown in full since the last
            # answer: the newline getpass echoes after an answer must not
            # count as the next prompt (typed then, the answer would be
            # echoed and then flushed by the next prompt's TCSAFLUSH).
            if pending and shown[answered:].endswith(b": "):
                os.write(main_fd, pending.pop(0).encode() + b"\n")
                answered = len(shown)
        return proc.wait(timeout=30), shown.decode("utf-8", "replace")
    finally:
        os.close(main_fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("answers", "status"),
    [([SECRET, SECRET], 0), ([SECRET, SECRET + "x"], 2)],
    ids=["same", "differ"],
)
def test_at_a_terminal_the_secret_is_typed_twice_without_echo(
    tmp_path: Path, answers: list[str], status: int
) -> None:
    config = keyring_config(tmp_path)
    env = {
        **os.environ,
        "PYTHON_KEYRING_BACKEND": PLAINTEXT,
        "XDG_DATA_HOME": str(tmp_path / "data"),
    }
    code, shown = run_on_a_terminal(["-c", str(config), "set-password", "home"], env, answers)
    assert code == status, shown
    assert "Password for account 'home':" in shown and "Again" in shown
    assert SECRET not in shown  # no echo
    if status:
        assert "the two entries differ; nothing stored" in shown
    stored = (tmp_path / "data").exists()
    assert stored == (status == 0)


def test_the_imap_target_reads_its_own_keyring_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keyring
    from keyrings.alt.file import PlaintextKeyring

    from popsync.config.targets import ImapTarget

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    before = keyring.get_keyring()
    keyring.set_keyring(PlaintextKeyring())
    try:
        keyring.set_password("popsync", "imap:alice@imap.example", SECRET)
        target = ImapTarget(host="imap.example", username="alice", password_keyring=True)
        assert target.secret() == SECRET
    finally:
        keyring.set_keyring(before)
