"""Per-account locks between real processes and between threads of one process."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from popsync.errors import ConfigError, PopsyncError
from popsync.locks import AccountBusy, account_lock
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[1]

# A child process that takes the lock, says so, and holds it until told to go
# (or until killed). argv: state_dir account wait
HOLDER = """
import sys
from pathlib import Path
from popsync.locks import AccountBusy, account_lock
arg = sys.argv[3]
wait = arg == "true" if arg in ("true", "false") else float(arg)
try:
    with account_lock(Path(sys.argv[1]), sys.argv[2], wait=wait):
        print("locked", flush=True)
        sys.stdin.readline()
except AccountBusy as exc:
    print(f"busy {exc.holder}", flush=True)
    sys.exit(3)
"""

# A child that first finds the lock held (and says so), then waits up to 20 s
# for it. argv: state_dir account
WAITER = """
import sys
from pathlib import Path
from popsync.locks import AccountBusy, account_lock
state, account = Path(sys.argv[1]), sys.argv[2]
try:
    with account_lock(state, account, wait=False):
        sys.exit(4)  # the parent holds it: never here
except AccountBusy:
    print("refused", flush=True)
with account_lock(state, account, wait=20.0):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def start_holder(state: Path, account: str, wait: str = "false") -> subprocess.Popen[str]:
    return start_child(HOLDER, str(state), account, wait)


def start_child(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def wait_for_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def release(proc: subprocess.Popen[str]) -> int:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc.wait(timeout=20)


def test_lock_file_and_directory_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with account_lock(state, "home", wait=False):
        lock = state / "locks" / "home.lock"
        assert stat.S_IMODE((state / "locks").stat().st_mode) == 0o700
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        assert lock.read_text().strip() == str(os.getpid())
    assert lock.exists()  # never unlinked: waiters and newcomers share one inode


def test_reacquire_after_release(tmp_path: Path) -> None:
    for _ in range(3):
        with account_lock(tmp_path, "home", wait=False):
            pass


def test_other_process_is_refused_then_admitted(tmp_path: Path) -> None:
    child = start_holder(tmp_path, "home")
    try:
        assert wait_for_line(child) == "locked"
        with pytest.raises(AccountBusy) as info, account_lock(tmp_path, "home", wait=False):
            pass
        assert info.value.temporary is True
        assert info.value.holder == child.pid
        assert "home" in str(info.value)
        # A different account is independent.
        with account_lock(tmp_path, "work", wait=False):
            pass
    finally:
        assert release(child) == 0
    with account_lock(tmp_path, "home", wait=False):
        pass


def test_bounded_wait_times_out(tmp_path: Path) -> None:
    child = start_holder(tmp_path, "home")
    try:
        assert wait_for_line(child) == "locked"
        start = time.monotonic()
        with pytest.raises(AccountBusy), account_lock(tmp_path, "home", wait=0.3):
            pass
        elapsed = time.monotonic() - start
        assert 0.3 <= elapsed < 2.0
    finally:
        release(child)


def test_waiting_process_gets_the_lock_when_released(tmp_path: Path) -> None:
    with account_lock(tmp_path, "home", wait=False):
        waiter = start_child(WAITER, str(tmp_path), "home")
        assert wait_for_line(waiter) == "refused"  # it is up, and now polls for the lock
        assert waiter.poll() is None
    try:
        assert wait_for_line(waiter) == "locked"
    finally:
        assert release(waiter) == 0


def test_child_refused_while_we_hold(tmp_path: Path) -> None:
    with account_lock(tmp_path, "home", wait=False):
        child = start_holder(tmp_path, "home", wait="false")
        assert wait_for_line(child) == f"busy {os.getpid()}"
        assert child.wait(timeout=20) == 3


def test_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    child = start_holder(tmp_path, "home")
    assert wait_for_line(child) == "locked"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=20)
    with account_lock(tmp_path, "home", wait=1.0):
        pass


def test_threads_exclude_each_other(tmp_path: Path) -> None:
    held = threading.Event()
    leave = threading.Event()

    def holder() -> None:
        with account_lock(tmp_path, "home", wait=False):
            held.set()
            leave.wait(20)

    th = threading.Thread(target=holder)
    th.start()
    try:
        assert held.wait(10)
        # Same process, separate open(): flock still excludes.
        with pytest.raises(AccountBusy), account_lock(tmp_path, "home", wait=False):
            pass
        with pytest.raises(AccountBusy), account_lock(tmp_path, "home", wait=0.2):
            pass
    finally:
        leave.set()
        th.join(10)
    with account_lock(tmp_path, "home", wait=False):
        pass


def blocked_flock_waiters(lock: Path) -> int:
    """How many flock(2) requests the kernel holds blocked on *lock* (from /proc/locks)."""
    inode = f":{lock.stat().st_ino} "
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(" -> FLOCK " in line and inode in line for line in lines)


def test_wait_true_blocks_until_release(tmp_path: Path) -> None:
    order: list[str] = []
    held = threading.Event()

    def holder() -> None:
        with account_lock(tmp_path, "home", wait=False):
            held.set()
            # Release only once the main thread sleeps in flock(LOCK_EX).
            wait_until(
                lambda: blocked_flock_waiters(tmp_path / "locks" / "home.lock"),
                what="the main thread to block on the lock",
            )
            order.append("released")

    th = threading.Thread(target=holder)
    th.start()
    assert held.wait(10)
    with account_lock(tmp_path, "home", wait=True):
        order.append("acquired")
    th.join(10)
    assert order == ["released", "acquired"]


def test_many_threads_one_at_a_time(tmp_path: Path) -> None:
    inside = 0
    most = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, most
        for _ in range(5):
            with account_lock(tmp_path, "home", wait=True):
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.002)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert most == 1


def test_lock_is_not_inherited_by_children(tmp_path: Path) -> None:
    with account_lock(tmp_path, "home", wait=False):
        sleeper = subprocess.Popen(["sleep", "30"], close_fds=False)
    try:
        # The child still runs; had it inherited the descriptor, the lock
        # would still be held.
        with account_lock(tmp_path, "home", wait=False):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".hidden", "x\n", "a" * 200])
def test_unsafe_account_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError), account_lock(tmp_path, name, wait=False):
        pass
    assert not (tmp_path / "locks").exists()


def test_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me")
    (tmp_path / "locks").mkdir(mode=0o700)
    (tmp_path / "locks" / "home.lock").symlink_to(target)
    with pytest.raises(PopsyncError, match="lock file"), account_lock(tmp_path, "home", wait=False):
        pass
    assert target.read_text() == "keep me"


def test_symlinked_lock_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "locks").symlink_to(elsewhere)
    with (
        pytest.raises(PopsyncError, match="lock file"),
        account_lock(tmp_path / "state", "home", wait=False),
    ):
        pass
    assert list(elsewhere.iterdir()) == []
