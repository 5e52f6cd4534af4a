"""The MDA target with real commands: small Python scripts the tests write.

Each script saves what it was given (stdin, environment) to files and ends
as the test asks: exit 0, 75 or 1, a signal, a sleep past the timeout, a
flood of stderr.  The message reaches the MDA byte-exact, its exit status
is the answer, a timeout kills the whole process group, and stderr goes to
the log (its tail only), never into the answer.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from popsync.deliver.base import Receipt, Refusal
from popsync.deliver.mda import STDERR_TAIL, MdaTarget, open_mda_target
from popsync.errors import DeliveryError

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
    assert not _alive(child), "the MDA's child outlived the timeout"


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


RSS_PROBE = """
import hashlib, resource, sys
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
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    [result] = target.commit([draft])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(result, written, before, after)
"""


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
