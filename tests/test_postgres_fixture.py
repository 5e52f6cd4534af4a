"""The private PostgreSQL the ledger tests run against: it starts, isolates and cleans up."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from tests import postgres_fixtures
from tests.servers.postgres import PostgresCluster


def test_each_test_gets_its_own_empty_database(
    postgres: PostgresCluster, postgres_url: str
) -> None:
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            tables = conn.execute(
                text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            ).scalar_one()
            version = conn.execute(text("SHOW server_version_num")).scalar_one()
    finally:
        engine.dispose()
    assert tables == 0
    assert int(str(version)) >= 120000
    assert postgres_url.rsplit("/", 1)[1].startswith("each_test_gets_its_own_empty_database_")


def test_the_server_runs_unprivileged_on_loopback(postgres: PostgresCluster) -> None:
    rows = postgres.execute("SHOW listen_addresses")
    assert rows == [("127.0.0.1",)]
    assert postgres.running


def test_a_dropped_database_is_gone(postgres: PostgresCluster) -> None:
    name = postgres.new_database("gone")
    postgres.drop_database(name)
    rows = postgres.execute(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
    assert rows == []


def test_missing_postgres_skips_locally_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres_fixtures, "find_bindir", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="install the Debian package postgresql"):
        postgres_fixtures.require_postgres()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        postgres_fixtures.require_postgres()
