"""The MDA target with real commands: small Python scripts the tests write.

Each script saves what it was given (stdin, environment) to files and ends
as the test asks: exit 0, 75 or 1, a signal, a sleep past the timeout, a
flood of stderr.  The message reaches the MDA byte-exact, its exit status
is the answer, a timeout kills the whole process group, and stderr goes to
the log (its tail only), never into the answer.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import select
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from popsync.deliver.base import Receipt, Refusal
from popsync.deliver.mda import STDERR_TAIL, MdaTarget, open_mda_target
from popsync.errors import DeliveryError
from popsync.ledger import Ledger
from popsync.sync import PollReport, run_account
from popsync.testing.mailstore import MailStore
from popsync.testing.server import POP3TestServer
from tests.helpers import RSS_PROBE_PRELUDE, load, run_sync, stored_form, write_config
from tests.servers.dovecot_delivery import DeliveryDovecot

# Stored form: LF line ends.  Dot-stuffed-looking lines, "From " lines,
# 8-bit bytes, a 20,000-character line and no final line end.
TRICKY = (
    b"Return-Path: <a@example.org>\nSubject: tricky\n\n"
    b".\n..leading dots\nFrom the start\n>From quoted\n"
    b"8-bit: \xe9\xff\x00\x80\n" + b"x" * 20_000 + b"\nno final newline"
)


def mda_script(tmp_path: Path, body: str) -> str:
    """A command line running *body* as a Python script.

    The script starts by saving stdin to ``$OUT/stdin`` and the popsync
    variables of its environment to ``$OUT/env.json``.
    """
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    script = tmp_path / "mda.py"
    prologue = f"""\
        import json, os, sys, time
        OUT = {str(out)!r}
        with open(os.path.join(OUT, "stdin"), "wb") as f:
            while chunk := sys.stdin.buffer.read(1 << 16):
                f.write(chunk)
        env = {{k: v for k, v in os.environ.items() if k.startswith("POPSYNC_")}}
        with open(os.path.join(OUT, "env.json"), "w") as f:
            json.dump(env, f)
    """
    script.write_text(textwrap.dedent(prologue) + textwrap.dedent(body))
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


def deliver(
    command: str, message: bytes, *, uid: bytes = b"UID-1", timeout: float = 30.0
) -> Receipt | Refusal:
    with open_mda_target(command, account="acct", timeout=timeout, warn=_no_warning) as target:
        return deliver_with(target, message, uid=uid)


def deliver_with(target: MdaTarget, message: bytes, *, uid: bytes = b"UID-1") -> Receipt | Refusal:
    target.reserve("n1")
    draft = target.begin("n1", uid)
    for start in range(0, len(message), 7000):  # as the body streams in
        draft.write(message[start : start + 7000])
    target.end(draft)
    assert target.intent(draft) is None
    [result] = target.commit([draft])
    return result


def _no_warning(text: str) -> None:
    raise AssertionError(f"unexpected warning: {text}")


def test_exit_0_is_a_receipt_and_stdin_is_the_message_byte_exact(tmp_path: Path) -> None:
    command = mda_script(tmp_path, "sys.exit(0)\n")
    assert deliver(command, TRICKY, uid=b"AbC-123.x") == Receipt("exit 0")
    assert (tmp_path / "out" / "stdin").read_bytes() == TRICKY
    env = json.loads((tmp_path / "out" / "env.json").read_text())
    assert env == {
        "POPSYNC_ACCOUNT": "acct",
        "POPSYNC_UID": "AbC-123.x",
        "POPSYNC_SIZE": str(len(TRICKY)),
    }


def test_an_empty_message_and_the_target_contract(tmp_path: Path) -> None:
    command = mda_script(tmp_path, "sys.exit(0)\n")
    with open_mda_target(command, account="acct", timeout=30, warn=_no_warning) as target:
        assert (target.kind, target.batch, target.exactly_once) == ("mda", 1, False)
        assert target.recover([]) == []
        assert deliver_with(target, b"") == Receipt("exit 0")
    assert (tmp_path / "out" / "stdin").read_bytes() == b""


def test_exit_75_is_a_temporary_refusal(tmp_path: Path) -> None:
    result = deliver(mda_script(tmp_path, "sys.exit(75)\n"), TRICKY)
    assert result == Refusal("exit 75 (temporary failure)", temporary=True)


def test_exit_1_is_a_permanent_refusal_naming_the_status(tmp_path: Path) -> None:
    result = deliver(mda_script(tmp_path, "sys.exit(1)\n"), TRICKY)
    assert result == Refusal("exit 1", temporary=False)


def test_a_signal_is_a_permanent_refusal_naming_it(tmp_path: Path) -> None:
    body = "import signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    result = deliver(mda_script(tmp_path, body), TRICKY)
    assert result == Refusal("killed by signal 9", temporary=False)


def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    # The MDA starts a child that would outlive it, records its pid, then hangs.
    body = """\
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.path.join(OUT, "child"), "w") as f:
            f.write(str(child.pid))
        time.sleep(600)
    """
    started = time.monotonic()
    result = deliver(mda_script(tmp_path, body), TRICKY, timeout=1.5)
    elapsed = time.monotonic() - started
    assert result == Refusal("timed out after 1.5 s", temporary=False)
    assert elapsed < 10
    child = int((tmp_path / "out" / "child").read_text())
    if _alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the MDA's child outlived the timeout")


def _alive(pid: int, timeout: float = 10.0) -> bool:
    """Whether *pid* still runs after up to *timeout* s (SIGKILL lands asynchronously)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:  # a pidfd becomes readable when its process exits
        readable, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    return not readable


def test_a_child_left_holding_stderr_does_not_delay_the_answer(tmp_path: Path) -> None:
    # Exit 0 at once, leaving a grandchild with our stderr open for 600 s.
    body = """\
        import subprocess
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
        )
        with open(os.path.join(OUT, "child"), "w") as f:
            f.write(str(child.pid))
        sys.exit(0)
    """
    started = time.monotonic()
    try:
        assert deliver(mda_script(tmp_path, body), TRICKY, timeout=60) == Receipt("exit 0")
        assert time.monotonic() - started < 30
    finally:
        child = tmp_path / "out" / "child"
        if child.exists():
            os.kill(int(child.read_text()), signal.SIGKILL)


def test_stderr_tail_goes_to_the_log_not_into_the_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = """\
        for i in range(20000):
            sys.stderr.write(f"noise line {i}\\n")
        sys.stderr.write("secret-ish \\x1b[31m detail\\n")
        sys.exit(1)
    """
    caplog.set_level(logging.DEBUG, logger="popsync.deliver.mda")
    result = deliver(mda_script(tmp_path, body), TRICKY)
    assert result == Refusal("exit 1", temporary=False)
    records = [r for r in caplog.records if r.name == "popsync.deliver.mda"]
    assert records and all(r.levelno == logging.WARNING for r in records)
    messages = [r.getMessage() for r in records]
    assert all("account acct: unique-id UID-1: mda stderr: " in m for m in messages)
    assert "noise line 19999" in messages[-2]
    assert messages[-1].endswith("secret-ish \\x1b[31m detail")  # escaped
    assert "noise line 0\n" not in "\n".join(messages)
    shown = sum(len(m.split("mda stderr: ", 1)[1]) for m in messages)
    assert shown <= STDERR_TAIL + 100


def test_stderr_of_a_delivery_is_logged_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="popsync.deliver.mda")
    body = 'sys.stderr.write("delivered to INBOX\\n")\nsys.exit(0)\n'
    assert deliver(mda_script(tmp_path, body), TRICKY) == Receipt("exit 0")
    [record] = [r for r in caplog.records if r.name == "popsync.deliver.mda"]
    assert record.levelno == logging.DEBUG
    assert record.getMessage().endswith("mda stderr: delivered to INBOX")


def test_a_missing_command_fails_before_any_message(tmp_path: Path) -> None:
    with (
        pytest.raises(DeliveryError, match=r"account acct: mda command .*nope.* not found"),
        open_mda_target(str(tmp_path / "nope"), account="acct", timeout=5, warn=_no_warning),
    ):
        pass


def test_an_unparsable_command_is_one_clear_error() -> None:
    with (
        pytest.raises(DeliveryError, match="account acct: mda command: No closing quotation"),
        open_mda_target("procmail 'oops", account="acct", timeout=5, warn=_no_warning),
    ):
        pass


def test_a_command_removed_after_open_raises_delivery_error(tmp_path: Path) -> None:
    script = tmp_path / "gone"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    with open_mda_target(str(script), account="acct", timeout=5, warn=_no_warning) as target:
        script.unlink()
        with pytest.raises(DeliveryError, match="account acct: cannot run the mda command"):
            deliver_with(target, TRICKY)


def test_close_discards_a_draft_never_committed(tmp_path: Path) -> None:
    command = mda_script(tmp_path, "sys.exit(0)\n")
    with open_mda_target(command, account="acct", timeout=5, warn=_no_warning) as target:
        draft = target.begin("n1", b"u")
        draft.write(b"Subject: x\n\n")
    with pytest.raises(DeliveryError, match="spool file is closed"):
        draft.fileno()
    assert not (tmp_path / "out" / "stdin").exists()


RSS_PROBE = (
    RSS_PROBE_PRELUDE
    + """
from popsync.deliver.mda import open_mda_target

size, command = int(sys.argv[1]), sys.argv[2]
piece = (b"A" * 999 + b"\\n") * 64
with open_mda_target(command, account="big", timeout=120, warn=print) as target:
    draft = target.begin("n1", b"big-1")
    written = 0
    while written < size:
        draft.write(piece)
        written += len(piece)
    target.end(draft)
    before = peak_kib()
    [result] = target.commit([draft])
after = peak_kib()
print(result, written, before, after)
"""
)


def test_a_50_mb_message_keeps_memory_bounded(tmp_path: Path) -> None:
    """The MDA reads the spool file itself: popsync's peak RSS does not grow with it."""
    command = mda_script(tmp_path, "sys.exit(0)\n")
    size = 50 * 1024 * 1024
    probe = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(size), command],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result, written, before, after = probe.stdout.rsplit("\n", 2)[-2].rsplit(" ", 3)
    assert result == "Receipt(text='exit 0')"
    assert (tmp_path / "out" / "stdin").stat().st_size == int(written) >= size
    peak_kib = int(after)
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB"
    assert peak_kib - int(before) < 8 * 1024, "delivery grew the peak RSS"


# -- end to end: popsync polls the project's POP3 test server into an MDA ------------

E2E_MDA = """\
import hashlib, json, os, sys
OUT = sys.argv[1]
uid = os.environ["POPSYNC_UID"]
with open(os.path.join(OUT, "pids"), "a") as f:
    f.write(str(os.getpid()) + "\\n")
data = sys.stdin.buffer.read()
assert len(data) == int(os.environ["POPSYNC_SIZE"])
try:
    with open(os.path.join(OUT, "exits.json")) as f:
        status = json.load(f).get(uid, 0)
except FileNotFoundError:
    status = 0
if status == 0:
    name = hashlib.sha256(uid.encode() + data).hexdigest()
    with open(os.path.join(OUT, "log"), "a") as f:
        f.write(uid + " " + name + "\\n")
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
sys.stderr.write("mda: " + uid + " status " + str(status) + "\\n")
sys.exit(status)
"""


def tricky_messages() -> list[bytes]:
    """Byte-exact round trip material, as a POP3 server holds it (CRLF)."""
    rng = random.Random(5)
    blob = base64.encodebytes(rng.randbytes(5 * 1024 * 1024 // 4 * 3))
    return [
        b"Subject: dots\r\n\r\n.\r\n..two\r\n.leading\r\n. \r\nend\r\n",
        b"Subject: from lines\r\n\r\nFrom me\r\n>From you\r\nFrom: not a header\r\n",
        b"Subject: 8bit\r\n\r\n\xe9t\xe9 \xff\x80\x00 \x1b[0m\r\n",
        b"Subject: long line\r\n\r\n" + b"y" * 20_000 + b"\r\n",
        b"Subject: no final newline\r\n\r\nlast line",
        b"Subject: attachment\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + blob.replace(b"\n", b"\r\n"),
    ]


class MdaEnv:
    """One account polling a test server into the E2E_MDA script."""

    def __init__(self, tmp: Path, messages: list[bytes], **account: Any) -> None:
        self.out = tmp / "mda-out"
        self.out.mkdir()
        script = tmp / "e2e_mda.py"
        script.write_text(E2E_MDA)
        self.store = MailStore(messages)
        self.server = POP3TestServer(self.store).start()
        command = shlex.join([sys.executable, str(script), str(self.out)])
        kw = {"name": "acct", "port": self.server.port, "maildir": None, "mda": command}
        self.config_path = write_config(tmp, [{**kw, **account}])
        self.config = load(self.config_path)
        self.ledger = Ledger.open(self.config.ledger_url)

    def poll(self) -> PollReport:
        return run_account(self.config.accounts[0], self.ledger, self.config.state_dir)

    def exits(self, statuses: dict[bytes, int]) -> None:
        text = json.dumps({uid.decode(): status for uid, status in statuses.items()})
        (self.out / "exits.json").write_text(text)

    def delivered(self) -> Counter[bytes]:
        """Every message the MDA took (exit 0), counted."""
        log = self.out / "log"
        lines = log.read_text().splitlines() if log.exists() else []
        return Counter((self.out / line.split()[1]).read_bytes() for line in lines)

    def wait_for_mdas(self, timeout: float = 30) -> None:
        """Wait until every MDA run so far has exited (one may outlive a killed popsync)."""
        pids = self.out / "pids"
        for pid in pids.read_text().split() if pids.exists() else []:
            assert not _alive(int(pid), timeout), f"MDA {pid} still runs"

    def close(self) -> None:
        self.ledger.close()
        self.server.stop()


@pytest.fixture
def mda_env(tmp_path: Path) -> Iterator[Callable[..., MdaEnv]]:
    made: list[MdaEnv] = []

    def factory(messages: list[bytes], **account: Any) -> MdaEnv:
        made.append(MdaEnv(tmp_path, messages, **account))
        return made[-1]

    yield factory
    for env in made:
        env.close()


def test_run_account_delivers_byte_exact_and_deletes(mda_env: Callable[..., MdaEnv]) -> None:
    messages = tricky_messages()
    env = mda_env(messages, delete_after_days=0, timeout=60)
    report = env.poll()
    assert report.ok, report.error
    assert report.counts.fetched == len(messages) and report.counts.deleted == len(messages)
    assert env.delivered() == Counter(stored_form(m) for m in messages)
    assert len(env.store) == 0
    again = env.poll()  # nothing is handed over twice
    assert again.ok and again.counts.fetched == 0
    assert sum(env.delivered().values()) == len(messages)


def test_run_account_exit_75_is_temporary_and_deletes_nothing(
    mda_env: Callable[..., MdaEnv],
) -> None:
    env = mda_env([b"Subject: one\r\n\r\nbody\r\n"], delete_after_days=0)
    [uid] = env.store.uids()
    env.exits({uid: 75})
    report = env.poll()
    assert not report.ok and report.temporary is True
    assert "exit 75" in (report.error or "")
    assert env.store.uids() == [uid] and not env.delivered()
    env.exits({})  # the MDA recovers: the next poll delivers it
    assert env.poll().ok
    assert env.delivered() == Counter([b"Subject: one\n\nbody\n"]) and len(env.store) == 0


def test_run_account_exit_0_delivers_and_deletes_one(mda_env: Callable[..., MdaEnv]) -> None:
    env = mda_env([b"Subject: one\r\n\r\nbody\r\n"], delete_after_days=0)
    report = env.poll()
    assert report.ok and report.counts.deleted == 1
    assert env.delivered() == Counter([b"Subject: one\n\nbody\n"]) and len(env.store) == 0


def test_popsync_sync_exit_1_leaves_that_message_and_names_it(
    mda_env: Callable[..., MdaEnv],
) -> None:
    messages = [b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(4)]
    env = mda_env(messages, delete_after_days=0)
    bad = env.store.uids()[1]
    env.exits({bad: 1})
    run = subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(env.config_path), "sync", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1, run.stderr
    assert f"unique-id {bad.decode()}: the mda target refused it: exit 1" in run.stderr
    assert "Traceback" not in run.stderr
    assert env.store.uids() == [bad]  # the others were delivered and deleted
    others = [stored_form(m) for i, m in enumerate(messages) if i != 1]
    assert env.delivered() == Counter(others)


# -- crashes: SIGKILL a real popsync sync at each step, then run it again ------------

#: The crash point, and how many duplicates it may cost (an MDA cannot be
#: asked afterwards, so a kill between its exit 0 and the ledger's commit
#: costs exactly one).  ":3" is the third message of five.
MDA_CRASHES = {
    "after_begin_fetch": 0,
    "mid_body:3": 0,
    "mda_started:3": 1,  # popsync dies, the MDA still reads the whole spool file
    "after_dir_fsync:3": 1,
    "after_commit:3": 0,
    "after_dele": 0,
    "after_quit": 0,
}


@pytest.mark.crash
@pytest.mark.parametrize(("failpoint", "duplicates"), MDA_CRASHES.items())
def test_sigkill_then_rerun_loses_nothing_and_duplicates_at_most_one(
    mda_env: Callable[..., MdaEnv], failpoint: str, duplicates: int
) -> None:
    messages = [b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(5)]
    expected = {stored_form(m) for m in messages}
    env = mda_env(messages, delete_after_days=0)

    crashed = run_sync(env.config_path, failpoint)
    assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr)
    env.wait_for_mdas()
    on_server = {stored_form(m.data) for m in env.store.messages()}
    assert expected <= on_server | set(env.delivered()), "a message was lost"

    clean = run_sync(env.config_path, None)
    assert clean.returncode == 0, clean.stderr
    delivered = env.delivered()
    assert set(delivered) == expected  # whole copies only: nothing truncated
    assert sum(delivered.values()) - len(messages) == duplicates
    assert len(env.store) == 0


# -- dovecot-lda as the MDA --------------------------------------------------------------


def poll_into_lda(
    tmp_path: Path, argv: list[str], messages: list[bytes]
) -> tuple[PollReport, MailStore]:
    """One poll of a POP3 test server holding *messages*, delivering through *argv*."""
    store = MailStore(messages)
    with POP3TestServer(store) as pop3:
        account = {
            "name": "acct",
            "port": pop3.port,
            "maildir": None,
            "mda": shlex.join(argv),
            "delete_after_days": 0,
            "timeout": 60,
        }
        config = load(write_config(tmp_path, [account]))
        ledger = Ledger.open(config.ledger_url)
        try:
            return run_account(config.accounts[0], ledger, config.state_dir), store
        finally:
            ledger.close()


@pytest.mark.dovecot
def test_dovecot_lda_through_run_account_byte_exact(
    dovecot_delivery: DeliveryDovecot, tmp_path: Path
) -> None:
    box = dovecot_delivery.new_mailbox("lda")
    messages = tricky_messages()
    report, store = poll_into_lda(tmp_path, dovecot_delivery.lda_command(box.user), messages)
    assert report.ok, report.error
    assert len(store) == 0
    stored = dovecot_delivery.stored_messages(box.user)  # dovecot-lda adds nothing without -f
    assert sorted(stored) == sorted(stored_form(m) for m in messages)


@pytest.mark.dovecot
@pytest.mark.parametrize(("tempfail", "refusal"), [(True, "exit 75"), (False, "exit 77")])
def test_dovecot_lda_over_quota(
    dovecot_delivery: DeliveryDovecot, tmp_path: Path, tempfail: bool, refusal: str
) -> None:
    box = dovecot_delivery.new_mailbox("quota", quota_bytes=1000, quota_tempfail=tempfail)
    big = b"Subject: too big\r\n\r\n" + b"x" * 5000 + b"\r\n"
    report, store = poll_into_lda(tmp_path, dovecot_delivery.lda_command(box.user), [big])
    assert (not report.ok and report.temporary is tempfail) or not tempfail
    assert refusal in (report.error or "")
    assert len(store) == 1 and dovecot_delivery.stored_messages(box.user) == []


@pytest.mark.dovecot
def test_dovecot_lda_unknown_user_is_refused(
    dovecot_delivery: DeliveryDovecot, tmp_path: Path
) -> None:
    argv = [
        *dovecot_delivery.lda_command(dovecot_delivery.new_mailbox("lda").user)[:-1],
        "nobody-here",
    ]
    report, store = poll_into_lda(tmp_path, argv, [b"Subject: x\r\n\r\nbody\r\n"])
    assert not report.ok and "the mda target refused it: exit 67" in (report.error or "")
    assert len(store) == 1
