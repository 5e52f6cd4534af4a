"""The shipped systemd user unit, ``contrib/popsync.service``.

Always (no systemd needed): the unit file is parsed and its key settings are
checked: an absolute ``ExecStart`` that runs ``popsync run``, no restart loop
on a config error (exit status 2), a ``Documentation=`` line, and the
sandboxing keys.  Where ``systemd-analyze`` exists (Debian's ``systemd``
package installs it without a running systemd), the unit is also checked by
systemd itself: ``verify`` on a copy whose ``ExecStart`` names this
interpreter's ``popsync`` script (``verify`` insists the program exists), and
``security --offline=true``, whose exposure score must be 3.0 or better.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "contrib" / "popsync.service"
MAX_EXPOSURE = 3.0


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file as ``{section: [(key, value), ...]}``, keys in file order.

    Keys repeat in unit files (``ReadWritePaths=`` lines add up), so values
    are kept as a list rather than a mapping.  Comments (``#``, ``;``) and
    blank lines are dropped; line continuations are not used by the unit.
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"line {number}: a setting outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: not KEY=VALUE: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    """Every value ``key`` has in ``section``, in file order."""
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    """The single value of ``key`` in ``section``; fails if absent or repeated."""
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times, want once"
    return found[0]


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def test_exec_start_is_an_absolute_popsync_run(unit: dict[str, list[tuple[str, str]]]) -> None:
    program, *args = one(unit, "Service", "ExecStart").split()
    # %h is the user's home directory: absolute once systemd expands it.
    assert program.startswith(("/", "%h/")), f"ExecStart program {program!r} is not absolute"
    assert Path(program).name == "popsync"
    assert args == ["run"]


def test_a_config_error_does_not_restart_forever(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert one(unit, "Service", "Restart") == "on-failure"
    prevented = " ".join(values(unit, "Service", "RestartPreventExitStatus")).split()
    assert "2" in prevented


def test_documentation_line(unit: dict[str, list[tuple[str, str]]]) -> None:
    docs = " ".join(values(unit, "Unit", "Documentation")).split()
    assert all(re.match(r"(https?|file|man|info):", uri) for uri in docs), docs
    # The man pages the wheel installs (scripts/generate.py writes them).
    assert {"man:popsync(1)", "man:popsync.yaml(5)"} <= set(docs)


HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "PrivateUsers": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "read-only",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
}


@pytest.mark.parametrize(("key", "expected"), sorted(HARDENING.items()))
def test_hardening_setting(unit: dict[str, list[tuple[str, str]]], key: str, expected: str) -> None:
    assert one(unit, "Service", key) == expected


def test_network_stays_open(unit: dict[str, list[tuple[str, str]]]) -> None:
    """POP3 servers, loopback, name resolution and helpers' sockets."""
    families = one(unit, "Service", "RestrictAddressFamilies").split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
    for closed in ("PrivateNetwork", "IPAddressDeny"):
        assert not values(unit, "Service", closed), f"{closed}= would cut popsync off the network"


LEDGER_DIR = "%h/.local/state/popsync"


def test_the_ledger_directory_is_made_before_the_sandbox(
    unit: dict[str, list[tuple[str, str]]],
) -> None:
    """ReadWritePaths= needs the directory to exist; "+" runs mkdir unsandboxed.
    StateDirectory= would not do: systemd 252 (Debian 12) puts it under ~/.config
    for user units."""
    assert values(unit, "Service", "ExecStartPre") == [f"+/bin/mkdir -p {LEDGER_DIR}"]
    assert not values(unit, "Service", "StateDirectory")


def test_writable_paths_cover_common_maildirs_and_helpers(
    unit: dict[str, list[tuple[str, str]]],
) -> None:
    """Everything is read-only but these: each optional ("-"), so a missing
    one does not stop the service, except the ledger's, which must be there."""
    paths = " ".join(values(unit, "Service", "ReadWritePaths")).split()
    assert all(p.startswith("-") for p in paths if p != LEDGER_DIR), paths
    writable = {p.removeprefix("-") for p in paths}
    maildirs = {"%h/Maildir", "%h/Mail", "%h/mail", "%h/.mail", "%h/.local/share/mail"}
    assert maildirs <= writable
    assert LEDGER_DIR in paths, "the ledger's directory must be writable"
    # Caches, the runtime directory (agent and D-Bus sockets) and gpg's home,
    # for password_command helpers such as pass, gpg and secret-tool.
    assert {"%C", "%t", "%h/.gnupg"} <= writable


# --- systemd's own checks, where systemd-analyze exists ---------------------

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def popsync_script() -> Path:
    """The ``popsync`` console script installed beside this interpreter."""
    script = Path(sys.executable).parent / "popsync"
    if not script.is_file():
        pytest.skip(f"no popsync script beside {sys.executable} (not installed?)")
    return script


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart names an existing popsync."""
    text = UNIT.read_text(encoding="utf-8")
    text, count = re.subn(r"(?m)^ExecStart=\S+", f"ExecStart={popsync_script()}", text)
    assert count == 1
    copy = tmp_path / "units" / UNIT.name
    copy.parent.mkdir()
    copy.write_text(text, encoding="utf-8")
    return copy


def analyze(
    tmp_path: Path, *args: str, manpath: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze --user ARGS``, offline: a user manager needs a runtime
    directory, given here in the scratch directory (no systemd has to run).
    ``verify`` runs ``man`` for each ``Documentation=man:`` page: *manpath*
    is where it looks (default: only the system's pages)."""
    assert ANALYZE is not None
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_PAGER": "", "LC_ALL": "C"}
    env.pop("MANPATH", None)
    if manpath is not None:
        env["MANPATH"] = str(manpath)
    return subprocess.run(
        [ANALYZE, "--user", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def installed_man_pages(tmp_path: Path) -> Path:
    """The repository's man pages laid out as an install puts them (share/man)."""
    root = tmp_path / "share" / "man"
    for page in (REPO / "man").iterdir():
        section = root / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section / page.name)
    return root


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path, runnable_unit: Path) -> None:
    result = analyze(tmp_path, "verify", str(runnable_unit), manpath=installed_man_pages(tmp_path))
    assert result.returncode == 0, result.stderr
    # Unknown or misspelt settings are only warnings: none may be printed.
    assert result.stderr.strip() == "", result.stderr


@needs_analyze
def test_systemd_analyze_verify_before_the_man_pages_are_installed(
    tmp_path: Path, runnable_unit: Path
) -> None:
    """Without the pages, verify names them (and nothing else); ``--man=no``,
    as the unit's comment says, then passes."""
    empty = tmp_path / "no-man"
    empty.mkdir()
    result = analyze(tmp_path, "verify", str(runnable_unit), manpath=empty)
    complaints = result.stderr.strip().splitlines()
    assert complaints and all("Command 'man popsync" in line for line in complaints), complaints
    result = analyze(tmp_path, "verify", "--man=no", str(runnable_unit), manpath=empty)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


@needs_analyze
def test_systemd_analyze_security_score(tmp_path: Path, runnable_unit: Path) -> None:
    assert ANALYZE is not None
    usage = subprocess.run(
        [ANALYZE, "security", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    if "--offline" not in usage.stdout:
        pytest.skip("this systemd-analyze has no security --offline (systemd < 250)")
    result = analyze(tmp_path, "security", "--offline=true", "--no-pager", str(runnable_unit))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match[1])
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{result.stdout}"
