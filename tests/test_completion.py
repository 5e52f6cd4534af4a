"""Shell completion: ``completion/popsync`` (bash), ``completion/_popsync``
(zsh) and ``popsync completion bash|zsh``, all written by shtab from the
argparse parser.

bash is driven for real: the script is sourced and its completion function
called the way bash calls it on TAB.  zsh, where installed, parses the file.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BASH_FILE = REPO / "completion" / "popsync"
ZSH_FILE = REPO / "completion" / "_popsync"

needs_shtab = pytest.mark.skipif(
    importlib.util.find_spec("shtab") is None, reason="shtab is not installed"
)
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def bash_complete(script: Path, words: list[str]) -> list[str]:
    """What bash offers for the last of *words* after sourcing *script*."""
    line = " ".join(words)
    program = (
        f"source {script}\n"
        "complete -p popsync >/dev/null || exit 3\n"
        f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
        f'COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}\n'
        f"_shtab_popsync popsync {words[-1]} {words[-2]}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return sorted(done.stdout.split())


def test_the_committed_scripts_are_what_shtab_generates() -> None:
    from tests.test_manpages import load_generator

    generator = load_generator()
    if importlib.util.find_spec("shtab") is None:
        pytest.skip("shtab is not installed")
    problems = [p for p in generator.stale(generator.generated()) if "completion/" in p]
    assert not problems, "; ".join(problems) + ": run python scripts/generate.py"


@needs_bash
def test_bash_completes_commands_and_options() -> None:
    assert bash_complete(BASH_FILE, ["popsync", "sy"]) == ["sync"]
    assert bash_complete(BASH_FILE, ["popsync", "sync", "--no"]) == ["--no-progress"]
    assert bash_complete(BASH_FILE, ["popsync", "import", "x", "--from", "f"]) == ["fetchmail"]
    assert "--log-format" in bash_complete(BASH_FILE, ["popsync", "--"])


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_parses_the_completion_function() -> None:
    assert ZSH_FILE.read_text(encoding="utf-8").startswith("#compdef popsync\n")
    # -n: the file parses; autoload +X: zsh loads it as the function _popsync.
    program = f"zsh -n {ZSH_FILE} && fpath=({ZSH_FILE.parent} $fpath) && autoload -Uz +X _popsync"
    done = subprocess.run(
        ["zsh", "-f", "-c", program], capture_output=True, text=True, check=False, timeout=30
    )
    assert done.returncode == 0, done.stderr


@needs_shtab
@needs_bash
def test_popsync_completion_prints_a_working_script(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "popsync", "completion", "bash"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    script = tmp_path / "popsync.bash"
    script.write_text(done.stdout, encoding="utf-8")
    assert bash_complete(script, ["popsync", "comp"]) == ["completion"]


def test_popsync_completion_without_shtab_is_one_line(tmp_path: Path) -> None:
    # A directory named shtab with no module in it: `import shtab` fails.
    blocker = tmp_path / "blocker"
    (blocker / "shtab").mkdir(parents=True)
    (blocker / "shtab" / "__init__.py").write_text("raise ImportError('no shtab here')\n")
    env = {"PYTHONPATH": f"{blocker}:{REPO}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "popsync", "completion", "zsh"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "popsync[completion]" in done.stderr
