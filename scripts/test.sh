#!/usr/bin/env bash
# The one command to install everything and run every check on a Debian machine:
#
#   scripts/test.sh              all checks and the whole test suite
#   scripts/test.sh -k dovecot   extra arguments go to pytest
#
# Steps:
#   1. Debian packages, only if missing: dovecot-pop3d (the real POP3 server of
#      the interop tests), dovecot-lmtpd and dovecot-imapd (the real LMTP and
#      IMAP servers the delivery targets are tested against; dovecot-lda comes
#      with dovecot-core), fetchmail, getmail6 and mpop (whose state files
#      `popsync import` is tested against), postgresql (the real PostgreSQL
#      the ledger tests also run on), python3 and python3-venv, gcc and
#      python3-dev (to build the C body reader).  apt-get (after an
#      "apt-get update") runs directly as root, through sudo otherwise.
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

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

# --- 1. system packages: the real Dovecot of the interop and delivery tests ---

dovecot_packages=()
[ -x /usr/sbin/dovecot ] && [ -x /usr/lib/dovecot/pop3 ] || dovecot_packages+=(dovecot-pop3d)
[ -x /usr/lib/dovecot/lmtp ] || dovecot_packages+=(dovecot-lmtpd)
[ -x /usr/lib/dovecot/imap ] || dovecot_packages+=(dovecot-imapd)
[ -x /usr/lib/dovecot/dovecot-lda ] || dovecot_packages+=(dovecot-core)
if [ "${#dovecot_packages[@]}" -gt 0 ]; then
    apt_install "${dovecot_packages[@]}"
fi

# The other POP3 clients whose state files `popsync import` reads.
client_packages=()
command -v fetchmail >/dev/null || client_packages+=(fetchmail)
command -v getmail >/dev/null || client_packages+=(getmail6)
command -v mpop >/dev/null || client_packages+=(mpop)
if [ "${#client_packages[@]}" -gt 0 ]; then
    apt_install "${client_packages[@]}"
fi

# systemd-analyze, which checks contrib/popsync.service (tests/test_systemd_unit.py).
# The package installs without a running systemd (containers, CI).
command -v systemd-analyze >/dev/null || apt_install systemd

# groff renders the man pages (tests/test_manpages.py checks them with every
# warning on); zsh parses the zsh completion (tests/test_completion.py).
doc_packages=()
command -v groff >/dev/null || doc_packages+=(groff-base)
command -v zsh >/dev/null || doc_packages+=(zsh)
if [ "${#doc_packages[@]}" -gt 0 ]; then
    apt_install "${doc_packages[@]}"
fi
# PostgreSQL's server binaries, for the ledger tests that run on a real
# PostgreSQL (tests/servers/postgres.py starts a private cluster; the package's
# own cluster is not used).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || apt_install postgresql

# A C compiler and the Python headers build the body reader's C accelerator
# (popsync/pop3/_bodypass.c) during the install below; the tests fail under CI
# without it.  gcc brings libasan and libubsan for its sanitizer test.
build_packages=()
command -v gcc >/dev/null || build_packages+=(gcc)
"$python" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    2>/dev/null || build_packages+=(python3-dev)
if [ "${#build_packages[@]}" -gt 0 ]; then
    apt_install "${build_packages[@]}"
fi

# --- 2. virtualenv -----------------------------------------------------------

ensure_venv '.[test]'

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
