"""The naive baseline: CPython's ``poplib`` one command at a time, ``mailbox.Maildir``.

What a short script written from the standard library's documentation does,
and roughly what fetchmail and getmail do on the wire: UIDL once, then for
each new message a RETR and a wait for the whole reply, a delivery, and
(in delete mode) a DELE.  No pipelining; ``mailbox.Maildir`` fsyncs each file.

Seen UIDs are kept in a text file, one per line; a UID is appended (and the
file flushed) right after its message is in the Maildir, so a crash costs at
most a duplicate, never a loss.  TLS is verified against ``--ca-file``.

    python benchmarks/poplib_client.py --host 127.0.0.1 --port 995 --tls implicit \\
        --ca-file ca.pem --user u --password-file pw --maildir M --state seen.txt [--delete]

Exit status 0 on success, 1 on any POP3, TLS or OS error (one line on stderr).
"""

from __future__ import annotations

import argparse
import mailbox
import poplib
import ssl
import sys
from pathlib import Path


def fetch(args: argparse.Namespace) -> tuple[int, int]:
    """One poll; returns (messages fetched, bytes stored)."""
    password = Path(args.password_file).read_text().splitlines()[0]
    conn: poplib.POP3
    if args.tls == "implicit":
        ctx = ssl.create_default_context(cafile=args.ca_file)
        conn = poplib.POP3_SSL(args.host, args.port, timeout=args.timeout, context=ctx)
    else:
        conn = poplib.POP3(args.host, args.port, timeout=args.timeout)
    state = Path(args.state)
    seen = set(state.read_text().split()) if state.exists() else set()
    fetched = stored = 0
    try:
        conn.user(args.user)
        conn.pass_(password)
        _, listing, _ = conn.uidl()
        box = mailbox.Maildir(args.maildir, factory=None, create=True)
        with state.open("a", encoding="ascii") as record:
            for line in listing:
                number, uid = line.decode("ascii").split()
                if uid in seen:
                    continue
                _, lines, _ = conn.retr(int(number))
                data = b"\n".join(lines) + b"\n"
                box.add(data)
                record.write(uid + "\n")
                record.flush()
                fetched += 1
                stored += len(data)
                if args.delete:
                    conn.dele(int(number))
        conn.quit()
    finally:
        conn.close()
    return fetched, stored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="stdlib poplib baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls", choices=("implicit", "plain"), default="implicit")
    parser.add_argument("--ca-file")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password-file", required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--delete", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    try:
        fetched, stored = fetch(args)
    except (poplib.error_proto, ssl.SSLError, OSError, ValueError) as exc:
        print(f"poplib_client: {exc}", file=sys.stderr)
        return 1
    print(f"poplib_client: {fetched} fetched ({stored} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
