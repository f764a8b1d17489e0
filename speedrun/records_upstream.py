"""``import-upstream``: public NanoGPT speedrun (modded-nanogpt) log files in our run format.

An upstream log is the training script's own source, a line of ``=`` characters, the Python and
PyTorch versions, the ``nvidia-smi`` table, another ``=`` line, then the step lines::

    step:0/1385 val_loss:10.8258 train_time:0ms step_avg:nanms
    step:1/1385 train_time:17555ms step_avg:nanms
    ...
    step:1385/1385 val_loss:3.2792 train_time:178752ms step_avg:130.00ms
    peak memory allocated: 37653 MiB reserved: 39236 MiB

(Older scripts restart the clock after their first steps, so the per-step train times may jump back
once; the validation lines never do.) The import keeps the original file next to the JSON it derives
from it (``<name>.txt`` + ``<name>.json``, marked ``"source": "upstream"``), and ``check`` re-derives
the JSON from the file, so an imported number is as verifiable as one of ours.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from speedrun.data.shards import atomic_write_bytes, atomic_write_text
from speedrun.records_runlog import RUN_ID_PATTERN
from speedrun.runlog import code_hash
from speedrun.tracks import TRACKS

UPSTREAM_SCHEMA_VERSION = 1
UPSTREAM_CODE_NAME = "train_gpt.py"  # the script logs its own source
UPSTREAM_TRACK = TRACKS["8xH100-3.28"]
SEPARATOR = re.compile(r"^={20,}$")
VAL_PATTERN = re.compile(r"^step:(\d+)/(\d+) val_loss:(\S+) train_time:(\d+(?:\.\d+)?)ms step_avg:\S*ms$")
TRAIN_PATTERN = re.compile(r"^step:(\d+)/(\d+)(?: train_loss:\S+)? train_time:(\d+(?:\.\d+)?)ms step_avg:\S*ms$")
PYTHON_PATTERN = re.compile(r"^Running Python (\S+)", re.IGNORECASE)
TORCH_PATTERN = re.compile(r"^Running PyTorch (\S+)(?: compiled for CUDA (\S+))?", re.IGNORECASE)
CUDA_SUFFIX = re.compile(r"\+cu(\d+)(\d)$")  # a torch build's "+cu124": CUDA 12.4
GPU_ROW_PATTERN = re.compile(r"^\|\s+(\d+)\s+(\S.*?)\s{2,}(?:On|Off)\s+\|")


class UpstreamLogError(ValueError):
    def __init__(self, lineno: int, message: str):
        self.lineno = lineno
        super().__init__(message)


@dataclass
class ParsedUpstream:
    code: str
    python: str | None
    torch: str | None
    cuda: str | None
    gpu_names: list[str]
    nvidia_smi: str | None
    val_points: list[tuple[int, int, float, float]]  # (line number, step, val_loss, train_time_ms)
    num_steps: int


def parse_upstream_log(text: str) -> ParsedUpstream:
    """Parse a modded-nanogpt log; raises UpstreamLogError with the 1-based line number of the problem."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    separators = [i for i, line in enumerate(lines) if SEPARATOR.match(line)]
    if not separators:
        raise UpstreamLogError(len(lines), "no line of '=' characters after the code header")
    first_step = next((i for i in range(separators[0] + 1, len(lines)) if lines[i].startswith("step:")), None)
    if first_step is None:
        raise UpstreamLogError(len(lines), "no step lines after the header")
    separator = _code_end(lines, [s for s in separators if s < first_step], first_step)
    if separator == 0 or not any(line.strip() for line in lines[:separator]):
        raise UpstreamLogError(1, "no code header before the line of '=' characters")
    header = lines[separator + 1:first_step]
    python = torch = cuda = None
    gpu_names = []
    for line in header:
        if m := PYTHON_PATTERN.match(line):
            python = m[1]
        elif m := TORCH_PATTERN.match(line):
            torch, cuda = m[1], m[2]
            if cuda is None and (suffix := CUDA_SUFFIX.search(torch)):
                cuda = f"{suffix[1]}.{suffix[2]}"
        elif m := GPU_ROW_PATTERN.match(line):
            gpu_names.append(m[2])
    smi = [line for line in header if line.startswith(("|", "+"))]
    val_points, num_steps = _parse_steps(lines, first_step)
    return ParsedUpstream(code="\n".join(lines[:separator]) + "\n", python=python, torch=torch, cuda=cuda,
                          gpu_names=gpu_names, nvidia_smi="\n".join(smi) if smi else None,
                          val_points=val_points, num_steps=num_steps)


def _code_end(lines: list[str], separators: list[int], first_step: int) -> int:
    """The line of '=' that ends the code: the last one before the version header (the code may hold such
    lines itself); without a recognisable header, the first."""
    for s in reversed(separators):
        end = min([t for t in separators if t > s] + [first_step])
        if any(PYTHON_PATTERN.match(line) or TORCH_PATTERN.match(line) or GPU_ROW_PATTERN.match(line)
               for line in lines[s + 1:end]):
            return s
    return separators[0]


def _parse_steps(lines: list[str], first: int) -> tuple[list[tuple[int, int, float, float]], int]:
    val_points, num_steps, last_train_step = [], None, None
    for index in range(first, len(lines)):
        line, lineno = lines[index].rstrip(), index + 1
        if not line.startswith("step:"):
            continue
        val, train = VAL_PATTERN.match(line), TRAIN_PATTERN.match(line)
        m = val or train
        if m is None:
            raise UpstreamLogError(lineno, f"malformed step line {line[:80]!r}")
        step, total = int(m[1]), int(m[2])
        if num_steps is None:
            num_steps = total
        elif total != num_steps:
            raise UpstreamLogError(lineno, f"step line says {total} steps, earlier lines {num_steps}")
        if step > total:
            raise UpstreamLogError(lineno, f"step {step} is past the run's {total} steps")
        if val:
            try:
                loss = float(val[3])
            except ValueError:
                raise UpstreamLogError(lineno, f"val_loss {val[3]!r} is not a number") from None
            if not math.isfinite(loss) or loss < 0:
                raise UpstreamLogError(lineno, f"val_loss {val[3]} is not a finite non-negative number")
            time_ms = float(val[4])
            if val_points and step <= val_points[-1][1]:
                raise UpstreamLogError(lineno, f"validation step {step} does not increase "
                                               f"(line {val_points[-1][0]} was step {val_points[-1][1]})")
            if val_points and time_ms < val_points[-1][3]:
                raise UpstreamLogError(lineno, f"train_time {val[4]}ms goes back (line {val_points[-1][0]} said "
                                               f"{val_points[-1][3]:.0f}ms)")
            val_points.append((lineno, step, loss, time_ms))
        else:
            if last_train_step is not None and step <= last_train_step:
                raise UpstreamLogError(lineno, f"training step {step} does not increase (previous {last_train_step})")
            last_train_step = step
    if not val_points:
        raise UpstreamLogError(len(lines), "no val_loss lines")
    return val_points, num_steps


def upstream_facts(parsed: ParsedUpstream, name: str, raw: bytes) -> dict:
    """The run JSON derived from an upstream log (everything in it is recomputed by ``check``)."""
    code_sha = hashlib.sha256(parsed.code.encode()).hexdigest()
    gpu_name = parsed.gpu_names[0] if len(set(parsed.gpu_names)) == 1 else (
        " + ".join(sorted(set(parsed.gpu_names))) if parsed.gpu_names else None)
    last = parsed.val_points[-1]
    finished = last[1] == parsed.num_steps
    target = UPSTREAM_TRACK.target()
    on_track = len(parsed.gpu_names) == UPSTREAM_TRACK.gpu_count and UPSTREAM_TRACK.gpu_model in (gpu_name or "")
    status = ("success" if last[2] <= target else "not_converged") if finished else "incomplete"
    return {
        "schema_version": UPSTREAM_SCHEMA_VERSION,
        "source": "upstream",
        "run_id": Path(name).stem,
        "status": status,
        # The track whose hardware and target this run matches (its data and val tokens are the public
        # script's, which match the track's by construction of the public speedrun).
        "track": UPSTREAM_TRACK.name if on_track else None,
        "target_val_loss": target,
        "code": {"files": {UPSTREAM_CODE_NAME: code_sha}, "code_sha256": code_hash({UPSTREAM_CODE_NAME: code_sha})},
        "env": {"python": parsed.python, "torch": parsed.torch, "cuda": parsed.cuda, "device": "cuda",
                "gpu_name": gpu_name, "gpu_count": len(parsed.gpu_names), "nvidia_smi": parsed.nvidia_smi},
        "val_curve": [{"step": step, "val_loss": loss, "train_time_ms": time_ms}
                      for _, step, loss, time_ms in parsed.val_points],
        "final_val_loss": last[2] if finished else None,
        "train_time_ms": last[3] if finished else None,
        "steps_done": last[1],
        "num_steps": parsed.num_steps,
        "upstream": {"file": name, "sha256": hashlib.sha256(raw).hexdigest()},
    }


def read_upstream_log(path: Path) -> tuple[dict | None, str | None]:
    """(facts, None) for a valid upstream log, or (None, "<path>:<line>: problem")."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        return None, f"{path}: cannot read: {e.strerror}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"
    try:
        parsed = parse_upstream_log(text)
    except UpstreamLogError as e:
        return None, f"{path}:{e.lineno}: {e}"
    return upstream_facts(parsed, path.name, raw), None


def import_upstream(paths: list[Path], out_dir: Path) -> tuple[list[str], list[str]]:
    """Import every log, or none: returns (messages, problems). Writes nothing when any log is bad."""
    problems, planned = [], []
    for path in paths:
        if not RUN_ID_PATTERN.match(path.stem) or path.suffix != ".txt":
            problems.append(f"{path}: an upstream log is a <name>.txt file with a plain name (letters, digits, . _ -)")
            continue
        facts, problem = read_upstream_log(path)
        if problem:
            problems.append(problem)
            continue
        target = out_dir / path.name
        raw = path.read_bytes()
        if target.exists() and target.read_bytes() != raw:
            problems.append(f"{path}: {target} already exists with different content; not overwritten")
            continue
        planned.append((path, target, raw, facts))
    if problems:
        return [], problems
    messages = []
    for path, target, raw, facts in planned:
        json_path = target.with_suffix(".json")
        if target.exists() and json_path.exists():
            messages.append(f"{path}: already imported as {target}")
            continue
        atomic_write_bytes(target, raw)
        atomic_write_text(json_path, json.dumps(facts, indent=2, sort_keys=True) + "\n")
        result = (f"final val_loss {facts['final_val_loss']:.4f} at {facts['train_time_ms'] / 1000:.3f} s"
                  if facts["final_val_loss"] is not None else f"incomplete: stops at step {facts['steps_done']}")
        messages.append(f"{path}: imported as {json_path} ({result}, {facts['env']['gpu_count']}x "
                        f"{facts['env']['gpu_name']})")
    return messages, []


def load_upstream_json(json_path: Path, label: str | None = None) -> tuple[dict | None, list[str]]:
    """An imported run, re-derived from its saved log: (facts, problems)."""
    label = label or str(json_path)
    txt_path = json_path.with_suffix(".txt")
    txt_label = label[:-5] + ".txt" if label.endswith(".json") else str(txt_path)
    try:
        stored = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, [f"{label}: missing"]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [f"{label}: malformed JSON: {e}"]
    except RecursionError:
        return None, [f"{label}: malformed JSON: nested too deeply"]
    if not txt_path.is_file():
        return None, [f"{txt_label}: missing (an imported run keeps its original log)"]
    facts, problem = read_upstream_log(txt_path)
    if problem:
        return None, [problem.replace(str(txt_path), txt_label, 1)]
    if stored != facts:
        differing = sorted(k for k in set(facts) | set(stored) if facts.get(k) != stored.get(k)) \
            if isinstance(stored, dict) else ["everything"]
        return None, [f"{label}: differs from what {txt_label} says in {', '.join(differing)} (re-import it)"]
    return facts, []


def check_upstream_dir(folder: Path) -> tuple[list[dict], list[str]]:
    """Every imported run in ``folder``, re-derived from its log: (facts of the valid ones, problems)."""
    runs, problems = [], []
    entries = sorted(folder.iterdir())
    names = {e.name for e in entries}
    for entry in entries:
        where = f"records/{folder.name}/{entry.name}"
        if entry.is_symlink() or not entry.is_file() or entry.suffix not in (".txt", ".json"):
            problems.append(f"{where}: unexpected entry (imported logs are <name>.txt + <name>.json files)")
        elif entry.suffix == ".txt" and entry.with_suffix(".json").name not in names:
            problems.append(f"{where}: no {entry.stem}.json beside it (run import-upstream on it)")
        elif entry.suffix == ".json":
            facts, run_problems = load_upstream_json(entry, where)
            problems += run_problems
            if facts is not None:
                runs.append(facts)
    return runs, problems
