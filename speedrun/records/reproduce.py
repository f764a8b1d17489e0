"""``reproduce RECORD [--runs N]`` (``speedrun reproduce``, ``leaderboard.py reproduce``): re-run a record's
code as it was, here, and compare.

1. The record is checked like ``leaderboard.py check`` does; its code is the snapshot in its run logs, every
   file verified against its sha256.
2. A temporary checkout is made: the files of the logged git commit when this repository has it (else a copy of
   the current working tree), with the snapshot's files written over them, so every file the record's runs
   imported is byte-identical to what they ran. ``data/`` points at this repository's data.
3. ``python -m speedrun.cli train`` runs there N times with the record's preset and options (steps, validation
   cadence, sequence length, validation tokens, kernels, compile, device; seeds from the record's runs), writing
   its logs into the report folder.
4. The report (``report.md`` + ``report.svg``) puts the times side by side with their ratio and its 95% interval,
   runs the loss test on the new runs, overlays the curves, and lists every difference in environment, config and
   data. It says whether the new runs' code hash equals the record's, and if not, which files differ.

The report folder is built as ``<out>.partial`` and renamed to ``<out>`` once the report is written; an
interrupted reproduction keeps its finished runs' logs in the ``.partial`` folder.
"""

from __future__ import annotations

import datetime
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from speedrun import REPO_ROOT
from speedrun.config import get_preset
from speedrun.data.shards import atomic_write_text
from speedrun.errors import UserError
from speedrun.records.check import RECORDS_DIR, Record, differences, find_record
from speedrun.records.compare import comparison_lines, describe
from speedrun.records.page import comparison_svg
from speedrun.records.runlog import Run, check_run, load_run
from speedrun.records.stats import MIN_ML_RUNS, SIGNIFICANCE_LEVEL, loss_p_value

REPRODUCE_DIR = REPO_ROOT / "logs" / "reproduce"


def _git(args: list[str], repo: Path = REPO_ROOT, timeout: int = 300) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def materialize(run: Run, dest: Path, data_root: Path) -> str:
    """Write the run's code into ``dest``; returns a sentence saying what the checkout is made of."""
    if run.text.code_mismatches:  # (a checked record has none)
        raise UserError(f"{run.label}: the snapshot of {run.text.code_mismatches[0]} does not match its sha256")
    commit = run.facts["env"]["git"]["commit"]
    found = commit and (out := _git(["cat-file", "-e", f"{commit}^{{commit}}"])) and out.returncode == 0
    if found:
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO_ROOT, capture_output=True,
                                 check=True, timeout=300)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(dest, filter="data")
        base = f"the files of git commit {commit}"
    else:  # tracked and untracked-but-not-ignored files: a fresh clone plus local work (no venv, data or logs)
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                                 capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
        for rel in (p for p in listing if p and (REPO_ROOT / p).is_file()):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, dest / rel)
        why = "no commit was logged" if not commit else f"this repository does not have commit {commit}"
        base = f"a copy of the current working tree ({why})"
    for path, source in run.text.sources.items():
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).write_text(source, encoding="utf-8")
    data_root.mkdir(parents=True, exist_ok=True)
    data_link = dest / "data"
    if data_link.is_symlink() or data_link.is_file():
        data_link.unlink()
    elif data_link.is_dir():  # a commit that tracked files under data/: the data in use is this repository's
        shutil.rmtree(data_link)
    data_link.symlink_to(data_root.resolve(), target_is_directory=True)
    return f"{base}, with the record's code snapshot ({len(run.text.sources)} file(s)) written over them"


def train_arguments(facts: dict, seed: int, log_dir: Path) -> list[str]:
    """The ``speedrun train`` options that give the logged config (the rest comes from the preset; a staged
    recipe's stages set its sequence lengths, so it takes no --seq-len)."""
    config = facts["config"]
    train, data = config["train"], config["data"]
    args = ["--preset", config["preset"], "--steps", str(train["num_steps"]), "--val-every", str(train["val_every"]),
            *(["--seq-len", str(data["seq_len"])] if config.get("schedule") is None else []),
            "--val-tokens", str(data["val_tokens"]), "--seed", str(seed),
            "--kernels", train["kernels"], "--compile" if train["compile"] else "--no-compile",
            "--device", facts["env"]["device"], "--log-dir", str(log_dir), "--quiet"]
    preset = get_preset(config["preset"])  # options a record's own trainer may predate: only where they differ
    args += ["--data", data["data_dir"]] if data["data_dir"] != preset.data.data_dir else []
    args += ["--seqs-per-forward", str(data["seqs_per_forward"])] if (
        data.get("seqs_per_forward", 1) != preset.data.seqs_per_forward) else []
    return args + (["--warmup-steps", str(train["warmup_steps"])] if train["warmup_steps"] != preset.train.warmup_steps
                   else [])


def launcher(world_size: int, python: str) -> list[str]:
    distributed = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    return [python, *(distributed if world_size > 1 else []), "-m", "speedrun.cli", "train"]


def default_processes(facts: dict) -> int:
    """The record's process count, capped to the GPUs visible here (a divisor of a step's 8 sequences)."""
    world = facts["env"]["world_size"]
    if facts["env"]["device"] != "cuda" or world <= 1:
        return 1
    import torch

    return max(c for c in (8, 4, 2, 1) if c <= min(world, max(torch.cuda.device_count(), 1)))


def seeds_for(record: Record, runs: int) -> list[int]:
    """The record's seeds in run-id order, then new ones after the largest."""
    seeds = [r.facts["seed"] for r in sorted(record.runs, key=lambda r: r.run_id) if r.finished]
    return (seeds + list(range(max(seeds, default=-1) + 1, max(seeds, default=-1) + 1 + runs)))[:runs]


def run_training(command: list[str], checkout: Path, log_dir: Path, seed: int, echo: bool) -> tuple[Run | None, str]:
    """One run: (its checked run, "") or (None, why there is none)."""
    before = set(log_dir.glob("*.txt"))
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")])}
    output = None if echo else subprocess.DEVNULL
    returncode = subprocess.run(command, cwd=checkout, env=environ, stdout=output, stderr=output).returncode
    new_logs = sorted(set(log_dir.glob("*.txt")) - before)
    if len(new_logs) != 1:
        return None, f"seed {seed}: the trainer exited with {returncode} and wrote {len(new_logs)} run logs"
    run, problems = load_run(new_logs[0], new_logs[0].with_suffix(".json"), f"runs/{new_logs[0].name}")
    problems = problems or check_run(run)
    return (None, f"seed {seed} (exit {returncode}): " + "; ".join(problems)) if problems else (run, "")


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _run_row(who: str, run: Run) -> str:
    time, loss = (f"{run.train_time_ms / 1000:.2f}", f"{run.final_val_loss:.4f}") if run.finished else ("—", "—")
    return f"| {who} | {run.run_id} | {run.facts['seed']} | {run.status} | {time} | {loss} |"


def report_markdown(record: Record, reference: Run, new_runs: list[Run], failures: list[str], checkout_note: str,
                    command: list[str], plot_name: str) -> str:
    original = sorted(record.runs, key=lambda r: r.run_id)
    meta, target = record.meta, reference.facts["target_val_loss"]
    lines = [f"# Reproduction of {record.label}", "",
             f"{meta['title']} ({', '.join(meta['authors'])}, {record.date}, track `{record.path.split('/')[0]}`, "
             f"{meta['kind']} record).", "", "## Code", "",
             f"The checkout was {checkout_note}. Record code hash: `{reference.facts['code']['code_sha256']}`.", "",
             f"Command (run {len(new_runs) + len(failures)} times, in the checkout): `{' '.join(command)}`", ""]
    code_lines = [f"**Code differs** in run {run.run_id}: code hash `{run.facts['code']['code_sha256']}`; files that "
                  f"differ from the record's snapshot: {', '.join(k for k, _, _ in changed)}." for run in new_runs
                  if (changed := differences(reference.facts["code"]["files"], run.facts["code"]["files"]))]
    if new_runs:
        lines += code_lines or ["Every reproduced run's code hash equals the record's: the code ran byte for byte "
                                "as logged."]
    lines += ["", "## Runs", "", "| | run | seed | status | time (s) | final val loss |",
              "|---|---|---:|---|---:|---:|"]
    lines += [_run_row("record", r) for r in original] + [_run_row("reproduction", r) for r in new_runs]
    lines += ["| reproduction | (no valid log) | — | — | — | — |" for _ in failures] + [""]
    lines += [f"- {why}" for why in failures] + ([""] if failures else [])
    lines += ["## Time and loss (A: record, B: reproduction)", ""]
    lines += [f"- {line}" for line in (describe("A", "record", original), describe("B", "reproduction", new_runs),
                                        *comparison_lines(original, new_runs))]
    losses = [r.final_val_loss for r in new_runs if r.finished]
    if (p := loss_p_value(losses, target)) is not None:
        verdict = ("passes" if p < SIGNIFICANCE_LEVEL and len(losses) >= MIN_ML_RUNS else
                   f"does not pass (needs p < {SIGNIFICANCE_LEVEL} over at least {MIN_ML_RUNS} runs)")
        lines.append(f"- loss test of the reproduction (one-sided t-test, mean below the target {target}): "
                     f"p = {p:.3g}: {verdict}")
    lines += ["", "## Environment, config and data differences (record → here)", ""]
    if not new_runs:
        lines.append("No reproduced run wrote a valid log, so there is no environment to compare.")
    else:
        here = new_runs[0].facts
        diffs = [(f"env `{k}`", a, b) for k, a, b in differences(reference.facts["env"], here["env"])
                 if k != "nvidia_smi"]  # its clocks and temperatures always differ
        diffs += [(f"config `{k}`", a, b) for k, a, b in differences(reference.facts["config"], here["config"])
                  if k != "train.seed"]
        diffs += [(f"data `{k}`", a, b) for k, a, b in differences(reference.facts["data"], here["data"]) if k != "dir"]
        lines += [f"- {what}: {a!r} → {b!r}" for what, a, b in diffs] or [
            "None: same GPU, counts, versions, config (apart from the seed) and validation data."]
    return "\n".join(lines + ["", f"![times and validation curves]({plot_name})", ""])


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def reproduce(record_spec: str, runs: int = 3, out: Path | None = None, records_dir: Path = RECORDS_DIR,
              data_root: Path = REPO_ROOT / "data", processes: int | None = None, python: str = sys.executable,
              echo: bool = True, confirm=None) -> tuple[Path, bool]:
    """Reproduce a record; returns (report folder, whether every run wrote a valid log). ``confirm(text)``, when
    given, is asked before the record's code runs (it executes with this user's permissions); False refuses."""
    if runs < 1:
        raise UserError(f"--runs must be at least 1, got {runs}")
    record = find_record(record_spec, records_dir, keep_sources=True)
    finished = sorted((r for r in record.runs if r.finished), key=lambda r: r.run_id)
    if not finished:  # the run whose log supplies code and options (all share code and config)
        raise UserError(f"{record.label}: no finished run to take the code and options from")
    reference = finished[0]
    notice = (f"reproduce runs the code logged in {record.label}'s run logs ({len(reference.text.code_files)} files, "
              f"code sha256 {reference.facts['code']['code_sha256'][:12]}…), {runs} time(s), as you and with your "
              "permissions: only reproduce records whose code you trust.")
    if confirm is not None and not confirm(notice):
        raise UserError(f"{record.label}: not reproduced (its code was not run)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = out or REPRODUCE_DIR / f"{record.path.replace('/', '__')}__{stamp}"
    partial = out.with_name(out.name + ".partial")
    for folder, why in ((out, "choose another --out"), (partial, "an earlier interrupted reproduction; move it away")):
        if folder.exists():
            raise UserError(f"{folder}: already exists ({why})")
    log_dir = partial / "runs"
    log_dir.mkdir(parents=True)
    processes = processes or default_processes(reference.facts)
    results, command = [], []
    with tempfile.TemporaryDirectory(prefix="speedrun-reproduce-") as checkout_name:
        checkout_note = materialize(reference, Path(checkout_name), data_root)
        for seed in seeds_for(record, runs):
            command = launcher(processes, python) + train_arguments(reference.facts, seed, log_dir.resolve())
            if echo:
                print(f"reproduce: seed {seed}: {' '.join(command)}", flush=True)
            results.append(run_training(command, Path(checkout_name), log_dir, seed, echo))
    new_runs, failures = [r for r, _ in results if r], [why for r, why in results if not r]
    shown = ["<seed>" if flag == "--seed" else "<report folder>/runs" if flag == "--log-dir" else arg
             for flag, arg in zip(["", *command], command, strict=False)]
    atomic_write_text(partial / "report.md", report_markdown(record, reference, new_runs, failures, checkout_note,
                                                             shown, "report.svg"))
    atomic_write_text(partial / "report.svg", comparison_svg([("record", record.runs), ("reproduction", new_runs)],
                                                            f"reproduction of {record.label}"))
    os.rename(partial, out)
    return out, not failures


def ask_on_terminal(text: str) -> bool:
    """Print ``text`` and ask to go on; without a terminal to ask on, refuse (pass --yes to run anyway)."""
    print(text)
    if not sys.stdin.isatty():
        print("reproduce: no terminal to confirm on; pass --yes to run it", file=sys.stderr)
        return False
    return input("Run it? [y/N] ").strip().lower() in ("y", "yes")
