"""Several popsync processes sharing one PostgreSQL ledger: starting together,
locking accounts against each other, and what ``check`` says about targets.

Real ``popsync`` processes (``sys.executable -m popsync``) against the
project's POP3 test server and the private PostgreSQL the tests start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import maildir_contents, write_config
from tests.servers.postgres import PostgresCluster

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def popsync_process(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "popsync", "-c", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
    )


@pytest.fixture
def server() -> Iterator[POP3TestServer]:
    with POP3TestServer(MailStore(generate_messages(3, 800, seed=7))) as srv:
        yield srv


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(2))
def test_six_workers_starting_together_on_an_empty_database_all_succeed(
    tmp_path: Path, server: POP3TestServer, postgres: PostgresCluster, round_: int
) -> None:
    """Each first start checks the schema, finds none and creates it; only one may."""
    name = postgres.new_database("race")
    try:
        config = write_config(
            tmp_path, [{"name": "acct", "port": server.port}], ledger_url=postgres.url(name)
        )
        procs = [popsync_process(config, "sync", "--no-progress") for _ in range(6)]
        outputs = [p.communicate(timeout=90) for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, outputs
        # One of them fetched (the others found the account busy, or nothing new).
        assert sum(maildir_contents(tmp_path / "Maildir" / "acct").values()) == 3
    finally:
        postgres.drop_database(name)
