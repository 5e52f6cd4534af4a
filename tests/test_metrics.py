"""Prometheus metrics of ``popsync run`` (the ``metrics`` config key).

A real ``python -m popsync -c CONFIG run`` polls the project's POP3 test
server on loopback; the test scrapes its metrics over HTTP with urllib and
parses them with ``prometheus_client``'s own parser, then compares them with
what actually reached the Maildir.  The config rules (loopback unless
``metrics_allow_remote``; one line when the library is missing) are checked
through the real CLI.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from popsync import metrics as metrics_module
from popsync.config import load_config
from popsync.config.values import ListenAddress, parse_listen_address
from popsync.daemon import METRICS_MISSING, PollEvent, classify
from popsync.errors import ConfigError
from popsync.locks import AccountBusy
from popsync.metrics import MetricsServer, PollMetrics
from popsync.sync import PollReport
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import maildir_files, wait_until, write_config

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "m3trics-Pw-41d"
AUTH_FAULT = Faults(
    errors={"PASS": b"-ERR [AUTH] invalid credentials", "AUTH": b"-ERR [AUTH] invalid credentials"}
)

#: ``python -c`` that hides prometheus_client (an import of it fails as it
#: would when the package is not installed), then runs the real CLI.
WITHOUT_LIBRARY = (
    "import sys; sys.modules['prometheus_client'] = None; "
    "from popsync.cli import main; sys.exit(main(sys.argv[1:]))"
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def refused(host: str, port: int) -> bool:
    """Nothing listens at host:port any more."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def scrape(url: str) -> Samples:
    """Every sample at *url*, keyed by (sample name, labels)."""
    with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def with_metrics(config: Path, **top: Any) -> Path:
    doc = yaml.safe_load(config.read_text())
    doc.update(top)
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return config


def popsync(
    *args: str, shim: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    head = [sys.executable, "-c", shim] if shim else [sys.executable, "-m", "popsync"]
    return subprocess.run(
        [*head, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture
def servers() -> Iterator[Callable[..., POP3TestServer]]:
    started: list[POP3TestServer] = []

    def start(msgs: list[bytes], **kw: Any) -> POP3TestServer:
        server = POP3TestServer(MailStore(msgs), password=SECRET, **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def account(name: str, port: int, **kw: Any) -> dict[str, Any]:
    return {"name": name, "port": port, "interval": 3600, "secret": SECRET, **kw}


# --------------------------------------------------------------------------
# The daemon, scraped


def start_daemon(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    """``popsync run`` on *cfg* in the background, its stderr into *log*."""
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "popsync", "-c", str(cfg), "run"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def test_a_scrape_shows_what_the_daemon_fetched_deleted_and_paused(
    tmp_path: Path, servers: Callable[..., POP3TestServer]
) -> None:
    mail = list(generate_messages(3, 700, seed=12))
    good = servers(mail)
    bad = servers([], faults=AUTH_FAULT)
    port = free_port()
    cfg = with_metrics(
        write_config(
            tmp_path,
            [account("good", good.port, delete_after_days=0), account("bad", bad.port)],
        ),
        metrics=f"127.0.0.1:{port}",
    )
    started = time.time()
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def both_polled() -> Samples | None:
            assert proc.poll() is None, f"the daemon exited:\n{log.read_text()}"
            try:
                samples = scrape(url)
            except OSError:
                return None  # not listening yet
            ok = value(samples, "popsync_polls_total", account="good", result="ok")
            perm = value(samples, "popsync_polls_total", account="bad", result="permanent")
            return samples if ok and perm else None

        samples = wait_until(both_polled, timeout=20, what=log.read_text)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    files = maildir_files(load_config(cfg).select(["good"])[0].maildir)
    assert len(files) == 3
    assert len(good.store) == 0  # delete_after_days: 0 deleted all three
    stored = sum(f.stat().st_size for f in files)

    def good_(name: str, **labels: str) -> float | None:
        return value(samples, name, account="good", **labels)

    assert good_("popsync_polls_total", result="ok") == 1
    assert good_("popsync_polls_total", result="temporary") == 0
    assert good_("popsync_messages_fetched_total") == 3
    assert good_("popsync_fetched_bytes_total") == stored
    assert good_("popsync_messages_deleted_total") == 3
    assert good_("popsync_uids_remapped_total") == 0
    assert good_("popsync_messages_skipped") == 0
    assert good_("popsync_poll_duration_seconds_count") == 1
    assert good_("popsync_poll_duration_seconds_bucket", le="3600.0") == 1
    last_ok = good_("popsync_last_success_timestamp_seconds")
    assert last_ok is not None and started <= last_ok <= time.time()
    assert good_("popsync_account_paused") == 0

    assert value(samples, "popsync_polls_total", account="bad", result="permanent") == 1
    assert value(samples, "popsync_polls_total", account="bad", result="ok") == 0
    assert value(samples, "popsync_account_paused", account="bad") == 1
    assert value(samples, "popsync_messages_fetched_total", account="bad") == 0
    assert value(samples, "popsync_last_success_timestamp_seconds", account="bad") is None
    assert value(samples, "popsync_info", version="0.1.0") == 1

    out = log.read_text()
    assert f"serving metrics at http://127.0.0.1:{port}/metrics" in out
    assert SECRET not in out
    assert refused("127.0.0.1", port)


def test_a_reload_keeps_the_endpoint_and_an_added_account_gets_every_series(
    tmp_path: Path, servers: Callable[..., POP3TestServer]
) -> None:
    a, b = servers(list(generate_messages(1, 300, seed=1))), servers([])
    port = free_port()
    cfg = with_metrics(write_config(tmp_path, [account("a", a.port)]), metrics=f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/metrics"
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)
    try:

        def polled(name: str) -> Samples | None:
            assert proc.poll() is None, f"the daemon exited:\n{log.read_text()}"
            try:
                samples = scrape(url)
            except OSError:
                return None
            return (
                samples
                if value(samples, "popsync_polls_total", account=name, result="ok")
                else None
            )

        wait_until(lambda: polled("a"), timeout=20, what=log.read_text)
        other = free_port()
        with_metrics(
            write_config(tmp_path, [account("a", a.port), account("b", b.port)]),
            metrics=f"127.0.0.1:{other}",
        )
        proc.send_signal(signal.SIGHUP)
        samples = wait_until(lambda: polled("b"), timeout=20, what=log.read_text)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "the metrics setting changed; that takes a restart" in log.read_text()
    assert refused("127.0.0.1", other)  # never served there
    for result in ("temporary", "permanent", "busy"):
        assert value(samples, "popsync_polls_total", account="b", result=result) == 0
    assert value(samples, "popsync_messages_fetched_total", account="a") == 1
    assert value(samples, "popsync_account_paused", account="b") == 0


def test_a_port_in_use_is_one_config_error_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = with_metrics(
            write_config(tmp_path, [account("a", free_port())]), metrics=f"localhost:{port}"
        )
        done = popsync("-c", str(cfg), "run")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"popsync: {cfg}: metrics: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_the_endpoint_serves_on_ipv6_loopback_until_closed() -> None:
    port = free_port("::1")
    metrics = PollMetrics(["x"])
    with MetricsServer(parse_listen_address(f"[::1]:{port}"), metrics.registry):
        samples = scrape(f"http://[::1]:{port}/metrics")
        assert value(samples, "popsync_polls_total", account="x", result="busy") == 0
    assert refused("::1", port)


def test_a_silent_scrape_connection_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that connects and sends nothing does not hold a thread forever."""
    monkeypatch.setattr(metrics_module._Handler, "timeout", 0.3)
    port = free_port()
    with (
        MetricsServer(ListenAddress("127.0.0.1", port), PollMetrics([]).registry),
        socket.create_connection(("127.0.0.1", port), timeout=10) as idle,
    ):
        started = time.monotonic()
        assert idle.recv(1) == b""  # the server hung up
        assert time.monotonic() - started < 5


def test_a_busy_poll_counts_as_busy_and_adds_no_duration() -> None:
    """Another popsync held the lock: nothing of this daemon's was fetched or timed."""
    metrics = PollMetrics(["a"])
    report = PollReport("a", error="busy", temporary=True, exception=AccountBusy("a", 4242))
    report.seconds = 0.002
    outcome = classify(report)
    assert outcome.kind == "busy"
    metrics.observe(PollEvent("a", report, outcome, 300.0, None, 0, False))
    get = metrics.registry.get_sample_value
    assert get("popsync_polls_total", {"account": "a", "result": "busy"}) == 1
    assert get("popsync_poll_duration_seconds_count", {"account": "a"}) is None


# --------------------------------------------------------------------------
# The config key


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9464", ListenAddress("127.0.0.1", 9464)),
        ("localhost:9464", ListenAddress("127.0.0.1", 9464)),
        ("[::1]:9464", ListenAddress("::1", 9464)),
        ("127.0.0.2:1", ListenAddress("127.0.0.2", 1)),
    ],
)
def test_loopback_addresses_are_accepted(tmp_path: Path, text: str, address: ListenAddress) -> None:
    cfg = with_metrics(write_config(tmp_path, [account("a", 110)]), metrics=text)
    config = load_config(cfg)
    assert config.metrics == address
    assert config.metrics.loopback


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        (9464, "must be HOST:PORT"),
        ("127.0.0.1", "must be HOST:PORT"),
        ("127.0.0.1:0", "must be between 1 and 65535"),
        ("127.0.0.1:65536", "must be between 1 and 65535"),
        ("::1:9464", "write an IPv6 address in brackets"),
        ("[127.0.0.1]:9464", "only an IPv6 address goes in brackets"),
        ("metrics.example.org:9464", "must be an IP address or localhost"),
        (":9464", "must be an IP address or localhost"),
        ("0.0.0.0:9464", "is not a loopback address"),
        ("[::]:9464", "is not a loopback address"),
        ("192.0.2.7:9464", "set metrics_allow_remote: true"),
    ],
)
def test_a_bad_or_remote_address_is_one_line_from_check(
    tmp_path: Path, text: object, phrase: str
) -> None:
    cfg = with_metrics(write_config(tmp_path, [account("a", 110)]), metrics=text)
    done = popsync("-c", str(cfg), "check")
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"popsync: {cfg}: metrics: ")
    assert phrase in line


def test_a_remote_address_needs_the_opt_in(tmp_path: Path) -> None:
    cfg = with_metrics(
        write_config(tmp_path, [account("a", 110)]),
        metrics="0.0.0.0:9464",
        metrics_allow_remote=True,
    )
    assert load_config(cfg).metrics == ListenAddress("0.0.0.0", 9464)
    with_metrics(cfg, metrics=None)
    with pytest.raises(ConfigError, match=r"metrics_allow_remote: only with metrics$"):
        load_config(cfg)


@pytest.mark.parametrize("command", ["check", "run"])
def test_without_the_library_check_and_run_say_how_to_install_it(
    tmp_path: Path, command: str
) -> None:
    cfg = with_metrics(
        write_config(tmp_path, [account("a", free_port())]), metrics="127.0.0.1:9464"
    )
    done = popsync("-c", str(cfg), command, shim=WITHOUT_LIBRARY)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"popsync: {cfg}: {METRICS_MISSING}"]
    assert METRICS_MISSING == "metrics needs popsync[metrics]: pip install 'popsync[metrics]'"


def test_without_the_key_the_library_is_not_needed(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [account("a", free_port())])
    done = popsync("-c", str(cfg), "check", shim=WITHOUT_LIBRARY)
    assert done.returncode == 0, done.stderr
