# Sourced by scripts/demo and scripts/test: create .venv if missing and install jaxscale.
# $1: pip extras ("" or "[test]").
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JAXSCALE_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[jaxscale] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.jaxscale-installed$1"
if [ ! -f "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ]; then
  echo "[jaxscale] installing jaxscale$1 into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install --quiet -e "$REPO$1"
  touch "$stamp"
fi
# An editable install leaves jaxscale's own modules uncompiled (a wheel install compiles them);
# byte-compile them once so that no run pays ~0.1 s for it, whatever PYTHONDONTWRITEBYTECODE says.
"$VENV/bin/python" -m compileall -q "$REPO/jaxscale" >/dev/null || true
