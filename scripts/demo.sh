#!/usr/bin/env bash
# The one command to install popsync and watch it work, with no outside server:
#
#   scripts/demo.sh
#
# Creates (or reuses) the virtualenv .venv in the repository, installs popsync
# into it, and runs `popsync demo`: a built-in POP3 server on 127.0.0.1 with
# sample mail, synced three times into a temporary Maildir.  Extra arguments go
# to `popsync demo` (e.g. `scripts/demo.sh --dir /tmp/popsync-demo` keeps the files).
# Environment: PYTHON picks the interpreter (default python3, 3.11 or newer).
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

ensure_venv .
say "popsync demo"
exec "$venv/bin/popsync" demo "$@"
