"""Many accounts, several workers, one PostgreSQL ledger: does sharing by leases scale?

    python benchmarks/scale.py                      # 2,000 accounts, 4 workers, 3 min, then idle
    python benchmarks/scale.py --duration 60 --accounts 500 --idle-accounts 2000   # quicker

Phase 1 (shared): a private PostgreSQL (``tests/servers/postgres.py``), the
project's POP3 test server serving one maildrop per account (it records every
login that overlaps another session of the same maildrop), and ``--workers``
``popsync run`` processes sharing the accounts of one config with
``interval`` and ``lease``. New mail arrives in every maildrop during the
run, and popsync deletes what it stored. Two thirds into the run the
benchmark SIGKILLs a worker that is polling, and measures how long its
accounts wait for another worker. At the end the survivors are stopped with
SIGTERM and everything is checked: every account polled about once per
interval (the gaps between its polls), no overlapping session, every
message stored exactly once and none left on the server.

Phase 2 (idle): one worker with ``--idle-accounts`` accounts, none of them
due (their rows are set an hour ahead), for ``--idle-seconds``: its RSS and
CPU while there is nothing to do.

Figures: polls per second per worker, CPU seconds per poll, RSS per worker
(from ``/proc``: Linux only), and the ledger round trips per poll, counted in
each worker by SQLAlchemy events (statements, BEGIN/COMMIT/ROLLBACK, new
connections) -- the worker runs through this file with ``--worker``, which
installs the counters and writes them out at exit.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TICKS = os.sysconf("SC_CLK_TCK")


# -- inside a worker -----------------------------------------------------------------


def worker_main(out: Path, argv: list[str]) -> int:
    """Run ``popsync ARGV`` counting every ledger round trip; write the counts to *out*."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def count(kind: str) -> None:
        with lock:
            counts[kind] += 1

    event.listen(Engine, "before_cursor_execute", lambda *a: count("statements"))
    for name in ("begin", "commit", "rollback"):  # each one a round trip of its own
        event.listen(Engine, name, lambda *a, _n=name: count(_n))
    event.listen(Engine, "engine_connect", lambda *a: count("checkouts"))

    from sqlalchemy.pool import Pool

    import popsync.daemon

    event.listen(Pool, "connect", lambda *a: count("connections"))
    event.listen(Pool, "reset", lambda *a: count("resets"))  # a ROLLBACK on check-in
    real = popsync.daemon.run_account

    def counted(*args: object, **kwargs: object) -> object:
        count("polls")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    popsync.daemon.run_account = counted  # type: ignore[assignment]

    def dump() -> None:
        with lock:
            out.write_text(json.dumps(dict(counts)))

    atexit.register(dump)
    from popsync.cli import main

    return main(argv)


# -- measuring processes ----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def message(user: str, n: int) -> bytes:
    return f"Subject: {user} #{n}\r\nMessage-ID: <{user}.{n}@bench>\r\n\r\nbody {n}\r\n".encode()


def write_config(
    path: Path,
    users: list[str],
    *,
    port: int,
    url: str,
    args: argparse.Namespace,
    maildirs: Path | None,
) -> None:
    import yaml

    accounts = []
    for user in users:
        acc: dict[str, object] = {
            "name": user,
            "host": "127.0.0.1",
            "port": port,
            "tls": "none",
            "allow_plaintext": True,
            "username": user,
            "password": "pass",
            "interval": args.interval,
            "delete_after_days": 0,
        }
        if maildirs is not None:
            acc["maildir"] = str(maildirs / user)
        else:  # never polled (idle phase); an lmtp target keeps check quiet
            acc["lmtp"] = "127.0.0.1:24"
            acc["lmtp_recipient"] = f"{user}@example.org"
        accounts.append(acc)
    doc = {"ledger": url, "lease": args.lease, "accounts": accounts}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)


def start_worker(
    config: Path, counts: Path, log: Path, max_concurrent: int
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                str(counts),
                "--",
                "-c",
                str(config),
                "run",
                "--max-concurrent",
                str(max_concurrent),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    CHILDREN.append(proc)
    return proc


def wait_for(condition: object, timeout: float, what: str) -> bool:
    """Poll *condition* for up to *timeout* seconds; False (and a line) if it never held."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            print(f"timed out after {timeout:.0f} s waiting for {what}", file=sys.stderr)
            return False
        time.sleep(0.5)
    return True


#: Every worker started, so that none outlives the benchmark.
CHILDREN: list[subprocess.Popen[bytes]] = []


def kill_children() -> None:
    for proc in CHILDREN:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- phase 1 --------------------------------------------------------------------------


def shared_phase(args: argparse.Namespace, cluster: object, scratch: Path) -> dict[str, object]:
    from popsync.ledger import Ledger
    from popsync.testing.mailstore import MailStore
    from popsync.testing.server import POP3TestServer

    users = [f"a{i:05d}" for i in range(args.accounts)]
    sent = {u: [message(u, 0)] for u in users}
    boxes = {u: MailStore(sent[u]) for u in users}
    db = cluster.new_database("scale")  # type: ignore[attr-defined]
    url = cluster.url(db)  # type: ignore[attr-defined]
    maildirs = scratch / "Maildir"
    maildirs.mkdir()
    config = scratch / "shared.yaml"
    result: dict[str, object] = {}
    with POP3TestServer(mailboxes=boxes, idle_timeout=60) as srv:
        write_config(config, users, port=srv.port, url=url, args=args, maildirs=maildirs)
        Ledger.open(url).close()
        procs = []
        for i in range(args.workers):
            counts, log = scratch / f"w{i}.json", scratch / f"w{i}.log"
            procs.append((start_worker(config, counts, log, args.max_concurrent), counts, log))
        started = time.monotonic()
        stop_mail = threading.Event()

        def mail_arrives() -> None:  # about one new message per account per 3 intervals
            n = 1
            rate = args.accounts / (3 * args.interval)
            while not stop_mail.wait(1.0):
                for u in random.sample(users, min(len(users), max(1, int(rate)))):
                    data = message(u, n)
                    n += 1
                    boxes[u].add(data)
                    sent[u].append(data)

        mailer = threading.Thread(target=mail_arrives, daemon=True)
        mailer.start()
        with Ledger.open(url) as ledger:
            time.sleep(args.duration * 2 / 3)  # the run itself: nothing to wait for but time
            rows = ledger.lease_rows()
            pids = {str(p.pid): p for p, _, _ in procs}
            holders = Counter(
                r.owner.split(":")[1]
                for r in rows.values()
                if r.owner and r.owner.split(":")[1] in pids
            )
            victim_pid = holders.most_common(1)[0][0] if holders else str(procs[0][0].pid)
            victim = pids[victim_pid]
            cpu_before_kill = cpu_seconds(victim.pid)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed_at = ledger.database_time()
            # The accounts it really held when it died: read after the kill (a
            # poll that finished between a snapshot and the kill released its
            # account, which is then simply due an interval later).
            held = [
                n
                for n, r in ledger.lease_rows().items()
                if r.owner and r.owner.split(":")[1] == victim_pid
            ]
            takeover: dict[str, float] = {}

            def all_taken() -> bool:
                rows = ledger.lease_rows()
                for name in held:
                    r = rows[name]
                    if name not in takeover and r.last_poll_at and r.last_poll_at > killed_at:
                        takeover[name] = r.last_poll_at - killed_at
                return len(takeover) == len(held)

            # Under a backlog (workers slower than the accounts' rate) the
            # killed worker's accounts queue behind older overdue ones.
            wait_for(all_taken, args.interval + 3 * args.lease, "the killed worker's accounts")
            left = args.duration - (time.monotonic() - started)
            if left > 0:
                time.sleep(left)
            stop_mail.set()
            mailer.join()
            survivors = [(p, c, log) for p, c, log in procs if p is not victim]
            usage = {p.pid: (cpu_seconds(p.pid), rss_mb(p.pid)) for p, _, _ in survivors}
            elapsed = time.monotonic() - started

            def drained() -> bool:
                return all(not len(boxes[u]) for u in users)

            drain_started = time.monotonic()
            drained_ok = wait_for(drained, 3 * args.interval + 60, "the last mail to be fetched")
            drain_s = time.monotonic() - drain_started
            for p, _, _ in survivors:
                p.send_signal(signal.SIGTERM)
            codes = [p.wait(120) for p, _, _ in survivors]
            gaps = poll_gaps(ledger, users)
        overlaps = len(srv.overlaps())
    duplicates, lost = check_mail(users, sent, maildirs)
    per_worker = worker_figures(procs, victim, usage, cpu_before_kill, elapsed)
    result.update(
        accounts=args.accounts,
        workers=args.workers,
        interval=args.interval,
        lease=args.lease,
        duration_s=round(elapsed, 1),
        exit_codes=codes,
        overlapping_sessions=overlaps,
        messages_sent=sum(len(v) for v in sent.values()),
        duplicates=duplicates,
        lost=lost,
        poll_gaps_s=gaps,
        killed_worker_accounts=len(held),
        taken_over=len(takeover),
        drained=drained_ok,
        drain_s=round(drain_s, 1),
        takeover_s={
            "max": round(max(takeover.values(), default=0.0), 2),
            "median": round(statistics.median(takeover.values()), 2) if takeover else None,
        },
        per_worker=per_worker,
    )
    cluster.drop_database(db)  # type: ignore[attr-defined]
    return result


def check_mail(users: list[str], sent: dict[str, list[bytes]], maildirs: Path) -> tuple[int, int]:
    """(duplicates, losses): each account's Maildir against the mail it was sent."""
    stored = {u: maildir_counter(maildirs / u) for u in users}
    duplicates = sum(sum(c - 1 for c in s.values() if c > 1) for s in stored.values())
    expected = {u: Counter(m.replace(b"\r\n", b"\n") for m in sent[u]) for u in users}
    lost = sum(sum((expected[u] - stored[u]).values()) for u in users)
    return duplicates, lost


def worker_figures(
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]],
    victim: subprocess.Popen[bytes],
    usage: dict[int, tuple[float, float]],
    cpu_before_kill: float,
    elapsed: float,
) -> list[dict[str, object]]:
    """Polls, CPU, RSS and ledger round trips of each worker of phase 1."""
    per_worker = []
    for p, counts, log in procs:
        polls_logged = sum(
            1
            for line in log.read_text(errors="replace").splitlines()
            if ": ok: " in line or ": poll failed" in line or ": skipped: " in line
        )
        entry: dict[str, object] = {"pid": p.pid, "polls": polls_logged}
        if p is victim:
            entry.update(killed=True, cpu_s=cpu_before_kill)
        else:
            cpu, rss = usage[p.pid]
            sql = json.loads(counts.read_text()) if counts.exists() else {}
            # psycopg sends BEGIN as a query of its own before a transaction's
            # first statement, and COMMIT and ROLLBACK too. A pool reset after
            # a COMMIT sends nothing (the connection is idle): not counted.
            trips = sum(sql.get(k, 0) for k in ("statements", "begin", "commit", "rollback"))
            polls = max(sql.get("polls", 0), 1)
            entry.update(
                cpu_s=round(cpu, 1),
                rss_mb=round(rss, 1),
                polls_per_s=round(polls_logged / elapsed, 2),
                cpu_ms_per_poll=round(1000 * cpu / max(polls_logged, 1), 1),
                round_trips_per_poll=round(trips / polls, 1),
                connections_per_poll=round(sql.get("connections", 0) / polls, 2),
                sql=sql,
            )
        per_worker.append(entry)
    return per_worker


def maildir_counter(path: Path) -> Counter[bytes]:
    return Counter(
        p.read_bytes()
        for sub in ("new", "cur")
        if (path / sub).is_dir()
        for p in (path / sub).iterdir()
    )


def poll_gaps(ledger: object, users: list[str]) -> dict[str, object]:
    """Seconds between successive poll starts of each account, over all accounts."""
    from sqlalchemy import select

    from popsync.ledger.models import polls

    starts: dict[str, list[float]] = defaultdict(list)
    with ledger.engine.connect() as conn:  # type: ignore[attr-defined]
        for account, at in conn.execute(select(polls.c.account, polls.c.started_at)):
            starts[account].append(at)
    gaps = sorted(
        b - a for s in starts.values() for a, b in zip(sorted(s), sorted(s)[1:], strict=False)
    )
    never = [u for u in users if u not in starts]
    if not gaps:
        return {"never_polled": len(never)}
    q = statistics.quantiles(gaps, n=100)
    return {
        "never_polled": len(never),
        "polls": sum(len(s) for s in starts.values()),
        "min": round(gaps[0], 2),
        "median": round(statistics.median(gaps), 2),
        "p99": round(q[98], 2),
        "max": round(gaps[-1], 2),
    }


# -- phase 2 --------------------------------------------------------------------------


def idle_phase(args: argparse.Namespace, cluster: object, scratch: Path) -> dict[str, object]:
    from sqlalchemy import update

    from popsync.ledger import Ledger
    from popsync.ledger.models import accounts

    users = [f"i{i:05d}" for i in range(args.idle_accounts)]
    db = cluster.new_database("idle")  # type: ignore[attr-defined]
    url = cluster.url(db)  # type: ignore[attr-defined]
    config = scratch / "idle.yaml"
    write_config(config, users, port=9, url=url, args=args, maildirs=None)
    with Ledger.open(url) as ledger:
        ledger.ensure_accounts(users)
        with ledger.engine.begin() as conn:  # nothing due for an hour
            conn.execute(update(accounts).values(next_poll_at=time.time() + 3600))
    counts, log = scratch / "idle.json", scratch / "idle.log"
    t0 = time.monotonic()
    proc = start_worker(config, counts, log, args.max_concurrent)
    wait_for(lambda: "daemon started" in log.read_text(errors="replace"), 300, "the idle worker")
    start_s = time.monotonic() - t0
    cpu0 = cpu_seconds(proc.pid)
    time.sleep(args.idle_seconds)  # measuring idleness: nothing to wait for but time
    cpu1, rss = cpu_seconds(proc.pid), rss_mb(proc.pid)
    threads = len(os.listdir(f"/proc/{proc.pid}/task"))
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    sql = json.loads(counts.read_text()) if counts.exists() else {}
    cluster.drop_database(db)  # type: ignore[attr-defined]
    return {
        "accounts": args.idle_accounts,
        "start_s": round(start_s, 1),
        "seconds": args.idle_seconds,
        "cpu_s": round(cpu1 - cpu0, 2),
        "cpu_percent": round(100 * (cpu1 - cpu0) / args.idle_seconds, 2),
        "rss_mb": round(rss, 1),
        "threads": threads,
        "exit_code": code,
        "statements_total": sql.get("statements"),
        "polls": sql.get("polls", 0),
    }


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker_main(Path(sys.argv[2]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--interval", type=int, default=30)
    parser.add_argument("--lease", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of phase 1")
    parser.add_argument("--max-concurrent", type=int, default=8)
    parser.add_argument("--idle-accounts", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--skip-shared", action="store_true")
    parser.add_argument("--skip-idle", action="store_true")
    args = parser.parse_args()
    from tests.servers.postgres import PostgresCluster

    report: dict[str, object] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "load_average_at_start": os.getloadavg(),
        "args": vars(args),
    }
    atexit.register(kill_children)
    with PostgresCluster() as cluster, tempfile.TemporaryDirectory(prefix="popsync-scale-") as tmp:
        if not args.skip_shared:
            report["shared"] = shared_phase(args, cluster, Path(tmp))
            print(json.dumps(report["shared"], indent=1), flush=True)
        if not args.skip_idle:
            report["idle"] = idle_phase(args, cluster, Path(tmp))
            print(json.dumps(report["idle"], indent=1), flush=True)
    print(json.dumps(report))
    shared = report.get("shared", {})
    ok = not shared or (
        shared["overlapping_sessions"] == 0 and shared["duplicates"] == 0 and shared["lost"] == 0  # type: ignore[index]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
