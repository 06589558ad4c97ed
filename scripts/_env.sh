# Shared set-up for scripts/demo and scripts/test: a .venv with the project installed.
# Sourced, not run. Usage: ensure_venv "<pip extras spec>"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

find_python() {
  for candidate in python3.13 python3.12 python3.11 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  echo "error: Python >= 3.10 with the venv module is required (apt-get install python3-venv)" >&2
  return 1
}

ensure_venv() {
  local spec="$1"
  if [ ! -x "$PY" ]; then
    echo "==> creating $VENV"
    "$(find_python)" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
  fi
  # Reinstall only when pyproject.toml or the requested extras changed since the last install.
  local stamp="$VENV/.installed-$(echo "$spec" | tr -c 'a-z0-9' '_')"
  if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "==> installing $spec into .venv"
    "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT$spec"
    touch "$stamp"
  fi
}

# ensure_debian_package PACKAGE CHECK...: run CHECK (a command); if it fails, install Debian's
# PACKAGE (as root, or through password-less sudo), or stop with a message saying how.
ensure_debian_package() {
  local package="$1"
  shift
  if "$@" >/dev/null 2>&1; then
    return 0
  fi
  local run=()
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "==> installing $package (Debian package)"
  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    echo "==> installing $package (Debian package, via sudo)"
    run=(sudo -n)
  else
    echo "error: $package is not installed and cannot be installed here;" >&2
    echo "       install it (Debian/Ubuntu: apt-get install $package) and run again" >&2
    exit 1
  fi
  "${run[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  "${run[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >/dev/null
}
