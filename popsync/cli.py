"""The command line (docs/design.md §5).

    popsync [-c CONFIG] sync [--dry-run | --refetch] [ACCOUNT ...]
                                             one poll of all (or the named) accounts
    popsync [-c CONFIG] run                  the daemon, in the foreground
    popsync [-c CONFIG] check [--online]     validate the config; --online also logs in
    popsync [-c CONFIG] status [--json] [ACCOUNT ...]
                                             per account: last poll, result, counts
    popsync [-c CONFIG] verify [--json] [--deep] [ACCOUNT ...]
                                             read-only: is every server message held here?
    popsync [-c CONFIG] db upgrade           bring the ledger's schema up to date
    popsync [-c CONFIG] import ACCOUNT --from fetchmail|getmail|mpop FILE [--dry-run]
                                             adopt what another tool already fetched
    popsync [-c CONFIG] serverinfo [--json] ACCOUNT
                                             greeting, TLS, certificate, CAPA, STAT
    popsync [-c CONFIG] auth ACCOUNT         OAuth2: authorize once, store the tokens
    popsync [-c CONFIG] set-password ACCOUNT store the account's secret in the keyring
    popsync demo                             a built-in server, sample mail, a real sync
    popsync completion bash|zsh              print a shell completion script (needs shtab)

The global options (-c, -v, -q, --log-format) may come before or after the
command.  Exit status: 0 all good; 1 at least one account's poll did not
complete; 2 the config or the command line is wrong.  Every problem is one
line on stderr naming the account -- never a traceback for a user mistake or
a server fault.  ``-q`` prints nothing but those problems, so cron mails the
user only when something is wrong.  Imports are lazy so that a cron
``popsync sync`` starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from popsync import __version__
from popsync.errors import ConfigError, PopsyncError

if TYPE_CHECKING:
    from popsync.config import Config
    from popsync.ledger import Ledger, PollRecord
    from popsync.ledger.leases import LeaseRow
    from popsync.retention import Retention
    from popsync.sync import PollReport

EXIT_OK = 0
EXIT_POLL_FAILED = 1
EXIT_USAGE = 2

_EXITS = {
    "sync": "0 every account polled (or another popsync is polling it right now); "
    "1 a poll failed; 2 config or usage error (--refetch for an account that is not a "
    "Maildir included)",
    "run": "0 stopped cleanly; 2 config or usage error",
    "check": "0 the config is valid (with --online: and every account logged in); "
    "1 with --online, an account could not connect or log in; "
    "2 the config is not valid (one line per problem)",
    "serverinfo": "0 connected and logged in; 1 a network, TLS or login failure (what "
    "was learnt before it is still shown); 2 config or usage error",
    "status": "0 every account's last poll succeeded (or it was never polled); "
    "1 an account's last poll failed (a permanent failure pauses it in `popsync run`); "
    "2 config or usage error",
    "db": "0 the schema is up to date; 2 config or usage error",
    "auth": "0 the tokens are stored; 1 the authorization failed or timed out; "
    "2 config or usage error",
    "demo": "0 the demo synced its sample mail; 1 it did not",
    "set-password": "0 stored; 1 no usable keyring (the line says how to get one); "
    "2 config error, unknown account, or the two entries differ",
    "completion": "0 the script was printed; 1 shtab is not installed",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2 (argparse's own default code)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"popsync: {message} (see popsync --help)\n")


def _add_global_options(parser: argparse.ArgumentParser, *, sub_level: bool) -> None:
    """-c, -v, -q and --log-format on *parser*.  The copies on each command's
    parser default to SUPPRESS, so ``popsync -v sync`` keeps the -v given first."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if sub_level else value

    parser.add_argument(
        "-c",
        "--config",
        default=default(None),
        help="config file (default: $POPSYNC_CONFIG, else $XDG_CONFIG_HOME/popsync/config.yaml)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="more log output: -v each step, -vv the protocol dialog (secrets redacted)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="print only errors (for cron: no output unless something is wrong)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=default("text"),
        help="text: one readable line per event (default); json: one JSON object per "
        "line, with the account and counts as fields",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="popsync",
        description="Fetch POP3 mail exactly once into Maildirs.",
        epilog="Exit status: 0 all good; 1 an account's poll failed (or, for status, its "
        "last poll did); 2 the config or the command line is wrong.  "
        "See `popsync COMMAND --help`.",
    )
    parser.add_argument("--version", action="version", version=f"popsync {__version__}")
    _add_global_options(parser, sub_level=False)
    common = _Parser(add_help=False)
    _add_global_options(common, sub_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add_parser(name: str, **kwargs: str) -> argparse.ArgumentParser:
        if name in _EXITS:
            kwargs.setdefault("epilog", f"Exit status: {_EXITS[name]}.")
        return sub.add_parser(name, parents=[common], **kwargs)  # type: ignore[arg-type]

    p_sync = add_parser("sync", help="poll all (or the named) accounts once, then exit")
    p_sync.add_argument(
        "accounts",
        nargs="*",
        metavar="ACCOUNT",
        help="an account's name, as in the config (default: all accounts)",
    )
    p_sync.add_argument("--no-progress", action="store_true", help="no progress bar")
    sync_mode = p_sync.add_mutually_exclusive_group()
    sync_mode.add_argument(
        "--refetch",
        action="store_true",
        help="also fetch again the messages delivered earlier whose Maildir file is missing "
        "or damaged, if the server still holds them unchanged (maildir targets only)",
    )
    sync_mode.add_argument(
        "--dry-run",
        action="store_true",
        help="connect, log in and list, then print what a poll would fetch, skip, delete "
        "and remap; change nothing (no RETR, no DELE, the ledger and Maildir untouched)",
    )
    p_run = add_parser("run", help="run the daemon in the foreground")
    p_run.add_argument(
        "--max-concurrent", type=int, default=4, metavar="N", help="polls at once (default 4)"
    )
    p_run.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long polls in flight may finish after SIGTERM (default 30)",
    )
    p_check = add_parser("check", help="validate the config file")
    p_check.add_argument(
        "--online",
        action="store_true",
        help="also connect, negotiate TLS and log in to each account (STAT and QUIT; "
        "never RETR or DELE, no ledger writes)",
    )
    p_info = add_parser(
        "serverinfo",
        help="what the account's server says about itself",
        description="Connects as the account's TLS settings say and shows the greeting, "
        "TLS version and cipher, the certificate (subject, issuer, validity, SHA-256 "
        "fingerprint), CAPA, SASL mechanisms, LOGIN-DELAY and EXPIRE, then logs in and "
        "shows STAT's message count and size.  Never RETR or DELE; the ledger and the "
        "Maildir are not touched.",
    )
    p_info.add_argument("account", metavar="ACCOUNT", help="the account, as named in the config")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_status = add_parser("status", help="show each account's last poll")
    p_status.add_argument("--json", action="store_true", help="machine-readable output")
    p_status.add_argument(
        "accounts", nargs="*", metavar="ACCOUNT", help="accounts to show (default: all)"
    )
    p_verify = add_parser(
        "verify",
        help="read-only: is every message on the server held intact here?",
        description=(
            "Lists each account's server (UIDL, LIST; never RETR or DELE) and checks "
            "every message against the ledger and its local copy, re-hashing Maildir "
            "files.  Exit 0: every message is held (or imported); 1: something is "
            "missing, damaged, never fetched, skipped or the check failed; 2: usage."
        ),
    )
    p_verify.add_argument(
        "accounts", nargs="*", metavar="ACCOUNT", help="accounts to verify (default: all)"
    )
    p_verify.add_argument("--json", action="store_true", help="machine-readable output")
    p_verify.add_argument(
        "--deep",
        action="store_true",
        help="also compare each message's headers (TOP n 0) to catch reused unique-ids",
    )
    p_db = add_parser("db", help="ledger maintenance")
    p_db.add_argument("action", choices=("upgrade",))
    p_import = add_parser(
        "import",
        help="adopt the messages fetchmail, getmail or mpop already fetched, so they are "
        "never fetched again",
        description="Read another POP3 client's state file and record this account's "
        "unique-ids in it as delivered (with no local copy): popsync will not fetch them, "
        "and never deletes them from the server. Only entries for the account's username "
        "at its host (and port, where the file records one) are adopted. Exit 0: done; "
        "2: the file cannot be read or parsed, or holds nothing for the account (the "
        "ledger is then unchanged).",
    )
    p_import.add_argument("account", metavar="ACCOUNT", help="the account, as named in the config")
    p_import.add_argument(
        "--from",
        dest="tool",
        required=True,
        choices=("fetchmail", "getmail", "mpop"),
        help="the tool that wrote FILE",
    )
    p_import.add_argument(
        "file",
        metavar="FILE",
        help="fetchmail's .fetchids (--idfile), getmail's oldmail-SERVER-PORT-USERNAME, "
        "or mpop's UIDLs file (uidls_file)",
    )
    p_import.add_argument(
        "--dry-run", action="store_true", help="show what would be adopted; change nothing"
    )
    p_auth = add_parser(
        "auth",
        help="OAuth2: authorize popsync once for an account and store its tokens (prints "
        "a URL and a code, or a URL to open; needs no input)",
    )
    p_auth.add_argument("account", metavar="ACCOUNT", help="an account with an oauth2 block")
    p_auth.add_argument(
        "--wait",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the browser to come back (code flow; default 300)",
    )
    p_setpw = add_parser(
        "set-password",
        help="store an account's password (or token) in the desktop keyring",
        description="Prompt for the secret (twice, without echo) and store it in the "
        "keyring under service 'popsync', user ACCOUNT, where password_keyring: true "
        "reads it. Without a terminal, one line is read from stdin. Never give a "
        "secret on the command line.",
    )
    p_setpw.add_argument("account", metavar="ACCOUNT", help="the account, as named in the config")
    p_demo = add_parser("demo", help="sync sample mail from a built-in server")
    p_demo.add_argument("--dir", help="keep the demo's files here (default: a temp dir)")
    p_completion = add_parser(
        "completion",
        help="print the shell completion script for bash or zsh",
        description="Print a completion script (made by shtab from this command line) "
        'for SHELL: `eval "$(popsync completion bash)"` in ~/.bashrc, or save the zsh '
        "one as _popsync in a directory of $fpath.  Needs shtab (`popsync[completion]`).",
    )
    p_completion.add_argument("shell", metavar="SHELL", choices=("bash", "zsh"), help="bash or zsh")
    return parser


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911, PLR0912 - one return per command
    args = build_parser().parse_args(argv)
    from popsync.logs import setup_logging

    setup_logging(verbosity=-1 if args.quiet else args.verbose, fmt=args.log_format)
    try:
        if args.command == "demo":
            from popsync.demo import run_demo

            return run_demo(Path(args.dir) if args.dir else None, run_command=main)
        if args.command == "completion":
            return _completion(args.shell)
        with _start_up(freeze=args.command == "sync"):
            config = _load(args.config)
        if args.command == "check":
            return _check(config, online=args.online)
        if args.command == "serverinfo":
            return _serverinfo(config, args.account, as_json=args.json)
        if args.command == "sync" and args.dry_run:
            return _dry_run(config, args.accounts)
        if args.command == "sync":
            return _sync(config, args.accounts, progress=not args.no_progress, refetch=args.refetch)
        if args.command == "status":
            return _status(config, args.accounts, as_json=args.json)
        if args.command == "verify":
            return _verify(config, args.accounts, as_json=args.json, deep=args.deep)
        if args.command == "auth":
            return _auth(config, args.account, wait=args.wait)
        if args.command == "import":
            return _import(config, args.account, args.tool, Path(args.file), dry_run=args.dry_run)
        if args.command == "set-password":
            return _set_password(config, args.account)
        if args.command == "db":
            _open_ledger(config).close()
            _say(f"ledger {config.ledger_shown}: schema is up to date")
            return EXIT_OK
        if args.command == "run":
            from popsync.daemon import run_daemon

            if not args.quiet:  # a daemon's default output is one line per poll
                setup_logging(
                    verbosity=args.verbose + 1, fmt=args.log_format, steps_verbosity=args.verbose
                )
            status: int = run_daemon(
                config,
                config_path=_config_path(args.config),
                max_concurrent=args.max_concurrent,
                grace=args.grace,
            )
            return status
    except ConfigError as exc:
        _problem(str(exc))
        return EXIT_USAGE
    except PopsyncError as exc:
        _problem(str(exc))
        return EXIT_POLL_FAILED
    except KeyboardInterrupt:
        _problem("interrupted")
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def _completion(shell: str) -> int:
    """Print shtab's completion script for *shell*; 1 if shtab is missing."""
    try:
        import shtab
    except ImportError:
        _problem(
            "completion: needs shtab: pip install 'popsync[completion]' (or use the "
            "scripts installed in share/bash-completion and share/zsh)"
        )
        return EXIT_POLL_FAILED
    print(shtab.complete(build_parser(), shell=shell))
    return EXIT_OK


def _problem(text: str, **fields: object) -> None:
    """Each line of *text* as one error record: ``popsync: LINE`` on stderr (or JSON)."""
    log = logging.getLogger("popsync")
    for line in text.splitlines() or [text]:
        log.error("%s", line, extra={"plain": True, **fields})


def _say(text: str, **fields: object) -> None:
    """A result line on stdout (or JSON); ``-q`` silences it."""
    from popsync.logs import REPORT_LOGGER

    logging.getLogger(REPORT_LOGGER).info("%s", text, extra=fields)


@contextmanager
def _start_up(*, freeze: bool) -> Iterator[None]:
    """Import modules and load the config with the cyclic collector off.

    What start-up makes (modules, classes, the config) lives as long as the
    process: collections during it free nothing, yet walk an ever larger
    heap (about 80 ms of a sync's start-up).  With *freeze*, it is then
    left out of later collections too (:func:`gc.freeze`): a poll of a
    large mailbox builds tens of thousands of tuples, and each collection
    of the oldest generation they trigger would walk every module again.
    The collector is enabled again on the way out, if it was.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()


def _config_path(cli_value: str | None) -> Path:
    from popsync.config import resolve_config_path

    return resolve_config_path(cli_value)


def _load(cli_value: str | None) -> Config:
    from popsync.config import load_config

    return load_config(_config_path(cli_value))


def _open_ledger(config: Config) -> Ledger:
    from popsync.ledger import Ledger

    return Ledger.open(config.ledger_url)


def _set_password(config: Config, name: str) -> int:
    """``set-password``: read the secret (prompt or stdin line), store it in the keyring."""
    from popsync.keyring_secrets import backend_problem, store_keyring_secret

    (account,) = config.select([name])
    problem = backend_problem()  # before the prompt: do not ask for nothing
    if problem:
        _problem(problem)
        return EXIT_POLL_FAILED
    secret = _new_secret(account.name)
    try:
        store_keyring_secret(account.name, secret)
    except ValueError as exc:
        _problem(str(exc))
        return EXIT_POLL_FAILED
    _say(f"account {account.name!r}: secret stored in the keyring (service 'popsync')")
    if not account.password_keyring:
        _problem(
            f"account {account.name!r}: note: it does not read the keyring yet; "
            "set password_keyring: true (instead of its other password key)"
        )
    return EXIT_OK


def _new_secret(name: str) -> str:
    """The secret to store: typed twice at a terminal (no echo), else stdin's
    first line.  ConfigError if empty, different, or not one clean line."""
    import getpass

    from popsync.credentials import LINE_BREAKERS, MAX_PASSWORD_FILE_BYTES

    if sys.stdin.isatty():
        secret = getpass.getpass(f"Password for account {name!r}: ")
        if getpass.getpass("Again, to be sure: ") != secret:
            raise ConfigError(f"account {name!r}: the two entries differ; nothing stored")
    else:
        raw = sys.stdin.buffer.readline(MAX_PASSWORD_FILE_BYTES)
        try:
            secret = raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"account {name!r}: stdin is not UTF-8 text") from None
    if not secret or LINE_BREAKERS.intersection(secret):
        raise ConfigError(f"account {name!r}: the secret must be one non-empty line")
    return secret


def _check(config: Config, *, online: bool) -> int:
    """The config is valid (it loaded); with *online*, log in to each account in turn."""
    from popsync.daemon import require_metrics

    require_metrics(config)
    if any(account.oauth2 is not None for account in config.accounts):
        from popsync.oauth.client import require_authlib

        require_authlib()  # else one line: how to install the extra (exit 2)
    names = ", ".join(a.name for a in config.accounts)
    _say(f"{config.source}: OK ({len(config.accounts)} account(s): {names})")
    for warning in config.warnings():
        logging.getLogger("popsync").warning("%s", warning)
    if not online:
        return EXIT_OK
    from popsync.serverinfo import probe
    from popsync.textfmt import format_size

    failed = False
    for account in config.accounts:
        info = probe(account, config.state_dir, details=False)
        if info.error is not None:
            _problem(f"{account.name}: FAILED: {info.error}", account=account.name, result="error")
            failed = True
            continue
        assert info.messages is not None and info.size is not None
        _say(
            f"{account.name}: ok ({info.messages} messages, {format_size(info.size)})",
            account=account.name,
            result="ok",
            listed=info.messages,
            bytes=info.size,
        )
    return EXIT_POLL_FAILED if failed else EXIT_OK


def _serverinfo(config: Config, name: str, *, as_json: bool) -> int:
    """Print what *name*'s server says about itself; exit 1 if a step failed."""
    from popsync.serverinfo import format_info, info_document, probe

    (account,) = config.select([name])
    info = probe(account, config.state_dir)
    if as_json:
        print(json.dumps(info_document(info), indent=2))
    else:
        print("\n".join(format_info(info)))
    if info.error is None:
        return EXIT_OK
    _problem(f"{account.name}: {info.error}", account=account.name, result="error")
    return EXIT_USAGE if info.config_error else EXIT_POLL_FAILED


def _auth(config: Config, name: str, *, wait: float) -> int:
    """``popsync auth ACCOUNT``: the instructions on stdout, even with -q (the
    user must act on them); the tokens never appear anywhere."""
    from popsync.oauth.access import authorize

    (account,) = config.select([name])
    if account.oauth2 is None:
        raise ConfigError(
            f"account {name!r} has no oauth2 block (popsync auth is for auth: xoauth2 or "
            "oauthbearer with oauth2)"
        )
    if not wait > 0:
        raise ConfigError(f"--wait must be more than 0 seconds, not {wait:g}")

    def tell(text: str) -> None:
        print(text, flush=True)

    where = authorize(account, config.state_dir, tell, wait=wait)
    _say(f"account {name!r}: authorized; tokens stored in {where}")
    return EXIT_OK


def _sync(config: Config, names: list[str], *, progress: bool, refetch: bool = False) -> int:
    with _start_up(freeze=True):
        from popsync.sync import REFETCH_NEEDS_MAILDIR, run_account

    accounts = config.select(names) if names else list(config.accounts)
    if refetch and (others := [a for a in accounts if a.target != "maildir"]):
        for account in others:
            _problem(f"{account.name}: {REFETCH_NEEDS_MAILDIR} (it delivers to {account.target})")
        return EXIT_USAGE
    with _start_up(freeze=True):
        ledger = _open_ledger(config)
    failed = 0
    try:
        for account in accounts:
            bar = _ProgressBar(account.name, sys.stderr) if progress else None
            report = run_account(
                account,
                ledger,
                config.state_dir,
                progress=bar.update if bar and bar.enabled else None,
                refetch=refetch,
            )
            if bar:
                bar.close()
            failed += not _tell(report)
    finally:
        ledger.close()
    return EXIT_POLL_FAILED if failed else EXIT_OK


def _dry_run(config: Config, names: list[str]) -> int:
    """Print each account's plan; change nothing (see :mod:`popsync.dryrun`)."""
    from popsync.dryrun import format_preview, preview_account

    accounts = config.select(names) if names else list(config.accounts)
    ledger = _open_existing_ledger(config)
    try:
        previews = [preview_account(account, ledger, config.state_dir) for account in accounts]
    finally:
        if ledger is not None:
            ledger.close()
    for p in previews:
        fields: dict[str, object] = {"account": p.account}
        if p.error is not None:
            _problem(f"{p.account}: FAILED: {p.error}", result="error", **fields)
            continue
        _say(
            format_preview(p),
            result="dry-run",
            new=p.fetch,
            bytes=p.bytes,
            skipped=p.skip,
            deleted=p.delete,
            remapped=p.remap,
            **fields,
        )
    return EXIT_POLL_FAILED if any(p.error is not None for p in previews) else EXIT_OK


def _open_existing_ledger(config: Config) -> Ledger | None:
    """The ledger, or None for a SQLite ledger that does not exist yet (opening
    would create it, and a dry run creates nothing)."""
    from sqlalchemy.engine import make_url

    url = make_url(config.ledger_url)
    uri = url.query.get("uri") in ("true", "1")  # a URI filename: SQLite's to resolve
    if url.get_backend_name() == "sqlite" and not uri and not Path(url.database or "").exists():
        return None
    return _open_ledger(config)


def _verify(config: Config, names: list[str], *, as_json: bool, deep: bool) -> int:
    from popsync.verify import check_document, format_check, verify_account

    accounts = config.select(names)
    ledger = _open_ledger(config)
    try:
        checks = [verify_account(a, ledger, config.state_dir, deep=deep) for a in accounts]
    finally:
        ledger.close()
    if as_json:
        print(json.dumps({"accounts": [check_document(c) for c in checks]}, indent=2))
    else:
        for check in checks:
            lines = format_check(check)
            if check.error is not None:
                _problem(lines[0])
            else:
                print("\n".join(lines))
    return EXIT_OK if all(c.ok for c in checks) else EXIT_POLL_FAILED


def _import(config: Config, name: str, tool: str, path: Path, *, dry_run: bool) -> int:
    """Adopt *name*'s unique-ids from *tool*'s state file *path* (one transaction)."""
    import time

    from popsync.adopt import read_state_file, receipt, select
    from popsync.errors import escape_server_text

    (account,) = config.select([name])
    state = read_state_file(tool, path)
    chosen = select(state, account)
    ledger = _open_ledger(config)
    try:
        # The account's lock: a poll running now must not fetch what is adopted.
        with ledger.account_lock(config.state_dir, account.name, wait=10.0):
            adopted = ledger.adopt(
                account.name,
                chosen.mine,
                target=account.target,
                receipt=receipt(state.tool),
                now=time.time(),
                dry_run=dry_run,
            )
    finally:
        ledger.close()
    if dry_run:
        for uid in adopted:
            _say(f"would adopt {escape_server_text(uid)}", account=account.name)
    verb = "would adopt" if dry_run else "adopted"
    _say(
        f"{account.name}: {verb} {len(adopted)}, already known {len(chosen.mine) - len(adopted)}, "
        f"ignored {chosen.ignored} (other accounts)",
        account=account.name,
    )
    if adopted and account.delete_after_days is not None:
        _say(
            f"{account.name}: note: popsync never deletes adopted messages from the server "
            "(it holds no copy to compare them with); delete_after_days applies to the "
            "messages it fetches itself",
            account=account.name,
        )
    return EXIT_OK


def _tell(report: PollReport) -> bool:
    """Log *report*'s summary line (an error line if it failed); False if it failed.

    Another process holding the account's lock is not a failure: that process
    (usually the daemon) is fetching the mail right now.
    """
    from popsync.locks import AccountBusy

    fields: dict[str, object] = {"account": report.account}
    if isinstance(report.exception, AccountBusy):
        _say(f"{report.error}: skipped, its mail is being fetched", result="busy", **fields)
        return True
    if not report.ok:
        _problem(format_report(report).removeprefix("popsync: "), result="error", **fields)
        return False
    fields.update(dataclasses.asdict(report.counts))  # JSON logs keep those in logs.FIELDS
    if report.refetched is not None:
        fields["refetched"] = report.refetched
    _say(format_report(report), result="ok", seconds=round(report.seconds, 3), **fields)
    return True


def format_report(report: PollReport) -> str:
    """The one summary line of a poll."""
    from popsync.sync import format_summary

    if not report.ok:
        kind = "temporary" if report.temporary else "needs attention"
        return f"popsync: {report.account}: FAILED ({kind}): {report.error}"
    return f"{report.account}: {format_summary(report)}"


class _ProgressBar:
    """A one-line progress display on a terminal, for long polls only."""

    def __init__(self, account: str, stream: TextIO) -> None:
        self.account = account
        self.stream = stream
        self.enabled = stream.isatty() and os.environ.get("TERM") != "dumb"
        self.shown = False

    def update(self, done: int, total: int, nbytes: int) -> None:
        from popsync.textfmt import format_size

        if total < 50:  # short polls need no bar
            return
        width = 30
        filled = width * done // max(total, 1)
        line = (
            f"\r{self.account}: [{'#' * filled}{'.' * (width - filled)}] "
            f"{done}/{total} {format_size(nbytes)}"
        )
        self.stream.write(line)
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _status(config: Config, names: list[str], *, as_json: bool) -> int:
    """Each named (default: every) account's last poll.  Exit 1 when any of
    them last failed -- a permanent failure is what pauses an account in the
    daemon, whose pause lives only in its memory -- else 0."""
    import time

    from popsync.retention import retention

    accounts = config.select(names)
    chosen = [a.name for a in accounts]
    ledger = _open_ledger(config)
    try:
        polls = ledger.last_polls()
        known = {name: ledger.counts(name) for name in chosen}
        kept = {a.name: retention(ledger, a.name, a.delete_after_days) for a in accounts}
        # Workers sharing a PostgreSQL ledger: who polled each account last,
        # and when it is due (the daemon on SQLite keeps that in the polls).
        leases = ledger.lease_rows() if config.shared_ledger else {}
    finally:
        ledger.close()
    if as_json:
        entries = [_status_entry(n, polls.get(n), known[n], kept[n], leases.get(n)) for n in chosen]
        print(json.dumps({"accounts": entries}, indent=2))
    else:
        now = time.time()
        for name in chosen:
            line = _status_line(
                name, polls.get(name), known[name], kept[name], now, leases.get(name)
            )
            _say(line, account=name)
    failed = any((poll := polls.get(n)) is not None and poll.result == "error" for n in chosen)
    return EXIT_POLL_FAILED if failed else EXIT_OK


def iso_time(when: float | None) -> str | None:
    """*when* (epoch seconds) as ISO 8601 UTC to the second, ``2026-11-27T19:00:00Z``."""
    import time

    if when is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _status_entry(
    name: str,
    poll: PollRecord | None,
    known: dict[str, int],
    kept: Retention,
    lease: LeaseRow | None,
) -> dict[str, object]:
    entry: dict[str, object] = {
        "account": name,
        "ledger": known,
        "deletion": {
            "delete_after_days": kept.delete_after_days,
            "policy": kept.policy,
            "waiting": kept.waiting,
            "next_due_at": iso_time(kept.next_due_at),
        },
        "last_poll": None,
    }
    # The worker (HOST:PID:RANDOM) that claimed the account last; null on SQLite.
    entry["last_owner"] = lease.last_owner if lease is not None else None
    if poll is not None:
        entry["last_poll"] = {
            "started_at": iso_time(poll.started_at),
            "finished_at": iso_time(poll.finished_at),
            "result": poll.result,
            "error": poll.error,
            "temporary": poll.temporary,
            "counts": dataclasses.asdict(poll.counts),
            "next_poll_at": iso_time(_next_poll(poll, lease)),
        }
    return entry


def _next_poll(poll: PollRecord, lease: LeaseRow | None) -> float | None:
    """When the account is due: its lease row's time with shared workers, else the poll's."""
    return lease.next_poll_at if lease is not None else poll.next_poll_at


def _status_line(
    name: str,
    poll: PollRecord | None,
    known: dict[str, int],
    kept: Retention,
    now: float,
    lease: LeaseRow | None,
) -> str:
    from popsync.textfmt import format_duration

    ledger_text = ", ".join(f"{n} {state}" for state, n in sorted(known.items()) if n) or "empty"
    if poll is None:
        return f"{name}: never polled; {kept.text(now)}; ledger: {ledger_text}"
    line = f"{name}: last poll {format_duration(now - poll.started_at)} ago"
    if lease is not None and lease.last_owner:
        line += f" by worker {lease.last_owner}"
    line += f": {poll.result}"
    if poll.error:
        line += f" ({poll.error})"
    if poll.result == "error" and poll.temporary is False:
        # [AUTH], [SYS/PERM], a TLS refusal...: retrying will not help, and the
        # daemon pauses the account until its config entry changes.
        line += "; needs attention: retrying will not help (`popsync run` pauses it)"
    line += f"; fetched {poll.counts.fetched}, deleted {poll.counts.deleted}"
    if poll.counts.remapped:
        line += f", remapped {poll.counts.remapped} (renumbered by the server, not fetched again)"
    if poll.counts.deferred:
        line += f", deferred {poll.counts.deferred} (fetch_limit: fetched by the next polls)"
    next_at = _next_poll(poll, lease)
    if next_at is not None:
        line += f"; next poll in {format_duration(next_at - now)}"
    return f"{line}; {kept.text(now)}; ledger: {ledger_text}"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
