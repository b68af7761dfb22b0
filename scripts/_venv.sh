# Sourced by scripts/demo and scripts/test: make .venv inside the repo and install the project.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "cabinet needs Python 3.11 or newer (found: $("$PY" --version 2>&1))" >&2
    exit 1
fi
VENV="$ROOT/.venv"
STAMP="$VENV/.installed-$(cat "$ROOT/pyproject.toml" | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:12])')-$1"
if [ ! -f "$STAMP" ]; then
    echo "Setting up $VENV (one time) ..." >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    if [ "$1" = test ]; then
        "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]" >&2
    else
        "$VENV/bin/python" -m pip install --quiet -e "$ROOT" >&2
    fi
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
