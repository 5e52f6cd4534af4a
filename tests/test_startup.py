"""What a cron ``popsync sync`` pays before it talks to the server.

A poll with nothing new is mostly start-up, so the sync path imports only
what a sync of an up-to-date SQLite ledger uses.  Alembic (schema
migrations) is needed only when the ledger's schema revision is not current;
the scheduler, metrics and the ORM only by ``popsync run``; PostgreSQL's
dialect and driver only by a PostgreSQL ledger or lease mode; Authlib,
keyring and SCRAM only by accounts that use them.  The probe runs the real
command line (``python -X importtime -m popsync ... sync``) in a child
process against the project's test server and reads the modules it loaded
from the interpreter's own import report.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import run_sync, write_config

pytestmark = pytest.mark.timeout(60)

#: Packages a nothing-new ``popsync sync`` of a SQLite ledger must not import,
#: each with what it is for.
NOT_FOR_SYNC = {
    "alembic": "schema upgrades (the schema is current)",
    "mako": "Alembic's templates",
    "apscheduler": "popsync run",
    "prometheus_client": "popsync run's metrics",
    "sqlalchemy.orm": "nothing: the ledger is SQLAlchemy Core",
    "sqlalchemy.ext": "nothing",
    "sqlalchemy.dialects.postgresql": "PostgreSQL ledgers and lease mode",
    "psycopg": "PostgreSQL ledgers",
    "authlib": "OAuth2 accounts",
    "keyring": "password_keyring accounts",
    "scramp": "SCRAM logins",
    "shtab": "popsync completion",
    "popsync.daemon": "popsync run",
    "popsync.metrics": "popsync run",
    "popsync.ledger.locks": "PostgreSQL advisory locks",
    "popsync.oauth.access": "OAuth2 accounts",
    "popsync.oauth.client": "OAuth2 accounts",
    "popsync.dryrun": "sync --dry-run",
    "popsync.verify": "popsync verify and sync --refetch",
    "popsync.refetch": "sync --refetch",
}

_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| +(\S+)$", re.MULTILINE)


def imported_by_sync(config: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``popsync sync`` under ``-X importtime``: its result and every module it imported."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "popsync", "-c", str(config), "sync"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return out, set(_IMPORTED.findall(out.stderr))


def heavy(modules: set[str]) -> dict[str, str]:
    """The modules among *modules* that the sync path must not import, and why."""
    return {
        m: why
        for m in sorted(modules)
        for package, why in NOT_FOR_SYNC.items()
        if m == package or m.startswith(package + ".")
    }


@pytest.fixture
def synced_config(tmp_path: Path) -> Iterator[Path]:
    """A config whose SQLite ledger is current and holds every message the server has."""
    with POP3TestServer(MailStore(generate_messages(3, 800, seed=5))) as srv:
        config = write_config(tmp_path, [{"name": "acct", "port": srv.port}])
        first = run_sync(config)  # creates the ledger: the schema is made here
        assert first.returncode == 0, first.stderr
        yield config


def test_sync_of_an_up_to_date_ledger_imports_only_what_it_uses(synced_config: Path) -> None:
    out, modules = imported_by_sync(synced_config)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "popsync.sync" in modules  # the report is read right: the poll ran
    assert "sqlalchemy.dialects.sqlite" in modules
    assert heavy(modules) == {}


def test_the_probe_sees_a_lazy_module_once_it_is_imported(tmp_path: Path) -> None:
    """The guard above can fail: a module imported on the way, however deep,
    shows up in the report (here the daemon, and the scheduler it imports)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import popsync.daemon"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = heavy(set(_IMPORTED.findall(out.stderr)))
    assert "popsync.daemon" in found
    assert "apscheduler" in {m.split(".")[0] for m in found}


PROBE = """
import gc, json, sys
from popsync.cli import main
early = []  # full collections before start-up froze anything


def watch(phase, info):
    if phase == "start" and info["generation"] == 2 and not gc.get_freeze_count():
        early.append(1)


gc.callbacks.append(watch)
code = main(["-c", sys.argv[1], "sync", "--no-progress"])
print(json.dumps({"code": code, "frozen": gc.get_freeze_count(), "early": len(early),
                  "enabled": gc.isenabled()}))
"""


def test_sync_keeps_start_up_out_of_the_cyclic_collector(synced_config: Path) -> None:
    """Start-up (modules, the config) runs with the cyclic collector off, and
    what it made is frozen before the poll, so neither start-up nor the
    collections a large listing's tuples trigger walk it; the collector is
    on again for the poll."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(synced_config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    assert result["frozen"] > 10_000
    assert result["early"] == 0
    assert result["enabled"]
