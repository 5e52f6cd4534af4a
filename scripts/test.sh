#!/usr/bin/env bash
# The one command to install everything and run every check on a Debian machine:
#
#   scripts/test.sh              all checks and the whole test suite
#   scripts/test.sh -k dovecot   extra arguments go to pytest
#
# Steps:
#   1. Debian packages, only if missing: dovecot-pop3d (the real POP3 server of
#      the interop tests), python3 and python3-venv.  apt-get runs directly as
#      root, through sudo otherwise; "apt-get update" runs once, only then.
#   2. The virtualenv .venv in the repository (created or reused), with
#      `pip install -e '.[test]'`.
#   3. ruff check, ruff format --check, mypy (strict, on popsync/), pytest.
#      Every step runs even when an earlier one failed, so one run shows all
#      problems; the exit status is non-zero if any failed.  pytest collecting
#      no test at all (its exit status 5) counts as a failure.
#
# Works from any directory; needs no input (CI runs it as root with CI=true).
# Environment: PYTHON picks the interpreter for the virtualenv (default
# python3, which must be 3.11 or newer).

set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

python="${PYTHON:-python3}"
venv="$repo/.venv"
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '\n==> %s\n' "$*"; }

# --- 1. system packages ------------------------------------------------------

missing=()
[ -x /usr/sbin/dovecot ] && [ -x /usr/lib/dovecot/pop3 ] || missing+=(dovecot-pop3d)
if ! command -v "$python" >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
elif ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)  # Debian splits venv/ensurepip out of python3
fi

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1; then
        as_root=(sudo)
    else
        echo "error: need ${missing[*]}, but not root and no sudo to install them" >&2
        exit 1
    fi
    say "installing Debian packages: ${missing[*]}"
    "${as_root[@]}" apt-get update
    "${as_root[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi

# --- 2. virtualenv -----------------------------------------------------------

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: $python is $("$python" -V 2>&1); popsync needs Python 3.11 or newer" >&2
    exit 1
fi
if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "creating virtualenv $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi
say "installing popsync and its test tools into .venv"
"$venv/bin/python" -m pip install --quiet -e '.[test]'

# The tools run from the virtualenv, whatever else is on PATH.
export PATH="$venv/bin:$PATH"
unset PYTHONPATH

# --- 3. checks ----------------------------------------------------------------

failed=()
run() {
    local name="$1"
    shift
    say "$name"
    if "$@"; then
        return 0
    fi
    failed+=("$name")
}

run "ruff check" ruff check .
run "ruff format --check" ruff format --check .
run "mypy" mypy

say "pytest $*"
status=0
python -m pytest "$@" || status=$?
case "$status" in
    0) ;;
    5) echo "error: pytest collected no tests" >&2; failed+=("pytest (no tests collected)") ;;
    *) failed+=("pytest (exit status $status)") ;;
esac

if [ "${#failed[@]}" -gt 0 ]; then
    echo >&2
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
printf '\nAll checks passed.\n'
