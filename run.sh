#!/usr/bin/env bash
# speedrun entry point.
#
#   ./run.sh [OPTIONS]        prepare the environment on first use, then run the race on this machine
#   ./run.sh test [PYTEST…]   prepare the environment (with dev extras), then run the whole test suite
#
# The virtual environment lives in .venv (override with SPEEDRUN_VENV). It is created with
# --system-site-packages so that a CUDA build of torch already installed on the machine is reused.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${SPEEDRUN_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# The torch release this project is tested with; used only when the environment has no torch at all.
TORCH_SPEC="${SPEEDRUN_TORCH:-torch==2.13.0}"

usage() {
    cat <<'EOF'
Usage:
  ./run.sh [OPTIONS]          run the race on what this machine has
  ./run.sh test [PYTEST_ARGS] run the test suite (e.g. ./run.sh test -m "not slow" tests/data)
  ./run.sh --help             this message

Race options (passed to `speedrun train`; unknown options are an error):
EOF
    # The option list comes from the trainer's own parser, so it can never go stale. It needs no
    # third-party package, so it works before the virtual environment exists.
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m speedrun.cli train --help | sed '1,/^options:/d'
    cat <<'EOF'

Launcher options (handled here):
  --nproc N                   processes per node (default: number of visible CUDA GPUs, 1 without CUDA)

Environment:
  SPEEDRUN_VENV               virtual environment folder (default: ./.venv)
  SPEEDRUN_TORCH              pip spec used when no torch is installed (default: torch==2.13.0)
  PYTHON                      interpreter used to create the environment (default: python3, >= 3.10)
EOF
}

log() { printf '[run.sh] %s\n' "$*" >&2; }

# Create the venv on first use and (re)install the package whenever pyproject.toml changes.
prepare_env() {
    local extras="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" - <<'EOF' || { log "Python >= 3.10 is required (found $("$PYTHON" --version 2>&1))."; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
EOF
        log "creating virtual environment in ${VENV#$ROOT/} (with system site packages)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    fi
    local py="$VENV/bin/python"
    if ! "$py" -c "import torch" >/dev/null 2>&1; then
        log "no torch found: installing $TORCH_SPEC"
        "$py" -m pip install --quiet "$TORCH_SPEC"
    fi
    local stamp
    stamp="$VENV/.speedrun-installed-$extras-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        log "installing speedrun${extras:+[$extras]} into the environment"
        local spec="$ROOT"
        [ -n "$extras" ] && spec="$ROOT[$extras]"
        "$py" -m pip install --quiet --disable-pip-version-check -e "$spec"
        rm -f "$VENV"/.speedrun-installed-"$extras"-*
        touch "$stamp"
    fi
}

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# The Triton kernels run on CPU through Triton's interpreter; it must be chosen before triton is imported.
if ! has_cuda; then export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"; fi

cmd="${1:-}"
case "$cmd" in
    -h|--help|help)
        usage
        exit 0
        ;;
    test)
        shift
        prepare_env dev
        cd "$ROOT"
        set +e
        # Two workers: much of the suite is single-threaded Python (Triton's interpreter, the records'
        # checks); tests/conftest.py says how the tests are shared between them. `-n 0` runs in one process.
        "$VENV/bin/python" -m pytest -n 2 --dist loadgroup --no-loadscope-reorder "$@"
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then
            log "pytest collected no tests: a run that executes no test is a broken run."
            exit 1
        fi
        exit "$rc"
        ;;
esac

# The race. --nproc is ours; everything else goes to `speedrun train`, which rejects unknown options.
nproc=""
train_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc)
            [ $# -ge 2 ] || { log "--nproc needs a value"; exit 2; }
            nproc="$2"; shift 2 ;;
        --nproc=*)
            nproc="${1#--nproc=}"; shift ;;
        *)
            train_args+=("$1"); shift ;;
    esac
done
if [ -n "$nproc" ] && ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
    log "--nproc must be a positive integer, got '$nproc'"; exit 2
fi

# Check the options before spending minutes on an install.
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m speedrun.cli train --check-args "${train_args[@]}"

prepare_env ""
cd "$ROOT"
if [ -z "$nproc" ]; then
    if has_cuda; then nproc="$(nvidia-smi -L | wc -l)"; else nproc=1; fi
fi
if [ "$nproc" -eq 1 ]; then
    exec "$VENV/bin/speedrun" train "${train_args[@]}"
fi
log "launching $nproc processes with torchrun"
exec "$VENV/bin/torchrun" --standalone --nproc_per_node="$nproc" -m speedrun.cli train "${train_args[@]}"
