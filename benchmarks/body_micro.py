"""Micro-benchmark of the body path alone (not part of the test run).

Feeds N dot-stuffed CRLF messages of SIZE bytes, as a server would send them
to pipelined RETRs, through the protocol core in receive-sized chunks and
into a Maildir target (hash, write, fsync, link), and prints MB/s of wire
bytes.  No network, no TLS, no ledger: what is left is popsync's own
per-byte work on the way from the socket to the disk.

    PYTHONPATH=. python benchmarks/body_micro.py [-n 20] [--size 2097152] [--chunk 262144]

``--pure`` reads the bodies with the pure-Python reader even where the C
accelerator (popsync/pop3/_bodypass.c) is built.

``--paired OTHER_TREE`` runs this tree and another checkout alternately in
fresh processes (``--rounds`` times each, order swapped every round) and
prints the median ratio of their times: below 1 means this tree is faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def wire_form(message: bytes) -> bytes:
    """*message* (LF line ends) as RETR sends it: +OK, CRLF, stuffed, terminated."""
    lines = message.split(b"\n")[:-1]
    body = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    return b"+OK\r\n" + body + b"\r\n.\r\n"


def run_once(count: int, size: int, chunk: int, pure: bool = False) -> float:
    """Seconds to take *count* messages through the core into a Maildir."""
    from popsync.deliver.maildir.target import open_maildir_target
    from popsync.pop3 import BodyData, Connection, EndOfBody, Retr
    from popsync.pop3.connection import State
    from popsync.testing.samples import generate_messages

    if pure:
        from popsync.pop3 import reader

        if hasattr(reader, "use_accelerator"):  # a tree from before the accelerator
            reader.use_accelerator(False)

    stream = b"".join(wire_form(m) for m in generate_messages(count, size))
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        conn = Connection()
        conn._state = State.TRANSACTION  # skip the login: only bodies are measured
        conn.pipelining = True
        with open_maildir_target(Path(scratch) / "Mail", print) as target:
            start = time.perf_counter()
            for msg in range(1, count + 1):
                conn.send(Retr(msg))
                target.reserve(f"m{msg}")
            pos = ended = 0
            draft = None
            drafts = []
            while ended < count:
                event = conn.next_event()
                if isinstance(event, BodyData):
                    if draft is None:
                        draft = target.begin(f"m{ended + 1}", b"uid")
                    draft.write(event.data)
                elif isinstance(event, EndOfBody):
                    assert draft is not None
                    target.end(draft)
                    drafts.append(draft)
                    draft = None
                    ended += 1
                elif type(event).__name__ == "NeedData":
                    conn.receive_data(stream[pos : pos + chunk])
                    pos += chunk
            target.commit(drafts)
            return time.perf_counter() - start


def paired(other: Path, args: argparse.Namespace) -> None:
    argv = [str(Path(__file__).resolve()), "-n", str(args.n), "--size", str(args.size)]
    argv += ["--chunk", str(args.chunk), "--seconds", *(["--pure"] if args.pure else [])]
    trees = [REPO_ROOT, other]
    times: dict[Path, list[float]] = {tree: [] for tree in trees}
    for round_ in range(args.rounds + 1):  # round 0 warms the page cache
        for tree in trees if round_ % 2 else trees[::-1]:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run(
                [sys.executable, *argv], env=env, capture_output=True, text=True, check=True
            )
            if round_:
                times[tree].append(float(out.stdout))
    ratios = [a / b for a, b in zip(times[REPO_ROOT], times[other], strict=True)]
    for tree in trees:
        print(f"{tree}: median {statistics.median(times[tree]):.3f} s")
    print(
        f"this/other: median {statistics.median(ratios):.2f}x "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {len(ratios)} pairs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="messages (default 20)")
    parser.add_argument("--size", type=int, default=2 * 1024 * 1024, help="bytes per message")
    parser.add_argument("--chunk", type=int, default=256 * 1024, help="bytes per receive")
    parser.add_argument("--pure", action="store_true", help="the pure-Python body reader")
    parser.add_argument("--paired", type=Path, default=None, help="another checkout to compare")
    parser.add_argument("--rounds", type=int, default=9, help="paired rounds (default 9)")
    parser.add_argument("--seconds", action="store_true", help="print only the seconds")
    args = parser.parse_args()
    if args.paired is not None:
        paired(args.paired, args)
        return
    seconds = run_once(args.n, args.size, args.chunk, args.pure)
    if args.seconds:
        print(f"{seconds:.6f}")
        return
    wire = args.n * args.size  # about: the wire form adds CRs and stuffing dots
    print(f"{args.n} x {args.size} B in {seconds:.3f} s: {wire / seconds / 1e6:.0f} MB/s")


if __name__ == "__main__":
    main()
