#!/usr/bin/env bash
# Everything one GPU can tell us, in one command, with no network. Which to run (device time includes the
# machine's start, a few minutes):
#   bench/gpu_suite.sh --smoke      < 4 min: the environment, every Triton kernel configuration of record #89's
#                                   ops launched once on the card, the model check (Triton = torch on CUDA), one
#                                   compiled training step per kernel set. Run this when less than 10 minutes are
#                                   left.
#   bench/gpu_suite.sh              < 10 min: the smoke steps' substance and more:
#     1. environment report (nvidia-smi, versions)                          -> env.txt
#     2. GPU tests: tests/kernels on CUDA (fp32, fp16, bf16), the model check, the compile-graph check,
#        the loader tests, every `gpu`-marked test (in parallel when pytest-xdist is there) -> tests.txt
#     3. speedrun bench launch: every kernel configuration of record #89's ops, once   -> launch.md
#     4. speedrun bench kernels --quick, record #89's ops at its shapes -> kernels.csv, kernels.txt, kernels_<op>.png
#     5. speedrun bench train, record89 (the default race), --kernels triton, eager   -> record89/train.md
#     6. the same, compiled as the race runs it (one graph)             -> record89_compiled/train.md
#     7. a markdown summary of all of it                                -> summary.md
#   Left for a later call (neither finished on the H100, bench/results/2026-11-27_1547_*): Sub3Min's compiled
#   step, `speedrun bench train --preset sub3min --kernels triton --steps 3 --warmup 1`, and the kernel sets'
#   training compared, `speedrun bench converge --preset sub3min --steps 15 --val-every 5 --seq-len 8192
#   --val-tokens 262144 --no-compile` (the tests' model check compares them on the card meanwhile).
# Results go to $OUT if set, else bench/results/<date>_<gpu>/, or <date>_<time>_<gpu>/ if that holds an
# earlier run's (commit that folder). Every step runs even if one fails, each within a time budget (a step
# over it gets Ctrl-C, so pytest and the trainer still write what they have, and counts as failed); the
# script then exits non-zero and summary.md names the failures.
#
#   --dry-run     the same pipeline on the CPU with tiny settings (CI runs both modes this way): it checks
#                 the script, not the GPU; its times mean nothing
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY_RUN=0
SMOKE=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --smoke) SMOKE=1 ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_suite.sh: unknown option $arg (use --smoke, --dry-run or --help)" >&2; exit 2 ;;
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
echo "gpu_suite$([ "$SMOKE" = 1 ] && echo ' --smoke'): results in $OUT$([ "$DRY_RUN" = 1 ] && echo ' (dry run on CPU)')"

# step NAME LOGFILE SECONDS COMMAND...: run with a time budget (the suite must stay under 10 minutes; exit
# 124 = over budget: SIGINT first, so pytest prints its failures and a run writes its log, SIGKILL 20 s
# later), tee the output, record "name<TAB>rc<TAB>seconds" in steps.tsv
step() {
    local name=$1 log=$2 budget=$3
    shift 3
    echo "=== $name (budget ${budget}s): $*"
    local t0=$SECONDS
    # paths inside the checkout are written relative to it: the logs get committed, the checkout's place not
    if declare -F "$1" > /dev/null; then  # a function of this script (the environment report): no budget
        "$@" 2>&1 | sed -u "s|$ROOT/||g" | tee "$OUT/$log"
    else
        timeout --signal=INT --kill-after=20 "$budget" "$@" 2>&1 | sed -u "s|$ROOT/||g" | tee "$OUT/$log"
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
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
if "$PY" -c "import xdist" 2> /dev/null && [ "$DRY_RUN" = 0 ]; then
    PYTEST+=(-n 8)  # cold Triton compiles dominate: 8 workers on the GPU machine's 16 cores
fi
# record #89's ops (the default race; the Sub3Min ops were timed in bench/results/2026-11-27_nvidia-h100-80gb-hbm3)
KERNEL_OPS=varlen_attention,mtp_cross_entropy,mlp_fp8,quantize_down,polar_express
if [ "$DRY_RUN" = 1 ] && [ "$SMOKE" = 1 ]; then
    step environment env.txt 60 env_report
    step "bench launch" launch.log 120 "${SB[@]}" launch --device cpu --op varlen_attention --out "$OUT"
    # the GPU-marked model checks skip on the CPU: the step checks the script (the main suite runs the rest)
    step "model check" tests.txt 60 "${PYTEST[@]}" tests/test_kernels_in_model.py -m gpu
    step "bench train" train.log 300 "${SB[@]}" train --device cpu --preset sub3min-tiny --kernels triton,torch \
        --steps 1 --warmup 0 --profile-steps 0 --seq-len 128 --out "$OUT"
elif [ "$DRY_RUN" = 1 ]; then
    step environment env.txt 60 env_report
    step tests tests.txt 300 "${PYTEST[@]}" -m gpu tests/kernels
    step "bench launch" launch.log 120 "${SB[@]}" launch --device cpu --op varlen_attention --out "$OUT"
    # two of the ops (tests/bench/test_bench_kernels.py runs every op's quick bench): the step, not the ops
    step "bench kernels" kernels.log 300 "${SB[@]}" kernels --quick --device cpu --variant torch,triton \
        --op quantize_down,mlp_fp8 --out "$OUT"
    # the tiny twin with the torch set, eager and "compiled": the steps' pipeline. TORCH_COMPILE_DISABLE makes
    # torch.compile a no-op (a cold compile took 2 minutes here; compiled runs are tested in tests/)
    step "bench train record89" record89.log 300 "${SB[@]}" train --device cpu --preset record89-tiny --kernels torch \
        --steps 1 --warmup 0 --profile-steps 0 --no-compile --out "$OUT/record89"
    step "bench train record89 compiled" record89_compiled.log 300 env TORCH_COMPILE_DISABLE=1 "${SB[@]}" train \
        --device cpu --preset record89-tiny --kernels torch --steps 1 --warmup 0 --profile-steps 0 --compile \
        --out "$OUT/record89_compiled"
elif [ "$SMOKE" = 1 ]; then
    # budgets: 30 + 75 + 45 + 75 s = 3.75 min at the most (launching every op's configurations cold took over
    # 45 s on the H100, bench/results/2026-11-27_1547_nvidia-h100-80gb-hbm3)
    step environment env.txt 30 env_report
    step "bench launch" launch.log 75 "${SB[@]}" launch --op "$KERNEL_OPS" --out "$OUT"
    step "model check" tests.txt 45 "${PYTEST[@]}" tests/test_kernels_in_model.py -m gpu
    # the tiny preset: a compile of the 124M model takes ~45 s per kernel set (bench/results/2026-11-27_*)
    step "bench train" train.log 75 "${SB[@]}" train --preset sub3min-tiny --kernels triton,torch --steps 2 --warmup 1 \
        --profile-steps 0 --out "$OUT"
else
    # budgets: 30 + 210 + 45 + 90 + 35 + 145 s = 9.25 min at the most, under the 10-minute limit of one command.
    # Measured on the H100 (bench/results/2026-11-27_1547_nvidia-h100-80gb-hbm3): the tests ~210 s with 8
    # workers (cold Triton compiles), bench kernels 83 s, record #89's eager Triton step 18 s to warm up,
    # inductor's compile of Sub3Min's model ~45 s per kernel set
    step environment env.txt 30 env_report
    step tests tests.txt 210 "${PYTEST[@]}" tests/kernels tests/test_model.py tests/test_kernels_in_model.py \
        tests/test_compile_graph.py tests/data/test_loader.py -m "gpu or not slow"
    step "bench launch" launch.log 45 "${SB[@]}" launch --op "$KERNEL_OPS" --out "$OUT"
    # no torch_compile variant (a compile per op and shape would eat the budget); flex: the library attention
    step "bench kernels" kernels.log 90 "${SB[@]}" kernels --quick --op "$KERNEL_OPS" --variant torch,triton,flex \
        --out "$OUT"
    # record #89 at the last stage's batch and windows, the triton set only (the torch set's references did not
    # finish a step in 40 s on the H100): eager first (a number even if the compile fails), then as the race
    # runs it, compiled with fullgraph=True (the warm-up step compiles the last stage's shapes)
    step "bench train record89" record89.log 35 "${SB[@]}" train --preset record89 --kernels triton \
        --steps 1 --warmup 1 --profile-steps 0 --no-compile --out "$OUT/record89"
    step "bench train record89 compiled" record89_compiled.log 145 "${SB[@]}" train --preset record89 \
        --kernels triton --steps 3 --warmup 1 --profile-steps 1 --compile --out "$OUT/record89_compiled"
fi
"$PY" -m speedrun.bench.summary "$OUT"
if awk -F'\t' '$2 != 0 { bad = 1 } END { exit bad ? 0 : 1 }' "$STEPS_FILE"; then
    echo "gpu_suite: FAILED steps (see $OUT/summary.md):"
    awk -F'\t' '$2 != 0 { print "  " $1 " (exit " $2 ")" }' "$STEPS_FILE"
    exit 1
fi
echo "gpu_suite: all steps passed; summary: $OUT/summary.md"
