"""The wheel ships the man pages, the completion scripts and the compiled body
reader, and ``pipx install`` gives a working ``popsync`` whose man page
``man`` finds.

Both tests build from a copy of the source tree (never in the checkout, where
setuptools would leave build/ behind) and need the network for pip's build
dependencies (setuptools), so they are marked slow.  The pipx test needs pipx
1.5 or later (the first to link ``share/man``), which the ``test`` extra
installs; Debian 12's pipx 1.1 is too old.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from popsync import __version__

REPO = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "*.so",  # an in-place build: the wheel must compile its own
)

#: Where each generated file goes under the environment's prefix.
DATA_FILES = {
    "share/man/man1/popsync.1": "man/popsync.1",
    "share/man/man5/popsync.yaml.5": "man/popsync.yaml.5",
    "share/bash-completion/completions/popsync": "completion/popsync",
    "share/zsh/site-functions/_popsync": "completion/_popsync",
}


def source_copy(tmp_path: Path) -> Path:
    tree = tmp_path / "src"
    shutil.copytree(REPO, tree, ignore=SKIP)
    return tree


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=timeout, env=env
    )
    assert done.returncode == 0, f"{argv[:4]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_the_wheel_holds_the_man_pages_and_completions(tmp_path: Path) -> None:
    tree = source_copy(tmp_path)
    out = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(tree)])
    (wheel,) = out.glob("popsync-*.whl")
    data = f"popsync-{__version__}.data/data/"
    with zipfile.ZipFile(wheel) as archive:
        for inside, source in DATA_FILES.items():
            assert archive.read(data + inside) == (REPO / source).read_bytes(), inside
        names = archive.namelist()
    # The body reader's C accelerator, compiled, with its source and stub.
    assert any(re.fullmatch(r"popsync/pop3/_bodypass\..*\.so", name) for name in names), names
    assert {"popsync/pop3/_bodypass.c", "popsync/pop3/_bodypass.pyi"} <= set(names)


def _pipx_version() -> tuple[int, ...] | None:
    try:
        installed = importlib.metadata.version("pipx")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", installed)[:2])


@pytest.mark.slow
@pytest.mark.skipif(
    (_pipx_version() or (0,)) < (1, 5), reason="needs pipx 1.5 or later (pip install pipx)"
)
def test_pipx_install_gives_a_command_and_its_man_page(tmp_path: Path) -> None:
    tree = source_copy(tmp_path)
    home = tmp_path / "home"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PIPX_HOME": str(home / "pipx"),
        "PIPX_BIN_DIR": str(home / "bin"),
        "PIPX_MAN_DIR": str(home / "man"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONFIG_FILE"):
        if name in os.environ:
            env[name] = os.environ[name]
    run([sys.executable, "-m", "pipx", "install", "--python", sys.executable, str(tree)], env=env)

    version = run([str(home / "bin" / "popsync"), "--version"], env=env, timeout=60)
    assert version.strip() == f"popsync {__version__}"
    for section, page in (("man1", "popsync.1"), ("man5", "popsync.yaml.5")):
        linked = home / "man" / section / page
        assert linked.is_file(), f"pipx did not link {section}/{page}"
        assert linked.read_bytes() == (REPO / "man" / page).read_bytes()
    if shutil.which("man"):
        shown = run(
            ["man", "popsync"],
            env={**env, "MANPATH": str(home / "man"), "MANPAGER": "cat", "MANWIDTH": "80"},
            timeout=60,
        )
        assert "popsync - fetch POP3 mail" in re.sub(".\b", "", shown)
