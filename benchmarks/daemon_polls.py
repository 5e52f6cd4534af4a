"""What a daemon poll that finds nothing new costs: CPU per poll and recorded poll time.

    python benchmarks/daemon_polls.py                          # 100 accounts x 100 known
    python benchmarks/daemon_polls.py --accounts 1 --messages 50000 --interval 2
    python benchmarks/daemon_polls.py --paired ../other-checkout --rounds 5   # this tree vs another

The project's POP3 test server (``popsync.testing.server``, in this process)
serves one maildrop per account, each holding ``--messages`` messages that
the ledger already knows (adopted as delivered before the daemon starts, as
``popsync import`` would).  ``popsync run`` (a SQLite ledger, the tree's own
code through ``PYTHONPATH``) then polls every account every ``--interval``
seconds.  After each account's first poll (which reads its rows, and in a
tree with the known-rows cache keeps them), the benchmark reads the daemon's
CPU time (utime + stime from ``/proc/PID/stat``: the daemon only, not the
server) and waits for ``--polls`` more polls per account.  Figures:

* ``cpu_ms_per_poll``: the daemon's CPU over the window / polls finished in
  it (idle wake-ups between polls included);
* ``poll_ms``: the median of the durations the daemon recorded itself in the
  ``polls`` table (``finished_at - started_at``) over the window, and p90.

With ``--paired OTHER_TREE`` each round runs this tree and the other one,
alternating which goes first, and the report gives each figure's ratio
(this / other): median, min and max over the rounds.  A busy machine makes
absolute figures noisy; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TICKS = os.sysconf("SC_CLK_TCK")

#: Adopts the uids as delivered through the tree's own Ledger (argv: url, account, uid file).
PREFILL = """
import sys, time
from popsync.ledger import Ledger
url, path = sys.argv[1], sys.argv[2]
with Ledger.open(url) as led:
    for line in open(path):
        account, *uids = line.split()
        led.adopt(account, [u.encode() for u in uids], target="maildir", receipt="bench",
                  now=time.time())
"""


POPSYNC_RUN = (sys.executable, "-m", "popsync")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def message(user: str, n: int) -> bytes:
    return f"Subject: {user} #{n}\r\nMessage-ID: <{user}.{n}@bench>\r\n\r\nbody {n}\r\n".encode()


def write_config(path: Path, users: list[str], port: int, url: str, interval: float) -> None:
    import yaml

    accounts = [
        {
            "name": user,
            "host": "127.0.0.1",
            "port": port,
            "tls": "none",
            "allow_plaintext": True,
            "username": user,
            "password": "pass",
            "interval": interval,
            "maildir": str(path.parent / "Maildir" / user),
        }
        for user in users
    ]
    path.write_text(yaml.safe_dump({"ledger": url, "accounts": accounts}, sort_keys=False))
    path.chmod(0o600)


def finished_polls(db: Path) -> list[tuple[float, float]]:
    """(started_at, finished_at) of every finished poll, read without popsync's code."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(
            "SELECT started_at, finished_at FROM polls WHERE finished_at IS NOT NULL "
            "AND result = 'ok'"
        ).fetchall()
    except sqlite3.OperationalError:
        return []  # not created yet
    finally:
        con.close()


def wait_for_polls(db: Path, n: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(finished_polls(db)) < n:
        if proc.poll() is not None:
            raise SystemExit(f"popsync run exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {n} polls")
        time.sleep(0.05)


def one_run(tree: Path, args: argparse.Namespace, boxes: dict[str, object], port: int) -> dict:
    users = sorted(boxes)
    with tempfile.TemporaryDirectory(prefix="popsync-daemon-polls-") as tmp:
        scratch = Path(tmp)
        db = scratch / "state" / "ledger.db"
        url = f"sqlite:///{db}"
        config = scratch / "config.yaml"
        (scratch / "Maildir").mkdir()
        write_config(config, users, port, url, args.interval)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        uid_file = scratch / "uids"
        with uid_file.open("w") as out:
            for user in users:
                uids = boxes[user].uids()  # type: ignore[attr-defined]
                out.write(user + " " + " ".join(u.decode() for u in uids) + "\n")
        subprocess.run(
            [sys.executable, "-c", PREFILL, url, str(uid_file)], env=env, cwd=tree, check=True
        )
        log = (scratch / "run.log").open("wb")
        proc = subprocess.Popen(
            [*POPSYNC_RUN, "-c", str(config), "run", "--max-concurrent", str(args.max_concurrent)],
            env=env,
            cwd=tree,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            # The first poll of every account reads (and keeps) its rows.
            wait_for_polls(db, len(users), proc, args.timeout)
            start_polls = len(finished_polls(db))
            cpu0, t0 = cpu_seconds(proc.pid), time.time()
            want = start_polls + args.polls * len(users)
            wait_for_polls(db, want, proc, args.timeout)
            cpu1 = cpu_seconds(proc.pid)
            polls = [p for p in finished_polls(db) if p[0] >= t0]
        except BaseException:
            print((scratch / "run.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        done = len(finished_polls(db)) - start_polls
        durations = sorted((f - s) * 1000 for s, f in polls)
        return {
            "tree": str(tree),
            "polls": done,
            "cpu_ms_per_poll": round((cpu1 - cpu0) * 1000 / max(1, done), 2),
            "poll_ms": round(statistics.median(durations), 2) if durations else None,
            "poll_ms_p90": round(durations[int(0.9 * (len(durations) - 1))], 2)
            if durations
            else None,
        }


def ratios(mine: list[dict], other: list[dict], key: str) -> dict[str, float]:
    values = [a[key] / b[key] for a, b in zip(mine, other, strict=True) if a[key] and b[key]]
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--messages", type=int, default=100, help="known messages per account")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    parser.add_argument("--polls", type=int, default=5, help="measured polls per account")
    parser.add_argument("--max-concurrent", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--paired", type=Path, metavar="OTHER_TREE", help="compare with a tree")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds")
    args = parser.parse_args()

    from popsync.testing.mailstore import MailStore
    from popsync.testing.server import POP3TestServer

    users = [f"a{i:04d}" for i in range(args.accounts)]
    boxes = {u: MailStore([message(u, n) for n in range(args.messages)]) for u in users}
    report: dict[str, object] = {
        "accounts": args.accounts,
        "messages": args.messages,
        "interval": args.interval,
        "polls_per_account": args.polls,
    }
    with POP3TestServer(mailboxes=boxes, idle_timeout=60) as srv:
        if args.paired is None:
            report["run"] = one_run(ROOT, args, boxes, srv.port)  # type: ignore[arg-type]
        else:
            mine: list[dict] = []
            other: list[dict] = []
            for i in range(args.rounds):
                order = [(ROOT, mine), (args.paired, other)]
                for tree, out in order if i % 2 == 0 else order[::-1]:
                    out.append(one_run(tree, args, boxes, srv.port))  # type: ignore[arg-type]
                    print(json.dumps(out[-1]), file=sys.stderr, flush=True)
            report["this"] = mine
            report["other"] = other
            report["ratio_this_over_other"] = {
                key: ratios(mine, other, key) for key in ("cpu_ms_per_poll", "poll_ms")
            }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
