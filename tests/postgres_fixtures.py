"""Pytest fixtures for a real PostgreSQL ledger.

Registered from ``tests/conftest.py`` with ``pytest_plugins``.

* ``postgres`` (session): one private :class:`~tests.servers.postgres.PostgresCluster`
  on 127.0.0.1 (a free port), started on first use and stopped at the end.
* ``postgres_url`` (function): the SQLAlchemy URL of a new, empty database on
  it (``postgresql+psycopg://popsync@127.0.0.1:PORT/NAME``), dropped afterwards.
* ``ledger_url`` (function, parametrized ``sqlite`` / ``postgresql``): the URL
  of a ledger that does not exist yet: a file in ``tmp_path``, or an empty
  PostgreSQL database. A test that takes it runs once on each backend.

Every test that uses any of these gets the ``postgresql`` marker (for
``ledger_url``, only its PostgreSQL case), so ``-m "not postgresql"`` leaves
them out.

Policy when PostgreSQL is not installed: skip with the reason, except when the
environment variable ``CI`` is set (non-empty): then fail, because in CI these
tests must run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.postgres import PostgresCluster, PostgresError, find_bindir

BACKENDS = ("sqlite", "postgresql")

_FIXTURES = frozenset({"postgres", "postgres_url"})


def require_postgres() -> None:
    """Skip the calling test if PostgreSQL or psycopg is missing; fail it when ``CI`` is set."""
    reason = None
    if find_bindir() is None:
        reason = "PostgreSQL server binaries (initdb, postgres) not found; install the Debian "
        reason += "package postgresql (scripts/test.sh does)"
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            reason = "psycopg is not installed; pip install -e '.[test]'"
    if reason is None:
        return
    message = f"real PostgreSQL not available: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so PostgreSQL tests must run)", pytrace=False)
    pytest.skip(message)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        on_pg = callspec is not None and callspec.params.get("ledger_url") == "postgresql"
        if names & _FIXTURES or on_pg:
            item.add_marker(pytest.mark.postgresql)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A running private PostgreSQL, shared by the session."""
    require_postgres()
    try:
        cluster = PostgresCluster().__enter__()
    except PostgresError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def postgres_url(postgres: PostgresCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new, empty database on the shared PostgreSQL, as a SQLAlchemy URL."""
    if not postgres.running:
        pytest.fail("the shared PostgreSQL has died:\n" + postgres.log_tail(), pytrace=False)
    name = postgres.new_database(request.node.name.split("[")[0].removeprefix("test_"))
    yield postgres.url(name)
    postgres.drop_database(name)


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ledger URL that does not exist yet, on each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'ledger.db'}"
    return str(request.getfixturevalue("postgres_url"))
