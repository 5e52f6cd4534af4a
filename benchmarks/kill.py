"""SIGKILL each POP3 client mid-session, run it again, count what arrived twice.

    python benchmarks/kill.py                         # 4 clients, keep + delete, 5 kills each
    python benchmarks/kill.py --count 100 --repeat 3 --clients popsync,mpop --modes keep

The evidence for "popsync never delivers a message twice after SIGKILL":
for each client (popsync, mpop, fetchmail, getmail6 -- configured exactly as
in ``run.py``, see ``clients.py``) and each mode (``keep``: mail stays on the
server; ``delete``: the client deletes what it fetched), ``--repeat`` times:

1. a private Dovecot (``tests/servers/dovecot.py``) on loopback holds
   ``--count`` deterministic messages (``popsync.testing.samples``), each
   with its own Message-ID; the client gets a fresh Maildir and fresh state;
2. the client starts, and once its Maildir (``new/`` + ``cur/``) holds K
   messages (and a random 0 to ``--jitter`` seconds more) the benchmark
   SIGKILLs its whole process group -- K moves evenly from 1/(R+1) to
   R/(R+1) of ``--count`` over the R repeats;
3. the client runs again, to completion (a re-run that fails -- getmail's
   "waiting child timed out" on a loaded machine -- is tried again, up to
   ``--reruns`` times, and counted);
4. the Maildir is compared with what the server held, by SHA-256 of the
   stored form (after removing what a client always adds, getmail's
   Return-Path): a message present more than once is a **duplicate**; a
   message neither in the Maildir nor still on the server is **lost**.

Printed per client and mode: runs, kills that landed mid-session, the
duplicates over all runs and the most in one run, the messages lost, and the
re-run tries that failed.  A client that had exited, or had delivered every
message, when the kill came is not counted as killed mid-session.  Exit status 0 when the
benchmark ran (whatever the figures), 2 when Dovecot is missing.

Not part of the test suite: it takes a few minutes.  Loopback only; every
child process has a timeout and its own process group.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))

from clients import Client, all_clients  # noqa: E402
from harness import (  # noqa: E402
    Job,
    Target,
    maildir_files,
    make_maildir,
    run_measured,
    stored_form,
    warm_server,
)

from popsync.testing.samples import generate_messages  # noqa: E402
from tests.servers.dovecot import Dovecot  # noqa: E402

USER = "killbench"
PASSWORD = "kill-bench-password-1"
CLIENTS = ("popsync", "mpop", "fetchmail", "getmail")


@dataclass
class Tally:
    """One client in one mode, over all its runs."""

    runs: int = 0
    kills: int = 0
    duplicates: list[int] = field(default_factory=list)
    lost: int = 0
    failed_reruns: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    killed: bool
    delivered_at_kill: int
    duplicates: int
    lost: int
    failed_reruns: int
    note: str = ""

    def describe(self, aimed_at: int) -> str:
        kill = f"killed at {self.delivered_at_kill}" if self.killed else "not killed"
        text = f"{kill} (aimed at {aimed_at}); duplicates {self.duplicates}, lost {self.lost}"
        return f"{text}; {self.note}" if self.note else text


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def count_delivered(maildir: Path) -> int:
    total = 0
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError), os.scandir(maildir / sub) as entries:
            total += sum(1 for _ in entries)
    return total


def start_and_kill(
    argv: list[str], env: dict[str, str], job: Job, after: int, jitter: float
) -> tuple[bool, int]:
    """Start the client; SIGKILL its process group *jitter* seconds after
    *job*'s Maildir holds *after* messages (so the kill lands in different
    phases: writing, syncing, recording).  (killed?, messages seen at the kill)."""
    log = (job.state_dir / "killed-run.log").open("wb")
    with log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=job.state_dir,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + job.timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                seen = count_delivered(job.maildir)
                if seen >= after:
                    time.sleep(jitter)
                    seen = count_delivered(job.maildir)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return proc.returncode == -signal.SIGKILL, seen
                time.sleep(0.002)  # a benchmark watching a directory, not a test
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return False, count_delivered(job.maildir)


class KillBench:
    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.server = Dovecot(scratch / "dovecot", users={USER: PASSWORD})
        self.messages = list(generate_messages(args.count, args.size, seed=7))

    def fill(self) -> Counter[str]:
        """A full mailbox again; the digests of its stored form."""
        self.server.clear(USER)
        self.server.add_messages(USER, self.messages)
        stored = self.server.stored_messages(USER)
        warm_server(self.server.pop3_port, USER, PASSWORD, len(stored))
        return Counter(digest(stored_form(m)) for m in stored)

    def job(self, client: Client, mode: str, run: int) -> Job:
        base = self.scratch / "runs" / client.name / mode / str(run)
        state = base / "state"
        state.mkdir(parents=True)
        maildir = base / "Maildir"
        make_maildir(maildir, client.maildir_owner())
        target = Target(
            "127.0.0.1", self.server.pop3_port, "plain", USER, PASSWORD, self.scratch / "no-ca"
        )
        return Job(target, maildir, state, mode == "delete", self.args.timeout)

    def one_run(self, client: Client, mode: str, run: int, after: int) -> Outcome:
        expected = self.fill()
        job = self.job(client, mode, run)
        inv = client.prepare(job)
        jitter = random.Random(run).uniform(0, self.args.jitter)
        killed, seen = start_and_kill(list(inv.argv), dict(inv.env), job, after, jitter)
        failures, note = self.rerun(client, job)
        got: Counter[str] = Counter(
            digest(client.strip_added(f.read_bytes())) for f in maildir_files(job.maildir)
        )
        left = Counter(digest(stored_form(m)) for m in self.server.stored_messages(USER))
        duplicates = sum(n - 1 for d, n in got.items() if d in expected and n > 1)
        lost = sum(1 for d in expected if d not in got and d not in left)
        strange = sum(n for d, n in got.items() if d not in expected)
        if strange:
            note = f"{strange} files not from the server; {note}".rstrip("; ")
        return Outcome(killed, seen, duplicates, lost, failures, note)

    def rerun(self, client: Client, job: Job) -> tuple[int, str]:
        """Run the client again until it succeeds (``--reruns`` tries at most):
        (failed tries, what the last failure said)."""
        failures, note = 0, ""
        for attempt in range(self.args.reruns):
            inv = client.prepare(job)  # the same config again
            done = run_measured(
                inv.argv, env=inv.env, cwd=job.state_dir, timeout=job.timeout,
                log_prefix=job.state_dir / f"rerun-{attempt}",
            )  # fmt: skip
            if done.returncode in client.ok_codes and not done.timed_out:
                break
            failures += 1
            note = f"re-run exit {done.returncode}: {done.stderr.strip()[-160:]}"
        return failures, note

    def run(self) -> dict[tuple[str, str], Tally]:
        clients = all_clients()
        tallies: dict[tuple[str, str], Tally] = {}
        for name in self.args.clients:
            client = clients[name]
            why = client.missing()
            for mode in self.args.modes:
                tally = tallies.setdefault((name, mode), Tally())
                if why:
                    tally.notes.append(f"skipped: {why}")
                    continue
                for run in range(self.args.repeat):
                    after = max(1, self.args.count * (run + 1) // (self.args.repeat + 1))
                    outcome = self.one_run(client, mode, run, after)
                    print(f"  {name:<10} {mode:<6} run {run + 1}: {outcome.describe(after)}",
                          file=sys.stderr, flush=True)  # fmt: skip
                    tally.runs += 1
                    # A kill after the last message arrived is no mid-session kill.
                    tally.kills += outcome.killed and outcome.delivered_at_kill < self.args.count
                    tally.duplicates.append(outcome.duplicates)
                    tally.lost += outcome.lost
                    tally.failed_reruns += outcome.failed_reruns
                    if outcome.note:
                        tally.notes.append(outcome.note)
        return tallies


def report(tallies: dict[tuple[str, str], Tally], args: argparse.Namespace) -> str:
    lines = [
        f"{args.count} messages of ~{args.size} bytes; SIGKILL after 1/{args.repeat + 1} to "
        f"{args.repeat}/{args.repeat + 1} of them were delivered, then a re-run to completion",
        "",
        "| client | mode | runs | kills mid-session | duplicates (total) "
        "| duplicates (most in a run) | lost | failed re-run tries |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (name, mode), t in tallies.items():
        if not t.runs:
            lines.append(f"| {name} | {mode} | {'; '.join(t.notes)} | | | | | |")
            continue
        lines.append(
            f"| {name} | {mode} | {t.runs} | {t.kills} | {sum(t.duplicates)} | "
            f"{max(t.duplicates)} | {t.lost} | {t.failed_reruns} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200, help="messages per run (default 200)")
    p.add_argument("--size", type=int, default=16384, help="bytes per message (default 16384)")
    p.add_argument("--repeat", type=int, default=5, help="kills per client and mode (default 5)")
    p.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated")
    p.add_argument("--modes", default="keep,delete", help="keep, delete or both")
    p.add_argument(
        "--jitter",
        type=float,
        default=0.02,
        help="kill up to this many seconds after the K-th message (default 0.02)",
    )
    p.add_argument(
        "--reruns", type=int, default=3, help="tries for the re-run to succeed (default 3)"
    )
    p.add_argument("--timeout", type=float, default=300, help="seconds per client run")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    args.clients = [c for c in args.clients.split(",") if c]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.clients) - set(all_clients())
    if unknown:
        p.error(f"unknown client(s): {', '.join(sorted(unknown))}")
    if set(args.modes) - {"keep", "delete"}:
        p.error("--modes takes keep and/or delete")
    if args.count < 2 or args.repeat < 1:
        p.error("--count must be at least 2 and --repeat at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ok, reason = Dovecot.available()
    if not ok:
        print(f"kill.py: {reason}", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="popsync-kill-", dir="/var/tmp"))
    scratch.chmod(0o755)  # getmail's delivery child (nobody, under root) walks in
    bench = KillBench(args, scratch)
    try:
        bench.server.start()
        tallies = bench.run()
    finally:
        bench.server.stop()
        if args.keep_scratch:
            print(f"scratch kept: {scratch}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    print(report(tallies, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
