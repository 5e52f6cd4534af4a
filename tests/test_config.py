"""Tests for popsync.config: real files, real modes, real subprocesses.

Every error case checks that the message is exactly one line that names the
file, the account and the key, and carries none of pydantic's own text.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from popsync.config import (
    Account,
    AuthMethod,
    Config,
    TlsMode,
    load_config,
    parse_duration,
    parse_size,
    resolve_config_path,
)
from popsync.config.loading import MAX_CONFIG_BYTES
from popsync.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SECRET = "Zq7-s3cr3t-Pw"  # distinctive, so a leak is easy to spot

GOOD = """\
accounts:
  - name: home
    host: pop.example.org
    username: alice
    password_file: home.pass
    maildir: Mail/home
"""


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME and no XDG / POPSYNC variables leaking in from the caller."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("POPSYNC_CONFIG", "XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        monkeypatch.delenv(var, raising=False)
    return home


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def config_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    """A config file in tmp_path, with the password file GOOD refers to."""
    write(tmp_path / "home.pass", SECRET + "\n")
    return write(tmp_path / "popsync.yaml", textwrap.dedent(text), mode)


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def assert_clean(message: str) -> None:
    """No pydantic wording, no URL to pydantic's docs, no secret."""
    for leak in ("Input should", "pydantic", "errors.pydantic.dev", "input_value", SECRET):
        assert leak not in message, message


def account_yaml(**overrides: object) -> str:
    """A one-account config: GOOD with keys replaced (None removes a key)."""
    account: dict[str, object] = {
        "name": "home",
        "host": "pop.example.org",
        "username": "alice",
        "password_file": "home.pass",
        "maildir": "Mail/home",
    }
    for key, value in overrides.items():
        if value is None:
            account.pop(key, None)
        else:
            account[key] = value
    return yaml.safe_dump({"accounts": [account]}, sort_keys=False)


# --------------------------------------------------------------------------
# Good configs


def test_defaults_and_derived_values(tmp_path: Path, clean_env: Path) -> None:
    config = load_config(config_file(tmp_path, GOOD))
    (account,) = config.accounts
    assert account.port == 995
    assert account.tls is TlsMode.IMPLICIT
    assert account.auth is AuthMethod.AUTO
    assert account.allow_plaintext is False
    assert account.maildir == tmp_path / "Mail/home"
    assert account.password_file == tmp_path / "home.pass"
    assert account.ca_file is None
    assert account.delete_after_days is None
    assert account.max_message_size is None
    assert (account.interval, account.timeout) == (300, 60.0)
    assert (account.max_line_length, account.pipeline_window) == (65536, None)
    state = clean_env / ".local/state/popsync"
    assert config.ledger_url == f"sqlite:///{state}/ledger.db"
    assert config.ledger_url.startswith("sqlite:////")
    assert config.state_dir == state
    assert config.source == tmp_path / "popsync.yaml"
    assert account.secret() == SECRET


@pytest.mark.parametrize(("tls", "port"), [("implicit", 995), ("starttls", 110)])
def test_port_default_follows_tls(tmp_path: Path, tls: str, port: int) -> None:
    config = load_config(config_file(tmp_path, account_yaml(tls=tls)))
    assert config.accounts[0].port == port
    assert isinstance(config.accounts[0].port, int)


def test_tls_none_with_consent(tmp_path: Path) -> None:
    path = config_file(tmp_path, account_yaml(tls="none", allow_plaintext=True, auth="apop"))
    account = load_config(path).accounts[0]
    assert (account.tls, account.port, account.auth) == (TlsMode.NONE, 110, AuthMethod.APOP)


def test_xdg_state_home_and_explicit_ledgers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    config = load_config(config_file(tmp_path, GOOD))
    assert config.ledger_url == f"sqlite:///{tmp_path}/state/popsync/ledger.db"
    assert config.state_dir == tmp_path / "state/popsync"

    monkeypatch.setenv("DBDIR", str(tmp_path / "db"))
    cases = {
        "sqlite:///${DBDIR}/l.db": (f"sqlite:///{tmp_path}/db/l.db", tmp_path / "db"),
        "sqlite:///rel/l.db?timeout=5": (
            f"sqlite:///{tmp_path}/rel/l.db?timeout=5",
            tmp_path / "rel",
        ),
        "sqlite+pysqlite:///~/l.db": (
            f"sqlite+pysqlite:///{tmp_path}/home/l.db",
            tmp_path / "home",
        ),
        "sqlite://": ("sqlite://", tmp_path / "state/popsync"),
        "postgresql://u@db.example/popsync": (
            "postgresql://u@db.example/popsync",
            tmp_path / "state/popsync",
        ),
    }
    for url, (want_url, want_state) in cases.items():
        text = GOOD + f"ledger: {url!r}\n"
        config = load_config(config_file(tmp_path, text))
        assert (config.ledger_url, config.state_dir) == (want_url, want_state), url


def test_relative_xdg_state_home_is_ignored(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")  # XDG: must be absolute
    config = load_config(config_file(tmp_path, GOOD))
    assert config.state_dir == clean_env / ".local/state/popsync"


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    text = account_yaml(
        tls="starttls",
        port=1110,
        auth="plain",
        delete_after_days=3,
        interval="1h30m",
        max_message_size="2G",
        timeout="90s",
        max_line_length="8K",
        pipeline_window=256,
    )
    first = load_config(config_file(tmp_path, text))
    dumped = yaml.safe_dump(first.model_dump(mode="json", exclude_unset=False))
    second = load_config(write(tmp_path / "popsync.yaml", dumped))
    assert second == first
    account = second.accounts[0]
    assert (account.interval, account.timeout) == (5400, 90.0)
    assert (account.max_message_size, account.max_line_length) == (2 << 30, 8192)


def test_example_config_loads_and_documents_every_key(tmp_path: Path, clean_env: Path) -> None:
    """config.example.yaml cannot rot: it loads, and every model key appears in it."""
    target = tmp_path / "etc" / "config.yaml"
    target.parent.mkdir()
    shutil.copy(REPO / "config.example.yaml", target)
    target.chmod(0o600)  # it holds a literal password
    write(clean_env / ".config/popsync/home.pass", "from-the-example\n")
    write(clean_env / ".config/popsync/example-net-ca.pem", "not parsed at load time\n")
    write(clean_env / ".config/popsync/me.pem", "not parsed at load time\n", 0o644)
    write(clean_env / ".config/popsync/me.key", "not parsed at load time\n")

    config = load_config(target)

    names = [a.name for a in config.accounts]
    assert names == ["home", "archive", "test", "lists", "filtered", "sieve", "move", "work"]
    assert [a.target for a in config.accounts] == [
        "maildir", "maildir", "maildir", "mbox", "mda", "lmtp", "imap", "maildir"
    ]  # fmt: skip
    used = set().union(*(account.model_fields_set for account in config.accounts))
    assert used >= set(Account.model_fields), set(Account.model_fields) - used
    assert config.model_fields_set >= set(Config.model_fields)
    home, archive, test, *_ = config.accounts
    assert home.secret() == "from-the-example"
    assert home.delete_after_days == 0 and home.tls is TlsMode.IMPLICIT
    assert archive.tls is TlsMode.STARTTLS and archive.password_command
    assert archive.delete_after_days is None and archive.maildir == clean_env / "Mail/archive"
    assert test.maildir == tmp_path / "etc/Mail/test"
    assert config.state_dir == clean_env / ".local/state/popsync"


# --------------------------------------------------------------------------
# One clear line per problem

ERROR_CASES: list[tuple[dict[str, object], str, str]] = [
    # (overrides, key named in the message, phrase expected)
    ({"port": 0}, "port", "must be between 1 and 65535"),
    ({"port": 70000}, "port", "must be between 1 and 65535"),
    ({"port": "pop3"}, "port", "must be a whole number"),
    ({"port": True}, "port", "must be a whole number"),
    ({"tls": "ssl"}, "tls", "must be one of 'implicit', 'starttls' or 'none'"),
    ({"tls": False}, "tls", "must be one of"),
    ({"auth": "digest-md5"}, "auth", "must be one of"),
    ({"tls": "none"}, "tls", "allow_plaintext: true"),
    ({"tls": "none", "allow_plaintext": False}, "tls", "in clear"),
    ({"allow_plaintext": "maybe"}, "allow_plaintext", "must be true or false"),
    ({"host": None}, "host", "missing"),
    ({"host": "pop example"}, "host", "without spaces"),
    ({"username": None}, "username", "missing"),
    ({"username": "alice\r\nDELE 1"}, "username", "line breaks"),
    ({"username": 123}, "username", "must be text (put it in quotes)"),
    ({"maildir": None}, "maildir", "missing"),
    ({"maildir": ""}, "maildir", "must not be empty"),
    ({"maildir": "$POPSYNC_TEST_UNSET/x"}, "maildir", "$POPSYNC_TEST_UNSET is not set"),
    ({"maildir": "${POPSYNC_TEST_UNSET}"}, "maildir", "$POPSYNC_TEST_UNSET is not set"),
    ({"maildir": "price$"}, "maildir", "$$"),
    ({"maildir": "~nosuchuser-popsync/x"}, "maildir", "unknown user"),
    ({"ca_file": "missing-ca.pem"}, "ca_file", "no such file"),
    ({"password_file": "nowhere.pass"}, "password_file", "No such file"),
    ({"password_file": None}, "password", "give one of password, password_file"),
    ({"password": SECRET}, "password, password_file", "only one of"),
    ({"password_file": None, "password": 1234}, "password", "must be text"),
    ({"password_file": None, "password": SECRET + "\nDELE 1"}, "password", "line breaks"),
    ({"password_command": "echo hi"}, "password_file, password_command", "only one of"),
    ({"password_file": None, "password_command": "get 'pw"}, "password_command", "quotation"),
    ({"password_file": None, "password_command": "  "}, "password_command", "must not be empty"),
    ({"delete_after_days": -1}, "delete_after_days", "must be at least 0"),
    ({"delete_after_days": 1.5}, "delete_after_days", "must be a whole number"),
    ({"interval": 0}, "interval", "must be at least 1"),
    ({"interval": "5x"}, "interval", "such as 90s, 5m, 1h30m"),
    ({"interval": 2.5}, "interval", "whole number of seconds"),
    ({"interval": "400d"}, "interval", "at most 366 days"),
    ({"timeout": 0}, "timeout", "more than 0 seconds"),
    ({"timeout": "-5"}, "timeout", "such as 90s"),
    ({"max_message_size": 0}, "max_message_size", "must be at least 1"),
    ({"max_message_size": "5T"}, "max_message_size", "K, M or G"),
    ({"max_line_length": 100}, "max_line_length", "must be at least 1024"),
    ({"pipeline_window": 0}, "pipeline_window", "between 1 and 256"),
    ({"pipeline_window": 257}, "pipeline_window", "between 1 and 256"),
    ({"pasword": "x"}, "pasword", "unknown key (did you mean 'password'?)"),
    ({"colour": "blue"}, "colour", "unknown key"),
]


@pytest.mark.parametrize(("overrides", "key", "phrase"), ERROR_CASES)
def test_each_error_is_one_clear_line(
    tmp_path: Path, overrides: dict[str, object], key: str, phrase: str
) -> None:
    path = config_file(tmp_path, account_yaml(**overrides))
    message = load_error(path)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: account 'home': {key}: "), message
    assert phrase in message, message
    assert_clean(message)


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("home/../x", "letters, digits"),
        ("x" * 65, "1-64"),
        ("..", "must not start with '.'"),
        (".hidden", "must not start with '.'"),
        ("", "1-64"),
    ],
)
def test_bad_account_names_are_named_by_index(tmp_path: Path, name: str, phrase: str) -> None:
    path = config_file(tmp_path, account_yaml(name=name))
    message = load_error(path)
    assert message.startswith(f"{path}: account #1: name: "), message
    assert phrase in message and "\n" not in message


@pytest.mark.parametrize("command", [["check"], ["sync", "--no-progress"], ["run"]])
def test_a_name_the_lock_file_cannot_take_is_refused_by_every_command(
    tmp_path: Path, clean_env: Path, command: list[str]
) -> None:
    # Account names become lock-file names: one rule decides both, so a name
    # that `check` accepts can always be locked.
    path = config_file(tmp_path, account_yaml(name=".hidden"))
    done = subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(path), *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].endswith(f"{path}: account #1: name: must not start with '.'"), lines
    assert not (clean_env / ".local/state/popsync").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("accounts: []\n", "accounts: must list at least one account"),
        ("ledger: sqlite:///x.db\n", "accounts: missing"),
        ("accounts:\n  home: {}\n", "accounts: must be a list"),
        ("accounts:\n  - just-a-name\n", "account #1: must be a mapping"),
        (GOOD + "colour: blue\n", "colour: unknown key"),
        (GOOD + "ledger: not a url\n", "ledger: must be an SQLAlchemy URL"),
        (GOOD + "ledger: sqlite:///$POPSYNC_TEST_UNSET/l.db\n", "ledger: environment variable"),
    ],
)
def test_top_level_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = config_file(tmp_path, text)
    message = load_error(path)
    assert message == f"{path}: {expected}" or message.startswith(f"{path}: {expected}")
    assert "\n" not in message
    assert_clean(message)


def test_many_problems_one_line_each_and_duplicates(tmp_path: Path) -> None:
    text = """\
    accounts:
      - name: home
        host: a.example
        username: a
        password_file: home.pass
        maildir: a
      - name: work
        host: b.example
        username: b
        port: 0
        maildir: b
      - name: home
        host: c.example
        username: c
        password_file: home.pass
        maildir: c
      - host: d.example
    """
    path = config_file(tmp_path, text)
    lines = load_error(path).splitlines()
    assert lines == [
        f"{path}: account 'work': port: must be between 1 and 65535",
        f"{path}: account 'work': password: missing: give one of password, "
        "password_file, password_command, password_keyring or oauth2",
        f"{path}: account #4: name: missing (this key is required)",
        f"{path}: account #4: username: missing (this key is required)",
        f"{path}: account #4: maildir: missing: give one delivery target: "
        "maildir, mbox, mda, lmtp, imap",
        f"{path}: account #4: password: missing: give one of password, "
        "password_file, password_command, password_keyring or oauth2",
        f"{path}: account #3: name: 'home' is already used by account #1",
    ]


def test_duplicate_names_alone(tmp_path: Path) -> None:
    text = GOOD + GOOD.removeprefix("accounts:\n")
    path = config_file(tmp_path, text)
    assert load_error(path) == f"{path}: account #2: name: 'home' is already used by account #1"


# --------------------------------------------------------------------------
# The file itself


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    message = load_error(path)
    assert message.startswith(f"{path}: no such file") and "\n" not in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert load_error(tmp_path) == f"{tmp_path}: is a directory, not a config file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = config_file(tmp_path, GOOD, mode=0o000)
    assert load_error(path) == f"{path}: cannot read it: permission denied"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = config_file(tmp_path, text)
    assert load_error(path) == f"{path}: is empty; it needs an 'accounts' list"


@pytest.mark.parametrize("text", ["- name: home\n", "just text\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = config_file(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}: the top level must be a mapping")


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    path = config_file(tmp_path, GOOD.replace("maildir: Mail/home", "maildir: Mail: home"))
    message = load_error(path)
    assert message == f"{path}:6:18: YAML syntax error: mapping values are not allowed here"


def test_yaml_syntax_error_hides_the_offending_line(tmp_path: Path) -> None:
    # PyYAML's own message quotes the line; that line holds the password here.
    text = GOOD.replace("password_file: home.pass", f'password: "{SECRET}\\q"')
    path = config_file(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}:5:"), message
    assert "YAML syntax error" in message and "\n" not in message
    assert_clean(message)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    text = GOOD + "    maildir: Mail/other\n"
    path = config_file(tmp_path, text)
    assert load_error(path) == f"{path}:7:5: YAML syntax error: duplicate key 'maildir'"


def test_unsafe_yaml_tag_is_refused(tmp_path: Path) -> None:
    path = config_file(tmp_path, "accounts: !!python/object/apply:os.system ['true']\n")
    message = load_error(path)
    assert message.startswith(f"{path}:1:") and "YAML syntax error" in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "popsync.yaml"
    path.write_bytes(b"accounts:\n  - name: h\xe9\n")
    assert load_error(path) == f"{path}:2: not UTF-8 text"


def test_oversized_file(tmp_path: Path) -> None:
    path = config_file(tmp_path, GOOD + "#" * MAX_CONFIG_BYTES + "\n")
    assert f"larger than {MAX_CONFIG_BYTES >> 20} MiB" in load_error(path)


# --------------------------------------------------------------------------
# Secrets: permissions, hygiene, sources


def with_password(secret: str = SECRET) -> str:
    return account_yaml(password_file=None, password=secret)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_config_with_password_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = config_file(tmp_path, with_password(), mode=mode)
    message = load_error(path)
    assert message == (
        f"{path}: holds a password but is readable by group or others; "
        f"run: chmod 600 {path} (or use password_file or password_command)"
    )
    assert_clean(message)


def test_config_with_password_private_is_fine(tmp_path: Path) -> None:
    path = config_file(tmp_path, with_password(), mode=0o600)
    assert load_config(path).accounts[0].secret() == SECRET


def test_config_without_password_may_be_world_readable(tmp_path: Path) -> None:
    path = config_file(tmp_path, GOOD, mode=0o644)
    assert load_config(path).accounts[0].name == "home"


def test_password_never_in_repr_str_or_dump(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, with_password()))
    account = config.accounts[0]
    for text in (repr(config), str(config), repr(account), str(account), config.model_dump_json()):
        assert SECRET not in text
    assert account.secret() == SECRET


def test_password_not_in_errors_about_other_keys(tmp_path: Path) -> None:
    path = config_file(tmp_path, account_yaml(password_file=None, password=SECRET, port=-1))
    message = load_error(path)
    assert "port" in message
    assert_clean(message)


def test_password_file_readable_by_others_refused_at_load(tmp_path: Path) -> None:
    path = config_file(tmp_path, GOOD)
    secret_file = tmp_path / "home.pass"
    secret_file.chmod(0o640)
    message = load_error(path)
    assert message == (
        f"{path}: account 'home': password_file: {secret_file} is readable by group "
        f"or others; run: chmod 600 {secret_file}"
    )


def test_password_file_mode_checked_again_when_read(tmp_path: Path) -> None:
    account = load_config(config_file(tmp_path, GOOD)).accounts[0]
    (tmp_path / "home.pass").chmod(0o644)
    with pytest.raises(ConfigError, match=r"chmod 600 .*home\.pass") as info:
        account.secret()
    assert str(info.value).startswith("account 'home': password_file: ")
    assert_clean(str(info.value))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (SECRET.encode() + b"\n", SECRET),
        (SECRET.encode(), SECRET),
        (SECRET.encode() + b"\r\n", SECRET),
        (SECRET.encode() + b"\nsecond line is ignored\n", SECRET),
        ("pässwörd\n".encode(), "pässwörd"),
    ],
)
def test_password_file_first_line(tmp_path: Path, content: bytes, expected: str) -> None:
    account = load_config(config_file(tmp_path, GOOD)).accounts[0]
    (tmp_path / "home.pass").write_bytes(content)
    assert account.secret() == expected


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"", "is empty"),
        (b"\nlater\n", "is empty"),
        (b"Zq7\rDELE 1\n", "CR or NUL"),
        (b"Zq7\0x\n", "CR or NUL"),
        (b"\xff\xfe\n", "not UTF-8"),
        (b"x" * (70 << 10), "too long"),
    ],
)
def test_bad_password_files(tmp_path: Path, content: bytes, phrase: str) -> None:
    account = load_config(config_file(tmp_path, GOOD)).accounts[0]
    (tmp_path / "home.pass").write_bytes(content)
    with pytest.raises(ConfigError, match=phrase) as info:
        account.secret()
    assert "\n" not in str(info.value)
    assert "DELE" not in str(info.value)


def test_password_file_removed_after_load(tmp_path: Path) -> None:
    account = load_config(config_file(tmp_path, GOOD)).accounts[0]
    (tmp_path / "home.pass").unlink()
    with pytest.raises(ConfigError, match="No such file"):
        account.secret()


def command_account(tmp_path: Path, script: str, command: str = "./getpw") -> Account:
    """An account whose password_command runs *script* (a /bin/sh script)."""
    write(tmp_path / "getpw", "#!/bin/sh\n" + textwrap.dedent(script), mode=0o700)
    text = account_yaml(password_file=None, password_command=command)
    return load_config(config_file(tmp_path, text)).accounts[0]


def test_password_command_runs_in_config_dir_without_shell(tmp_path: Path) -> None:
    account = command_account(tmp_path, f"printf '%s\\n' '{SECRET}'\n")
    assert account.secret() == SECRET
    # No shell: the argument reaches the program verbatim, quotes removed by shlex.
    account = command_account(tmp_path, 'printf "%s" "$1"\n', command="./getpw 'two words; $HOME'")
    assert account.secret() == "two words; $HOME"


def test_password_command_strips_one_crlf(tmp_path: Path) -> None:
    assert command_account(tmp_path, f"printf '{SECRET}\\r\\n'\n").secret() == SECRET


@pytest.mark.parametrize(
    ("script", "phrase"),
    [
        (f"printf '{SECRET}\\r\\nDELE 1\\r\\n'\n", "more than one line"),
        (f"printf '{SECRET}\\nDELE 1\\n'\n", "more than one line"),
        (f"printf '{SECRET}\\000x'\n", "more than one line"),
        ("exit 0\n", "printed nothing"),
        ("printf '\\n'\n", "printed nothing"),
        ("cat\n", "printed nothing"),  # stdin is closed: cat sees EOF at once
        ("printf '\\377\\n'\n", "not UTF-8"),
        # stderr is never shown: a failing helper may print the secret there.
        ("echo 'vault is locked' >&2; exit 3\n", "exited with status 3 (run it by hand"),
        ("kill -9 $$\n", "killed by signal 9"),
    ],
)
def test_bad_password_commands(tmp_path: Path, script: str, phrase: str) -> None:
    account = command_account(tmp_path, script)
    with pytest.raises(ConfigError) as info:
        account.secret()
    message = str(info.value)
    assert message.startswith("account 'home': password_command: "), message
    assert phrase in message and "\n" not in message
    assert_clean(message)


def test_password_command_failure_does_not_echo_secret_from_stderr(tmp_path: Path) -> None:
    account = command_account(tmp_path, f"echo {SECRET}; echo {SECRET} >&2; exit 1\n")
    with pytest.raises(ConfigError, match="exited with status 1") as info:
        account.secret()
    assert_clean(str(info.value))


def test_password_command_not_found(tmp_path: Path) -> None:
    text = account_yaml(password_file=None, password_command="./no-such-helper --x")
    account = load_config(config_file(tmp_path, text)).accounts[0]
    with pytest.raises(ConfigError, match=r"cannot run \./no-such-helper: No such file"):
        account.secret()


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_password_command_timeout_kills_the_whole_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import popsync.config.secrets

    monkeypatch.setattr(popsync.config.secrets, "PASSWORD_COMMAND_TIMEOUT", 0.5)
    script = "sleep 30 &\necho $! > child.pid\nwait\n"
    account = command_account(tmp_path, script)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"did not finish within 0\.5 seconds"):
        account.secret()
    assert time.monotonic() - started < 5
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while not process_gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(child)


def test_default_command_timeout_is_30_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import popsync.config
    import popsync.config.secrets

    assert popsync.config.PASSWORD_COMMAND_TIMEOUT == 30.0
    monkeypatch.setattr(popsync.config.secrets, "PASSWORD_COMMAND_TIMEOUT", 0.3)
    account = command_account(tmp_path, "sleep 30\n")
    with pytest.raises(ConfigError, match=r"within 0\.3 seconds"):
        account.secret()


# --------------------------------------------------------------------------
# Durations, sizes, expansion, path resolution, selection


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (300, 300.0),
        (0.5, 0.5),
        ("300", 300.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m 5s", 5405.0),
        ("2d", 172800.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "1.5h", "30m1h", "-1", True, None, float("nan")])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [(1, 1), ("1000", 1000), ("64K", 65536), ("50M", 50 << 20), ("2G", 2 << 30), ("3 k", 3072)],
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5T", "1.5M", "M", "-3", False, 2.5])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("$MAILROOT/x", "{root}/x"),
        ("${MAILROOT}/x", "{root}/x"),
        ("${MAILROOT}x", "{root}x"),
        ("~/Mail", "{home}/Mail"),
        ("~", "{home}"),
        ("Mail/$USERPART", "{cfg}/Mail/bob"),
        ("pay$$day", "{cfg}/pay$day"),
        ("/abs/dir", "/abs/dir"),
    ],
)
def test_path_expansion(
    tmp_path: Path,
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    written: str,
    expected: str,
) -> None:
    monkeypatch.setenv("MAILROOT", str(tmp_path / "root"))
    monkeypatch.setenv("USERPART", "bob")
    account = load_config(config_file(tmp_path, account_yaml(maildir=written))).accounts[0]
    want = expected.format(root=tmp_path / "root", home=clean_env, cfg=tmp_path)
    assert account.maildir == Path(want)
    assert account.maildir.is_absolute()


def test_tilde_user_expansion(tmp_path: Path) -> None:
    import pwd

    root_home = pwd.getpwuid(0).pw_dir
    account = load_config(config_file(tmp_path, account_yaml(maildir="~root/m"))).accounts[0]
    assert account.maildir == Path(root_home) / "m"


def test_ca_file_and_password_file_expand(tmp_path: Path, clean_env: Path) -> None:
    write(clean_env / "ca.pem", "pem\n")
    write(clean_env / "p", "pw\n")
    text = account_yaml(ca_file="~/ca.pem", password_file="$HOME/p")
    account = load_config(config_file(tmp_path, text)).accounts[0]
    assert account.ca_file == clean_env / "ca.pem"
    assert account.password_file == clean_env / "p"
    assert account.secret() == "pw"


def test_model_built_in_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    account = Account(
        name="t",
        host="127.0.0.1",
        tls="none",
        allow_plaintext=True,
        username="u",
        password="p",
        maildir="m",
    )
    assert (account.port, account.maildir, account.secret()) == (110, tmp_path / "m", "p")
    with pytest.raises(Exception, match="frozen"):
        account.port = 1  # type: ignore[misc]


def test_resolve_config_path(
    tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_config_path(None) == clean_env / ".config/popsync/config.yaml"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert resolve_config_path(None) == tmp_path / "xdg/popsync/config.yaml"
    monkeypatch.setenv("POPSYNC_CONFIG", "~/env.yaml")
    assert resolve_config_path(None) == clean_env / "env.yaml"
    assert resolve_config_path("~/cli.yaml") == clean_env / "cli.yaml"
    assert resolve_config_path("rel.yaml") == Path("rel.yaml")
    monkeypatch.setenv("POPSYNC_CONFIG", "")  # empty counts as unset
    assert resolve_config_path(None) == tmp_path / "xdg/popsync/config.yaml"
    assert resolve_config_path(None, environ={"HOME": "/h"}) == Path(
        "/h/.config/popsync/config.yaml"
    )


def test_select(tmp_path: Path) -> None:
    text = GOOD + "".join(
        f"  - {{name: {n}, host: h, username: u, password_file: home.pass, maildir: {n}}}\n"
        for n in ("work", "list")
    )
    config = load_config(config_file(tmp_path, text))
    assert [a.maildir for a in config.select(["work"])] == [tmp_path / "work"]
    with pytest.raises(ConfigError, match=r"^unknown account 'nope' \(known: home, work, list\)$"):
        config.select(["nope"])
    assert [a.name for a in config.select([])] == ["home", "work", "list"]
    assert [a.name for a in config.select(["list", "home", "list"])] == ["list", "home"]
    with pytest.raises(ConfigError) as info:
        config.select(["home", "x", "y"])
    assert str(info.value) == "unknown accounts 'x', 'y' (known: home, work, list)"


def test_module_imports_stay_light() -> None:
    """Loading the config must not pull in the ledger or scheduler stacks."""
    code = (
        "import sys, popsync.config;"
        "heavy = [m for m in ('sqlalchemy', 'apscheduler', 'alembic', 'popsync.ledger')"
        " if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


def test_stat_helper_sanity(tmp_path: Path) -> None:
    # The permission tests rely on chmod taking effect on this file system.
    path = write(tmp_path / "f", "x", mode=0o640)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_lease_is_seconds_of_at_least_one(tmp_path: Path) -> None:
    assert load_config(config_file(tmp_path, GOOD)).lease == 10.0
    assert load_config(config_file(tmp_path, "lease: 30s\n" + GOOD)).lease == 30.0
    error = load_error(config_file(tmp_path, "lease: 0.5\n" + GOOD))
    assert "lease" in error and "must be at least 1 s" in error, error
    assert len(error.splitlines()) == 1


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without libyaml")
def test_libyaml_parses_and_still_refuses_duplicate_keys() -> None:
    """The fast parser (libyaml) is the one used, and it keeps the duplicate-key
    rule; its syntax errors are worded by the pure-Python parser instead."""
    from popsync.config import loading

    assert loading._FastLoader is not None
    text = "accounts:\n  - name: a\n    password: x\n    password: y\n"
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'password'"):
        yaml.load(text, Loader=loading._FastLoader)
    assert yaml.load("a: [1, 2]\n", Loader=loading._FastLoader) == {"a": [1, 2]}
