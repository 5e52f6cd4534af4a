"""A hostile server's listings cannot exhaust popsync's memory or crash a poll.

Each test runs a real ``popsync sync`` in its own process against the test
server, whose ``huge_listing`` fault makes a listing of any size as it sends
it.  A small wrapper process runs the poll and reports the poll's peak RSS
(``ru_maxrss`` of its only child), so nothing else the test run started
counts.  Each poll must stay under :data:`PEAK_LIMIT_MIB` and fail with one
clear line naming the account and the command -- never a traceback.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from popsync.testing.faults import Faults, HugeListing
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import write_config

pytestmark = pytest.mark.timeout(120)

#: No hostile listing may take a poll's peak RSS past this.
PEAK_LIMIT_MIB = 100

# Runs argv, then reports its exit status, output and peak RSS as JSON.
_MEASURE = """
import json, resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=90)
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"returncode": proc.returncode, "stdout": proc.stdout,
                  "stderr": proc.stderr, "peak_kib": peak_kib}))
"""


@dataclass(frozen=True)
class Poll:
    returncode: int
    stdout: str
    stderr: str
    peak_kib: int

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024


def poll(config: Path) -> Poll:
    """One ``popsync sync`` in a process of its own, measured."""
    argv = [sys.executable, "-m", "popsync", "-c", str(config), "sync", "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *argv],
        capture_output=True,
        text=True,
        timeout=110,
        check=True,
    )
    return Poll(**json.loads(done.stdout))


def poll_against(tmp_path: Path, store: MailStore, faults: Faults) -> Poll:
    with POP3TestServer(store, faults=faults) as server:
        config = write_config(tmp_path, [{"name": "hostile", "port": server.port}])
        return poll(config)


def assert_one_clear_line(result: Poll, *needles: str) -> None:
    """The poll failed, and said why on one line naming the account."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "hostile" in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def some_messages(n: int) -> MailStore:
    """*n* small new messages: above 64 the poll asks for every size with one LIST."""
    return MailStore(list(generate_messages(n, 300, seed=7)))


# 20,000 lines of 60 KB: 1.2 GB if the client held it (it used to reach GBs).
HOSTILE: list[tuple[HugeListing, str]] = [
    ("UIDL", "UIDL: server sent a listing line longer than 522 octets"),
    ("LIST", "LIST: server sent a listing line longer than 128 octets"),
    # Before login and before STLS: a man in the middle can write this one.
    ("CAPA", "CAPA: server sent a listing line longer than 1024 octets"),
]


@pytest.mark.parametrize(("command", "message"), HOSTILE)
def test_huge_listing_lines_fail_the_poll_in_little_memory(
    tmp_path: Path, command: HugeListing, message: str
) -> None:
    faults = Faults(huge_listing=(command, 20_000, 60_000))
    result = poll_against(tmp_path, some_messages(70), faults)
    assert_one_clear_line(result, message)
    assert result.peak_mib < PEAK_LIMIT_MIB, result


def test_long_capa_of_short_lines_fails_the_poll(tmp_path: Path) -> None:
    # Every line within RFC 2449's 512 octets, but no real CAPA is 10 MB.
    faults = Faults(huge_listing=("CAPA", 20_000, 500))
    result = poll_against(tmp_path, some_messages(1), faults)
    assert_one_clear_line(result, "CAPA: listing ")  # whichever bound a receive hits first
    assert re.search(r"has more than 200 lines$|is longer than 65536 octets$", result.stderr)
    assert result.peak_mib < PEAK_LIMIT_MIB, result


@pytest.mark.parametrize("count", [1, 70])  # LIST n, and one LIST for many
def test_list_size_beyond_any_message_fails_the_poll_cleanly(tmp_path: Path, count: int) -> None:
    # 2**63 once crashed the run with an OverflowError from SQLite's INTEGER.
    faults = Faults(wrong_list_size={1: 2**63})
    result = poll_against(tmp_path, some_messages(count), faults)
    assert_one_clear_line(result, "LIST size: 9223372036854775808 octets cannot be a message")


# Runs one UIDL through a real session; prints the entries' count and peak RSS.
_BIG_UIDL = """
import resource, sys
from popsync.session import Session, SessionOptions
options = SessionOptions(host="127.0.0.1", port=int(sys.argv[1]), username="user",
                         tls="none", allow_plaintext=True, timeout=60)
with Session.open(options) as session:
    session.login("pass")
    entries = session.uidl()
    print(len(entries), len(set(uid for _, uid in entries)),
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    session.quit()
"""


@pytest.mark.slow
def test_largest_valid_uidl_is_stored_compactly() -> None:
    # 999,999 lines of 509 octets (uids of ~500): 485 MiB on the wire.  Not
    # hostile, so it must pass -- in little more than its own size (1.5 GB
    # before the listing was parsed as it streamed).
    lines, length = 999_999, 509
    faults = Faults(huge_listing=("UIDL", lines, length))
    with POP3TestServer(MailStore(), faults=faults) as server:
        done = subprocess.run(
            [sys.executable, "-c", _BIG_UIDL, str(server.port)],
            capture_output=True,
            text=True,
            timeout=110,
            check=True,
        )
    count, distinct, peak_kib = map(int, done.stdout.split())
    assert count == distinct == lines
    raw_mib = lines * length / 2**20
    assert peak_kib / 1024 < 1.5 * raw_mib, (peak_kib / 1024, raw_mib)
