"""The ``leaderboard.py`` command line (also ``speedrun leaderboard …``; ``speedrun reproduce …`` is its
``reproduce``): check, build, submit, show, compare, import-upstream, reproduce. ``--help`` describes each.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
from pathlib import Path

from speedrun import REPO_ROOT
from speedrun.args import positive_int
from speedrun.data.shards import atomic_write_files
from speedrun.errors import UserError, run_command, wants_debug
from speedrun.records.check import KINDS, RECORDS_DIR, UPSTREAM_DIR_NAME, check_tree, progression_name
from speedrun.tracks import TRACKS


def report(problems: list[str], warnings: list[str], command: str, outcome: str = "") -> None:
    """Problems on stdout, one per line; warnings and the count (and ``outcome``) on stderr."""
    for line in problems:
        print(line)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if problems:
        print(f"{command}: {len(problems)} problem(s){outcome}", file=sys.stderr)


def selected_problems(problems: list[str], paths: list[Path], records_dir: Path) -> tuple[list[str], list[str]]:
    """Problems about the records under ``paths`` (all when none), and problems with the paths themselves."""
    root, prefixes, bad = records_dir.resolve(), [], []
    for path in paths:
        resolved = path.resolve()
        if not resolved.exists():
            bad.append(f"{path}: no such file or folder")
        elif resolved != root and root not in resolved.parents:
            bad.append(f"{path}: outside the records folder {records_dir}")
        else:
            relative = resolved.relative_to(root).as_posix()
            prefixes.append("records" if relative == "." else f"records/{relative}")
    if not paths:
        return problems, bad
    return [p for p in problems if any(p == pre or p.startswith((pre + "/", pre + ":")) for pre in prefixes)], bad


def cmd_check(args) -> int:
    result = check_tree(args.records)
    problems, bad_paths = selected_problems(result.problems, args.paths, args.records)
    report(bad_paths + problems, result.warnings, "check")
    if bad_paths or problems:
        return 1
    print(f"check: ok: {len(result.records)} record(s), {sum(len(r.runs) for r in result.records)} run(s), "
          f"{len(result.upstream)} upstream run(s)")
    return 0


def cmd_build(args) -> int:
    """Check, then write every output of a valid tree, all or none (speedrun/records/board.py)."""
    from speedrun.records.board import LEADERBOARD_NAME, PAGE_NAME, RUNS_CSV_NAME, markdown, runs_csv
    from speedrun.records.page import page, progression_svg

    result = check_tree(args.records)
    report(result.problems, result.warnings, "build", ": refused, fix them (nothing was written)")
    if result.problems:
        return 1
    link_prefix = Path(os.path.relpath(args.records, args.out)).as_posix()
    files = {args.out / LEADERBOARD_NAME: markdown(result, link_prefix), args.records / RUNS_CSV_NAME:
             runs_csv(result), args.records / PAGE_NAME: page(result, ".")}
    files |= {args.records / progression_name(name): progression_svg(records)
              for name, records in result.by_track().items()}
    atomic_write_files({path: text.encode() for path, text in files.items()})
    print("\n".join(f"wrote {path}" for path in files))
    return 0


def cmd_submit(args) -> int:
    from speedrun.records.submit import Submission, submit

    folder = submit(Submission(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Submission)}),
                    args.records)
    print(f"submitted {folder}; run `python leaderboard.py build` to update the leaderboard")
    return 0


def cmd_show(args) -> int:
    from speedrun.records.board import terminal_table

    result = check_tree(args.records)
    print(terminal_table(result, args.track))
    report(result.problems, result.warnings, "show", ": records with problems are left out of the table above")
    return 1 if result.problems else 0


def cmd_compare(args) -> int:
    from speedrun.records.compare import compare

    print("\n".join(compare(args.a, args.b, args.plot, args.records)))
    return 0


def cmd_import_upstream(args) -> int:
    from speedrun.records.upstream import import_upstream

    print("\n".join(import_upstream(args.logs, args.out or args.records / UPSTREAM_DIR_NAME)))
    return 0


def cmd_reproduce(args) -> int:
    from speedrun.records.reproduce import ask_on_terminal, reproduce

    out, all_valid = reproduce(args.record, runs=args.runs, out=args.out, records_dir=args.records,
                               processes=args.nproc, confirm=None if args.yes else ask_on_terminal)
    print(f"reproduce: report in {out / 'report.md'} (plot {out / 'report.svg'})")
    if not all_valid:
        print("reproduce: some runs did not write a valid log (see the report)", file=sys.stderr)
    return 0 if all_valid else 1


def build_parser(prog: str = "leaderboard.py") -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--records", type=Path, default=RECORDS_DIR, metavar="DIR",
                        help="the records folder (default: records/ of this repository)")
    parser = argparse.ArgumentParser(prog=prog, description="Records and the leaderboard, computed from the run logs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", parents=[common], help="validate records (all, or those under PATHs)")
    check.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="record or track folders to report on")
    check.set_defaults(run=cmd_check)

    build = sub.add_parser("build", parents=[common], help="check, then write the leaderboard, plot, CSV and page")
    build.add_argument("--out", type=Path, default=REPO_ROOT, metavar="DIR",
                       help="folder for LEADERBOARD.md (default: the repository root)")
    build.set_defaults(run=cmd_build)

    submit = sub.add_parser("submit", parents=[common], help="make a record folder from run logs")
    submit.add_argument("logs", nargs="+", type=Path, metavar="LOG", help="run logs (.txt or .json; both are copied)")
    submit.add_argument("--track", required=True, choices=sorted(TRACKS))
    submit.add_argument("--title", required=True)
    submit.add_argument("--author", dest="authors", action="append", required=True,
                        help="an author's name (repeat for several)")
    submit.add_argument("--description", required=True, help="one or two sentences on what changed")
    submit.add_argument("--kind", choices=KINDS, default="ml",
                        help="ml (must pass the loss test) or systems (same math, faster); default ml")
    submit.add_argument("--beats", default=None, metavar="RECORD",
                        help="the record this one beats, e.g. tiny-cpu/2025-01-01_first (none for a track's first)")
    submit.add_argument("--date", default=None, metavar="YYYY-MM-DD", help="the record's date (default: today, UTC)")
    submit.add_argument("--readme", type=Path, default=None, metavar="FILE",
                        help="the write-up for README.md (default: made from the title and description)")
    submit.add_argument("--slug", default=None, help="folder name after the date (default: from the title)")
    submit.set_defaults(run=cmd_submit)

    show = sub.add_parser("show", parents=[common], help="the leaderboard in the terminal")
    show.add_argument("--track", choices=sorted(TRACKS), default=None)
    show.set_defaults(run=cmd_show)

    compare = sub.add_parser("compare", parents=[common], help="two records or runs side by side")
    compare.add_argument("a", metavar="A", help="a record folder (or track/folder), a run log, or an upstream log")
    compare.add_argument("b", metavar="B")
    compare.add_argument("--plot", type=Path, default=REPO_ROOT / "logs" / "compare.svg", metavar="SVG",
                         help="where to write the curves (default: logs/compare.svg)")
    compare.set_defaults(run=cmd_compare)

    upstream = sub.add_parser("import-upstream", parents=[common],
                              help="import public modded-nanogpt log files for comparison")
    upstream.add_argument("logs", nargs="+", type=Path, metavar="LOG")
    upstream.add_argument("--out", type=Path, default=None, metavar="DIR",
                          help=f"destination (default: records/{UPSTREAM_DIR_NAME}/)")
    upstream.set_defaults(run=cmd_import_upstream)

    reproduce = sub.add_parser("reproduce", parents=[common], help="re-run a record's logged code here and compare")
    reproduce.add_argument("record", metavar="RECORD", help="a record folder, or <track>/<folder> inside records/")
    reproduce.add_argument("--runs", type=positive_int, default=3, help="how many times to run it (default 3)")
    reproduce.add_argument("--out", type=Path, default=None, metavar="DIR",
                           help="report folder (default: logs/reproduce/<track>__<record>__<UTC time>)")
    reproduce.add_argument("--nproc", type=positive_int, default=None,
                           help="processes (GPUs) per run (default: the record's, capped to the visible GPUs)")
    reproduce.add_argument("--yes", action="store_true",
                           help="run the record's logged code without asking (it runs with your permissions)")
    reproduce.set_defaults(run=cmd_reproduce)
    return parser


def main(argv: list[str] | None = None, prog: str = "leaderboard.py") -> int:
    """Run one subcommand (``[--debug] COMMAND …``) inside the error boundary (speedrun.errors); ``prog`` names
    the command in help and errors (``speedrun leaderboard``)."""
    debug, argv = wants_debug(sys.argv[1:] if argv is None else list(argv))

    def command() -> int:
        args = build_parser(prog).parse_args(argv)
        # A command loads every record: millions of small objects, no reference cycles. The cyclic garbage
        # collector would only walk them again and again (seconds at 10,000 records); refcounting frees them.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return args.run(args)
        except UserError as e:  # a refusal: its problems, one per line, like check's
            report(str(e).split("\n"), [], args.command, ": refused (nothing was written)")
            return 1
        finally:
            if collecting:
                gc.enable()
    return run_command(command, debug)
