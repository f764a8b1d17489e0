"""bench/gpu_suite.sh in its dry-run mode (the whole pipeline on the CPU, which is also the end-to-end test of
`speedrun bench train`), its summary, and the convergence comparison (`speedrun bench converge` runs end to end
in tests/test_kernels_in_model.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from speedrun import REPO_ROOT
from speedrun.bench.converge import compare
from speedrun.bench.summary import summary
from speedrun.cli import main

SUITE = REPO_ROOT / "bench" / "gpu_suite.sh"


def _suite_env(out) -> dict:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SPEEDRUN_VENV=str(out / "no-venv"))
    env.pop("TRITON_INTERPRET", None)  # the dry run must set it itself
    return env


@pytest.mark.slow
def test_gpu_suite_smoke_dry_run(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run(["bash", str(SUITE), "--smoke", "--dry-run"], cwd=REPO_ROOT, env=_suite_env(out),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split("\t")[0] for line in (out / "steps.tsv").read_text().splitlines()]
    assert steps == ["environment", "bench launch", "model check", "bench train"]
    text = (out / "summary.md").read_text()
    assert "Dry run on a CPU" in text and "FAILED" not in text and "missing" not in text
    assert "0 failed." in text and "| triton | False |" in text and "| torch | False |" in text
    assert "2 skipped" in text and "Kernels (source" not in text and "Convergence" not in text  # (no CUDA)


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run(["bash", str(SUITE), "--dry-run"], cwd=REPO_ROOT, env=_suite_env(out),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("env.txt", "tests.txt", "launch.md", "kernels.csv", "kernels.txt", "record89/train.md",
                 "record89_compiled/train.md", "summary.md", "steps.tsv"):
        assert (out / name).is_file(), name
    steps = [line.split("\t")[0] for line in (out / "steps.tsv").read_text().splitlines()]
    assert steps == ["environment", "tests", "bench launch", "bench kernels", "bench train record89",
                     "bench train record89 compiled"]
    text = (out / "summary.md").read_text()
    assert "Dry run on a CPU" in text and "FAILED" not in text and "missing" not in text
    assert "| bench kernels | ok |" in text and "| bench launch | ok |" in text
    assert "| bench train record89 | ok |" in text and "## Training step, record #89 (source" in text
    assert "| bench train record89 compiled | ok |" in text and "## Training step, record #89 compiled" in text
    assert "| torch | False |" in text and "| torch | True |" in text  # the two train tables
    train = (out / "record89" / "train.md").read_text()
    assert "preset record89-tiny" in train and "Synthetic tokens" in train


def test_gpu_suite_refuses_unknown_options_and_a_missing_gpu(tmp_path):
    proc = subprocess.run(["bash", str(SUITE), "--fast"], cwd=REPO_ROOT, env=_suite_env(tmp_path),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr
    help_text = subprocess.run(["bash", str(SUITE), "--help"], capture_output=True, text=True).stdout
    assert help_text.startswith("Everything one GPU") and help_text.rstrip().endswith("its times mean nothing")
    proc = subprocess.run(["bash", str(SUITE)], cwd=REPO_ROOT, env=_suite_env(tmp_path), capture_output=True,
                          text=True)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr


def test_summary_names_missing_files_and_failed_steps(tmp_path):
    (tmp_path / "steps.tsv").write_text("environment\t0\t1\nbench kernels\t1\t5\nbench train\t124\t120\n")
    (tmp_path / "kernels.csv").write_text(
        "op,variant,mode,shape,recipe,dtype,status,detail,median_ms,tflops,gbps,speedup_vs_torch,speedup_vs_compile\n"
        "mlp,triton,fwd,M=8,True,bfloat16,wrong,max error 3 > tolerance 0.1,,,,,\n"
        "mlp,torch,fwd,M=8,True,bfloat16,ok,,1.5,2.0,100,1.0,\n")
    text = summary(tmp_path)
    assert "| bench kernels | FAILED (exit 1) | 5 |" in text
    assert "| bench train | FAILED: over its time budget | 120 |" in text
    assert "| mlp | M=8 | fwd | torch | ok | 1.500 | 2.0 | 100 | 1.00 | - |" in text
    assert "Wrong or failed: mlp triton fwd: max error 3 > tolerance 0.1" in text
    for name in ("env.txt", "train.md"):  # their steps ran (or always run)
        assert f"{name} missing" in text
    assert "tests.txt" not in text and "converge.md" not in text  # steps that did not run (--smoke has none)


def test_summary_names_failed_kernel_launches(tmp_path):
    (tmp_path / "steps.tsv").write_text("bench launch\t1\t30\n")
    (tmp_path / "launch.md").write_text(
        "# Triton kernels launched on H100\n\n3 launches of 2 distinct kernel configurations; 1 failed.\n\n"
        "| kernel | config | dtype | status | ms (first launch, compile included) |\n|---|---|---|---|---|\n"
        "| _a | BLOCK=8 | bfloat16 | ok | 1.0 |\n| _b | BLOCK=16 | float32 | OutOfResources: shared memory | 2.0 |\n")
    text = summary(tmp_path)
    assert "| bench launch | FAILED (exit 1) | 30 |" in text and "1 failed." in text
    assert "| _b | BLOCK=16 | float32 | OutOfResources: shared memory | 2.0 |" in text and "| _a |" not in text


def _run_log(status, curve):
    return {"status": status, "train_time_ms": 1000.0,
            "val_curve": [{"step": s, "val_loss": v} for s, v in curve]}


def test_converge_compare_passes_close_curves_and_fails_the_rest():
    torch_run = _run_log("completed", [(0, 7.0), (50, 5.0), (100, 4.0)])
    ok, lines = compare({"torch": torch_run, "triton": _run_log("completed", [(0, 7.0), (50, 5.01), (100, 4.02)])},
                        0.05)
    assert ok and "largest difference 0.0200" in lines[-1] and lines[-1].endswith("PASS")
    ok, lines = compare({"torch": torch_run, "triton": _run_log("completed", [(0, 7.0), (50, 5.3), (100, 4.0)])},
                        0.05)
    assert not ok and "curves differ by 0.3000" in lines[-1]
    ok, lines = compare({"torch": torch_run, "triton": _run_log("diverged", [(0, 7.0)])}, 0.05)
    assert not ok and "triton: status diverged" in lines[-1]


@pytest.mark.parametrize("argv,message", [
    (["train", "--kernels", "cuda"], "--kernels must list torch and/or triton"),
    (["train", "--kernels", "torch,torch"], "--kernels must list torch and/or triton"),
    (["train", "--seq-len", "100"], "multiple of the attention block"),
    (["converge", "--tolerance", "0"], "--tolerance must be positive"),
    (["launch", "--op", "mlp,nope"], "--op must list ops with a Triton variant"),
])
def test_bench_misuse_is_refused(argv, message, tmp_path, capsys):
    try:
        code = main(["bench", *argv, "--device", "cpu", "--out", str(tmp_path)])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    assert code in (1, 2) and message in capsys.readouterr().err


def test_converge_refuses_a_preset_without_triton_variants_before_any_run(monkeypatch, tmp_path, capsys):
    import kernels.mlp_fp8

    monkeypatch.delitem(kernels.mlp_fp8.VARIANTS, "triton", raising=False)
    assert main(["bench", "converge", "--preset", "record89-tiny", "--device", "cpu", "--out", str(tmp_path)]) == 1
    assert "preset record89-tiny's mlp_fp8 lack a Triton variant" in capsys.readouterr().err
    assert not (tmp_path / "converge_logs").exists()


@pytest.mark.parametrize("command", ["kernels", "train", "converge"])
def test_device_cuda_without_a_gpu_is_refused(command, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert main(["bench", command, "--device", "cuda", "--out", str(tmp_path)]) == 1
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
