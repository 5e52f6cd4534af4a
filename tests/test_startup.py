"""What a cron ``popsync sync`` pays before it talks to the server.

A poll with nothing new is mostly start-up.  Alembic (schema migrations) is
needed only when the ledger's schema revision is not current, and the
scheduler only by ``popsync run``: a sync of an up-to-date ledger must import
neither.  The probe runs the real command line in a child process against the
project's test server, then lists the modules it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import run_sync, write_config

pytestmark = pytest.mark.timeout(60)

#: Packages a nothing-new ``popsync sync`` must not import.
NOT_FOR_SYNC = ("alembic", "mako", "apscheduler", "sqlalchemy.orm", "popsync.daemon")

PROBE = """
import json, sys
from popsync.cli import main
code = main(["-c", sys.argv[1], "sync", "--no-progress"])
heavy = sorted({m for m in sys.modules for p in %r if m == p or m.startswith(p + ".")})
print(json.dumps({"code": code, "heavy": heavy}))
"""


def modules_after_sync(config: Path) -> tuple[int, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE % (NOT_FOR_SYNC,), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["code"], result["heavy"]


def test_sync_of_an_up_to_date_ledger_imports_no_migrations_or_scheduler(tmp_path: Path) -> None:
    with POP3TestServer(MailStore(generate_messages(3, 800, seed=5))) as srv:
        config = write_config(tmp_path, [{"name": "acct", "port": srv.port}])
        first = run_sync(config)  # creates the ledger: the schema is made here
        assert first.returncode == 0, first.stderr
        code, heavy = modules_after_sync(config)
    assert code == 0
    assert heavy == []
