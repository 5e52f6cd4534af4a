"""Dataset C in the daemon: a nothing-new poll of 50,000 known messages, against mpop.

    python benchmarks/daemon_c.py [--tls implicit|plain] [--polls 7] [--count 50000] [--profile F]

What the issue's "poll in the daemon" figure means, on the benchmark's own
private Dovecot (``run.py``'s setup, dataset C): popsync syncs the mailbox
once (untimed), then ``popsync run`` polls it every ``--interval`` seconds.
The figure for popsync is the duration the daemon records itself for each
poll (the ``polls`` table: ``finished_at - started_at``: lock, ledger check,
login, UIDL, plan, QUIT; no process start), the first poll left out (it
reads the rows the later ones keep).  Right after each recorded poll, while
the daemon sleeps, mpop runs once on its own synced state and its whole
process is timed, so each popsync poll has an mpop run next to it in time:
*ratio* is their quotient, median and min-max over the pairs.  The daemon's
CPU time over the timed polls is given per poll too (``/proc/PID/stat``).

Both clients' Maildirs are checked unchanged at the end (nothing new was
delivered).  Needs Dovecot and mpop, like ``run.py``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent))

import run as R  # noqa: E402
from clients import Mpop, Popsync  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def recorded(ledger: Path) -> list[float]:
    """Durations of the finished polls, oldest first."""
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT finished_at - started_at FROM polls WHERE finished_at IS NOT NULL ORDER BY id"
        ).fetchall()
    return [float(r[0]) for r in rows]


def files(maildir: Path) -> int:
    return sum(len(os.listdir(maildir / sub)) for sub in ("new", "cur"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tls", choices=("implicit", "plain"), default="implicit")
    ap.add_argument("--polls", type=int, default=7, help="timed polls (and mpop runs)")
    ap.add_argument("--count", type=int, default=50_000, help="messages in the mailbox")
    ap.add_argument("--interval", type=int, default=4, help="the daemon's poll interval, s")
    ap.add_argument("--profile", metavar="FILE", help="py-spy (raw) the daemon's timed polls")
    args = ap.parse_args()

    ds = R.DATASETS["C"]
    if args.count != ds.count:
        ds = ds.scaled(args.count)
    scratch = Path(tempfile.mkdtemp(prefix="daemon-c-", dir="/var/tmp"))
    ns = argparse.Namespace(clients=["popsync", "mpop"], tls=args.tls, timeout=None)
    bench = R.Bench(ns, scratch)
    bench.start_server()
    daemon: subprocess.Popen[bytes] | None = None
    try:
        port = bench.server_port()
        bench.fill(ds)
        pop, mpop = Popsync(), Mpop()
        pop_job = bench.job(ds, pop, port, "daemon")
        mpop_job = bench.job(ds, mpop, port, "synced")
        for client, job in ((pop, pop_job), (mpop, mpop_job)):
            m, _ = bench.execute(client, job, f"{client.name} initial sync (untimed)")
            if m.returncode != 0:
                print(m.stderr[-2000:], file=sys.stderr)
                return 1
        stored = (files(pop_job.maildir), files(mpop_job.maildir))

        inv = pop.prepare(pop_job)
        config = pop_job.state_dir / "config.yaml"
        config.write_text(config.read_text() + f"    interval: {args.interval}s\n")
        argv = [a if a != "sync" else "run" for a in inv.argv if a != "--no-progress"]
        ledger = pop_job.state_dir / "ledger.db"
        before = len(recorded(ledger))
        log = (pop_job.state_dir / "daemon.log").open("wb")
        daemon = subprocess.Popen(argv, env=inv.env, cwd=pop_job.state_dir, stdout=log, stderr=log)

        def wait_polls(n: int) -> list[float]:
            deadline = time.monotonic() + 120 + n * args.interval * 2
            while time.monotonic() < deadline:
                got = recorded(ledger)[before:]
                if len(got) >= n:
                    return got
                assert daemon is not None and daemon.poll() is None, "the daemon exited"
                time.sleep(0.05)
            raise TimeoutError(f"{n} daemon polls")

        wait_polls(1)  # the first poll reads the rows
        cpu0 = cpu_seconds(daemon.pid)
        spy = None
        if args.profile:
            spy_argv = ["py-spy", "record", "--format", "raw", "-r", "500", "-o", args.profile]
            spy = subprocess.Popen([*spy_argv, "--pid", str(daemon.pid)])
        pairs: list[tuple[float, float]] = []
        for i in range(args.polls):
            poll = wait_polls(2 + i)[-1]
            m, _ = bench.execute(mpop, mpop_job, f"mpop poll {i + 1}")
            if m.returncode != 0:
                print(m.stderr[-2000:], file=sys.stderr)
                return 1
            pairs.append((poll, m.wall))
        cpu = (cpu_seconds(daemon.pid) - cpu0) / args.polls
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        if (files(pop_job.maildir), files(mpop_job.maildir)) != stored:
            print("a nothing-new poll delivered something", file=sys.stderr)
            return 1
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        assert bench.server is not None
        bench.server.stop()

    ratios = [p / m for p, m in pairs]
    print(
        f"C in the daemon, {args.count:,} known, {args.tls} TLS, {len(pairs)} pairs "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}):"
    )
    print(f"  popsync recorded poll: median {statistics.median(p for p, _ in pairs):.3f} s")
    print(f"  mpop whole process:    median {statistics.median(m for _, m in pairs):.3f} s")
    print(
        f"  ratio: median {statistics.median(ratios):.2f}x, "
        f"min-max {min(ratios):.2f}-{max(ratios):.2f}"
    )
    print(f"  daemon CPU per poll (idle wake-ups included): {cpu * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
