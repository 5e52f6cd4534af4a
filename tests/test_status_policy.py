"""``status`` tells each account's deletion policy in words -- and, for
``delete_after_days: N``, how many delivered messages wait for their day and
when the next is due -- read from a real ledger filled by real polls."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from popsync.cli import iso_time
from popsync.cli import main as cli_main
from popsync.ledger import Ledger
from popsync.plan import DAY
from popsync.retention import Retention
from popsync.sync import run_account
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import load, write_config

pytestmark = pytest.mark.timeout(60)


def status(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(["-c", str(config), "status", *args])
    return code, capsys.readouterr().out


def test_each_policy_in_words_with_what_waits_for_n_days(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stores = {name: MailStore(generate_messages(3, 900, seed=i)) for i, name in enumerate("abc")}
    servers = {name: POP3TestServer(store).start() for name, store in stores.items()}
    try:
        config_path = write_config(
            tmp_path,
            [
                {"name": "mirror", "port": servers["a"].port},
                {"name": "drop", "port": servers["b"].port, "delete_after_days": 0},
                {"name": "week", "port": servers["c"].port, "delete_after_days": 7},
            ],
        )
        code, out = status(config_path, capsys)
        assert code == 0
        lines = dict(line.split(": ", 1) for line in out.splitlines())
        assert lines["mirror"].startswith("never polled; keeps mail on the server;")
        assert lines["drop"].startswith("never polled; deletes after delivery;")
        assert lines["week"].startswith("never polled; deletes 7 days after delivery: nothing")

        config = load(config_path)
        mirror, drop, week = config.accounts
        started = time.time()
        with Ledger.open(config.ledger_url) as ledger:
            for account in (mirror, drop):
                assert run_account(account, ledger, config.state_dir).ok
            # Two messages delivered four days ago, the third one just now.
            first = stores["c"].messages()[2]
            stores["c"].discard([first])
            assert run_account(week, ledger, config.state_dir, now=lambda: started - 4 * DAY).ok
            stores["c"].add(first.data)
            assert run_account(week, ledger, config.state_dir).ok

        code, out = status(config_path, capsys)
        assert code == 0
        lines = dict(line.split(": ", 1) for line in out.splitlines())
        assert "; keeps mail on the server; ledger: 3 delivered" in lines["mirror"]
        assert "; deletes after delivery; ledger: 3 deleted" in lines["drop"]
        assert (
            "; deletes 7 days after delivery: 3 waiting, the next due in 3.0 days;"
            in (lines["week"])
        )

        code, out = status(config_path, capsys, "--json")
        entries = {e["account"]: e["deletion"] for e in json.loads(out)["accounts"]}
        assert entries["mirror"] == {
            "delete_after_days": None,
            "policy": "keeps mail on the server",
            "waiting": None,
            "next_due_at": None,
        }
        assert entries["drop"]["policy"] == "deletes after delivery"
        assert entries["drop"]["delete_after_days"] == 0
        week_entry = entries["week"]
        assert (week_entry["policy"], week_entry["waiting"]) == ("deletes 7 days after delivery", 3)
        with Ledger.open(config.ledger_url) as ledger:
            delivered = min(
                r.delivered_at or 0 for r in ledger.rows("week").values() if r.delivered_at
            )
        assert week_entry["next_due_at"] == iso_time(delivered + 7 * DAY)

        # Three days on, the two old ones are due and deleted; the third one waits.
        with Ledger.open(config.ledger_url) as ledger:
            later = run_account(week, ledger, config.state_dir, now=lambda: started + 3 * DAY)
            assert later.ok and later.counts.deleted == 2
        code, out = status(config_path, capsys, "week")
        assert "deletes 7 days after delivery: 1 waiting, the next due in 7.0 days" in out
    finally:
        for server in servers.values():
            server.stop()


def test_a_message_past_its_day_is_due_at_the_next_poll(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with POP3TestServer(MailStore(generate_messages(2, 700, seed=5))) as server:
        config_path = write_config(
            tmp_path, [{"name": "month", "port": server.port, "delete_after_days": 30}]
        )
        config = load(config_path)
        with Ledger.open(config.ledger_url) as ledger:
            old = time.time() - 31 * DAY
            assert run_account(config.accounts[0], ledger, config.state_dir, now=lambda: old).ok
        code, out = status(config_path, capsys)
    assert code == 0
    assert "deletes 30 days after delivery: 2 waiting, the next due now (at the next poll)" in out


@pytest.mark.parametrize(
    ("retention", "expected"),
    [
        (Retention(None), "keeps mail on the server"),
        (Retention(0), "deletes after delivery"),
        (Retention(1, 0, None), "deletes 1 day after delivery: nothing waiting"),
        (
            Retention(2, 4, 1000.0 + 3600),
            "deletes 2 days after delivery: 4 waiting, the next due in 60 min",
        ),
    ],
)
def test_the_words(retention: Retention, expected: str) -> None:
    assert retention.text(1000.0) == expected


def test_a_deletion_that_cannot_be_confirmed_is_not_waiting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    faults = Faults(errors={"TOP": b"-ERR no TOP here"})
    with POP3TestServer(MailStore(generate_messages(2, 700, seed=6)), faults=faults) as server:
        config_path = write_config(
            tmp_path, [{"name": "month", "port": server.port, "delete_after_days": 30}]
        )
        config = load(config_path)
        with Ledger.open(config.ledger_url) as ledger:
            old = time.time() - 31 * DAY
            assert run_account(config.accounts[0], ledger, config.state_dir, now=lambda: old).ok
            # Due now, but the server refuses TOP: both withheld, left on the server.
            assert run_account(config.accounts[0], ledger, config.state_dir).ok
        assert status(config_path, capsys)[0] == 0
        out = status(config_path, capsys)[1]
    assert "deletes 30 days after delivery: nothing waiting" in out
    assert "ledger: 2 delivered" in out and "2 withheld" in out
