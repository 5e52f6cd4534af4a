"""OAuth2 end to end, offline: ``popsync auth`` (device flow, code flow with
PKCE) against a local authorization server (tests/oauth_server.py), then
``popsync sync`` against a real Dovecot whose ``oauth2`` passdb asks that
server (RFC 7662 introspection) whether the token is good -- so Dovecot
itself accepts or refuses XOAUTH2 and OAUTHBEARER.  Plus refresh and
rotation, ``invalid_grant``, the daemon's pause and resume, the bounds on
the token endpoint, the config rules and the provider presets.

No token, code or client secret may appear in any output, even with -vv,
nor in the ledger: every test that runs popsync greps for all of them.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keyring
import keyring.backend
import pytest
import yaml

from popsync.config import load_config
from popsync.config.oauth2 import OAuth2Settings
from popsync.errors import ConfigError
from popsync.oauth.client import Client
from popsync.oauth.errors import OAuthError
from popsync.oauth.flows import device_flow
from popsync.oauth.http import post_form
from popsync.oauth.presets import PRESETS
from popsync.oauth.tokens import TokenResponse
from tests.dovecot_fixtures import require_dovecot
from tests.helpers import maildir_contents, stored_form
from tests.oauth_server import CLIENT_ID, OAuthServer
from tests.servers.dovecot import Mailbox
from tests.servers.dovecot_oauth import OAuthDovecot

MAIL = b"From: a@example.org\r\nSubject: oauth %d\r\n\r\nbody %d\r\n"
CLIENT_SECRET = "cs-" + "k3y" * 8


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_desktop_keyring() -> Iterator[None]:
    """In this process too, no keyring (as for the children, see popsync_env):
    tokens go to the state directory's file unless a test sets a keyring."""
    import keyring.backends.fail

    previous = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())  # type: ignore[no-untyped-call]
    yield
    keyring.set_keyring(previous)


@pytest.fixture(scope="module")
def oauth_server() -> Iterator[OAuthServer]:
    with OAuthServer() as server:
        yield server


@pytest.fixture(scope="module")
def oauth_dovecot(
    oauth_server: OAuthServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OAuthDovecot]:
    require_dovecot()
    with OAuthDovecot(tmp_path_factory.mktemp("dovecot-oauth"), oauth_server.url) as server:
        yield server


@pytest.fixture
def server(oauth_server: OAuthServer) -> OAuthServer:
    """The module's authorization server, its switches back at their defaults."""
    oauth_server.rotate, oauth_server.invalid_grant = True, False
    oauth_server.fail_status, oauth_server.expires_in = None, 3600
    oauth_server.client_secret = None
    oauth_server.grants.clear()
    return oauth_server


@pytest.fixture
def mailbox(oauth_dovecot: OAuthDovecot, server: OAuthServer) -> Mailbox:
    box = oauth_dovecot.new_mailbox("oauth")
    server.user = box.user
    box.add_messages([MAIL % (i, i) for i in range(3)])
    return box


def write_config(
    tmp: Path, server: OAuthServer, box: Mailbox | None, ledger: str | None = None, **over: Any
) -> tuple[Path, str]:
    """A config with one oauth2 account ``work``; (its path, the account name).
    *ledger*: a ledger URL (default: SQLite in ``tmp/state``)."""
    oauth2 = {
        "token_endpoint": f"{server.url}/token",
        "device_authorization_endpoint": f"{server.url}/device",
        "scope": "mail",
        "client_id": CLIENT_ID,
    }
    oauth2.update(over.pop("oauth2", {}))
    account = {
        "name": "work",
        "host": "127.0.0.1",
        "port": box.pop3_port if box else 1,
        "tls": "none",
        "allow_plaintext": True,
        "username": box.user if box else "nobody",
        "auth": "xoauth2",
        "oauth2": {k: v for k, v in oauth2.items() if v is not None},
        "maildir": str(tmp / "Maildir"),
        "timeout": 10,
        **over,
    }
    path = tmp / "config.yaml"
    doc = {"ledger": ledger or f"sqlite:///{tmp / 'state' / 'ledger.db'}", "accounts": [account]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path, "work"


def popsync_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    # No desktop keyring here: tokens go to the state directory's file.
    env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"
    env["XDG_STATE_HOME"] = str(tmp / "xdg-state")
    return env


def popsync(tmp: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(tmp / "config.yaml"), *args],
        env=popsync_env(tmp),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Running:
    """A ``popsync`` child whose stdout lines arrive in a queue (bounded waits)."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "popsync", "-c", str(tmp / "config.yaml"), *args],
            env=popsync_env(tmp),
            stdin=subprocess.DEVNULL,  # popsync auth needs no input
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.proc.stdout.close()

    def line_with(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            self.seen.append(line)
            if text in line:
                return line

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        self.proc.wait(timeout)
        self.pump.join(timeout)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.proc.returncode, "".join(self.seen), err


def device_auth(tmp: Path, server: OAuthServer, name: str) -> str:
    """``popsync auth NAME`` by the device flow, approved by "the user"; its output."""
    run = Running(tmp, "auth", name)
    line = run.line_with("enter the code")
    assert f"{server.url}/device-login" in line
    server.approve(line.split("enter the code")[1].strip())
    status, out, err = run.finish()
    assert status == 0, out + err
    return out + err


def token_file(tmp: Path, name: str = "work") -> Path:
    return tmp / "state" / "oauth" / f"{name}.json"


def assert_no_secrets(server: OAuthServer, *texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        for secret in [*server.issued, CLIENT_SECRET]:
            assert secret.encode() not in data, f"a secret leaked: {secret[:3]}..."


# -- presets and config ------------------------------------------------------------


def test_presets_are_the_published_endpoints() -> None:
    google, microsoft = PRESETS["google"], PRESETS["microsoft"]
    assert google.authorization_endpoint == "https://accounts.google.com/o/oauth2/v2/auth"
    assert google.token_endpoint == "https://oauth2.googleapis.com/token"
    assert google.scope == "https://mail.google.com/"
    # Google's device flow does not allow the mail scope: the code flow it is.
    assert google.device_authorization_endpoint is None
    ms = microsoft.for_tenant("contoso.onmicrosoft.com")
    base = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0"
    assert ms == {
        "authorization_endpoint": f"{base}/authorize",
        "token_endpoint": f"{base}/token",
        "device_authorization_endpoint": f"{base}/devicecode",
        "scope": "https://outlook.office.com/POP.AccessAsUser.All offline_access",
    }


def test_provider_fills_in_and_explicit_keys_override(tmp_path: Path, server: OAuthServer) -> None:
    path, _ = write_config(
        tmp_path,
        server,
        None,
        oauth2={
            "provider": "microsoft",
            "token_endpoint": None,
            "device_authorization_endpoint": None,
            "scope": "custom",
            "client_id": "abc",
        },
    )
    (account,) = load_config(path).accounts
    assert account.oauth2 is not None
    assert account.oauth2.token_endpoint == (
        "https://login.microsoftonline.com/common/oauth2/v2.0/token"
    )
    assert account.oauth2.scope == "custom"


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"oauth2": {"token_endpoint": "http://login.example/token"}}, "oauth2.token_endpoint: "
         "must be https:// (plain http:// only to a loopback address)"),
        ({"oauth2": {"client_id": None}}, "oauth2.client_id: missing"),
        ({"oauth2": {"provider": "google", "tenant": "x"}}, "oauth2.tenant: only with provider: "
         "microsoft"),
        ({"oauth2": {"provider": "yahoo"}}, "oauth2.provider: must be one of"),
        ({"auth": "plain"}, "oauth2: needs auth: xoauth2 or auth: oauthbearer"),
        ({"password": "pw"}, "oauth2: give only one of password, oauth2"),
        ({"oauth2": {"token_endpoint": None, "device_authorization_endpoint": None}},
         "oauth2.token_endpoint: missing"),
        ({"oauth2": {"client_secret": "a", "client_secret_command": "b"}},
         "oauth2.client_secret: give only one of client_secret, client_secret_command"),
    ],
)  # fmt: skip
def test_oauth2_config_errors_are_one_line(
    tmp_path: Path, server: OAuthServer, over: dict[str, Any], expected: str
) -> None:
    path, _ = write_config(tmp_path, server, None, **over)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: account 'work': {expected}"), message
    assert "\n" not in message


# -- end to end against Dovecot ------------------------------------------------------


@pytest.mark.slow
def test_device_flow_then_sync_fetches_mail(
    tmp_path: Path, server: OAuthServer, mailbox: Mailbox
) -> None:
    write_config(tmp_path, server, mailbox)
    auth_out = device_auth(tmp_path, server, "work")
    assert "authorized; tokens stored in" in auth_out
    stored = token_file(tmp_path)
    assert stored.stat().st_mode & 0o777 == 0o600
    assert json.loads(stored.read_text())["refresh_token"] in server.refresh_tokens()

    done = popsync(tmp_path, "-vv", "sync", "--no-progress")

    assert done.returncode == 0, done.stderr
    assert maildir_contents(tmp_path / "Maildir") == {
        stored_form(MAIL % (i, i)): 1 for i in range(3)
    }
    assert set(server.grants) == {"urn:ietf:params:oauth:grant-type:device_code"}
    ledger = (tmp_path / "state" / "ledger.db").read_bytes()
    assert_no_secrets(server, auth_out, done.stdout, done.stderr, ledger)


@pytest.mark.slow
def test_code_flow_with_pkce_then_oauthbearer_sync(
    tmp_path: Path, server: OAuthServer, mailbox: Mailbox
) -> None:
    server.client_secret = CLIENT_SECRET
    secret_file = tmp_path / "client.secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    secret_file.chmod(0o600)
    write_config(
        tmp_path,
        server,
        mailbox,
        auth="oauthbearer",
        oauth2={
            "device_authorization_endpoint": None,
            "authorization_endpoint": f"{server.url}/authorize",
            "client_secret_file": str(secret_file),
        },
    )
    run = Running(tmp_path, "auth", "work")
    url = run.line_with(f"{server.url}/authorize").strip()
    assert "code_challenge_method=S256" in url
    # A request with another state is refused and the flow keeps waiting.
    redirect = run.line_with("waiting up to").split("come back to ")[1].strip(" )\n")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{redirect}?code=forged&state=wrong", timeout=10)
    assert refused.value.code == 400
    # "The browser": the server approves and redirects to popsync's listener.
    with urllib.request.urlopen(url, timeout=10) as page:
        assert b"authorized" in page.read()
    status, out, err = run.finish()
    assert status == 0, out + err

    done = popsync(tmp_path, "-vv", "sync", "--no-progress")

    assert done.returncode == 0, done.stderr
    assert len(maildir_contents(tmp_path / "Maildir")) == 3
    assert server.grants == {"authorization_code": 1}
    ledger = (tmp_path / "state" / "ledger.db").read_bytes()
    assert_no_secrets(server, out, err, done.stdout, done.stderr, ledger)


def expire_stored_access_token(tmp: Path) -> None:
    stored = token_file(tmp)
    data = json.loads(stored.read_text())
    data["expires_at"] = time.time() + 30  # inside the 60 s margin
    stored.write_text(json.dumps(data))


@pytest.mark.slow
def test_expired_access_token_is_refreshed_and_rotation_stored(
    tmp_path: Path, server: OAuthServer, mailbox: Mailbox
) -> None:
    write_config(tmp_path, server, mailbox)
    auth_out = device_auth(tmp_path, server, "work")
    first_refresh = json.loads(token_file(tmp_path).read_text())["refresh_token"]
    server.expire_access_tokens()  # Dovecot would now refuse the stored one
    expire_stored_access_token(tmp_path)

    done = popsync(tmp_path, "-vv", "sync", "--no-progress")

    assert done.returncode == 0, done.stderr
    assert len(maildir_contents(tmp_path / "Maildir")) == 3
    assert server.grants.get("refresh_token") == 1
    stored = json.loads(token_file(tmp_path).read_text())
    assert stored["refresh_token"] != first_refresh
    valid = server.refresh_tokens()
    assert stored["refresh_token"] in valid and first_refresh not in valid
    assert token_file(tmp_path).stat().st_mode & 0o777 == 0o600
    assert "refresh token rotated" in done.stderr

    # The new access token is reused: no refresh on the next poll.
    again = popsync(tmp_path, "sync", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert server.grants.get("refresh_token") == 1
    ledger = (tmp_path / "state" / "ledger.db").read_bytes()
    assert_no_secrets(server, auth_out, done.stdout, done.stderr, again.stderr, ledger)


@pytest.mark.slow
def test_invalid_grant_needs_attention_and_sync_exits_1(
    tmp_path: Path, server: OAuthServer, mailbox: Mailbox
) -> None:
    write_config(tmp_path, server, mailbox)
    device_auth(tmp_path, server, "work")
    expire_stored_access_token(tmp_path)
    server.invalid_grant = True

    done = popsync(tmp_path, "-vv", "sync", "--no-progress")

    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if "needs attention" in line]
    assert len(lines) == 1, done.stderr
    assert "run popsync auth work" in lines[0]
    assert "Traceback" not in done.stderr
    assert maildir_contents(tmp_path / "Maildir") == {}
    assert_no_secrets(server, done.stdout, done.stderr)


def test_concurrent_refreshes_use_the_refresh_token_once(
    tmp_path: Path, server: OAuthServer
) -> None:
    """A poll, serverinfo and a dry run may want a token at the same moment:
    one refreshes, the others find the new token stored (a rotated refresh
    token used twice would be refused, and the account need re-authorizing)."""
    from popsync.oauth.access import access_token

    path, name = write_config(tmp_path, server, None)
    device_auth(tmp_path, server, name)
    expire_stored_access_token(tmp_path)
    config = load_config(path)
    account = config.accounts[0]
    start = threading.Barrier(4)
    got: list[str] = []
    failed: list[BaseException] = []

    def want() -> None:
        start.wait(10)
        try:
            got.append(access_token(account, config.state_dir))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=want) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failed == []
    assert len(got) == 4 and len(set(got)) == 1
    assert server.grants.get("refresh_token") == 1


def test_no_token_stored_needs_attention(tmp_path: Path, server: OAuthServer) -> None:
    write_config(tmp_path, server, None)
    done = popsync(tmp_path, "sync", "--no-progress")
    assert done.returncode == 1
    assert "needs attention: run popsync auth work (no OAuth2 token is stored yet)" in done.stderr


def test_token_endpoint_errors_are_temporary(tmp_path: Path, server: OAuthServer) -> None:
    from popsync.ledger import Ledger
    from popsync.oauth.store import FileStore
    from popsync.oauth.tokens import StoredTokens
    from popsync.sync import run_account

    path, _ = write_config(tmp_path, server, None)
    config = load_config(path)
    FileStore(config.state_dir, "work").save(StoredTokens.model_validate({"refresh_token": "r"}))
    server.fail_status = 503
    ledger = Ledger.open(config.ledger_url)
    try:
        report = run_account(config.accounts[0], ledger, config.state_dir)
    finally:
        ledger.close()
    assert report.error == "token endpoint 127.0.0.1 answered HTTP 503"
    assert report.temporary is True


@pytest.mark.slow
def test_daemon_pauses_without_token_and_resumes_once_authorized(
    tmp_path: Path,
    server: OAuthServer,
    mailbox: Mailbox,
    ledger_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On SQLite the daemon's own schedule resumes; on PostgreSQL (lease mode)
    the pause lives in the shared row, and that row is resumed."""
    from tests.test_daemon import Harness

    # The in-process daemon and `popsync auth` must share one state directory.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    path, name = write_config(tmp_path, server, mailbox, ledger=ledger_url)
    daemon = Harness(path, token_watch=0.05).start()
    try:
        paused = daemon.wait_event(name, lambda e: e.paused)
        assert "run popsync auth work" in (paused.report.error or "")
        assert maildir_contents(tmp_path / "Maildir") == {}
        device_auth(tmp_path, server, name)
        ok = daemon.wait_event(name, lambda e: e.report.ok, timeout=20)
        assert ok.report.counts.fetched == 3
    finally:
        daemon.stop()
    assert len(maildir_contents(tmp_path / "Maildir")) == 3


def test_missing_extra_is_one_line(tmp_path: Path, server: OAuthServer) -> None:
    write_config(tmp_path, server, None)
    hide = (
        "import sys; sys.modules['authlib'] = None; from popsync.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    for command, status in (("check", 2), ("sync", 1)):
        done = subprocess.run(
            [sys.executable, "-c", hide, "-c", str(tmp_path / "config.yaml"), command],
            env=popsync_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == status, done.stderr
        assert "oauth2 needs popsync[oauth]: pip install 'popsync[oauth]'" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- the device flow's timing, without waiting ----------------------------------------


def client_for_server(server: OAuthServer, **kw: Any) -> Client:
    settings = OAuth2Settings(
        token_endpoint=f"{server.url}/token",
        device_authorization_endpoint=f"{server.url}/device",
        client_id=CLIENT_ID,
    )
    return Client(settings, None, kw.get("timeout", 10.0), kw.get("ca_file"))


def test_device_flow_honours_interval_and_slow_down(server: OAuthServer) -> None:
    server.device_interval, server.slow_down = 2, 1
    waits: list[float] = []
    said: list[str] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:  # the user approves during the third wait
            server.approve(said[0].rsplit(" ", 1)[1])

    tokens = device_flow(client_for_server(server), said.append, wait=wait, clock=lambda: 0.0)

    assert tokens.access_token.get_secret_value() in server.issued
    assert waits == [2, 7, 7]  # slow_down: 5 s more from then on (RFC 8628 §3.5)


def test_device_flow_gives_up_when_the_code_expires(server: OAuthServer) -> None:
    times = iter([0.0, 0.0, 599.5])
    with pytest.raises(OAuthError, match="the code expired before it was approved"):
        device_flow(client_for_server(server), lambda _: None, wait=lambda _: None,
                    clock=lambda: next(times))  # fmt: skip


def test_code_flow_times_out_with_exit_1(tmp_path: Path, server: OAuthServer) -> None:
    oauth2 = {"device_authorization_endpoint": None, "authorization_endpoint": f"{server.url}/a"}
    write_config(tmp_path, server, None, oauth2=oauth2)
    done = popsync(tmp_path, "auth", "work", "--wait", "0.5")
    assert done.returncode == 1
    assert done.stderr.strip().endswith(
        "no answer from the browser in time; run popsync auth again"
    )
    assert not token_file(tmp_path).exists()


def test_auth_of_an_account_without_oauth2_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    account = {"name": "home", "host": "h", "username": "u", "password": "p",
               "maildir": str(tmp_path / "M")}  # fmt: skip
    path.write_text(yaml.safe_dump({"accounts": [account]}))
    path.chmod(0o600)
    done = popsync(tmp_path, "auth", "home")
    assert done.returncode == 2
    assert "account 'home' has no oauth2 block" in done.stderr


# -- the token endpoint is bounded like a POP3 server -----------------------------------


class Canned:
    """A one-connection-at-a-time HTTP(S) server that sends canned bytes."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.context = context
        self.answers: queue.Queue[bytes | None] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.context else "http"
        return f"{scheme}://127.0.0.1:{self.listener.getsockname()[1]}/token"

    def _serve(self) -> None:
        while True:
            answer = self.answers.get()
            if answer is None:
                return
            conn, _ = self.listener.accept()
            try:
                if self.context is not None:
                    conn = self.context.wrap_socket(conn, server_side=True)
                conn.settimeout(3.0)  # a client without deadline sees EOF, not a timeout
                conn.recv(65536)
                conn.sendall(answer)
                while conn.recv(65536):  # the rest of the request; then hold on until
                    pass  # the client gives up (or 3 s pass)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.answers.put(None)
        self.listener.close()


@pytest.fixture
def canned() -> Iterator[Canned]:
    server = Canned()
    yield server
    server.close()


def http_answer(status: str, body: bytes, *, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    return head.encode() + body


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (http_answer("200 OK", b"{" + b" " * (70 << 10) + b"}"), "sent more than 65536 bytes"),
        (b"", "did not answer within 0.5 seconds"),  # not even a status line
        (http_answer("200 OK", b'{"a"', length=100), "did not answer within 0.5 seconds"),
        (http_answer("302 Found", b""), "answered HTTP 302"),
        (http_answer("503 Busy", b"{}"), "answered HTTP 503"),
        (http_answer("200 OK", b"<html>"), "did not answer with JSON"),
        (http_answer("400 Bad", b'{"error": "invalid_\\u001b[2Jgrant"}'),
         "refused: invalid_\\x1b[2Jgrant"),
    ],
)  # fmt: skip
def test_token_endpoint_answers_are_bounded(canned: Canned, answer: bytes, phrase: str) -> None:
    canned.answers.put(answer)
    started = time.monotonic()
    with pytest.raises(OAuthError) as info:
        post_form(canned.url, {"grant_type": "x"}, timeout=0.5, ca_file=None)
    assert phrase in str(info.value)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("body", "bad"),
    [
        ({"token_type": "Bearer"}, "access_token"),
        ({"access_token": "a", "token_type": "mac"}, "token_type"),
        ({"access_token": "a\r\nDELE 1", "token_type": "Bearer"}, "access_token"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": -5}, "expires_in"),
    ],
)
def test_token_responses_are_validated(canned: Canned, body: dict[str, Any], bad: str) -> None:
    canned.answers.put(http_answer("200 OK", json.dumps(body).encode()))
    client = Client(
        OAuth2Settings(token_endpoint=canned.url, device_authorization_endpoint=canned.url,
                       client_id=CLIENT_ID),
        None, 5.0, None,
    )  # fmt: skip
    with pytest.raises(OAuthError, match=rf"invalid token response \({bad}\)"):
        client.refresh("r")


def test_https_endpoint_is_verified_against_the_system_store_plus_ca_file(
    server_ssl_context: ssl.SSLContext, ca_file: Path
) -> None:
    server = Canned(server_ssl_context)
    try:
        good = http_answer("200 OK", b'{"ok": 1}')
        server.answers.put(good)
        with pytest.raises(OAuthError, match="TLS failed"):
            post_form(server.url, {}, timeout=5, ca_file=None)  # a CA unknown to the system
        server.answers.put(good)
        assert post_form(server.url, {}, timeout=5, ca_file=ca_file) == {"ok": 1}
    finally:
        server.close()


# -- the keyring, when a real one is there ------------------------------------------------


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A desktop keyring stand-in: in memory, priority like the Secret Service."""

    priority = 5

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.items: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.items.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.items[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.items.pop((service, username), None)


def test_tokens_go_to_a_usable_keyring_and_refresh_there(
    tmp_path: Path, server: OAuthServer
) -> None:
    from popsync.oauth.access import access_token, store_tokens
    from popsync.oauth.store import KEYRING_SERVICE, KeyringStore, open_store

    memory = MemoryKeyring()
    previous = keyring.get_keyring()
    keyring.set_keyring(memory)
    try:
        path, name = write_config(tmp_path, server, None)
        config = load_config(path)
        store = open_store(config.state_dir, name)
        assert isinstance(store, KeyringStore)
        with server._lock:
            grant = server._tokens(server.user)
        store_tokens(store, TokenResponse.model_validate(grant), time.time() - 3600)
        token = access_token(config.accounts[0], config.state_dir)  # expired: refreshed
    finally:
        keyring.set_keyring(previous)
    assert token != grant["access_token"] and token in server.issued
    kept = json.loads(memory.items[(KEYRING_SERVICE, name)])
    assert kept["access_token"] == token and kept["refresh_token"] != grant["refresh_token"]
    assert not token_file(tmp_path).exists()


@pytest.mark.slow
def test_token_dovecot_refuses_before_its_expiry_is_renewed_once(
    tmp_path: Path, server: OAuthServer, mailbox: Mailbox
) -> None:
    write_config(tmp_path, server, mailbox)
    device_auth(tmp_path, server, "work")
    server.expire_access_tokens()  # revoked early: the stored expiry still looks fine

    done = popsync(tmp_path, "-v", "sync", "--no-progress")

    assert done.returncode == 0, done.stderr
    assert "the server refused the OAuth2 access token; refreshing it" in done.stderr
    assert server.grants.get("refresh_token") == 1
    assert len(maildir_contents(tmp_path / "Maildir")) == 3

    # A refresh token that no longer works either: one line, exit 1, no loop.
    server.expire_access_tokens()
    server.invalid_grant = True
    again = popsync(tmp_path, "sync", "--no-progress")
    assert again.returncode == 1
    assert "needs attention: run popsync auth work" in again.stderr
    assert server.grants.get("refresh_token") == 2
    assert_no_secrets(server, done.stderr, again.stderr)
