"""popsync against mpop on a server without PIPELINING that writes with Nagle's algorithm on.

    python benchmarks/nagle.py                    # 2,000 x 4 KiB, 5 paired rounds
    python benchmarks/nagle.py --count 200 --runs 1

Many small POP3 servers (popa3d, Solid POP3) do not pipeline, and write a
RETR reply as two sends -- the status line, then the message -- with Nagle's
algorithm on (RFC 896).  A small message then waits in the server's kernel
until the client has ACKed the status line, and a client whose kernel delays
that ACK (Linux: up to 40 ms) pays the delay on every message.  The project's
test server imitates such a server (``pipelining=False, write_each=True``).

Each round runs popsync and mpop once each, in alternating order, after one
untimed warm-up round; every run starts from an empty Maildir and fresh state
and is verified byte for byte (SHA-256 multiset of the stored form).  The
output is a markdown table: medians of the wall times, the per-round ratio
popsync/mpop (median and min-max).  Loopback only; the server stops in
``finally``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run from a fresh clone without installing
    sys.path.insert(1, str(REPO_ROOT))

from clients import Client, Mpop, Popsync  # noqa: E402
from harness import Job, Target, digests, make_maildir, run_measured, verify_maildir  # noqa: E402

from popsync.testing.samples import generate_messages  # noqa: E402
from popsync.testing.server import MailStore, POP3TestServer  # noqa: E402

PASSWORD = "bench-password-1"


def one_run(client: Client, server: POP3TestServer, scratch: Path, tag: str) -> float:
    """Time one client fetching everything; raises RuntimeError unless it verified."""
    base = scratch / client.name / tag
    shutil.rmtree(base, ignore_errors=True)
    state = base / "state"
    state.mkdir(parents=True)
    make_maildir(base / "Maildir")
    target = Target(server.host, server.port, "plain", "user", PASSWORD, Path("/dev/null"))
    job = Job(target, base / "Maildir", state, False, 600.0)
    inv = client.prepare(job)
    m = run_measured(
        inv.argv, env=inv.env, cwd=state, timeout=job.timeout, log_prefix=state / "client"
    )
    if m.timed_out or m.returncode not in client.ok_codes:
        raise RuntimeError(f"{client.name} {tag}: exit {m.returncode}: {m.stderr[-300:]}")
    expected = digests(msg.data for msg in server.store.messages())
    verdict = verify_maildir(job.maildir, expected)
    if not verdict.ok:
        raise RuntimeError(f"{client.name} {tag}: {verdict.problem}")
    print(f"  {client.name:<8} {tag:<8} {m.wall:7.2f} s", file=sys.stderr, flush=True)
    shutil.rmtree(base, ignore_errors=True)
    return m.wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000, help="messages (default 2000)")
    p.add_argument("--size", type=int, default=4096, help="bytes per message (default 4096)")
    p.add_argument("--runs", type=int, default=5, help="timed rounds (default 5)")
    args = p.parse_args(argv)
    clients: list[Client] = [Popsync(), Mpop()]
    missing = [c.name for c in clients if c.missing()]
    if missing:
        print(f"nagle.py: not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    store = MailStore(generate_messages(args.count, args.size, 7))
    started = time.time()
    walls: dict[str, list[float]] = {c.name: [] for c in clients}
    ratios: list[float] = []
    scratch = Path(tempfile.mkdtemp(prefix="popsync-nagle-", dir="/var/tmp"))
    server = POP3TestServer(store, password=PASSWORD, pipelining=False, write_each=True)
    try:
        with server:
            for rnd in range(args.runs + 1):
                order = clients if rnd % 2 == 0 else clients[::-1]
                tag = "warm-up" if rnd == 0 else f"run {rnd}"
                got = {c.name: one_run(c, server, scratch, tag) for c in order}
                if rnd:
                    for name, wall in got.items():
                        walls[name].append(wall)
                    ratios.append(got["popsync"] / got["mpop"])
    except RuntimeError as exc:
        print(f"nagle.py: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    print(f"Measured {when} by `python benchmarks/nagle.py {' '.join(sys.argv[1:])}`\n")
    print(
        f"Test server without PIPELINING, Nagle on, status line and body written apart; "
        f"{args.count} x {args.size} B, plain POP3 on loopback; {args.runs} paired rounds "
        "after one warm-up, every delivery verified.\n"
    )
    print("| popsync s | mpop s | popsync/mpop | min-max |")
    print("| ---: | ---: | ---: | ---: |")
    print(
        f"| {statistics.median(walls['popsync']):.2f} | {statistics.median(walls['mpop']):.2f} "
        f"| **{statistics.median(ratios):.2f}x** | {min(ratios):.2f}-{max(ratios):.2f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
