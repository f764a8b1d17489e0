#!/usr/bin/env bash
# Everything one GPU can tell us, in one command (< 10 min on one H100/H200, no network):
#   1. environment report (nvidia-smi, versions)             -> env.txt
#   2. GPU tests: tests/kernels on CUDA (fp32, fp16 and bf16 cases), the model and loader tests, every
#      `gpu`-marked test                                     -> tests.txt
#   3. speedrun bench kernels --quick (the recipe's shapes)  -> kernels.csv, kernels.txt, kernels_<op>.png
#   4. speedrun bench train, --kernels torch and triton       -> train.md
#   5. speedrun bench converge: a shortened gpt2-124m run per kernel set, val curves compared
#                                                            -> converge.md, converge.png, converge_logs/
#   6. a markdown summary of all of it                       -> summary.md
# Results go to $OUT if set, else bench/results/<date>_<gpu>/. Every step runs even if one fails, each
# within a time budget (together 8.3 min; a step over its budget is stopped and counts as failed); the
# script then exits non-zero and summary.md names the failed steps.
#
#   bench/gpu_suite.sh              on a machine with a CUDA GPU
#   bench/gpu_suite.sh --dry-run    the same pipeline on the CPU with tiny settings (CI runs this): it
#                                   checks the script, not the GPU; its times mean nothing
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_suite.sh: unknown option $arg (use --dry-run or --help)" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-python3}
if [ -x "${SPEEDRUN_VENV:-.venv}/bin/python" ]; then PY="${SPEEDRUN_VENV:-.venv}/bin/python"; fi
if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: torch sees no CUDA GPU (use --dry-run to check the pipeline on a CPU)" >&2
    exit 2
fi
if [ "$DRY_RUN" = 1 ]; then export TRITON_INTERPRET=1; fi

if [ -z "${OUT:-}" ]; then
    OUT=$("$PY" -c "from speedrun.bench.measure import bench_device, results_dir; print(results_dir(bench_device(None)))")
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS_FILE="$OUT/steps.tsv"
: > "$STEPS_FILE"
echo "gpu_suite: results in $OUT$([ "$DRY_RUN" = 1 ] && echo ' (dry run on CPU)')"

# step NAME LOGFILE SECONDS COMMAND...: run with a time budget (the suite must stay under 10 minutes; exit
# 124 = over budget), tee the output, record "name<TAB>rc<TAB>seconds" in steps.tsv
step() {
    local name=$1 log=$2 budget=$3
    shift 3
    echo "=== $name (budget ${budget}s): $*"
    local t0=$SECONDS
    if declare -F "$1" > /dev/null; then  # a function of this script (the environment report): no budget
        "$@" 2>&1 | tee "$OUT/$log"
    else
        timeout --kill-after=15 "$budget" "$@" 2>&1 | tee "$OUT/$log"
    fi
    local rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS_FILE"
    [ "$rc" = 0 ] || echo "=== $name FAILED (exit $rc$([ "$rc" = 124 ] && echo ': over its time budget'))"
}

env_report() {
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
    "$PY" -c "import torch, platform; import triton; print(f'python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}'); print('gpu:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU)')"
    if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
}

SB=("$PY" -m speedrun.cli bench)
if [ "$DRY_RUN" = 1 ]; then
    step environment env.txt 60 env_report
    step tests tests.txt 300 "$PY" -m pytest -q -m gpu tests/kernels
    step "bench kernels" kernels.log 300 "${SB[@]}" kernels --quick --device cpu --variant torch,triton,sdpa \
        --op attention,mlp,cross_entropy,newton_schulz,polar_express --out "$OUT"
    step "bench train" train.log 300 "${SB[@]}" train --device cpu --steps 1 --warmup 1 --profile-steps 1 --seq-len 128 \
        --out "$OUT"
    step "bench converge" converge.log 300 "${SB[@]}" converge --device cpu --preset tiny --steps 2 --val-every 1 \
        --seq-len 128 --val-tokens 4096 --out "$OUT"
else
    # budgets: 120 + 140 + 120 + 120 s = 8.3 min at the most, under the 10-minute limit of one command
    step environment env.txt 30 env_report
    step tests tests.txt 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/test_model.py \
        tests/test_kernels_in_model.py tests/data/test_loader.py -m "gpu or not slow"
    # record #89's varlen_attention, mtp_cross_entropy and mlp_fp8 have plain-PyTorch references only so far
    # (their Triton kernels are issue [4/6]): timing them at the record's size would eat this step's budget
    step "bench kernels" kernels.log 140 "${SB[@]}" kernels --quick \
        --op attention,mlp,cross_entropy,newton_schulz,polar_express --out "$OUT"
    step "bench train" train.log 120 "${SB[@]}" train --steps 5 --warmup 2 --profile-steps 1 --out "$OUT"
    # eager (no compile): this step checks that the kernel sets train alike, not their speed
    step "bench converge" converge.log 120 "${SB[@]}" converge --steps 200 --val-every 25 --seq-len 8192 \
        --val-tokens 524288 --no-compile --out "$OUT"
fi
"$PY" -m speedrun.bench.summary "$OUT"
if awk -F'\t' '$2 != 0 { bad = 1 } END { exit bad ? 0 : 1 }' "$STEPS_FILE"; then
    echo "gpu_suite: FAILED steps (see $OUT/summary.md):"
    awk -F'\t' '$2 != 0 { print "  " $1 " (exit " $2 ")" }' "$STEPS_FILE"
    exit 1
fi
echo "gpu_suite: all steps passed; summary: $OUT/summary.md"
