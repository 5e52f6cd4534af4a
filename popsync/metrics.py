"""Prometheus metrics of ``popsync run``, served over HTTP (the ``metrics`` config key).

Contract
--------
* **Optional.**  This module needs ``prometheus_client`` (the extra
  ``popsync[metrics]``); nothing else in popsync imports it, and
  :func:`popsync.daemon.require_metrics` turns its absence into one config
  error line.
* **Private registry.**  :class:`PollMetrics` keeps its metrics in its own
  ``CollectorRegistry``: nothing is registered in the library's process-wide
  default registry, so two daemons in one process (tests) never collide.
* **One hook.**  The daemon hands every finished poll to
  :meth:`PollMetrics.observe` (its ``on_poll`` observer); the counts come from
  the poll's report, the same numbers as the summary line and ``status``.
  Scheduling state (paused, failures in a row) is read from the daemon's
  snapshot when a scrape asks for it, so a reload or SIGUSR1 shows at once.
* **The server** (:class:`MetricsServer`) is a threaded WSGI server bound to
  exactly the configured address; each connection has a deadline
  (:data:`CLIENT_TIMEOUT`), so an idle or slow client cannot pin a thread,
  and it logs nothing per request.  :meth:`MetricsServer.close` stops it and
  releases the port; the daemon calls it when it stops.

Metrics (``account`` label on all but the last):

========================================== ========= ===================================
``popsync_polls_total{result}``            counter   finished polls by outcome: ``ok``,
                                                     ``temporary``, ``permanent``, ``busy``
``popsync_messages_fetched_total``         counter   messages stored at the target
``popsync_fetched_bytes_total``            counter   bytes of those messages
``popsync_messages_deleted_total``         counter   messages deleted on the server
``popsync_uids_remapped_total``            counter   known messages found under a new UID
``popsync_messages_skipped``               gauge     messages the last completed poll left
                                                     on the server (too large, cut off ...)
``popsync_poll_duration_seconds``          histogram how long polls took (busy ones excluded)
``popsync_last_success_timestamp_seconds`` gauge     end of the last ``ok`` poll (Unix time)
``popsync_account_paused``                 gauge     1 while a permanent failure pauses it
``popsync_account_failures``               gauge     temporary failures in a row
``popsync_info{version}``                  gauge     always 1: the daemon is up
========================================== ========= ===================================
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from popsync import __version__
from popsync.config.values import ListenAddress
from popsync.errors import ConfigError

if TYPE_CHECKING:
    from popsync.daemon import AccountView, PollEvent

__all__ = [
    "CLIENT_TIMEOUT",
    "DURATION_BUCKETS",
    "RESULTS",
    "MetricsServer",
    "PollMetrics",
]

log = logging.getLogger("popsync.metrics")

#: The daemon's outcome classes (:data:`popsync.daemon.OutcomeKind`): every
#: account starts with a zero for each, so ``increase()`` works from the start.
RESULTS: Final = ("ok", "temporary", "permanent", "busy")
#: Poll durations from 10 ms (nothing new on a LAN server) to an hour (the
#: default poll_timeout: a first sync of a large mailbox).
DURATION_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
)  # fmt: skip
#: Seconds a scrape connection may stay silent before it is dropped.
CLIENT_TIMEOUT: Final = 10.0


class PollMetrics:
    """The daemon's metrics: fed by :meth:`observe`, read by a scrape.

    *accounts* get their series (at zero) at once.  :attr:`view` returns
    the daemon's scheduling state (:meth:`popsync.daemon.Daemon.snapshot`,
    set once the daemon exists) and is called on each scrape, from the
    server's thread.
    """

    def __init__(self, accounts: Iterable[str]) -> None:
        self.view: Callable[[], Mapping[str, AccountView]] = dict
        self.registry = CollectorRegistry()
        r = self.registry
        by_account = ["account"]
        self._polls = Counter(
            "popsync_polls", "Finished polls, by outcome", [*by_account, "result"], registry=r
        )
        self._fetched = Counter(
            "popsync_messages_fetched", "Messages stored at the target", by_account, registry=r
        )
        self._bytes = Counter(
            "popsync_fetched_bytes", "Bytes of the messages stored", by_account, registry=r
        )
        self._deleted = Counter(
            "popsync_messages_deleted", "Messages deleted on the server", by_account, registry=r
        )
        self._remapped = Counter(
            "popsync_uids_remapped",
            "Known messages found under a new unique-id (not fetched again)",
            by_account,
            registry=r,
        )
        self._skipped = Gauge(
            "popsync_messages_skipped",
            "Messages the last completed poll left on the server",
            by_account,
            registry=r,
        )
        self._duration = Histogram(
            "popsync_poll_duration_seconds",
            "How long polls took (those skipped as busy excluded)",
            by_account,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._last_ok = Gauge(
            "popsync_last_success_timestamp_seconds",
            "When the last successful poll ended (Unix time)",
            by_account,
            registry=r,
        )
        info = Gauge("popsync_info", "popsync is running (always 1)", ["version"], registry=r)
        info.labels(version=__version__).set(1)
        r.register(_Schedule(self))
        self._known: set[str] = set()
        for name in accounts:
            self._start_series(name)

    def _start_series(self, account: str) -> None:
        """Every series of *account* at zero (once): an account added by a
        reload gets them with its first poll."""
        if account in self._known:
            return
        self._known.add(account)
        for result in RESULTS:
            self._polls.labels(account=account, result=result)
        for counter in (self._fetched, self._bytes, self._deleted, self._remapped):
            counter.labels(account=account)

    def observe(self, event: PollEvent) -> None:
        """Count one finished poll (the daemon's ``on_poll`` hook); never raises
        for a well-formed event."""
        name, report, kind = event.account, event.report, event.outcome.kind
        self._start_series(name)
        self._polls.labels(account=name, result=kind).inc()
        if kind == "busy":  # another popsync polled it: nothing of ours to count
            return
        counts = report.counts
        self._fetched.labels(account=name).inc(counts.fetched)
        self._bytes.labels(account=name).inc(counts.bytes)
        self._deleted.labels(account=name).inc(counts.deleted)
        self._remapped.labels(account=name).inc(counts.remapped)
        self._duration.labels(account=name).observe(report.seconds)
        if kind == "ok":
            self._skipped.labels(account=name).set(counts.skipped)
            self._last_ok.labels(account=name).set(time.time())


class _Schedule(Collector):
    """Per-account scheduling gauges, read from the daemon at scrape time."""

    def __init__(self, metrics: PollMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []  # the metric names are fixed; no collect() at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        paused = GaugeMetricFamily(
            "popsync_account_paused",
            "1 while a permanent failure pauses the account (until a reload or SIGUSR1)",
            labels=["account"],
        )
        failures = GaugeMetricFamily(
            "popsync_account_failures",
            "Temporary failures in a row (0 after a successful poll)",
            labels=["account"],
        )
        for name, view in sorted(self._metrics.view().items()):
            paused.add_metric([name], 1.0 if view.paused else 0.0)
            failures.add_metric([name], float(view.failures))
        yield paused
        yield failures


# --------------------------------------------------------------------------
# The HTTP endpoint


class _Handler(WSGIRequestHandler):
    """One scrape: a deadline on the connection, and no log line per request."""

    timeout = CLIENT_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds up the daemon's exit
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up or timed out: not worth a traceback on stderr.
        log.debug("metrics: a scrape from %s failed", client_address, exc_info=True)


class MetricsServer:
    """Serves *registry* at *address* over HTTP, on any path, until :meth:`close`.

    Raises:
        ConfigError: the address cannot be bound (in use, not on this machine,
            a privileged port), with one line naming the address.
    """

    def __init__(self, address: ListenAddress, registry: CollectorRegistry) -> None:
        self.address = address
        server_class = type(
            "_BoundServer",
            (_Server,),
            {"address_family": socket.AF_INET6 if ":" in address.host else socket.AF_INET},
        )
        try:
            self._httpd: WSGIServer = make_server(
                address.host,
                address.port,
                make_wsgi_app(registry),
                server_class=server_class,
                handler_class=_Handler,
            )
        except OSError as exc:
            raise ConfigError(
                f"metrics: cannot listen on {address}: {exc.strerror or exc}"
            ) from None
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port (waits for the serving loop to end)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.close()
