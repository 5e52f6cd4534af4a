"""popsync against mpop, fetchmail, getmail6 and a stdlib poplib loop, on a private Dovecot.

    python benchmarks/run.py                       # everything, 3 runs, medians
    python benchmarks/run.py --quick               # smoke run: small counts, 1 run
    python benchmarks/run.py --datasets A,D --runs 1 --json out.json

What happens (see benchmarks/README.md for how to read the output):

1. A throw-away CA and a certificate for 127.0.0.1 (trustme); a private Dovecot
   (tests/servers/dovecot.py) under a scratch directory, on loopback ports.
2. Per dataset a mailbox filled with deterministic messages
   (popsync.testing.samples.generate_messages), then one untimed pipelined
   RETR of everything, so Dovecot's first-session work is charged to no client.
3. Per run, each client in turn as a separate process (``os.wait4``: its wall
   and CPU time; GNU time as the launcher: its own peak RSS), with a fresh
   Maildir and fresh UIDL state for a first fetch; for dataset C each client
   syncs once untimed and the timed runs are nothing-new polls on that state.
4. Each run is verified: the Maildir must hold exactly the stored form of
   what Dovecot holds (SHA-256 multiset); in delete mode the server must end
   empty.  A failed or unverified run is reported, never averaged in.
5. A table of medians and popsync's wall-time ratio to each other client.

Invariants: loopback only; every child process has a timeout; Dovecot and the
delay proxy are stopped in ``finally``; the scratch directory is removed
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run from a fresh clone without installing
    sys.path.insert(1, str(REPO_ROOT))

from clients import Client, Fetchmail, all_clients  # noqa: E402
from delay_proxy import DelayProxyProcess  # noqa: E402
from harness import (  # noqa: E402
    Job,
    Measurement,
    Target,
    Verdict,
    digests,
    make_maildir,
    run_measured,
    server_uidls,
    verify_maildir,
    warm_server,
)

from popsync.testing.samples import generate_messages  # noqa: E402
from tests.servers.dovecot import Dovecot, DovecotError  # noqa: E402

KIB = 1024
MIB = 1024 * 1024
USER_PASSWORD = "bench-password-1"


@dataclass(frozen=True, slots=True)
class Dataset:
    key: str
    title: str
    count: int
    size: int
    seed: int
    poll: bool = False  # C: time a nothing-new poll on synced state
    delay: float = 0.0  # seconds per direction through the delay proxy
    delete: bool = False
    timeout: float = 900.0  # per client run
    mailbox: str = ""  # Dovecot user; datasets with the same one share mail

    @property
    def user(self) -> str:
        """The Dovecot user: datasets with the same mail (A and D) share it."""
        return f"{self.mailbox}{self.count}"

    def scaled(self, count: int, size: int | None = None) -> Dataset:
        """The same dataset, smaller (for ``--quick``)."""
        return dataclasses.replace(
            self,
            count=count,
            size=self.size if size is None else size,
            timeout=min(self.timeout, 300.0),
        )


DATASETS = {
    "A": Dataset("A", "5,000 x 4 KiB, first fetch, keep", 5000, 4 * KIB, 1, mailbox="a"),
    "B": Dataset("B", "100 x 2 MiB, first fetch, keep", 100, 2 * MIB, 2, mailbox="b"),
    "C": Dataset(
        "C",
        "50,000 x 2 KiB synced: nothing-new poll",
        50000,
        2 * KIB,
        3,
        poll=True,
        timeout=1200.0,
        mailbox="c",
    ),
    "D": Dataset("D", "A behind a 20 ms round trip", 5000, 4 * KIB, 1, delay=0.010, mailbox="a"),
    "E": Dataset(
        "E", "A in delete mode (server ends empty)", 5000, 4 * KIB, 1, delete=True, mailbox="e"
    ),
}
#: F is not in the default list: one huge message, for the peak-RSS question
#: ("is the message held in memory?"), an extra to A-E.
DATASETS["F"] = Dataset("F", "1 x 200 MiB, first fetch, keep", 1, 200 * MIB, 6, mailbox="f")
QUICK_SIZES = {
    "A": (300, None),
    "B": (5, None),
    "C": (2000, None),
    "D": (100, None),
    "E": (300, None),
    "F": (1, 20 * MIB),
}


@dataclass
class RunResult:
    wall: float
    cpu: float
    maxrss_mb: float
    ok: bool
    problem: str = ""
    count: int = 0
    nbytes: int = 0
    extras: dict[str, float] = field(default_factory=dict)
    round: int = 0  # which round of the batch (paired mode pairs runs by it)


@dataclass
class ClientResult:
    client: str
    runs: list[RunResult] = field(default_factory=list)
    skipped: str = ""
    note: str = ""

    def good(self) -> list[RunResult]:
        return [r for r in self.runs if r.ok]

    @property
    def failed(self) -> str:
        bad = [r.problem for r in self.runs if not r.ok]
        return f"{len(bad)} of {len(self.runs)} runs failed: {bad[0]}" if bad else ""

    def median(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.good()]
        return statistics.median(values) if values else None

    def median_extra(self, key: str) -> float | None:
        values = [r.extras[key] for r in self.good() if key in r.extras]
        return statistics.median(values) if values else None


# ------------------------------------------------------------------ machine


def machine_info(dovecot_version: str) -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "dovecot": dovecot_version,
    }
    for tool, args in (
        ("mpop", ["--version"]),
        ("fetchmail", ["--version"]),
        ("getmail", ["--version"]),
    ):
        path = shutil.which(tool)
        if path is None:
            info[tool] = "not installed"
            continue
        try:
            out = subprocess.run([path, *args], capture_output=True, timeout=10, check=False)
            text = (out.stdout + out.stderr).decode("utf-8", "replace").splitlines()
            # First line naming a version ("WARNING: Running as root" is not one).
            info[tool] = next(
                (t.strip() for t in text if any(ch.isdigit() for ch in t) and "WARN" not in t), "?"
            )
        except (OSError, subprocess.SubprocessError):
            info[tool] = "?"
    return info


# ----------------------------------------------------------------- the run


class Bench:
    """One benchmark session: a server, its mailboxes, and the results so far."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.clients = [c for c in all_clients().values() if c.name in args.clients]
        self.results: dict[str, dict[str, ClientResult]] = {}
        self.expected: dict[str, Counter[str]] = {}
        self.filled: set[str] = set()
        self.ca_file = scratch / "ca.pem"
        self.server: Dovecot | None = None
        self.modes: list[str] = ["implicit", "plain"] if args.tls == "both" else [args.tls]
        self.tls = self.modes[0]  # the TLS mode of the datasets being run now
        self.ran: dict[str, Dataset] = {}  # result key -> the dataset as run (--quick scales)
        self.started = time.time()

    def key(self, ds: Dataset) -> str:
        """Where *ds*'s results go: its letter, and the TLS mode when both are run."""
        return ds.key if len(self.modes) == 1 else f"{ds.key} {self.tls}"

    # ---- setup

    def start_server(self) -> Dovecot:
        import trustme

        ca = trustme.CA()
        # localhost too: fetchmail matches only DNS names, so it polls "localhost via 127.0.0.1".
        cert = ca.issue_cert("127.0.0.1", "localhost", common_name="localhost")
        ca.cert_pem.write_to_path(str(self.ca_file))
        chain, key = self.scratch / "cert.pem", self.scratch / "key.pem"
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        self.server = Dovecot(self.scratch / "dovecot", users={}, cert_file=chain, key_file=key)
        self.server.start()  # from the main thread: see the harness docstring
        return self.server

    def fill(self, ds: Dataset, *, force: bool = False) -> None:
        """Fill the dataset's mailbox (once, or again after a delete run) and warm it."""
        server = self.server
        assert server is not None
        user = ds.user
        if user not in server.users:
            server.add_user(user, USER_PASSWORD)
        if user in self.filled and not force:
            return
        server.clear(user)
        server.add_messages(user, generate_messages(ds.count, ds.size, ds.seed))
        self.expected[user] = digests(server.stored_messages(user))
        warm_server(server.pop3_port, user, USER_PASSWORD, ds.count)
        self.filled.add(user)

    def target(self, ds: Dataset, port: int) -> Target:
        return Target("127.0.0.1", port, self.tls, ds.user, USER_PASSWORD, self.ca_file)

    def server_port(self) -> int:
        assert self.server is not None
        return self.server.pop3s_port if self.tls == "implicit" else self.server.pop3_port

    # ---- one client run

    def job(self, ds: Dataset, client: Client, port: int, tag: str) -> Job:
        base = self.scratch / "runs" / ds.key / client.name / tag
        if base.exists():
            shutil.rmtree(base)
        state = base / "state"
        state.mkdir(parents=True)
        maildir = base / "Maildir"
        make_maildir(maildir, client.maildir_owner())
        timeout = self.args.timeout or ds.timeout
        return Job(self.target(ds, port), maildir, state, ds.delete, timeout)

    def execute(self, client: Client, job: Job, label: str) -> tuple[Measurement, dict[str, float]]:
        inv = client.prepare(job)
        m = run_measured(
            inv.argv,
            env=inv.env,
            cwd=job.state_dir,
            timeout=job.timeout,
            log_prefix=job.state_dir / "client",
        )
        extras = client.extras(m)
        status = (
            "ok"
            if self.succeeded(client, m)
            else ("TIMEOUT" if m.timed_out else f"exit {m.returncode}")
        )
        print(
            f"  {label:<28} {m.wall:8.2f} s wall {m.cpu:7.2f} s cpu "
            f"{m.maxrss_mb:6.1f} MB  {status}",
            file=sys.stderr,
            flush=True,
        )
        return m, extras

    @staticmethod
    def succeeded(client: Client, m: Measurement) -> bool:
        return not m.timed_out and m.returncode in client.ok_codes

    def check(
        self,
        ds: Dataset,
        client: Client,
        job: Job,
        m: Measurement,
        expected: Counter[str] | None = None,
    ) -> Verdict:
        """Verify one run; *expected* defaults to everything the server holds."""
        if not self.succeeded(client, m):
            why = "timed out" if m.timed_out else f"exit status {m.returncode}"
            tail = (m.stderr.strip() or m.stdout.strip()).splitlines()[-1:] or [""]
            return Verdict(False, 0, 0, f"{why}: {tail[0][:200]}")
        if expected is None:
            expected = self.expected[ds.user]
        if isinstance(client, Fetchmail) and client.null:
            # Nothing stored: after a keep-mode run its idfile lists every UID;
            # in delete mode the server-empty check below is the whole check.
            total = sum(self.expected[ds.user].values())
            verdict = Verdict(True, total, 0) if ds.delete else _verify_fetchmail_ids(job, total)
        else:
            verdict = verify_maildir(job.maildir, expected, client.strip_added)
        if verdict.ok and ds.delete:
            assert self.server is not None
            left = len(self.server.stored_messages(ds.user))
            if left:
                return Verdict(
                    False,
                    verdict.count,
                    verdict.nbytes,
                    f"delete mode: {left} messages left on the server",
                )
        return verdict

    def record(
        self,
        ds: Dataset,
        client: Client,
        m: Measurement,
        v: Verdict,
        extras: dict[str, float],
        *,
        count: int | None = None,
        run: int = 0,
    ) -> None:
        result = self.results[self.key(ds)][client.name]
        result.runs.append(
            RunResult(
                m.wall,
                m.cpu,
                m.maxrss_mb,
                v.ok,
                v.problem,
                v.count if count is None else count,
                v.nbytes if count is None else 0,
                extras,
                run,
            )
        )

    # ---- datasets

    def run_dataset(self, ds: Dataset) -> None:
        print(
            f"\n{self.key(ds)}: {ds.title} ({ds.count} x {ds.size} B)", file=sys.stderr, flush=True
        )
        self.results[self.key(ds)] = {}
        self.ran[self.key(ds)] = ds
        runnable = []
        for client in self.clients:
            self.results[self.key(ds)][client.name] = ClientResult(client.name)
            reason = client.missing()
            if (
                not reason
                and ds.delay
                and client.lockstep
                and not (self.args.full or self.args.quick)
            ):
                reason = (
                    f"one command per round trip: minutes for {ds.count} messages "
                    "(poplib shows the same pattern); --full includes it"
                )
            if reason:
                self.results[self.key(ds)][client.name].skipped = reason
            else:
                runnable.append(client)
        t0 = time.monotonic()
        self.fill(ds)
        print(f"  (mailbox filled and warmed in {time.monotonic() - t0:.1f} s)", file=sys.stderr)
        with contextlib.ExitStack() as stack:
            port = self.server_port()
            if ds.delay:
                proxy = stack.enter_context(DelayProxyProcess(port, ds.delay))
                port = proxy.port
            if ds.poll:
                self.run_poll_dataset(ds, runnable, port)
            else:
                self.run_fetch_dataset(ds, runnable, port)

    def repeat(self, ds: Dataset, client: Client, run: int) -> bool:
        """Whether *client* gets timed run *run* (0-based) of *ds*.

        A client whose first run took longer than ``--repeat-limit`` is not
        repeated: such runs are dominated by round trips or process starts
        and vary little, and repeating them would multiply the total time.
        """
        result = self.results[self.key(ds)][client.name]
        if run == 0 or self.args.paired:  # a pair needs both of its runs
            return True
        if self.args.full or "1 run" in result.note:
            return not result.note.startswith("1 run")
        first = result.runs[0] if result.runs else None
        if first is not None and first.wall > self.args.repeat_limit:
            result.note = "; ".join(
                n for n in (result.note, f"1 run ({first.wall:.0f} s > --repeat-limit)") if n
            )
            return False
        return True

    def rounds(self, clients: list[Client]) -> Iterator[tuple[int, list[Client]]]:
        """The rounds of a batch: (round number, clients in the order they run).

        Runs interleave clients (1: all, 2: all, ...) so drift hits all alike.
        In paired mode, round 0 is an untimed warm-up (page cache, Dovecot's
        caches, the CPU's clock) and the order alternates from round to round,
        so neither side always runs right after the other.
        """
        if not self.args.paired:
            for run in range(1, self.args.runs + 1):
                yield run, clients
            return
        for run in range(self.args.runs + 1):
            yield run, clients if run % 2 == 0 else clients[::-1]

    def warmup(self, run: int) -> bool:
        return self.args.paired and run == 0

    def keep_run(
        self,
        ds: Dataset,
        client: Client,
        m: Measurement,
        v: Verdict,
        extras: dict[str, float],
        run: int,
        *,
        count: int | None = None,
    ) -> None:
        """Record a timed run; a warm-up counts only when it failed (as a note)."""
        if not self.warmup(run):
            self.record(ds, client, m, v, extras, count=count, run=run)
        elif not v.ok:
            result = self.results[self.key(ds)][client.name]
            result.note = "; ".join(n for n in (result.note, f"warm-up: {v.problem}") if n)

    def run_fetch_dataset(self, ds: Dataset, clients: list[Client], port: int) -> None:
        for run, order in self.rounds(clients):
            for client in order:
                if not self.warmup(run) and not self.repeat(ds, client, run - 1):
                    continue
                if ds.delete:
                    self.fill(ds, force=True)
                label = "warm-up" if self.warmup(run) else f"run {run}"
                job = self.job(ds, client, port, f"run{run}")
                m, extras = self.execute(client, job, f"{client.name} {label}")
                self.keep_run(ds, client, m, self.check(ds, client, job, m), extras, run)
                if not self.args.keep:
                    shutil.rmtree(job.maildir.parent, ignore_errors=True)

    def run_poll_dataset(self, ds: Dataset, clients: list[Client], port: int) -> None:
        """Sync each client once (untimed), then time nothing-new polls on that state.

        popsync and mpop always sync for real.  Unless ``--full``, the others
        get their "seen" state written from the server's UIDL list instead
        (minutes saved; see :meth:`clients.Client.seed`): their Maildir then
        stays empty, and the check is that the poll delivered nothing.
        """
        jobs: dict[str, tuple[Job, Counter[str]]] = {}
        uids: list[str] | None = None
        for client in clients:
            job = self.job(ds, client, port, "synced")
            if not self.args.full and client.name not in ("popsync", "mpop"):
                if uids is None:
                    assert self.server is not None
                    uids = server_uidls(self.server.pop3_port, ds.user, USER_PASSWORD)
                if client.seed(job, uids):
                    print(f"  {client.name + ' state seeded (untimed)':<28}", file=sys.stderr)
                    self.results[self.key(ds)][client.name].note = "UIDL state seeded, not synced"
                    jobs[client.name] = (job, Counter())
                    continue
            m, _ = self.execute(client, job, f"{client.name} initial sync (untimed)")
            verdict = self.check(ds, client, job, m)
            if verdict.ok:
                jobs[client.name] = (job, self.expected[ds.user])
            else:
                self.record(
                    ds, client, m, Verdict(False, 0, 0, "initial sync: " + verdict.problem), {}
                )
        for run, order in self.rounds(clients):
            for client in order:
                if client.name not in jobs:
                    continue
                if not self.warmup(run) and not self.repeat(ds, client, run - 1):
                    continue
                job, expected = jobs[client.name]
                label = "warm-up poll" if self.warmup(run) else f"poll {run}"
                m, extras = self.execute(client, job, f"{client.name} {label}")
                # Nothing new: the Maildir must be exactly as the sync left it.
                verdict = self.check(ds, client, job, m, expected)
                self.keep_run(ds, client, m, verdict, extras, run, count=ds.count)


def _verify_fetchmail_ids(job: Job, expected: int) -> Verdict:
    """fetchmail-null stores nothing; its idfile must list every UID once."""
    path = job.state_dir / "fetchids"
    try:
        lines = [ln for ln in path.read_text("utf-8", "replace").splitlines() if ln.strip()]
    except OSError as exc:
        return Verdict(False, 0, 0, f"no idfile: {exc}")
    uids = [ln.split()[-1] for ln in lines if not ln.startswith("#")]
    if len(set(uids)) != expected:
        return Verdict(False, len(set(uids)), 0, f"idfile holds {len(set(uids))} of {expected}")
    return Verdict(True, expected, 0)


# ------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def popsync_e_over_a(bench: Bench, mode: str = "") -> float | None:
    """popsync's delete-mode time over its keep-mode time, when both were measured."""
    suffix = f" {mode}" if mode and len(bench.modes) > 1 else ""
    a = bench.results.get("A" + suffix, {}).get("popsync")
    e = bench.results.get("E" + suffix, {}).get("popsync")
    a_wall = a.median("wall") if a else None
    e_wall = e.median("wall") if e else None
    return e_wall / a_wall if a_wall and e_wall else None


def report(bench: Bench, datasets: list[Dataset], machine: dict[str, str]) -> str:
    lines = [
        "machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        f"runs per cell: {bench.args.runs} (medians of verified runs); "
        f"TLS: {', '.join(bench.modes)}",
        "",
    ]
    header = (
        f"{'set':<3} {'client':<15} {'wall s':>8} {'CPU s':>8} {'RSS MB':>7} "
        f"{'msgs/s':>8} {'MB/s':>7} {'poll s':>7} {'popsync/this':>12}  note"
    )
    lines += [header, "-" * len(header)]
    for key, per in bench.results.items():
        ps = per.get("popsync")
        ps_wall = ps.median("wall") if ps else None
        for name, res in per.items():
            if res.skipped:
                lines.append(f"{key:<3} {name:<15} {'skipped: ' + res.skipped}")
                continue
            wall = res.median("wall")
            if wall is None:
                lines.append(f"{key:<3} {name:<15} FAILED: {res.failed}")
                continue
            count = res.median("count") or 0
            nbytes = res.median("nbytes") or 0
            ratio = f"{ps_wall / wall:.2f}x" if ps_wall is not None and name != "popsync" else ""
            note = "; ".join(n for n in (res.note, res.failed) if n)
            lines.append(
                f"{key:<3} {name:<15} {wall:8.2f} {_fmt(res.median('cpu')):>8} "
                f"{_fmt(res.median('maxrss_mb'), '.1f'):>7} "
                f"{count / wall:8.0f} {(_fmt(nbytes / wall / 1e6, '.1f') if nbytes else '-'):>7} "
                f"{_fmt(res.median_extra('poll_s'), '.1f'):>7} {ratio:>12}  {note}"
            )
        lines.append("")
    for mode in bench.modes:
        e_over_a = popsync_e_over_a(bench, mode)
        if e_over_a is not None:
            lines.append(f"popsync E/A (delete mode / keep mode wall time, {mode}): {e_over_a:.2f}")
    lines += [
        "",
        "popsync/this: popsync's median wall time divided by that client's "
        "(below 1: popsync faster).",
        "C: msgs/s counts messages checked by a nothing-new poll, MB/s is not applicable;"
        " poll s is popsync's own reported poll time (0.1 s resolution).",
        "Notes:",
    ]
    for client in bench.clients:
        lines.append(f"  {client.name}: {client.note}")
    return "\n".join(lines)


# ---------------------------------------------------------------- paired mode


@dataclass(frozen=True, slots=True)
class Pairing:
    """popsync against one peer on one dataset: the ratio of each round's two runs."""

    key: str
    peer: str
    ratios: list[float]
    popsync_wall: float | None
    peer_wall: float | None
    popsync_rss: float | None
    peer_rss: float | None
    problem: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None


def pairings(bench: Bench) -> list[Pairing]:
    """Per dataset and peer: popsync's wall time over the peer's, round by round.

    Only rounds where both runs verified form a pair; a failed or missing
    run drops its pair (and says so), it is never replaced.
    """
    out = []
    for key, per in bench.results.items():
        ps = per.get("popsync")
        if ps is None:
            continue
        mine = {r.round: r for r in ps.good()}
        for name, res in per.items():
            if name == "popsync":
                continue
            if res.skipped:
                out.append(Pairing(key, name, [], None, None, None, None, res.skipped))
                continue
            theirs = {r.round: r for r in res.good()}
            rounds = sorted(mine.keys() & theirs.keys())
            ratios = [mine[n].wall / theirs[n].wall for n in rounds]
            problem = "; ".join(f for f in (ps.failed, res.failed, res.note) if f)
            out.append(
                Pairing(
                    key,
                    name,
                    ratios,
                    ps.median("wall"),
                    res.median("wall"),
                    ps.median("maxrss_mb"),
                    res.median("maxrss_mb"),
                    problem,
                )
            )
    return out


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def paired_report(bench: Bench, machine: dict[str, str]) -> str:
    """The paired results as a markdown table the README can include verbatim."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(bench.started))
    lines = [
        f"Measured {when} by `python benchmarks/run.py {' '.join(bench.args.argv)}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + ".",
        "",
        f"Paired: popsync and each peer alternate in every round (one untimed "
        f"warm-up round, then {bench.args.runs} timed rounds, the order reversed "
        "every round); every delivery verified byte for byte. *ratio* is "
        "popsync's wall time over the peer's in the same round (below 1: popsync "
        "faster): the median and the min-max over the rounds. Wall times are "
        "medians, whole process (start-up included).",
        "",
        "| set | TLS | peer | pairs | ratio | min-max | popsync s | peer s "
        "| popsync RSS MB | peer RSS MB | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in pairings(bench):
        letter, _, mode = p.key.partition(" ")
        ds = bench.ran[p.key]
        ds_title = f"{ds.count:,} x {_size(ds.size)}" + (", delete" if ds.delete else "")
        ds_title += (
            ", nothing new" if ds.poll else f", {ds.delay * 2000:g} ms RTT" if ds.delay else ""
        )
        spread = f"{min(p.ratios):.2f}-{max(p.ratios):.2f}" if p.ratios else "-"
        median = f"**{p.median:.2f}x**" if p.median is not None else "-"
        single = "single run" if len(p.ratios) == 1 else ""
        note = "; ".join(n for n in (single, p.problem) if n).replace("|", "/")
        lines.append(
            f"| {letter}: {ds_title} | {mode or bench.modes[0]} | {p.peer} | {len(p.ratios)} "
            f"| {median} | {spread} | {_fmt(p.popsync_wall)} | {_fmt(p.peer_wall)} "
            f"| {_fmt(p.popsync_rss, '.1f')} | {_fmt(p.peer_rss, '.1f')} | {note} |"
        )
    for mode in bench.modes:
        e_over_a = popsync_e_over_a(bench, mode)
        if e_over_a is not None:
            lines += [
                "",
                f"popsync delete mode / keep mode (E/A, medians, {mode}): {e_over_a:.2f}",
            ]
    return "\n".join(lines)


def to_json(bench: Bench, datasets: list[Dataset], machine: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bench.started)),
        "runs": bench.args.runs,
        "paired": bench.args.paired,
        "tls": bench.modes,
        "datasets": {},
    }
    for key, per in bench.results.items():
        letter = key.partition(" ")[0]
        ds = next((d for d in datasets if d.key == letter), DATASETS[letter])
        ps = per.get("popsync")
        ps_wall = ps.median("wall") if ps else None
        entry: dict[str, Any] = {
            "title": ds.title,
            "count": ds.count,
            "size": ds.size,
            "clients": {},
        }
        for name, res in per.items():
            wall = res.median("wall")
            entry["clients"][name] = {
                "skipped": res.skipped or None,
                "failed": res.failed or None,
                "note": res.note or None,
                "runs": [asdict(r) for r in res.runs],
                "median": {
                    k: res.median(k) for k in ("wall", "cpu", "maxrss_mb", "count", "nbytes")
                }
                | {"poll_s": res.median_extra("poll_s")},
                "popsync_over_this_wall": (
                    ps_wall / wall if ps_wall and wall and name != "popsync" else None
                ),
            }
        out["datasets"][key] = entry
    out["popsync_e_over_a"] = {mode: popsync_e_over_a(bench, mode) for mode in bench.modes}
    if bench.args.paired:
        out["pairs"] = [asdict(p) | {"median": p.median} for p in pairings(bench)]
    return out


# --------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    known = list(all_clients())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--datasets", default="A,B,C,D,E", help="comma list of A,B,C,D,E (and F: 1 x 200 MiB)"
    )
    p.add_argument("--runs", type=int, default=None, help="timed runs per cell (default 3)")
    p.add_argument(
        "--clients",
        default="popsync,poplib,mpop,fetchmail,getmail",
        help=f"comma list of {','.join(known)}",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: small counts, 1 run")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--tls",
        choices=("implicit", "plain", "both"),
        default="implicit",
        help="pop3s (default), plain POP3, or both (every dataset twice)",
    )
    p.add_argument(
        "--paired",
        action="store_true",
        help="popsync and the peers alternate, one warm-up round, then --runs rounds "
        "(default 5); prints a markdown table of per-round ratios",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument(
        "--scratch",
        metavar="DIR",
        help="parent of the scratch dir (default /var/tmp:"
        " a real disk, so fsync costs what it costs)",
    )
    p.add_argument(
        "--repeat-limit",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="a client whose first run of a dataset takes longer is timed once (default 20)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="exhaustive (an hour or more): every client in D, real initial syncs "
        "in C, every run repeated",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="seconds per client run (default: per dataset, 900; 300 with --quick)",
    )
    args = p.parse_args(argv)
    args.datasets = [d.strip().upper() for d in args.datasets.split(",") if d.strip()]
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    for d in args.datasets:
        if d not in DATASETS:
            p.error(f"unknown dataset {d!r}")
    for c in args.clients:
        if c not in known:
            p.error(f"unknown client {c!r}")
    if args.runs is None:
        args.runs = 5 if args.paired else 1 if args.quick else 3
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.paired and "popsync" not in args.clients:
        p.error("--paired compares popsync with the others: include popsync in --clients")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


@contextlib.contextmanager
def scratch_dir(args: argparse.Namespace) -> Iterator[Path]:
    parent = Path(
        args.scratch or ("/var/tmp" if Path("/var/tmp").is_dir() else tempfile.gettempdir())
    )
    path = Path(tempfile.mkdtemp(prefix="popsync-bench-", dir=parent))
    os.chmod(path, 0o755)  # getmail's delivery child (nobody, when run as root) walks in
    try:
        yield path
    finally:
        if args.keep:
            print(f"scratch kept: {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ok, reason = Dovecot.available()
    if not ok:
        print(f"run.py: {reason}", file=sys.stderr)
        return 2
    datasets = [DATASETS[k] for k in args.datasets]
    if args.quick:
        datasets = [d.scaled(*QUICK_SIZES[d.key]) for d in datasets]
    machine = machine_info(Dovecot.version())
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), file=sys.stderr)
    started = time.monotonic()
    with scratch_dir(args) as scratch:
        bench = Bench(args, scratch)
        try:
            bench.start_server()
            for mode in bench.modes:
                bench.tls = mode
                for ds in datasets:
                    bench.run_dataset(ds)
        except DovecotError as exc:
            print(f"run.py: Dovecot failed: {exc}", file=sys.stderr)
            return 1
        finally:
            if bench.server is not None:
                bench.server.stop()
    text = report(bench, datasets, machine)
    print()
    print(text)
    if args.paired:
        print()
        print(paired_report(bench, machine))
    print(f"\ntotal benchmark time: {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(bench, datasets, machine), indent=2) + "\n")
    failed = any(
        r.failed or (not r.skipped and not r.runs)
        for per in bench.results.values()
        for r in per.values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
