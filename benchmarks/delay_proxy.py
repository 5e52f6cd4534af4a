"""A userspace TCP proxy on loopback that delays every chunk by a fixed time.

Used by the benchmark's dataset D to put a round-trip time between a POP3
client and the private Dovecot without touching the kernel's network setup
(no ``tc netem``, no root, no traffic off the machine).

Contract
--------
* Listens on ``127.0.0.1`` only and connects only to ``127.0.0.1:<target>``.
* Every chunk read on one side is written to the other side *delay* seconds
  after it arrived, in arrival order.  The delay applies per direction, so
  a round trip costs ``2 * delay``.  Bytes are forwarded untouched: TLS passes
  through end to end (the server's certificate names 127.0.0.1, which is
  still what the client connects to).
* Bounded: at most ``MAX_CONNECTIONS`` connections at once (more are
  refused), at most ``QUEUE_CHUNKS`` chunks of at most ``CHUNK`` bytes in
  flight per direction -- a full queue stops reading, so TCP flow control
  pushes back on the sender instead of the proxy growing.
* Stops by itself: when its standard input reaches end of file (its parent
  died or closed the pipe), on SIGTERM/SIGINT, after ``--max-seconds`` in
  total, or after ``--idle-seconds`` with no connection open.

Run as a program it prints ``LISTENING <port>`` on standard output once it
accepts connections; :class:`DelayProxyProcess` starts it that way and reads
the port, so the proxy's CPU time is never charged to the benchmark process
or to the client under test.

    python benchmarks/delay_proxy.py --target-port 995 [--delay-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"
CHUNK = 64 * 1024
QUEUE_CHUNKS = 256
MAX_CONNECTIONS = 64
CONNECT_TIMEOUT = 10.0
_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 5.0

#: Marks the end of one direction's stream in its queue.
_EOF = b""


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Forward *reader* to *writer*, each chunk *delay* seconds after it arrived.

    A reading task and a writing task joined by a bounded queue: the reader
    stamps each chunk with its due time, the writer sleeps until then.  Due
    times are non-decreasing, so order is kept and the delay is not cumulative.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=QUEUE_CHUNKS)

    async def read_side() -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                await queue.put((loop.time() + delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            await queue.put((loop.time() + delay, _EOF))

    async def write_side() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is _EOF or not data:
                # Half-close: the peer sees end of stream, the other direction
                # keeps flowing (a POP3 client may close first after QUIT).
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    reading = asyncio.create_task(read_side())
    try:
        await write_side()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
            await reading


class _Proxy:
    """The asyncio server: accepts, connects upstream, runs two pumps per connection."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.active = 0
        self.last_activity = time.monotonic()

    async def handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        # A connection still open when the proxy stops is cancelled; that is
        # the end of its story, not an error for asyncio to log.
        with contextlib.suppress(asyncio.CancelledError):
            await self._relay(c_reader, c_writer)

    async def _relay(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self.active >= MAX_CONNECTIONS:
            c_writer.close()
            return
        self.active += 1
        self.last_activity = time.monotonic()
        _nodelay(c_writer)
        try:
            s_reader, s_writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, self.target_port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            self.active -= 1
            c_writer.close()
            return
        _nodelay(s_writer)
        try:
            await asyncio.gather(
                _pump(c_reader, s_writer, self.delay),
                _pump(s_reader, c_writer, self.delay),
                return_exceptions=True,
            )
        finally:
            for w in (c_writer, s_writer):
                w.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await w.wait_closed()
            self.active -= 1
            self.last_activity = time.monotonic()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    """No Nagle on the proxy's sockets: the only delay added is the one asked for."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve(
    target_port: int,
    delay: float,
    *,
    listen_port: int = 0,
    max_seconds: float = 3600.0,
    idle_seconds: float = 600.0,
    watch_stdin: bool = True,
) -> None:
    """Run the proxy until one of the stop conditions of the module docstring."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if watch_stdin:
        # A daemon thread blocks on stdin; EOF means the parent is gone.
        def watch() -> None:
            with contextlib.suppress(OSError, ValueError):
                while sys.stdin.buffer.read(4096):
                    pass
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch, daemon=True).start()
    proxy = _Proxy(target_port, delay)
    server = await asyncio.start_server(proxy.handle, HOST, listen_port, limit=CHUNK)
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)
    started = time.monotonic()
    async with server:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            now = time.monotonic()
            if now - started > max_seconds:
                break
            if proxy.active == 0 and now - proxy.last_activity > idle_seconds:
                break
        server.close()


class DelayProxyProcess:
    """The proxy as a child process; a context manager that yields its port.

    Raises (from :meth:`start`):
        RuntimeError: the proxy did not report its port within 15 s.
    """

    def __init__(self, target_port: int, delay: float, *, max_seconds: float = 3600.0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.max_seconds = max_seconds
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--target-port",
                str(self.target_port),
                "--delay-ms",
                str(self.delay * 1000),
                "--max-seconds",
                str(self.max_seconds),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        # Bounded wait for the one line; a watchdog kills a proxy that stays silent.
        timer = threading.Timer(_START_TIMEOUT, self._proc.kill)
        timer.start()
        try:
            line = self._proc.stdout.readline().decode("ascii", "replace").split()
        finally:
            timer.cancel()
        if len(line) != 2 or line[0] != "LISTENING":
            self.stop()
            raise RuntimeError("delay proxy did not start")
        self.port = int(line[1])
        return self.port

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the proxy's own "parent gone" signal
        proc.terminate()
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--listen-port", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=10.0, help="per direction (default 10)")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    parser.add_argument("--idle-seconds", type=float, default=600.0)
    parser.add_argument("--no-stdin-watch", action="store_true")
    args = parser.parse_args(argv)
    asyncio.run(
        serve(
            args.target_port,
            args.delay_ms / 1000,
            listen_port=args.listen_port,
            max_seconds=args.max_seconds,
            idle_seconds=args.idle_seconds,
            watch_stdin=not args.no_stdin_watch,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
