"""``popsync demo``: the whole product on a built-in example, no outside server.

It starts the project's own POP3 server on 127.0.0.1 with sample mail
(dot-stuffed lines, 8-bit text, an attachment), writes a real config file
and runs ``popsync sync`` on it three times:

1. the first poll fetches everything into a fresh Maildir;
2. two new messages arrive; the second poll fetches exactly those two;
3. the third poll fetches nothing -- nothing is ever delivered twice.

The demo server speaks plain POP3 on loopback, so the demo account says
``tls: none`` and ``allow_plaintext: true`` -- a real account would not.

The command line is handed in (:func:`run_demo`'s *run_command*), so the demo
runs exactly what a user would type without importing :mod:`popsync.cli`,
which imports this module.
"""

from __future__ import annotations

import email.parser
import email.policy
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

#: The demo account's password (the built-in server is the only one that knows it).
DEMO_PASSWORD = "demo-password"  # noqa: S105


def _subject(path: Path) -> str:
    with path.open("rb") as fh:
        headers = email.parser.BytesHeaderParser(policy=email.policy.default).parse(fh)
    return str(headers.get("Subject", "(no subject)"))


def _show_maildir(maildir: Path) -> None:
    files = sorted((maildir / "new").iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
    print(f"  {maildir / 'new'} now holds {len(files)} message(s):")
    for path in files:
        print(f"    {path.stat().st_size:6d} B  {_subject(path)}")


def _write_config(root: Path, port: int) -> Path:
    secret = root / "demo.pass"
    secret.write_text(DEMO_PASSWORD + "\n")
    secret.chmod(0o600)
    config = root / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            # Written by `popsync demo`.  The built-in server speaks plain POP3 on
            # loopback; a real account keeps the default `tls: implicit`.
            ledger: sqlite:///{root / "ledger.db"}
            accounts:
              - name: demo
                host: 127.0.0.1
                port: {port}
                tls: none
                allow_plaintext: true
                username: demo
                password_file: {secret}
                maildir: {root / "Maildir"}
            """
        )
    )
    config.chmod(0o600)
    return config


def run_demo(directory: Path | None, run_command: Callable[[Sequence[str]], int]) -> int:
    """Run the demo in *directory* (None: a temporary one, removed after).

    *run_command* runs one popsync command line (``popsync.cli.main``).
    Returns 0 when every sync succeeded, else the status of a failed one.
    """
    from popsync.testing.mailstore import MailStore
    from popsync.testing.samples import generate_messages, sample_messages
    from popsync.testing.server import POP3TestServer

    with tempfile.TemporaryDirectory(prefix="popsync-demo-") as scratch:
        root = Path(directory) if directory is not None else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        store = MailStore(sample_messages())
        with POP3TestServer(store, username="demo", password=DEMO_PASSWORD) as server:
            config = _write_config(root, server.port)
            print(
                f"popsync demo: a POP3 server on 127.0.0.1:{server.port} holds "
                f"{len(store)} sample messages."
            )
            print(f"Config: {config}\n")

            print("1) First poll: everything is new.")
            status = run_command(["-c", str(config), "sync", "--no-progress"])
            _show_maildir(root / "Maildir")

            print("\n2) Two new messages arrive on the server; poll again.")
            for data in generate_messages(2, 1500, seed=7):
                store.add(data)
            status = run_command(["-c", str(config), "sync", "--no-progress"]) or status
            _show_maildir(root / "Maildir")

            print("\n3) Poll once more: nothing new, nothing fetched twice.")
            status = run_command(["-c", str(config), "sync", "--no-progress"]) or status

            print("\nWhat the ledger knows:")
            run_command(["-c", str(config), "status"])
        if directory is None:
            print(
                "\n(The demo's files were in a temporary directory, now removed; "
                "use `popsync demo --dir DIR` to keep them.)"
            )
    return status
