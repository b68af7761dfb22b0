# Sourced by the test command (after _venv.sh): what the browser tests (tests/test_web.py) need.
# Debian's chromium (Playwright's own browser downloads are not used: never `playwright install`)
# and the playwright package in the venv. When either cannot be had, one line says why and
# CABINET_BROWSER_MISSING carries it, so that the browser tests fail with that line (never skip).
_cabinet_browser() {
    local venv_py="${VENV:-$ROOT/.venv}/bin/python"
    if [ ! -x /usr/bin/chromium ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "Installing chromium (for the browser tests) ..." >&2
            apt-get install -y -qq chromium >/dev/null 2>&1 \
                || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; } || true
        fi
        if [ ! -x /usr/bin/chromium ]; then
            export CABINET_BROWSER_MISSING="browser tests: /usr/bin/chromium is missing and could not be installed (run as root: apt-get install chromium)"
            echo "$CABINET_BROWSER_MISSING" >&2
            return 0
        fi
    fi
    if ! "$venv_py" -c 'import playwright' >/dev/null 2>&1; then
        echo "Installing playwright into $VENV (for the browser tests) ..." >&2
        "$venv_py" -m pip install --quiet playwright >&2 || true
        if ! "$venv_py" -c 'import playwright' >/dev/null 2>&1; then
            export CABINET_BROWSER_MISSING="browser tests: the playwright package could not be installed into $VENV (pip install playwright)"
            echo "$CABINET_BROWSER_MISSING" >&2
        fi
    fi
}
_cabinet_browser
