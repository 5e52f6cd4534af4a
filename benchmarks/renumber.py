"""What a server that renumbers every unique-id costs popsync.

A private Dovecot (``tests/servers/dovecot.py``) holds N messages in one
Maildir.  popsync syncs them once (mail kept on the server), then the
user's ``pop3_uidl_format`` changes (``%08Xu%08Xv`` -> ``%v.%u``), so every
unique-id is new, and popsync polls again.  That second poll must fetch
nothing: it recognises each message by its LIST size and ``TOP n 0``
headers (pipelined) and moves its ledger row to the new unique-id.

Reported: the wall time of both ``popsync sync`` runs (process start
included), popsync's own poll time, and the commands Dovecot counted for
each session (its logout line: ``top=``, ``retr=``), so "TOPs, not RETRs"
is read off the server, not taken from popsync's word.  The first sync's
time is what a client without this pays again after a renumbering.

    python benchmarks/renumber.py                 # 50,000 messages of ~2 KiB
    python benchmarks/renumber.py --count 2000    # a quick look

Runs as root or not (the harness serves mail as ``nobody`` under root).
Exit status 0 when the second poll fetched nothing and remapped every
message, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))

from popsync.testing.samples import generate_messages  # noqa: E402
from tests.servers.dovecot import Dovecot  # noqa: E402

BEFORE, AFTER = "%08Xu%08Xv", "%v.%u"
_LOGOUT = re.compile(r"top=(\d+)/\d+, retr=(\d+)/\d+")
_FETCHED = re.compile(r" (\d+) fetched ")
_REMAPPED = re.compile(r" (\d+) remapped,")


def uidl_format(fmt: str) -> dict[str, str]:
    """The userdb field for one user's UIDL format (``%`` escaped for passwd-file)."""
    return {"pop3_uidl_format": fmt.replace("%", "%%")}


def write_config(base: Path, port: int, user: str, password: str) -> Path:
    secret = base / "pass"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    config = base / "config.yaml"
    config.write_text(
        f"ledger: sqlite:///{base / 'state' / 'ledger.db'}\n"
        "accounts:\n"
        "  - name: bench\n"
        "    host: 127.0.0.1\n"
        f"    port: {port}\n"
        "    tls: none\n"
        "    allow_plaintext: true\n"
        f"    username: {user}\n"
        f"    password_file: {secret}\n"
        f"    maildir: {base / 'Maildir'}\n"
        "    timeout: 60\n"
        "    poll_timeout: 3600\n"
    )
    config.chmod(0o600)
    return config


def sync(config: Path) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(config), "sync", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
        cwd=REPO_ROOT,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"popsync sync failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return wall, (done.stdout + done.stderr).strip()


def logouts(server: Dovecot, user: str) -> list[tuple[int, int]]:
    """(TOP count, RETR count) of each finished session of *user*, in order."""
    text = server.log_file.read_text("utf-8", "replace")
    return [
        (int(m.group(1)), int(m.group(2)))
        for line in text.splitlines()
        if f"({user})" in line and "Disconnected" in line and (m := _LOGOUT.search(line))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000, help="messages (default 50,000)")
    parser.add_argument("--size", type=int, default=2048, help="bytes each (default ~2 KiB)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="popsync-renumber-", dir="/var/tmp") as tmp:
        scratch = Path(tmp)
        os.chmod(scratch, 0o755)
        with Dovecot(scratch / "dovecot", users={}) as server:
            user, password = f"renum{secrets.token_hex(3)}", secrets.token_urlsafe(12)
            server.add_user(user, password, userdb_fields=uidl_format(BEFORE))
            print(f"filling {args.count} messages of ~{args.size} bytes...", file=sys.stderr)
            server.add_messages(user, generate_messages(args.count, args.size, seed=21))
            base = scratch / "client"
            base.mkdir()
            config = write_config(base, server.pop3_port, user, password)
            first_wall, first_out = sync(config)
            server.set_userdb_fields(user, uidl_format(AFTER))
            second_wall, second_out = sync(config)
            sessions = logouts(server, user)
    print(f"{args.count} messages of ~{args.size} bytes; pop3_uidl_format {BEFORE} -> {AFTER}")
    for label, wall, out in (
        ("first sync (all fetched)", first_wall, first_out),
        ("after renumbering      ", second_wall, second_out),
    ):
        print(f"  {label}: {wall:7.1f} s wall; popsync: {out.splitlines()[-1]}")
    for n, (tops, retrs) in enumerate(sessions, 1):
        print(f"  Dovecot, session {n}: TOP {tops}, RETR {retrs}")
    summary = second_out.splitlines()[-1]
    fetched, remapped = _FETCHED.search(summary), _REMAPPED.search(summary)
    ok = (
        fetched is not None
        and fetched.group(1) == "0"
        and remapped is not None
        and remapped.group(1) == str(args.count)
        and len(sessions) == 2
        and sessions[1][1] == 0
    )
    print("verified: nothing fetched again, every message remapped" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
