"""``speedrun bench kernels|train|converge``: the command line of the benchmarks."""

from __future__ import annotations

import argparse


def add_common_arguments(p: argparse.ArgumentParser, with_compile: bool = False) -> None:
    """--device and --out (and --compile/--no-compile) as every bench command takes them."""
    if with_compile:
        p.add_argument("--compile", dest="compile", action="store_true", default=None, help="default on CUDA")
        p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--out", metavar="DIR", default=None, help="results folder (default: bench/results/<date>_<gpu>/)")


def build_parser(prog: str = "speedrun bench") -> argparse.ArgumentParser:
    from speedrun.bench import converge, kernels_bench, train_bench

    parser = argparse.ArgumentParser(prog=prog, description="Benchmarks: kernel variants, training steps, "
                                     "and a convergence check of the kernel sets.")
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    kernels_bench.add_arguments(sub.add_parser(
        "kernels", help="every variant of every hot op: checked against the reference, then timed"))
    train_bench.add_arguments(sub.add_parser("train", help="training-step time per kernel set, with a profile"))
    converge.add_arguments(sub.add_parser(
        "converge", help="short training with --kernels torch and triton: do the val curves agree?"))
    aot = sub.add_parser("aot", help="compile every Triton kernel for sm_90 and sm_80 without a GPU: registers, "
                                     "spills, shared memory -> bench/results/aot/aot.md")
    aot.add_argument("--force", action="store_true", help="recompile even if the table is up to date")
    return parser


def main(argv: list[str], prog: str = "speedrun bench") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.bench_command == "kernels":
        from speedrun.bench.kernels_bench import kernels_command
        return kernels_command(args)
    if args.bench_command == "train":
        from speedrun.bench.train_bench import train_command
        return train_command(args)
    if args.bench_command == "aot":
        from speedrun.bench.aot import failed, run
        bad = [r for r in run(force=args.force) if failed(r)]
        for r in bad:
            print(f"FAILED {r.kernel} [{r.config}] {r.dtype} {r.target}: {r.status}")
        return 1 if bad else 0
    from speedrun.bench.converge import converge_command
    return converge_command(args)
