"""Alembic environment for the popsync ledger.

Two ways in:

* popsync itself (``popsync.ledger.upgrade``) puts an open connection, already
  inside a ``BEGIN IMMEDIATE`` transaction, into ``config.attributes
  ["connection"]``; the migrations run on it and popsync commits. No ini file,
  no logging set-up: the application owns logging.
* a developer runs ``alembic -x url=sqlite:////path/ledger.db upgrade head``
  (or sets ``sqlalchemy.url`` in ``alembic.ini``) from the repository root; the
  engine then comes from ``create_ledger_engine`` so the same pragmas apply,
  and the same schema lock is taken as popsync takes (``lock_schema``).

``render_as_batch`` lets later revisions ALTER tables on SQLite (copy-and-move).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from popsync.ledger.engine import (
    WRITE_OPTION,
    create_ledger_engine,
    lock_schema,
    parse_url,
    prepare_sqlite_file,
)
from popsync.ledger.models import metadata

config = context.config
target_metadata = metadata


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        **kwargs,
    )


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("no ledger URL: pass -x url=sqlite:////path/to/ledger.db")
    return url


def run_migrations_offline() -> None:
    """Emit the SQL to stdout (``alembic upgrade head --sql``)."""
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    shared = config.attributes.get("connection")
    if shared is not None:
        _run_on(shared)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name)
    url = parse_url(_url())
    prepare_sqlite_file(url)
    engine = create_ledger_engine(url)
    try:
        with engine.connect() as connection:
            connection.execution_options(**{WRITE_OPTION: True})
            with connection.begin():
                lock_schema(connection)
                _run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
