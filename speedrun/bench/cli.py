"""``speedrun bench kernels|train|converge|aot|launch``: the command line of the benchmarks."""

from __future__ import annotations

import argparse
import importlib


def add_common_arguments(p: argparse.ArgumentParser, with_compile: bool = False) -> None:
    """--device and --out (and --compile/--no-compile) as every bench command takes them."""
    if with_compile:
        p.add_argument("--compile", dest="compile", action="store_true", default=None, help="default on CUDA")
        p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--out", metavar="DIR", default=None, help="results folder (default: bench/results/<date>_<gpu>/, "
                   "or <date>_<time>_<gpu>/ if that holds results)")


def _command(module: str, function: str):
    """The command function ``module.function``, imported when the command runs (not for --help)."""
    return lambda args: getattr(importlib.import_module(module), function)(args)


def build_parser(prog: str = "speedrun bench") -> argparse.ArgumentParser:
    from speedrun.bench import converge, kernels_bench, launch, train_bench

    parser = argparse.ArgumentParser(prog=prog, description="Benchmarks: kernel variants, training steps, "
                                     "a convergence check of the kernel sets, and the Triton kernels compiled "
                                     "for GPUs (aot) and launched on one (launch).")
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = sub.add_parser("kernels", help="every variant of every hot op: checked against the reference, then timed")
    kernels_bench.add_arguments(p)
    p.set_defaults(run=_command("speedrun.bench.kernels_bench", "kernels_command"))
    p = sub.add_parser("train", help="training-step time per kernel set, graph breaks, a profile")
    train_bench.add_arguments(p)
    p.set_defaults(run=_command("speedrun.bench.train_bench", "train_command"))
    p = sub.add_parser("converge", help="short training with --kernels torch and triton: do the val curves agree?")
    converge.add_arguments(p)
    p.set_defaults(run=_command("speedrun.bench.converge", "converge_command"))
    p = sub.add_parser("aot", help="compile every Triton kernel for sm_90 and sm_80 without a GPU: registers, "
                                   "spills, shared memory -> bench/results/aot/aot.md")
    p.add_argument("--force", action="store_true", help="recompile even if the table is up to date")
    p.set_defaults(run=_command("speedrun.bench.aot", "aot_command"))
    p = sub.add_parser("launch", help="every Triton kernel configuration of the aot table launched once on the "
                                      "GPU -> launch.md")
    launch.add_arguments(p)
    p.set_defaults(run=_command("speedrun.bench.launch", "launch_command"))
    return parser


def main(argv: list[str], prog: str = "speedrun bench") -> int:
    args = build_parser(prog).parse_args(argv)
    return args.run(args)
