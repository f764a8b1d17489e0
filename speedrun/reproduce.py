"""``speedrun reproduce RECORD [--runs N]``: re-run a record's code as it was, here, and compare.

1. The record is checked like ``leaderboard.py check`` does; its code is the snapshot in its run logs,
   every file verified against its sha256.
2. A temporary checkout is made: the files of the logged git commit when this repository has it (else a
   copy of the current working tree), with the snapshot's files written over them, so every file the
   record's runs imported is byte-identical to what they ran. ``data/`` points at this repository's data.
3. ``python -m speedrun.cli train`` runs there N times with the record's preset and options (steps,
   validation cadence, sequence length, validation tokens, kernels, compile, device; seeds from the
   record's runs), writing its logs into the report folder.
4. The report (``report.md`` + ``report.png``) puts the times side by side with their ratio and its
   95% interval, runs the loss test on the new runs, overlays the curves, and lists every difference in
   environment and config. It also says whether the new runs' code hash equals the record's: if not,
   the checkout did not reproduce the code exactly, and the report names the files that differ.

The report folder is built as ``<out>.partial`` and renamed to ``<out>`` once the report is written;
an interrupted reproduction keeps its finished runs' logs in the ``.partial`` folder.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speedrun import REPO_ROOT
from speedrun.args import positive_int
from speedrun.config import get_preset
from speedrun.data.shards import atomic_write_text
from speedrun.records import MIN_ML_RUNS, RECORDS_DIR, SIGNIFICANCE_LEVEL, Record, load_record, loss_p_value, today_utc
from speedrun.records_runlog import Run, check_run, load_run
from speedrun.runlog import code_hash

REPRODUCE_DIR = REPO_ROOT / "logs" / "reproduce"


class ReproduceError(ValueError):
    """The record cannot be reproduced as asked; the message says why, one problem per line."""


# ---------------------------------------------------------------------------------------------
# The record's code
# ---------------------------------------------------------------------------------------------


def find_record(spec: str, records_dir: Path) -> Record:
    """Load and check a record given as a folder path or as '<track>/<folder>' inside ``records_dir``."""
    path = Path(spec)
    if not path.is_dir() and (records_dir / spec).is_dir():
        path = records_dir / spec
    if not (path / "record.json").is_file():
        raise ReproduceError(f"{spec}: not a record folder (no record.json)")
    path = path.resolve()
    try:
        record_path = path.relative_to(records_dir.resolve()).as_posix()
    except ValueError:
        record_path = f"{path.parent.name}/{path.name}"
    record = load_record(path, record_path, today_utc())
    if record.problems:
        raise ReproduceError("\n".join(record.problems))
    return record


def reference_run(record: Record) -> Run:
    """The run whose log supplies code and options: the first finished one (all share code and config)."""
    finished = sorted((r for r in record.runs if r.finished), key=lambda r: r.run_id)
    if not finished:
        raise ReproduceError(f"{record.label}: no finished run to take the code and options from")
    return finished[0]


def snapshot_sources(run: Run) -> dict[str, str]:
    """{path: exact source} of the run's code snapshot; every file matches its logged sha256."""
    sources = {}
    for path in run.text.code_files:
        source = run.text.source(path)
        if source is None:
            raise ReproduceError(f"{run.label}: the snapshot of {path} does not match its sha256")
        sources[path] = source
    return sources


def git_has_commit(commit: str | None, repo: Path = REPO_ROOT) -> bool:
    if not commit:
        return False
    try:
        out = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=repo, capture_output=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def extract_commit(commit: str, dest: Path, repo: Path = REPO_ROOT) -> None:
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=repo, capture_output=True, check=True,
                             timeout=300)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")


def working_tree_files(repo: Path = REPO_ROOT) -> list[str]:
    """Tracked and untracked-but-not-ignored files of the working tree (what a fresh clone plus local
    work would hold; no virtual environment, data, logs or build outputs)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True, timeout=60)
    return sorted(p for p in out.stdout.decode().split("\0") if p and (repo / p).is_file())


def copy_working_tree(dest: Path, repo: Path = REPO_ROOT) -> None:
    for rel in working_tree_files(repo):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)


def materialize(run: Run, dest: Path, data_root: Path) -> str:
    """Write the run's code into ``dest``; returns a sentence saying what the checkout is made of."""
    sources = snapshot_sources(run)
    commit = run.facts["env"]["git"]["commit"]
    if git_has_commit(commit):
        extract_commit(commit, dest)
        base = f"the files of git commit {commit}"
    else:
        copy_working_tree(dest)
        why = "no commit was logged" if not commit else f"this repository does not have commit {commit}"
        base = f"a copy of the current working tree ({why})"
    for path, source in sources.items():
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source, encoding="utf-8")
    data_root.mkdir(parents=True, exist_ok=True)
    data_link = dest / "data"
    if data_link.is_symlink() or data_link.is_file():
        data_link.unlink()
    elif data_link.is_dir():  # a commit that tracked files under data/: the data in use is this repository's
        shutil.rmtree(data_link)
    data_link.symlink_to(data_root.resolve(), target_is_directory=True)
    return f"{base}, with the record's code snapshot ({len(sources)} file(s)) written over them"


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def train_arguments(facts: dict, seed: int, log_dir: Path) -> list[str]:
    """The ``speedrun train`` options that give the logged config (the rest comes from the preset)."""
    config = facts["config"]
    train, data = config["train"], config["data"]
    args = ["--preset", config["preset"], "--steps", str(train["num_steps"]), "--val-every", str(train["val_every"]),
            "--seq-len", str(data["seq_len"]), "--val-tokens", str(data["val_tokens"]), "--seed", str(seed),
            "--kernels", train["kernels"], "--compile" if train["compile"] else "--no-compile",
            "--device", facts["env"]["device"], "--log-dir", str(log_dir), "--quiet"]
    if data["data_dir"] != get_preset(config["preset"]).data.data_dir:
        args += ["--data", data["data_dir"]]
    return args


def launcher(world_size: int, python: str) -> list[str]:
    if world_size > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
                "-m", "speedrun.cli", "train"]
    return [python, "-m", "speedrun.cli", "train"]


def default_processes(facts: dict) -> int:
    """The record's process count, capped to the GPUs visible here (the math is the same for any count)."""
    world = facts["env"]["world_size"]
    if facts["env"]["device"] != "cuda" or world <= 1:
        return 1
    import torch

    visible = torch.cuda.device_count()
    for count in (8, 4, 2, 1):  # a divisor of the 8 sequences of a step
        if count <= min(world, max(visible, 1)):
            return count
    return 1


def seeds_for(record: Record, runs: int) -> list[int]:
    """The record's seeds in run-id order, then new ones after the largest."""
    seeds = [r.facts["seed"] for r in sorted(record.runs, key=lambda r: r.run_id) if r.finished]
    extra = max(seeds, default=-1) + 1
    while len(seeds) < runs:
        seeds.append(extra)
        extra += 1
    return seeds[:runs]


@dataclass
class Attempt:
    seed: int
    returncode: int
    run: Run | None
    problems: list[str] = field(default_factory=list)


def run_training(command: list[str], checkout: Path, log_dir: Path, seed: int, echo: bool) -> Attempt:
    before = set(log_dir.glob("*.txt"))
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")])}
    output = None if echo else subprocess.DEVNULL
    returncode = subprocess.run(command, cwd=checkout, env=environ, stdout=output, stderr=output).returncode
    new_logs = sorted(set(log_dir.glob("*.txt")) - before)
    if len(new_logs) != 1:
        return Attempt(seed, returncode, None, [f"seed {seed}: the trainer exited with {returncode} and wrote "
                                                f"{len(new_logs)} run logs"])
    txt = new_logs[0]
    run, problems = load_run(txt, txt.with_suffix(".json"), label=f"runs/{txt.name}")
    if run is not None:
        problems = check_run(run)
    return Attempt(seed, returncode, run if not problems else None, problems)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def env_differences(original: dict, reproduced: dict) -> list[tuple[str, object, object]]:
    """Every environment fact that differs, nvidia-smi's table aside (its clock and temperatures always do)."""
    a = {k: v for k, v in flatten(original).items() if k != "nvidia_smi"}
    b = {k: v for k, v in flatten(reproduced).items() if k != "nvidia_smi"}
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def config_differences(original: dict, reproduced: dict) -> list[tuple[str, object, object]]:
    a, b = flatten(original), flatten(reproduced)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "train.seed"]


def data_differences(original: dict, reproduced: dict) -> list[tuple[str, object, object]]:
    """The data facts that differ (where the data folder is does not matter, what is in it does)."""
    keys = sorted((set(original) | set(reproduced)) - {"dir"})
    return [(k, original.get(k), reproduced.get(k)) for k in keys if original.get(k) != reproduced.get(k)]


def _mean_sd(values_ms: list[float]) -> str:
    if not values_ms:
        return "—"
    seconds = np.asarray(values_ms) / 1000
    return f"{seconds.mean():.2f} ± {seconds.std(ddof=1):.2f} s" if len(seconds) > 1 else f"{seconds[0]:.2f} s"


def _run_row(who: str, run: Run) -> str:
    time = f"{run.train_time_ms / 1000:.2f}" if run.finished else "—"
    loss = f"{run.final_val_loss:.4f}" if run.finished else "—"
    return f"| {who} | {run.run_id} | {run.facts['seed']} | {run.status} | {time} | {loss} |"


def report_markdown(record: Record, reference: Run, attempts: list[Attempt], checkout_note: str,
                    command: list[str], plot_name: str) -> str:
    from speedrun.leaderboard_compare import ratio_ci95, welch_test

    original = [r for r in sorted(record.runs, key=lambda r: r.run_id)]
    new_runs = [a.run for a in attempts if a.run is not None]
    orig_finished = [r for r in original if r.finished]
    new_finished = [r for r in new_runs if r.finished]
    target = reference.facts["target_val_loss"]
    lines = [f"# Reproduction of {record.label}", "",
             f"{record.meta['title']} ({', '.join(record.meta['authors'])}, {record.date}, track "
             f"`{record.path.split('/')[0]}`, {record.meta['kind']} record).", "",
             "## Code", "",
             f"The checkout was {checkout_note}. Record code hash: `{reference.facts['code']['code_sha256']}`.", "",
             f"Command (run {len(attempts)} times, in the checkout): `{' '.join(command)}`", ""]
    lines += _code_check_lines(reference, new_runs)
    lines += ["", "## Runs", "", "| | run | seed | status | time (s) | final val loss |",
              "|---|---|---:|---|---:|---:|"]
    lines += [_run_row("record", r) for r in original] + [_run_row("reproduction", r) for r in new_runs]
    failed = [a for a in attempts if a.run is None]
    for attempt in failed:
        lines.append(f"| reproduction | (no valid log) | {attempt.seed} | exit {attempt.returncode} | — | — |")
    lines += [""] + [f"- {p}" for a in failed for p in a.problems] + ([""] if failed else [])
    lines += ["## Time", "", f"- record: {_mean_sd([r.train_time_ms for r in orig_finished])} over "
              f"{len(orig_finished)} finished runs",
              f"- reproduction: {_mean_sd([r.train_time_ms for r in new_finished])} over {len(new_finished)} "
              f"finished runs"]
    if orig_finished and new_finished:
        ratio, interval = ratio_ci95([r.train_time_ms for r in orig_finished], [r.train_time_ms for r in new_finished])
        ci = (f", 95% interval {interval[0]:.3f} – {interval[1]:.3f}" if interval
              else " (the interval needs at least 2 finished runs on each side)")
        lines.append(f"- ratio reproduction / record (geometric means): {ratio:.3f}{ci}")
    lines += ["", "## Loss", ""]
    lines += _loss_lines(orig_finished, new_finished, target, welch_test)
    lines += ["", "## Environment and config differences (record → here)", ""]
    env_diffs = env_differences(reference.facts["env"], new_runs[0].facts["env"]) if new_runs else []
    cfg_diffs = config_differences(reference.facts["config"], new_runs[0].facts["config"]) if new_runs else []
    data_diffs = data_differences(reference.facts["data"], new_runs[0].facts["data"]) if new_runs else []
    if not new_runs:
        lines.append("No reproduced run wrote a valid log, so there is no environment to compare.")
    elif not env_diffs and not cfg_diffs and not data_diffs:
        lines.append("None: same GPU, counts, versions, config (apart from the seed) and validation data.")
    lines += [f"- env `{k}`: {a!r} → {b!r}" for k, a, b in env_diffs]
    lines += [f"- config `{k}`: {a!r} → {b!r}" for k, a, b in cfg_diffs]
    lines += [f"- data `{k}`: {a!r} → {b!r}" for k, a, b in data_diffs]
    lines += ["", f"![times and validation curves]({plot_name})", ""]
    return "\n".join(lines)


def _code_check_lines(reference: Run, new_runs: list[Run]) -> list[str]:
    if not new_runs:
        return []
    original_files = reference.facts["code"]["files"]
    lines = []
    for run in new_runs:
        files = run.facts["code"]["files"]
        if files == original_files:
            continue
        changed = sorted(p for p in set(files) | set(original_files) if files.get(p) != original_files.get(p))
        lines.append(f"**Code differs** in run {run.run_id}: code hash `{code_hash(files)}`; files that differ "
                     f"from the record's snapshot: {', '.join(changed)}.")
    return lines or ["Every reproduced run's code hash equals the record's: the code ran byte for byte as logged."]


def _loss_lines(original: list[Run], new: list[Run], target: float, welch_test) -> list[str]:
    if not new:
        return ["No finished reproduced run."]
    losses = [r.final_val_loss for r in new]
    lines = [f"- reproduction: mean final val loss {np.mean(losses):.4f} over {len(losses)} runs (target {target})"]
    p = loss_p_value(losses, target)
    if p is None:
        lines.append("- loss test: needs at least 2 runs")
    else:
        verdict = ("passes" if p < SIGNIFICANCE_LEVEL and len(losses) >= MIN_ML_RUNS else
                   f"does not pass (needs p < {SIGNIFICANCE_LEVEL} over at least {MIN_ML_RUNS} runs)")
        lines.append(f"- loss test (one-sided t-test, mean below the target): p = {p:.3g}: {verdict}")
    test = welch_test([r.final_val_loss for r in original], losses)
    if test is not None:
        lines.append(f"- reproduction − record final val loss: {test.difference:+.4f} (Welch two-sided p = "
                     f"{test.p_value:.3g})")
    return lines


def report_png(record: Record, new_runs: list[Run], path: Path) -> None:
    from speedrun.leaderboard_build import new_figure, save_png

    figure, (times_ax, step_ax, time_ax) = new_figure(width=15, height=4.5, cols=3)
    groups = [("record", [r for r in record.runs]), ("reproduction", new_runs)]
    for index, (name, runs) in enumerate(groups):
        color = f"C{index}"
        times = [r.train_time_ms / 1000 for r in runs if r.finished]
        times_ax.scatter([index] * len(times), times, color=color)
        if times:
            times_ax.hlines(np.mean(times), index - 0.2, index + 0.2, color=color)
        for run_index, run in enumerate(runs):
            if not run.curve:
                continue
            steps, ms, losses = zip(*run.curve, strict=True)
            label = name if run_index == 0 else None
            step_ax.plot(steps, losses, color=color, alpha=0.7, linewidth=1, label=label)
            time_ax.plot(np.asarray(ms) / 1000, losses, color=color, alpha=0.7, linewidth=1, label=label)
    times_ax.set_xticks([0, 1], ["record", "reproduction"])
    times_ax.set_xlim(-0.6, 1.6)
    times_ax.set_ylabel("train time (s)")
    times_ax.set_title("times (bar: mean)")
    for ax, xlabel in ((step_ax, "step"), (time_ax, "train time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right")
    figure.suptitle(f"reproduction of {record.label}")
    save_png(figure, path)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def reproduce(record_spec: str, runs: int = 3, out: Path | None = None, records_dir: Path = RECORDS_DIR,
              data_root: Path = REPO_ROOT / "data", processes: int | None = None, python: str = sys.executable,
              echo: bool = True, confirm=None) -> tuple[Path, bool]:
    """Reproduce a record; returns (report folder, whether every run wrote a valid log). ``confirm(text)``,
    when given, is asked before the record's code runs (it executes with this user's permissions) and
    refuses the reproduction by returning False."""
    if runs < 1:
        raise ReproduceError(f"--runs must be at least 1, got {runs}")
    record = find_record(record_spec, records_dir)
    reference = reference_run(record)
    if confirm is not None and not confirm(execution_notice(record, reference, runs)):
        raise ReproduceError(f"{record.label}: not reproduced (its code was not run)")
    if out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = REPRODUCE_DIR / f"{record.path.replace('/', '__')}__{stamp}"
    if out.exists():
        raise ReproduceError(f"{out}: already exists; choose another --out")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        raise ReproduceError(f"{partial}: already exists (an earlier interrupted reproduction); move it away")
    log_dir = partial / "runs"
    log_dir.mkdir(parents=True)
    processes = processes or default_processes(reference.facts)
    attempts, command = [], []
    with tempfile.TemporaryDirectory(prefix="speedrun-reproduce-") as checkout_name:
        checkout = Path(checkout_name)
        checkout_note = materialize(reference, checkout, data_root)
        for seed in seeds_for(record, runs):
            command = launcher(processes, python) + train_arguments(reference.facts, seed, log_dir.resolve())
            if echo:
                print(f"reproduce: seed {seed}: {' '.join(command)}", flush=True)
            attempts.append(run_training(command, checkout, log_dir, seed, echo))
    new_runs = [a.run for a in attempts if a.run is not None]
    shown = [("<seed>" if flag == "--seed" else "<report folder>/runs" if flag == "--log-dir" else arg)
             for flag, arg in zip(["", *command], command, strict=False)]
    atomic_write_text(partial / "report.md", report_markdown(record, reference, attempts, checkout_note, shown,
                                                             "report.png"))
    report_png(record, new_runs, partial / "report.png")
    os.rename(partial, out)
    return out, len(new_runs) == len(attempts)


def execution_notice(record: Record, reference: Run, runs: int) -> str:
    files = reference.text.code_files
    return (f"reproduce runs the code logged in {record.label}'s run logs ({len(files)} files, code sha256 "
            f"{reference.facts['code']['code_sha256'][:12]}…), {runs} time(s), as you and with your permissions: "
            "only reproduce records whose code you trust.")


def ask_on_terminal(text: str) -> bool:
    """Print ``text`` and ask to go on; without a terminal to ask on, refuse (pass --yes to run anyway)."""
    print(text)
    if not sys.stdin.isatty():
        print("reproduce: no terminal to confirm on; pass --yes to run it", file=sys.stderr)
        return False
    return input("Run it? [y/N] ").strip().lower() in ("y", "yes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("record", metavar="RECORD", help="a record folder, or <track>/<folder> inside records/")
    parser.add_argument("--runs", type=positive_int, default=3, help="how many times to run it (default 3)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="report folder (default: logs/reproduce/<track>__<record>__<UTC time>)")
    parser.add_argument("--records", type=Path, default=RECORDS_DIR, metavar="DIR",
                        help="the records folder (default: records/ of this repository)")
    parser.add_argument("--nproc", type=positive_int, default=None,
                        help="processes (GPUs) per run (default: the record's, capped to the visible GPUs)")
    parser.add_argument("--yes", action="store_true",
                        help="run the record's logged code without asking (it runs with your permissions)")


def reproduce_command(args: argparse.Namespace) -> int:
    """Run ``speedrun reproduce`` from parsed arguments (see add_arguments); returns the exit code."""
    try:
        out, all_valid = reproduce(args.record, runs=args.runs, out=args.out, records_dir=args.records,
                                   processes=args.nproc, confirm=None if args.yes else ask_on_terminal)
    except ReproduceError as e:
        for line in str(e).split("\n"):
            print(line)
        print("reproduce: refused", file=sys.stderr)
        return 1
    print(f"reproduce: report in {out / 'report.md'} (plot {out / 'report.png'})")
    if not all_valid:
        print("reproduce: some runs did not write a valid log (see the report)", file=sys.stderr)
        return 1
    return 0


def reproduce_main(argv: list[str] | None = None, prog: str = "speedrun reproduce") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Re-run a record's logged code on this machine and "
                                     "compare with the record.")
    add_arguments(parser)
    return reproduce_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(reproduce_main())
