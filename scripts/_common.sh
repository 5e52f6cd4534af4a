# Shared by scripts/demo.sh and scripts/test.sh (sourced, not run).
# Sets: repo, python, venv.  Provides: say, apt_install, ensure_venv SPEC.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
venv="$repo/.venv"
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '\n==> %s\n' "$*"; }

# apt_install PKG...: install Debian packages (apt-get update once first), as
# root directly or through sudo.
apt_install() {
    local as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "error: need $*, but not root and no sudo to install them" >&2
            exit 1
        fi
        as_root=(sudo)
    fi
    say "installing Debian packages: $*"
    "${as_root[@]}" apt-get update
    "${as_root[@]}" apt-get install -y --no-install-recommends "$@"
}

# ensure_venv SPEC: a Python >= 3.11 virtualenv at .venv with `pip install -e SPEC`.
ensure_venv() {
    local missing=()
    if ! command -v "$python" >/dev/null 2>&1; then
        missing+=(python3 python3-venv)
    elif ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        missing+=(python3-venv)  # Debian splits venv/ensurepip out of python3
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "error: $python is $("$python" -V 2>&1); popsync needs Python 3.11 or newer" >&2
        exit 1
    fi
    if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        say "creating virtualenv $venv"
        rm -rf "$venv"
        "$python" -m venv "$venv"
    fi
    say "installing $1 into .venv"
    "$venv/bin/python" -m pip install --quiet -e "$1"
}
