"""``speedrun bench launch``: every Triton kernel configuration of the AOT table, launched once on the card.

``speedrun bench aot`` proves each kernel compiles for sm_90 and fits its shared memory, without a GPU. This
is the other half, for the first minutes with one: the same ops driven the same way (speedrun.bench.aot:
every variant forward and backward, fp16/bf16/fp32, the recipe's widths, each autotune config launched once
rather than tuned), but on the GPU, each launch run and synchronised on its own so a failure is named
(kernel, config, dtype) and does not hide the others. Nothing here checks values: the kernel tests do.

On the CPU (``--device cpu``, the suite's dry run) the launches run under Triton's interpreter: that checks
this command, not the kernels on a GPU, and takes a few minutes at the recipe's widths.

Writes ``launch.md`` (one row per distinct kernel configuration) to the results folder; exit 1 when a launch
failed.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from speedrun.bench import aot
from speedrun.bench.cli import add_common_arguments
from speedrun.bench.measure import bench_device, device_name, results_dir, versions
from speedrun.data.shards import atomic_write_text
from speedrun.runlog import repo_or_absolute_path, utc_now


@dataclass
class Launch:
    kernel: str
    config: str  # the constexprs and launch options it was given
    dtype: str
    status: str  # "ok", or the error
    ms: float  # wall time of the launch and its synchronisation (the first launch also compiles)


def _describe(fn, args, kwargs) -> tuple[str, str, str]:
    config = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()) if k != "DOT_PRECISION")
    dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)})
    return fn.__name__, config, "/".join(dtypes)


def launch_all(device: torch.device, ops=None) -> list[Launch]:
    """Drive every Triton variant (of ``ops``, default all) on ``device`` with each kernel launch run,
    synchronised and recorded."""
    launches: list[Launch] = []

    def run_one(launch, fn, args, kwargs):
        t0 = time.perf_counter()
        try:
            launch()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            status = "ok"
        except Exception as e:  # noqa: BLE001 - a failed launch is a row of the table
            status = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        launches.append(Launch(*_describe(fn, args, kwargs), status, 1000 * (time.perf_counter() - t0)))

    with aot.gpu_path(), aot.every_config(run_one):
        aot.drive_ops(device, ops)
    return launches


def report(launches: list[Launch], device: torch.device) -> str:
    distinct: dict[tuple, Launch] = {}
    for r in launches:  # a failure of any launch of a configuration is that configuration's status
        key = (r.kernel, r.config, r.dtype)
        if key not in distinct or r.status != "ok":
            distinct[key] = r
    bad = [r for r in distinct.values() if r.status != "ok"]
    v = versions()
    lines = [f"# Triton kernels launched on {device_name(device)}", "",
             f"torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}; {utc_now()}. Made by "
             "`speedrun bench launch`: the ops of `speedrun bench aot`, each autotune config launched once.",
             f"{len(launches)} launches of {len(distinct)} distinct kernel configurations; {len(bad)} failed.", ""]
    if device.type == "cpu":
        lines += ["CPU run: the launches ran under the Triton interpreter (a check of this command, not of a GPU).",
                  ""]
    lines += ["| kernel | config | dtype | status | ms (first launch, compile included) |", "|---|---|---|---|---|"]
    lines += [f"| {r.kernel} | {r.config} | {r.dtype} | {r.status} | {r.ms:.1f} |" for r in distinct.values()]
    return "\n".join(lines) + "\n"


def triton_ops() -> list[str]:
    import kernels

    return [op for op in kernels.OP_MODULES if "triton" in kernels.variants(op)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", default=None, help="ops, comma-separated (default: every op with a Triton variant)")
    add_common_arguments(p, with_compile=False)


def launch_command(args) -> int:
    device = bench_device(args.device)
    available = triton_ops()
    if not available:
        raise SystemExit("bench launch: Triton is not installed")
    ops = available if args.op is None else [op.strip() for op in args.op.split(",") if op.strip()]
    if not ops or any(op not in available for op in ops):
        raise SystemExit(f"--op must list ops with a Triton variant ({', '.join(available)}), got {args.op!r}")
    out_dir = results_dir(device, args.out)
    print(f"bench launch: every Triton kernel configuration of {', '.join(ops)} once on {device_name(device)}")
    launches = launch_all(device, ops)
    text = report(launches, device)
    atomic_write_text(out_dir / "launch.md", text)
    bad = sorted({f"{r.kernel} [{r.config}] {r.dtype}: {r.status}" for r in launches if r.status != "ok"})
    print(text.split("\n\n")[1])
    for line in bad:
        print(f"  FAILED {line}")
    print(f"wrote {repo_or_absolute_path(out_dir / 'launch.md')}")
    return 1 if bad else 0
