"""The POP3 clients under test, each configured as fairly as it allows.

Contract
--------
Each :class:`Client` turns a :class:`~harness.Job` into an
:class:`~harness.Invocation`: it writes its own config (and any helper)
into the job's private ``state_dir`` and returns the argv to run.  All of
them

* connect to the same host and port with the same TLS mode, and verify the
  server certificate against the same CA file (no client skips the check);
* keep their UIDL state (ledger, uidls file, idfile, oldmail file, seen
  list) inside ``state_dir`` -- fresh for a first fetch, kept for the
  nothing-new poll;
* deliver into the job's Maildir without adding header lines (mpop
  ``received_header off``, fetchmail ``set invisible``, getmail
  ``delivered_to``/``received`` off), so the files can be compared byte for
  byte with what the server holds;
* leave mail on the server, or delete it when the job says so.

``HOME`` (and the XDG directories) point into ``state_dir`` so no client
reads or writes the invoking user's own files.

Peers that are not installed report why from :meth:`Client.missing`; the
benchmark skips their column and says so.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import sys
import time
from pathlib import Path

from harness import Invocation, Job, Measurement

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent


def _write_private(path: Path, text: str) -> Path:
    """Write a config holding a password: mode 0600 (fetchmail and mpop insist)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _base_env(job: Job) -> dict[str, str]:
    state = str(job.state_dir)
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": state,
        "XDG_CONFIG_HOME": state,
        "XDG_STATE_HOME": state,
        "XDG_DATA_HOME": state,
        "XDG_CACHE_HOME": state,
        "LC_ALL": "C.UTF-8",
        "TMPDIR": state,
    }


class Client:
    """One POP3 client; subclasses fill in how it is configured and run."""

    name = ""
    #: Shown under the table: anything that makes the comparison less than equal.
    note = ""
    #: Exit statuses that mean success.
    ok_codes: frozenset[int] = frozenset({0})

    def missing(self) -> str | None:
        """Why this client cannot run here, or None when it can."""
        return None

    def maildir_owner(self) -> tuple[int, int] | None:
        """(uid, gid) the Maildir must belong to, when the client delivers as another user."""
        return None

    def prepare(self, job: Job) -> Invocation:
        raise NotImplementedError

    def extras(self, measurement: Measurement) -> dict[str, float]:
        """Numbers the client reports about itself (popsync: its own poll time)."""
        return {}

    #: One command and one wait per message (no pipelining): dataset D costs
    #: it at least a round trip per message, minutes for 5,000.
    lockstep = False

    def strip_added(self, data: bytes) -> bytes:
        """A delivered file minus what the client always adds (checked, then removed)."""
        return data

    def seed(self, job: Job, uids: list[str]) -> bool:
        """Write the client's "already seen" state for *uids* without fetching.

        For the nothing-new poll (dataset C) of clients that take minutes to
        sync 50,000 messages for real.  Self-checking: a state the client does
        not accept makes it fetch, and the poll's check (nothing delivered)
        fails.  Returns False when the client has no seedable state.
        """
        return False


class Popsync(Client):
    name = "popsync"
    note = "python -m popsync sync (start-up included); durable ledger + fsynced Maildir"

    _SUMMARY = re.compile(r"^bench: .*, ([0-9.]+) s\s*$", re.MULTILINE)

    def prepare(self, job: Job) -> Invocation:
        t = job.target
        password_file = _write_private(job.state_dir / "password", t.password + "\n")
        lines = [
            f"ledger: sqlite:///{job.state_dir / 'ledger.db'}",
            "accounts:",
            "  - name: bench",
            f"    host: {t.host}",
            f"    port: {t.port}",
            f"    tls: {'implicit' if t.tls == 'implicit' else 'none'}",
            f"    username: {t.user}",
            f"    password_file: {password_file}",
            f"    maildir: {job.maildir}",
            f"    timeout: {min(job.timeout, 600):g}",
        ]
        if t.tls == "implicit":
            lines.append(f"    ca_file: {t.ca_file}")
        else:
            lines.append("    allow_plaintext: true")
        if job.delete:
            lines.append("    delete_after_days: 0")
        config = _write_private(job.state_dir / "config.yaml", "\n".join(lines) + "\n")
        env = _base_env(job)
        # Run this checkout's popsync even when another one is installed.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        argv = [sys.executable, "-m", "popsync", "-c", str(config), "sync", "--no-progress"]
        return Invocation(argv, env)

    def extras(self, measurement: Measurement) -> dict[str, float]:
        match = self._SUMMARY.search(measurement.stdout)
        return {"poll_s": float(match.group(1))} if match else {}


class Poplib(Client):
    name = "poplib"
    note = "stdlib poplib + mailbox.Maildir (fsyncs each file), one command at a time"

    def prepare(self, job: Job) -> Invocation:
        t = job.target
        password_file = _write_private(job.state_dir / "password", t.password + "\n")
        argv = [
            sys.executable,
            str(BENCH_DIR / "poplib_client.py"),
            "--host",
            t.host,
            "--port",
            str(t.port),
            "--tls",
            t.tls,
            "--ca-file",
            str(t.ca_file),
            "--user",
            t.user,
            "--password-file",
            str(password_file),
            "--maildir",
            str(job.maildir),
            "--state",
            str(job.state_dir / "seen-uids"),
            "--timeout",
            f"{min(job.timeout, 600):g}",
        ]
        if job.delete:
            argv.append("--delete")
        return Invocation(argv, _base_env(job))

    def seed(self, job: Job, uids: list[str]) -> bool:
        (job.state_dir / "seen-uids").write_text("".join(u + "\n" for u in uids), "ascii")
        return True


class Mpop(Client):
    name = "mpop"
    note = "C, GnuTLS; pipelining auto; fsyncs each file"

    def missing(self) -> str | None:
        return None if shutil.which("mpop") else "mpop not installed (apt-get install mpop)"

    def prepare(self, job: Job) -> Invocation:
        t = job.target
        implicit = t.tls == "implicit"
        rc = f"""\
defaults
timeout {min(job.timeout, 600):g}
account bench
host {t.host}
port {t.port}
tls {"on" if implicit else "off"}
tls_starttls off
tls_trust_file {t.ca_file if implicit else ""}
tls_certcheck {"on" if implicit else "off"}
auth user
user {t.user}
password {t.password}
delivery maildir {job.maildir}
uidls_file {job.state_dir / "uidls"}
keep {"off" if job.delete else "on"}
only_new on
pipelining auto
received_header off
"""
        path = _write_private(job.state_dir / "mpoprc", rc)
        return Invocation(
            [shutil.which("mpop") or "mpop", f"--file={path}", "-q", "bench"], _base_env(job)
        )


class Fetchmail(Client):
    """fetchmail, delivering through an MDA (it has no Maildir writer of its own).

    The MDA is one ``perl`` process per message that writes ``tmp/``,
    fsyncs, then ``link()``s into ``new/`` -- the Maildir protocol, and the
    per-file fsync every other client here does too -- which is what a real
    fetchmail-to-Maildir setup (procmail, maildrop) costs as well.  With
    ``null=True`` fetchmail hands each message to ``cat > /dev/null`` instead
    (still a process per message, but nothing written; the count is then
    checked from fetchmail's idfile rather than a Maildir).
    """

    name = "fetchmail"
    lockstep = True
    note = "MDA = one perl process per message: tmp/, fsync, link into new/"
    ok_codes = frozenset({0, 1})  # 1: "no mail", its answer to a nothing-new poll

    _MDA = r"""
use strict; use Time::HiRes (); use IO::Handle;
my $md = $ARGV[0];
my ($s, $us) = Time::HiRes::gettimeofday();
my $name = "$s.M${us}P$$.bench";
open(my $fh, '>', "$md/tmp/$name") or exit 75;
binmode STDIN; binmode $fh;
my $buf; while (read(STDIN, $buf, 65536)) { print $fh $buf or exit 75 }
$fh->flush or exit 75; $fh->sync or exit 75;
close($fh) or exit 75;
link("$md/tmp/$name", "$md/new/$name") or exit 75;
unlink("$md/tmp/$name"); exit 0;
"""

    def __init__(self, *, null: bool = False) -> None:
        self.null = null
        if null:
            self.name = "fetchmail-null"
            self.note = "MDA = cat > /dev/null: a process per message, nothing stored"

    def missing(self) -> str | None:
        if not shutil.which("fetchmail"):
            return "fetchmail not installed (apt-get install fetchmail)"
        if not self.null and not shutil.which("perl"):
            return "perl (for fetchmail's Maildir MDA) not installed"
        return None

    def prepare(self, job: Job) -> Invocation:
        t = job.target
        if self.null:
            mda = "/bin/sh -c 'cat > /dev/null'"
        else:
            script = job.state_dir / "maildir-mda.pl"
            script.write_text(self._MDA)
            mda = f"{shutil.which('perl')} {script} {job.maildir}"
        tls = (
            f"ssl sslcertck sslcertfile '{t.ca_file}' sslproto 'tls1.2+'"
            # fetchmail checks DNS names only (not IP SANs): the certificate
            # also names localhost, and that is the name fetchmail verifies.
            " sslcommonname localhost"
            if t.tls == "implicit"
            else "sslproto ''"
        )
        rc = f"""\
set invisible
set no bouncemail
set no syslog
poll {t.host} port {t.port} proto pop3 uidl timeout {min(int(job.timeout), 600)}
  user "{t.user}" there with password "{t.password}" is "{_local_user()}" here
  {"" if job.delete else "keep"} {tls}
  mda "{mda}"
"""
        path = _write_private(job.state_dir / "fetchmailrc", rc)
        argv = [
            shutil.which("fetchmail") or "fetchmail",
            "--fetchmailrc",
            str(path),
            "--idfile",
            str(job.state_dir / "fetchids"),
            "--pidfile",
            str(job.state_dir / "fetchmail.pid"),
            "--nodetach",
            "--silent",
        ]
        return Invocation(argv, _base_env(job))

    def seed(self, job: Job, uids: list[str]) -> bool:
        # The idfile fetchmail writes: one "user@server uid" line per message.
        prefix = f"{job.target.user}@{job.target.host} "
        _write_private(job.state_dir / "fetchids", "".join(prefix + u + "\n" for u in uids))
        return True


class Getmail(Client):
    name = "getmail"
    lockstep = True
    note = (
        "Python; forks a delivery child per message (its Maildir design);"
        " always adds Return-Path (stripped before the check)"
    )

    def missing(self) -> str | None:
        if shutil.which("getmail"):
            return None
        return "getmail6 not installed (apt-get install getmail6)"

    def strip_added(self, data: bytes) -> bytes:
        # getmail always writes a Return-Path line first (Message.flatten);
        # no option turns it off.  Anything else added would fail the check.
        if data.startswith(b"Return-Path: "):
            return data[data.index(b"\n") + 1 :]
        return data

    def maildir_owner(self) -> tuple[int, int] | None:
        # getmail refuses to deliver as root; it setuid()s its delivery child
        # to [destination] user, which must own the Maildir.
        if os.geteuid() != 0:
            return None
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid

    def prepare(self, job: Job) -> Invocation:
        t = job.target
        implicit = t.tls == "implicit"
        rc = f"""\
[retriever]
type = {"SimplePOP3SSLRetriever" if implicit else "SimplePOP3Retriever"}
server = {t.host}
port = {t.port}
username = {t.user}
password = {t.password}
{f"ca_certs = {t.ca_file}" if implicit else ""}

[destination]
type = Maildir
path = {job.maildir}/
{"user = nobody" if os.geteuid() == 0 else ""}

[options]
verbose = 0
read_all = false
delete = {"true" if job.delete else "false"}
delivered_to = false
received = false
message_log_syslog = false
"""
        path = _write_private(job.state_dir / "getmailrc", rc)
        argv = [
            shutil.which("getmail") or "getmail",
            f"--rcfile={path}",
            f"--getmaildir={job.state_dir}",
            "--quiet",
        ]
        return Invocation(argv, _base_env(job))

    def seed(self, job: Job, uids: list[str]) -> bool:
        # getmail's oldmail file: "uid NUL unix-time" lines, named after the
        # server, port and user (retrieverbases.initialize).
        t = job.target
        stamp = int(time.time())
        path = job.state_dir / f"oldmail-{t.host}-{t.port}-{t.user}"
        path.write_text("".join(f"{u}\0{stamp}\n" for u in uids))
        return True


def _local_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def all_clients() -> dict[str, Client]:
    """Every client the benchmark knows, by name, in table order."""
    clients: list[Client] = [
        Popsync(),
        Poplib(),
        Mpop(),
        Fetchmail(),
        Getmail(),
        Fetchmail(null=True),
    ]
    return {c.name: c for c in clients}
