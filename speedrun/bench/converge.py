"""``speedrun bench converge``: do the Triton kernels train like the PyTorch ones?

Runs a shortened training of a preset once per kernel set (``speedrun train`` in a fresh process each, as
a real run), on the token shards given with ``--data``, else the FineWeb shards when present, else the
synthetic language; then overlays the validation-loss curves and compares them step by step. It fails
(exit 1) when a run does not finish (diverged, aborted, no log) or when the curves differ by more than
``--tolerance`` at any validation step. Kernel sets differ in rounding, and training amplifies rounding
differences, so the tolerance is loose by design: it catches a broken kernel, not a last-digit change.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import kernels
from speedrun import REPO_ROOT
from speedrun.bench.cli import add_common_arguments
from speedrun.config import get_preset, preset_names
from speedrun.data.shards import atomic_write_bytes, atomic_write_text, list_shards
from speedrun.runlog import repo_or_absolute_path


def default_data_dir() -> Path:
    fineweb = REPO_ROOT / "data" / "fineweb10B"
    if list_shards(fineweb, "train") and list_shards(fineweb, "val"):
        return fineweb
    from speedrun.data.synth import ensure_synth

    synth = REPO_ROOT / "data" / "synth"
    ensure_synth(synth)
    return synth


def run_one(kernel_set: str, args, data_dir: Path, log_dir: Path) -> dict:
    """Train once with ``kernel_set``; returns the run's JSON log (raises SystemExit if there is none)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    # paths relative to the repository (the working directory of the run) when inside it, as the logs keep them
    cmd = [sys.executable, "-m", "speedrun.cli", "train", "--preset", args.preset, "--kernels", kernel_set,
           "--steps", str(args.steps), "--val-every", str(args.val_every), "--data", repo_or_absolute_path(data_dir),
           "--log-dir", repo_or_absolute_path(log_dir), "--quiet"]
    for option, value in (("--seq-len", args.seq_len), ("--val-tokens", args.val_tokens),
                          ("--warmup-steps", args.warmup_steps), ("--device", args.device)):
        if value is not None:
            cmd += [option, str(value)]
    if args.compile is not None:
        cmd.append("--compile" if args.compile else "--no-compile")
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO_ROOT, check=False)  # not_converged exits 1: the log says what happened
    logs = sorted(log_dir.glob("*.json"))
    if len(logs) != 1:
        raise SystemExit(f"expected one run log in {log_dir}, found {len(logs)}")
    return json.loads(logs[0].read_text())


def compare(runs: dict[str, dict], tolerance: float) -> tuple[bool, list[str]]:
    """(passed, markdown lines): the val curves side by side and the largest difference."""
    (name_a, a), (name_b, b) = runs.items()
    curve_a = {p["step"]: p["val_loss"] for p in a["val_curve"]}
    curve_b = {p["step"]: p["val_loss"] for p in b["val_curve"]}
    steps = sorted(set(curve_a) & set(curve_b))
    lines = [f"| step | val_loss {name_a} | val_loss {name_b} | difference |", "|---|---|---|---|"]
    worst = 0.0
    for s in steps:
        d = curve_b[s] - curve_a[s]
        worst = max(worst, abs(d))
        lines.append(f"| {s} | {curve_a[s]:.4f} | {curve_b[s]:.4f} | {d:+.4f} |")
    problems = [f"{name}: status {r['status']}" for name, r in runs.items() if r["status"] in ("diverged", "aborted")]
    if not steps:
        problems.append("no common validation steps")
    if worst > tolerance:
        problems.append(f"curves differ by {worst:.4f} > tolerance {tolerance}")
    verdict = "PASS" if not problems else "FAIL: " + "; ".join(problems)
    lines += ["", f"largest difference {worst:.4f} (tolerance {tolerance}); "
              f"train time {name_a} {a['train_time_ms'] / 1000:.1f} s, {name_b} {b['train_time_ms'] / 1000:.1f} s; "
              f"{verdict}"]
    return not problems, lines


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        ax.plot([p["step"] for p in r["val_curve"]], [p["val_loss"] for p in r["val_curve"]], marker="o",
                label=f"--kernels {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def add_arguments(p: argparse.ArgumentParser) -> None:
    from speedrun.args import non_negative_int, positive_int

    p.add_argument("--preset", choices=preset_names(), default=None,
                   help="default: sub3min on GPU, sub3min-tiny on CPU (presets with Triton kernels for every op)")
    p.add_argument("--steps", type=positive_int, default=200, help="training steps per run (default: 200)")
    p.add_argument("--val-every", type=positive_int, default=25, help="validate every N steps (default: 25)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="override the preset's sequence length")
    p.add_argument("--val-tokens", type=positive_int, default=None, help="override the validation token count")
    p.add_argument("--warmup-steps", type=non_negative_int, default=None, metavar="N",
                   help="untimed warm-up steps of each run (default: the preset's; eager runs need none)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="token shards (default: data/fineweb10B when present, else the synthetic language)")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest allowed val-loss difference (0.05)")
    add_common_arguments(p, with_compile=True)


def converge_command(args) -> int:
    from speedrun.bench.measure import bench_device, device_name, results_dir
    from speedrun.train import recipe_ops

    device = bench_device(args.device)
    if not args.tolerance > 0:
        raise SystemExit(f"--tolerance must be positive, got {args.tolerance}")
    args.preset = get_preset(args.preset or ("sub3min" if device.type == "cuda" else "sub3min-tiny")).preset
    without_triton = [op for op in recipe_ops(get_preset(args.preset)) if "triton" not in kernels.variants(op)]
    if without_triton:  # refused now, not after a whole torch run
        raise SystemExit(f"bench converge compares --kernels torch with triton; preset {args.preset}'s "
                         f"{', '.join(without_triton)} lack a Triton variant here (Triton missing, or not yet written)")
    data_dir = Path(args.data).resolve() if args.data else default_data_dir()
    if not list_shards(data_dir, "train") or not list_shards(data_dir, "val"):
        raise SystemExit(f"--data {args.data}: no train/val shards there")
    out_dir = results_dir(device, args.out)
    log_root = out_dir / "converge_logs"
    if log_root.exists() and any(log_root.rglob("*.json")):
        raise SystemExit(f"{log_root} already holds run logs; choose another --out (nothing is overwritten)")
    runs = {k: run_one(k, args, data_dir, log_root / k) for k in ("torch", "triton")}
    passed, lines = compare(runs, args.tolerance)
    head = [f"# bench converge: preset {args.preset}, {args.steps} steps, on {device_name(device)}", "",
            f"data: {data_dir.name} ({runs['torch']['data'].get('kind') or 'token shards'}); run logs in "
            f"{log_root.name}/", ""]
    text = "\n".join(head + lines) + "\n"
    print(text)
    atomic_write_text(out_dir / "converge.md", text)
    plot(runs, out_dir / "converge.png")
    return 0 if passed else 1
