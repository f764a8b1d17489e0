"""The ``speedrun`` command line.

Building the parser imports nothing beyond the standard library and ``speedrun.config`` (so that
``./run.sh --help`` works before any environment exists); each command imports what it needs when run.
"""

from __future__ import annotations

import argparse
import os
import sys

from speedrun.args import non_negative_int, positive_float, positive_int, seed
from speedrun.config import DEFAULT_CPU_PRESET, DEFAULT_GPU_PRESET, preset_names


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=preset_names(), default=None,
                   help=f"training recipe, named after the record it computes (default: {DEFAULT_GPU_PRESET} with "
                        f"CUDA, {DEFAULT_CPU_PRESET} without)")
    p.add_argument("--kernels", choices=["torch", "triton"], default=None,
                   help="implementation of the hot ops (default: triton on CUDA, torch elsewhere)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="folder of token shards, relative to the current folder (default: the preset's, in the "
                        "repository; synthetic data is generated on first use)")
    p.add_argument("--steps", type=positive_int, default=None, help="override the number of optimizer steps")
    p.add_argument("--val-every", type=positive_int, default=None, help="validate every N steps (and at the last)")
    p.add_argument("--val-tokens", type=positive_int, default=None,
                   help="override the validation token count (a record run must use the track's)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="override the tokens per micro-batch sequence")
    p.add_argument("--seqs-per-forward", type=positive_int, default=None,
                   help="sequences per forward pass (default: the preset's; the math does not change)")
    p.add_argument("--seed", type=seed, default=None, help="random seed (default: the preset's)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=None, metavar="N",
                   help="untimed training steps before the clock starts, to compile and warm caches; the model, "
                        "optimizers and data are restored after them (default: the preset's)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the model (default on CUDA)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="do not torch.compile")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--log-dir", default=None, metavar="DIR",
                   help="where run logs go (default: logs/ in the repository)")
    p.add_argument("--save-checkpoint", metavar="PATH", default=None,
                   help="save the final model here after the run's log is written (outside the timed region)")
    p.add_argument("--quiet", action="store_true", help="print only validation lines and the summary")
    p.add_argument("--check-args", action="store_true", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speedrun", description="The GPT-2 speedrun harness.",
                                     epilog="speedrun --debug COMMAND …: show the traceback of any failure "
                                            "(also SPEEDRUN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # --- data -----------------------------------------------------------------------------------
    data = sub.add_parser("data", help="download, tokenize, generate and verify token shards")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    verify = dsub.add_parser("verify", help="check shards fully: header, size, token range, manifest checksum")
    verify.add_argument("paths", nargs="+", metavar="PATH", help="shard files or folders of shards")

    download = dsub.add_parser("download", help="fetch the published FineWeb GPT-2 shards from the Hugging Face hub")
    download.add_argument("--train-shards", type=non_negative_int, default=None,
                          help="number of train shards (default: what sub3min and record89 need plus a margin)")
    download.add_argument("--dir", default="data/fineweb10B", help="destination folder (default: data/fineweb10B)")
    download.add_argument("--repo-id", default="kjj0/fineweb10B-gpt2", help="Hugging Face dataset repository")

    tok = dsub.add_parser("tokenize", help="turn raw text (.txt/.jsonl/.parquet) into shards like the published ones")
    tok.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt, .jsonl or .parquet files")
    tok.add_argument("--out", required=True, metavar="DIR", help="output folder")
    tok.add_argument("--shard-tokens", type=positive_int, default=100_000_000,
                     help="tokens per shard (default: 100,000,000, as published)")
    tok.add_argument("--txt-mode", choices=["lines", "file"], default="lines",
                     help=".txt inputs: one document per line, or the whole file as one document")
    tok.add_argument("--name", default="fineweb", help="shard name prefix (default: fineweb)")
    tok.add_argument("--workers", type=positive_int, default=None, help="tokenizer processes (default: CPU count)")

    synth = dsub.add_parser("synth", help="generate the synthetic language (and its exact optimal loss)")
    synth.add_argument("--out", default="data/synth", metavar="DIR", help="output folder (default: data/synth)")
    synth.add_argument("--seed", type=non_negative_int, default=0, help="generator seed (default: 0)")
    synth.add_argument("--train-tokens", type=positive_int, default=20_000_000, help="train tokens (default: 20M)")
    synth.add_argument("--val-tokens", type=positive_int, default=1_048_576, help="val tokens (default: 1,048,576)")

    # --- train ----------------------------------------------------------------------------------
    train = sub.add_parser("train", help="run the race: train to the target validation loss, write a run log")
    add_train_arguments(train)

    # --- schedule -------------------------------------------------------------------------------
    sched = sub.add_parser("schedule", help="print a preset's plan: every step-indexed value of its run")
    sched.add_argument("--preset", choices=preset_names(), default="record89",
                       help="the recipe whose plan to print (default: record89)")
    sched.add_argument("--every", type=positive_int, default=None, metavar="N",
                       help="also a row every N steps (default: only where something changes)")
    sched.add_argument("--json", action="store_true",
                       help="every step's plan as one JSON object per line, for programs")

    # --- leaderboard, reproduce, bench (parsed by their own modules; listed here for --help) -------------
    sub.add_parser("leaderboard", help="records and the leaderboard: check, build, submit, show, compare, "
                                       "import-upstream (see `speedrun leaderboard --help`)", add_help=False)
    sub.add_parser("reproduce", help="re-run a record's code on this machine and compare "
                                     "(see `speedrun reproduce --help`)", add_help=False)
    sub.add_parser("bench", help="benchmarks: kernels, train, converge (see `speedrun bench --help`)",
                   add_help=False)

    # --- sample ---------------------------------------------------------------------------------
    sample = sub.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("--checkpoint", required=True, metavar="PATH")
    sample.add_argument("--prompt", default="", help="text to continue (GPT-2 tokenizer)")
    sample.add_argument("--max-new-tokens", type=positive_int, default=100)
    sample.add_argument("--temperature", type=positive_float, default=0.8)
    sample.add_argument("--top-k", type=positive_int, default=50)
    sample.add_argument("--seed", type=seed, default=0)
    return parser


def _run_data(args) -> int:
    if args.data_command == "verify":
        from speedrun.data.shards import verify_command
        return verify_command(args.paths)
    if args.data_command == "download":
        from speedrun.data.download import download_command
        return download_command(train_shards=args.train_shards, out_dir=args.dir, repo_id=args.repo_id)
    if args.data_command == "tokenize":
        from speedrun.data.tokenize_text import tokenize_command
        return tokenize_command(args.inputs, out_dir=args.out, shard_tokens=args.shard_tokens,
                                txt_mode=args.txt_mode, name=args.name, workers=args.workers)
    if args.data_command == "synth":
        from speedrun.data.synth import synth_command
        return synth_command(out_dir=args.out, seed=args.seed, train_tokens=args.train_tokens,
                             val_tokens=args.val_tokens)
    raise AssertionError(args.data_command)


def main(argv: list[str] | None = None) -> int:
    """``speedrun [--debug] COMMAND …``: every command inside one error boundary (speedrun.errors)."""
    from speedrun.errors import run_command, wants_debug

    debug, argv = wants_debug(sys.argv[1:] if argv is None else list(argv))
    return run_command(lambda: _dispatch(argv), debug)


def _dispatch(argv: list[str]) -> int:
    # Without a CUDA GPU the Triton kernels run under Triton's CPU interpreter, which must be chosen
    # before triton is first imported.
    # (`speedrun bench aot` compiles for GPUs: never under the interpreter)
    if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl") and argv[:2] != ["bench", "aot"]:
        os.environ["TRITON_INTERPRET"] = "1"
    # These own their whole command line (their own --help and options): dispatch before argparse.
    if argv[:1] == ["leaderboard"]:
        from speedrun.records.cli import main as leaderboard_main
        return leaderboard_main(argv[1:], prog="speedrun leaderboard")
    if argv[:1] == ["reproduce"]:  # the leaderboard's reproduce
        from speedrun.records.cli import main as leaderboard_main
        return leaderboard_main(argv, prog="speedrun")
    if argv[:1] == ["bench"]:
        from speedrun.bench.cli import main as bench_main
        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "data":
        return _run_data(args)
    if args.command == "train":
        if args.check_args:
            return 0
        from speedrun.train import train_command
        return train_command(args)
    if args.command == "schedule":
        from speedrun.schedule import schedule_command
        return schedule_command(args.preset, every=args.every, as_json=args.json)
    if args.command == "sample":
        from speedrun.sample import sample_command
        return sample_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
