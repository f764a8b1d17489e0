"""``import-upstream``: public NanoGPT speedrun (modded-nanogpt) logs as runs, for comparison.

An upstream log is the training script's own source, a line of ``=`` characters, the Python and PyTorch
versions, the ``nvidia-smi`` table, another ``=`` line, then the step lines::

    step:0/1385 val_loss:10.8258 train_time:0ms step_avg:nanms
    step:1/1385 train_time:17555ms step_avg:nanms
    ...
    step:1385/1385 val_loss:3.2792 train_time:178752ms step_avg:130.00ms

(Older scripts restart the clock after their first steps, so training lines' times may jump back once; the
validation lines never do.) The log is the one truth: the import checks it and copies it, unchanged, into
``records/upstream/``, and every reader (``check``, ``build``, ``compare``) derives the run from it again.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import math
import re
from pathlib import Path

from speedrun.data.shards import atomic_write_bytes
from speedrun.errors import UserError
from speedrun.records.runlog import RUN_ID_PATTERN, LogFormatError, Run, StepLine, code_hash, read_text, unprintable
from speedrun.tracks import TRACKS

HISTORY_NAME, HISTORY_COLUMNS = "history.csv", ["number", "date", "minutes", "title", "source"]
HISTORY_SOURCE = "the README of github.com/KellerJordan/modded-nanogpt"
UPSTREAM_CODE_NAME = "train_gpt.py"  # the script logs its own source
UPSTREAM_TRACK = TRACKS["8xH100-3.28"]
SEPARATOR = re.compile(r"^={20,}$")
STEP_PATTERN = re.compile(r"^step:(\d{1,9})/(\d{1,9})(?: val_loss:(\S+)| train_loss:\S+)? "
                          r"train_time:(\d{1,15}(?:\.\d+)?)ms step_avg:\S*ms$")  # (digits: as runlog.STEP_LINE's)
PYTHON_PATTERN = re.compile(r"^Running Python (\S+)", re.IGNORECASE)
TORCH_PATTERN = re.compile(r"^Running PyTorch (\S+)(?: compiled for CUDA (\S+))?", re.IGNORECASE)
CUDA_SUFFIX = re.compile(r"\+cu(\d+)(\d)$")  # a torch build's "+cu124": CUDA 12.4
GPU_ROW_PATTERN = re.compile(r"^\|\s+(\d+)\s+(\S.*?)\s{2,}(?:On|Off)\s+\|")


def _is_header(line: str) -> bool:
    return any(p.match(line) for p in (PYTHON_PATTERN, TORCH_PATTERN, GPU_ROW_PATTERN))


def upstream_facts(text: str, name: str) -> dict:
    """The run facts of a modded-nanogpt log; raises LogFormatError with the 1-based line of a problem."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    separators = [i for i, line in enumerate(lines) if SEPARATOR.match(line)]
    first_step = next((i for i in range(separators[0] + 1, len(lines)) if lines[i].startswith("step:")),
                      None) if separators else None
    if first_step is None:
        raise LogFormatError(len(lines), "no line of '=' characters after the code header" if not separators
                             else "no step lines after the header")
    # the code ends at the last '=' line before the version header (the code may hold such lines itself)
    before = [s for s in separators if s < first_step]
    code_end = next((s for s in reversed(before) if any(_is_header(line) for line in lines[s + 1:min(
        [t for t in before if t > s] + [first_step])])), before[0])
    if not any(line.strip() for line in lines[:code_end]):
        raise LogFormatError(1, "no code header before the line of '=' characters")
    python = torch = cuda = None
    gpus = []
    for lineno, line in enumerate(lines[code_end + 1:first_step], start=code_end + 2):
        if _is_header(line) and (bad := unprintable(line)):  # these texts reach the leaderboard and terminals
            raise LogFormatError(lineno, f"the version and GPU header holds {bad}")
        if m := PYTHON_PATTERN.match(line):
            python = m[1]
        elif m := TORCH_PATTERN.match(line):
            torch, cuda = m[1], m[2] or (f"{s[1]}.{s[2]}" if (s := CUDA_SUFFIX.search(m[1])) else None)
        elif m := GPU_ROW_PATTERN.match(line):
            gpus.append(m[2])
    smi = [line for line in lines[code_end + 1:first_step] if line.startswith(("|", "+"))]
    curve, num_steps, last_train = [], None, None
    for lineno, line in enumerate(lines[first_step:], start=first_step + 1):
        if not line.startswith("step:"):
            continue
        if not (m := STEP_PATTERN.match(line.rstrip())):
            raise LogFormatError(lineno, f"malformed step line {line[:80]!r}")
        step, total, time_ms = int(m[1]), int(m[2]), float(m[4])
        num_steps = num_steps or total
        if total != num_steps:
            raise LogFormatError(lineno, f"step line says {total} steps, earlier lines {num_steps}")
        if step > total:
            raise LogFormatError(lineno, f"step {step} is past the run's {total} steps")
        if m[3] is None:
            if last_train is not None and step <= last_train:
                raise LogFormatError(lineno, f"training step {step} does not increase (previous {last_train})")
            last_train = step
            continue
        try:
            loss = float(m[3])
        except ValueError:
            raise LogFormatError(lineno, f"val_loss {m[3]!r} is not a number") from None
        if not math.isfinite(loss) or loss < 0:
            raise LogFormatError(lineno, f"val_loss {m[3]} is not a finite non-negative number")
        if curve and step <= curve[-1]["step"]:
            raise LogFormatError(lineno, f"validation step {step} does not increase (previous {curve[-1]['step']})")
        if step == total and time_ms <= 0:  # (as our logs: speedrun/records/runlog.py, _check_outcome)
            raise LogFormatError(lineno, "the run finished at train_time 0ms: no run trains in no time")
        if curve and time_ms < curve[-1]["train_time_ms"]:
            raise LogFormatError(lineno, f"train_time {m[4]}ms goes back (previous {curve[-1]['train_time_ms']:.0f}ms)")
        curve.append({"step": step, "val_loss": loss, "train_time_ms": time_ms})
    if not curve:
        raise LogFormatError(len(lines), "no val_loss lines")
    code_sha = hashlib.sha256(("\n".join(lines[:code_end]) + "\n").encode()).hexdigest()
    gpu_name = " + ".join(sorted(set(gpus))) or None
    finished, target = curve[-1]["step"] == num_steps, UPSTREAM_TRACK.target()
    on_track = len(gpus) == UPSTREAM_TRACK.gpu_count and UPSTREAM_TRACK.gpu_model in (gpu_name or "")
    return {
        "run_id": Path(name).stem,
        "status": ("success" if curve[-1]["val_loss"] <= target else "not_converged") if finished else "incomplete",
        # the track whose hardware and target the run matches (its data and val tokens are the public script's)
        "track": UPSTREAM_TRACK.name if on_track else None, "target_val_loss": target,
        "code": {"files": {UPSTREAM_CODE_NAME: code_sha}, "code_sha256": code_hash({UPSTREAM_CODE_NAME: code_sha})},
        "env": {"python": python, "torch": torch, "cuda": cuda, "device": "cuda", "gpu_name": gpu_name,
                "gpu_count": len(gpus), "nvidia_smi": "\n".join(smi) or None},
        "val_curve": curve, "final_val_loss": curve[-1]["val_loss"] if finished else None,
        "train_time_ms": curve[-1]["train_time_ms"] if finished else None, "steps_done": curve[-1]["step"],
        "num_steps": num_steps, "file": name,
    }


def as_run(facts: dict, label: str) -> Run:
    lines = [StepLine(0, p["step"], facts["num_steps"], p["val_loss"], p["train_time_ms"], math.nan)
             for p in facts["val_curve"]]
    return Run(run_id=facts["run_id"], label=label, facts=facts, val_lines=lines)


def read_upstream_log(path: Path, label: str | None = None) -> tuple[Run | None, str | None]:
    """(the run, None) for a valid upstream log, or (None, "<label>:<line>: problem")."""
    label = label or str(path)
    text, problem = read_text(path, label)
    if problem:
        return None, problem
    try:
        return as_run(upstream_facts(text, path.name), label), None
    except LogFormatError as e:
        return None, f"{label}:{e.lineno}: {e}"


def import_upstream(paths: list[Path], out_dir: Path) -> list[str]:
    """Copy every log into ``out_dir``, or none; returns what was done. Raises UserError (nothing is written)
    when any log is bad."""
    problems, planned = [], []
    for path in paths:
        if not RUN_ID_PATTERN.match(path.stem) or path.suffix != ".txt":
            problems.append(f"{path}: an upstream log is a <name>.txt file with a plain name (letters, digits, . _ -)")
        elif (result := read_upstream_log(path))[1]:
            problems.append(result[1])
        elif (out_dir / path.name).exists() and (out_dir / path.name).read_bytes() != path.read_bytes():
            problems.append(f"{path}: {out_dir / path.name} already exists with different content; not overwritten")
        else:
            planned.append((path, result[0]))
    if problems:
        raise UserError("\n".join(problems))
    messages = []
    for path, run in planned:
        facts, target = run.facts, out_dir / path.name
        if target.exists():
            messages.append(f"{path}: already imported as {target}")
            continue
        atomic_write_bytes(target, path.read_bytes())
        result = (f"final val_loss {run.final_val_loss:.4f} at {run.train_time_ms / 1000:.3f} s" if run.finished
                  else f"incomplete: stops at step {facts['steps_done']}")
        messages.append(f"{path}: imported as {target} ({result}, {facts['env']['gpu_count']}x "
                        f"{facts['env']['gpu_name']})")
    return messages


def read_history(path: Path, where: str) -> tuple[list[dict], list[str]]:
    """The public record history (``history.csv``: number, date, minutes, title, source; transcribed from
    modded-nanogpt's README, whose figures it keeps): rows with the time in seconds, and problems."""
    text, problem = read_text(path, where)
    rows = list(csv.reader(io.StringIO(text or "")))
    if problem or not rows or rows[0] != HISTORY_COLUMNS:
        return [], [problem or f"{where}:1: the header must be {','.join(HISTORY_COLUMNS)}"]
    history, problems = [], []
    for lineno, row in enumerate(rows[1:], start=2):
        try:
            number, date, minutes, title, source = row
            entry = {"number": int(number), "date": datetime.date.fromisoformat(date).isoformat(),
                     "seconds": 60 * float(minutes), "title": title, "source": source}
        except ValueError as e:
            problems.append(f"{where}:{lineno}: not number,YYYY-MM-DD date,minutes,title,source ({e})")
            continue
        if not 0 < entry["seconds"] < math.inf or (history and entry["number"] <= history[-1]["number"]):
            problems.append(f"{where}:{lineno}: record numbers increase and times are positive")
        elif bad := unprintable(title + source):
            problems.append(f"{where}:{lineno}: holds {bad}")
        else:
            history.append(entry)
    return history, problems


def check_upstream_dir(folder: Path, entries: dict) -> tuple[list[Run], list[dict], list[str]]:
    """Every imported log in ``folder`` read again, and the public record history: (the valid runs, the
    history, problems). ``entries``: the folder's entries by name, its links and unprintable names left out."""
    runs, history, problems = [], [], []
    for entry in (Path(e.path) for e in entries.values()):
        where = f"records/{folder.name}/{entry.name}"
        if not entry.is_file() or (entry.suffix != ".txt" and entry.name != HISTORY_NAME):
            problems.append(f"{where}: unexpected entry (records/{folder.name}/ holds imported <name>.txt logs and "
                            f"{HISTORY_NAME})")
        elif entry.name == HISTORY_NAME:
            history, history_problems = read_history(entry, where)
            problems += history_problems
        else:
            run, problem = read_upstream_log(entry, where)
            problems += [problem] if problem else []
            runs += [run] if run else []
    return runs, history, problems
