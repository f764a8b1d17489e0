"""``speedrun bench kernels|train|converge``: the command line of the benchmarks."""

from __future__ import annotations

import argparse


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
    return parser


def main(argv: list[str], prog: str = "speedrun bench") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.bench_command == "kernels":
        from speedrun.bench.kernels_bench import kernels_command
        return kernels_command(args)
    if args.bench_command == "train":
        from speedrun.bench.train_bench import train_command
        return train_command(args)
    from speedrun.bench.converge import converge_command
    return converge_command(args)
