"""Reading and checking one run's logs (``<run_id>.txt`` + ``<run_id>.json``, as ``speedrun.runlog`` writes them).

The text log is the source of truth for every number the leaderboard shows: a run's final validation
loss is the ``val_loss`` of its last-step validation line, its time that line's ``train_time``. The
JSON file must say the same thing; any disagreement, malformation or impossible value is a problem.

Problems are plain strings, one per problem, prefixed with the file (and line) they are about.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

from speedrun.config import DataConfig, ModelConfig, OptimConfig, RunConfig, StagedSchedule, TrainConfig
from speedrun.runlog import SCHEMA_VERSION, STATUSES, code_hash
from speedrun.tracks import Track

FINISHED_STATUSES = ("success", "not_converged")  # ran every step and validated at the last one
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HEX64 = r"[0-9a-f]{64}"

# Section lines of the text log (see speedrun/runlog.py for the layout).
FIRST_LINE = "speedrun run log"
CODE_HEADER = re.compile(rf"^====== code: (\S+) sha256=({HEX64}) lines=(\d+) eol=(yes|no) ======$")
CODE_HASH_LINE = re.compile(rf"^====== code_sha256: ({HEX64}) ======$")
ENV_LINE, CONFIG_LINE, LOG_LINE, SUMMARY_LINE = (f"====== {name} ======"
                                                  for name in ("environment", "config", "log", "summary"))

# The two kinds of step lines. Our trainer writes the loss with 4 decimals and whole milliseconds.
VAL_PATTERN = re.compile(r"^step:(\d+)/(\d+) val_loss:(-?\d+\.\d{4}|nan|-?inf) train_time:(\d+)ms "
                         r"step_avg:(nan|\d+\.\d{2})ms$")
TRAIN_PATTERN = re.compile(r"^step:(\d+)/(\d+) train_time:(\d+)ms step_avg:(\d+\.\d{2})ms$")

# The JSON file's fields: name -> allowed types (None: JSON null). Exactly these, no more, no fewer.
NUMBER = (int, float)
RUN_FIELDS = {
    "schema_version": (int,), "run_id": (str,), "status": (str,), "track": (str, None), "preset": (str,),
    "target_val_loss": (*NUMBER, None), "seed": (int,), "config": (dict,), "code": (dict,), "env": (dict,),
    "data": (dict,), "val_curve": (list,), "train_losses": (list,), "final_val_loss": (*NUMBER, None),
    "train_time_ms": (*NUMBER, None), "steps_done": (int,), "tokens_seen": (int,),
    "tokens_per_second": (*NUMBER, None), "mfu": (*NUMBER, None), "peak_memory_mib": (*NUMBER, None),
    "diverged_at_step": (int, None), "message": (str, None),
}
RUN_OPTIONAL_FIELDS = {"checkpoint": (str, None), "started_at": (str,), "finished_at": (str, None),
                       "schedule_changes": (list,)}
CODE_FIELDS = {"files": (dict,), "code_sha256": (str,)}
ENV_FIELDS = {
    "python": (str,), "torch": (str,), "triton": (str, None), "cuda": (str, None), "nccl": (str, int, None),
    "device": (str,), "world_size": (int,), "gpu_name": (str, None), "gpu_count": (int,),
    "cpu_count": (int, None), "platform": (str,), "triton_interpret": (bool,), "nvidia_smi": (str, None),
    "git": (dict,),
}
GIT_FIELDS = {"commit": (str, None), "dirty": (bool, None)}
DATA_FIELDS = {"dir": (str,), "val_shard": (str,), "kind": (str, None), "val_optimal_loss": (*NUMBER, None),
               "val_shard_sha256": (str, None)}
VAL_POINT_FIELDS = {"step": (int,), "val_loss": NUMBER, "train_time_ms": NUMBER}
# A track's data name -> the data manifest "kind" its runs must have used.
TRACK_DATA_KIND = {"synth": "synth", "fineweb10B": "download"}


class LogFormatError(ValueError):
    def __init__(self, lineno: int, message: str):
        self.lineno = lineno
        super().__init__(message)


class ValLine(NamedTuple):
    lineno: int
    step: int
    total: int
    val_loss: float
    train_time_ms: int
    step_avg_ms: float  # NaN at step 0


class TrainLine(NamedTuple):
    lineno: int
    step: int
    total: int
    train_time_ms: int
    step_avg_ms: float


@dataclass
class TextLog:
    """Everything in a text log, as written."""

    run_id: str
    code_files: dict[str, str]  # path -> sha256 from the section header
    code_sources: dict[str, str]  # path -> the file's exact source, as the snapshot section restores it
    code_header_lines: dict[str, int]  # path -> line number of its section header
    code_sha256: str
    env_text: str  # the JSON sections as written (parsed only when they differ from the JSON file)
    config_text: str
    env_start: int  # line number of the section's first line
    config_start: int
    val_lines: list[ValLine]
    train_lines: list[TrainLine]
    summary_text: str | None  # None: the run never ended (killed), so no summary was written
    summary_start: int

    def source(self, path: str) -> str | None:
        """The exact source of a snapshot file, or None when the snapshot does not match its hash."""
        source = self.code_sources[path]
        return source if source_matches(source, self.code_files[path]) else None


@dataclass(slots=True)
class RunSummary:
    """What the leaderboard keeps of a checked run (cheap to pass between processes)."""

    run_id: str
    label: str
    status: str
    finished: bool
    final_val_loss: float | None  # from the text log's last-step validation line
    train_time_ms: int | None  # idem
    val_points: tuple  # ((step, val_loss, train_time_ms), ...) of the text log: what duplicates are judged by
    seed: int
    num_steps: int
    target_val_loss: float | None
    device: str
    gpu_name: str | None
    gpu_count: int
    torch: str
    code_sha256: str


@dataclass
class Run:
    """One run: its parsed text log and its JSON facts. Numbers come from the text log."""

    run_id: str
    txt_path: Path
    json_path: Path
    label: str  # how problems name it, e.g. records/tiny-cpu/2025-01-01_x/runs/<id>.txt
    text: TextLog
    facts: dict
    json_text: str

    def summary(self) -> RunSummary:
        facts, env = self.facts, self.facts["env"]
        return RunSummary(run_id=self.run_id, label=self.label, status=self.status, finished=self.finished,
                          final_val_loss=self.final_val_loss, train_time_ms=self.train_time_ms,
                          val_points=tuple((v.step, v.val_loss, v.train_time_ms) for v in self.text.val_lines),
                          seed=facts["seed"],
                          num_steps=facts["config"]["train"]["num_steps"], target_val_loss=facts["target_val_loss"],
                          device=env["device"], gpu_name=env["gpu_name"], gpu_count=env["gpu_count"],
                          torch=env["torch"], code_sha256=facts["code"]["code_sha256"])

    @functools.cached_property
    def config_key(self) -> str:
        """The JSON's config without the seed, as text: equal for every run of one recipe.

        When the text log's config section is verbatim the JSON's (the writer's layout), the key is cut
        from it: a string slice instead of a JSON encoding, on the leaderboard's hot path.
        """
        text = self.text.config_text
        if _section_agrees(self, "config", text, self.text.config_start, self.facts["config"], "config"):
            return config_key(self.facts["config"])
        train = text.find('\n  "train": {')
        seed = text.find('\n    "seed": ', train) if train >= 0 else -1
        end = text.find(",\n", seed) if seed >= 0 else -1
        if end >= 0 and text.find("\n", seed + 1) == end + 1:
            return text[:seed] + text[end + 1:]
        return config_key(self.facts["config"])

    @property
    def status(self) -> str:
        return self.facts["status"]

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def final_val_loss(self) -> float | None:
        """The last-step validation loss of a finished run, from the text log."""
        return self.text.val_lines[-1].val_loss if self.finished else None

    @property
    def train_time_ms(self) -> int | None:
        """The train time at the last-step validation of a finished run, from the text log."""
        return self.text.val_lines[-1].train_time_ms if self.finished else None

    @property
    def curve(self) -> list[tuple[int, int, float]]:
        """(step, train_time_ms, val_loss) of every validation line."""
        return [(v.step, v.train_time_ms, v.val_loss) for v in self.text.val_lines]


# ---------------------------------------------------------------------------------------------
# Parsing the text log
# ---------------------------------------------------------------------------------------------


def source_matches(source: str, sha256: str) -> bool:
    return hashlib.sha256(source.encode()).hexdigest() == sha256


def parse_json_section(text: str, first_lineno: int, name: str) -> dict:
    """A JSON section of the text log; raises LogFormatError with the file's line number."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LogFormatError(first_lineno + e.lineno - 1, f"the {name} section is not valid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise LogFormatError(first_lineno, f"the {name} section must be a JSON object")
    return value


def canonical_json(value) -> str:
    """How the writer formats every JSON section and file (so equal text means equal facts)."""
    return json.dumps(value, indent=2, sort_keys=True)


def _parse_step_lines(lines: list[str], first_lineno: int) -> tuple[list[ValLine], list[TrainLine]]:
    val_lines, train_lines = [], []
    for offset, line in enumerate(lines):
        lineno = first_lineno + offset
        if not line.startswith("step:"):
            continue  # summary lines ("final val_loss ...", "peak memory ...") are free text
        if m := VAL_PATTERN.match(line):
            val_lines.append(ValLine(lineno, int(m[1]), int(m[2]), float(m[3]), int(m[4]), float(m[5])))
        elif m := TRAIN_PATTERN.match(line):
            train_lines.append(TrainLine(lineno, int(m[1]), int(m[2]), int(m[3]), float(m[4])))
        else:
            raise LogFormatError(lineno, f"malformed step line {line[:80]!r}")
    return val_lines, train_lines


def parse_text_log(text: str) -> TextLog:
    """Parse a text log; raises LogFormatError (with a 1-based line number) when it is malformed."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) < 2 or lines[0] != FIRST_LINE:
        raise LogFormatError(1, f"not a speedrun run log (the first line must be {FIRST_LINE!r})")
    if not lines[1].startswith("run_id: "):
        raise LogFormatError(2, "the second line must be 'run_id: <id>'")
    run_id = lines[1][len("run_id: "):]

    # Code snapshot sections: a header announcing the file's line count, then exactly that many lines.
    i = 2
    code_files, code_sources, header_lines = {}, {}, {}
    while True:
        if i >= len(lines):
            raise LogFormatError(i, "the log ends before its code_sha256 line")
        total = CODE_HASH_LINE.match(lines[i])
        if total:
            break
        header = CODE_HEADER.match(lines[i])
        if header is None:
            raise LogFormatError(i + 1, f"expected a code section header or the code_sha256 line, got "
                                        f"{lines[i][:80]!r}")
        path, sha, n_lines, eol = header[1], header[2], int(header[3]), header[4]
        if path in code_files:
            raise LogFormatError(i + 1, f"the code snapshot holds {path} twice")
        if i + 1 + n_lines > len(lines):
            raise LogFormatError(i + 1, f"the code snapshot of {path} is cut short ({n_lines} lines announced)")
        source = "\n".join(lines[i + 1:i + 1 + n_lines]) + "\n" if n_lines else ""
        code_sources[path] = source[:-1] if eol == "no" else source
        code_files[path], header_lines[path] = sha, i + 1
        i += 1 + n_lines
    code_sha256 = total[1]

    def section(start: int, title: str, next_title: str) -> tuple[list[str], int]:
        """The lines after ``title`` (at ``start``) up to ``next_title``, and where that is."""
        if start >= len(lines) or lines[start] != title:
            found = repr(lines[start][:80]) if start < len(lines) else "the end of the file"
            raise LogFormatError(start + 1, f"expected {title!r}, got {found}")
        try:
            end = lines.index(next_title, start + 1)
        except ValueError:
            if title != LOG_LINE:  # only the step section may run to the end (a killed run)
                raise LogFormatError(len(lines), f"the log ends before its {next_title!r} line") from None
            end = len(lines)
        return lines[start + 1:end], end

    env_lines, i = section(i + 1, ENV_LINE, CONFIG_LINE)
    env_start = i - len(env_lines) + 1
    config_lines, i = section(i, CONFIG_LINE, LOG_LINE)
    config_start = i - len(config_lines) + 1
    step_section, i = section(i, LOG_LINE, SUMMARY_LINE)
    step_start = i - len(step_section) + 1
    val_lines, train_lines = _parse_step_lines(step_section, step_start)
    summary_text = "\n".join(lines[i + 1:]) if i < len(lines) else None
    return TextLog(run_id=run_id, code_files=code_files, code_sources=code_sources,
                   code_header_lines=header_lines, code_sha256=code_sha256, env_text="\n".join(env_lines),
                   config_text="\n".join(config_lines), env_start=env_start, config_start=config_start,
                   val_lines=val_lines, train_lines=train_lines, summary_text=summary_text, summary_start=i + 2)


# ---------------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------------


def load_run(txt_path: Path, json_path: Path, label: str | None = None) -> tuple[Run | None, list[str]]:
    """Read and parse both files of a run. Returns (run, problems); run is None when unreadable."""
    label = label or str(txt_path)
    json_label = label[:-4] + ".json" if label.endswith(".txt") else str(json_path)
    problems = []
    try:
        text = parse_text_log(txt_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{label}: missing (every run needs its .txt and .json log)")
    except UnicodeDecodeError as e:
        problems.append(f"{label}: not UTF-8 text ({e.reason} at byte {e.start})")
    except LogFormatError as e:
        problems.append(f"{label}:{e.lineno}: {e}")
    except RecursionError:
        problems.append(f"{label}: a JSON section is nested too deeply")
    try:
        json_text = json_path.read_text(encoding="utf-8")
        facts = json.loads(json_text)
        if not isinstance(facts, dict):
            problems.append(f"{json_label}: must hold a JSON object")
        else:
            nulls_at_divergence(facts)
    except FileNotFoundError:
        problems.append(f"{json_label}: missing (every run needs its .txt and .json log)")
    except UnicodeDecodeError as e:
        problems.append(f"{json_label}: not UTF-8 text ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        problems.append(f"{json_label}:{e.lineno}: malformed JSON: {e.msg}")
    except RecursionError:
        problems.append(f"{json_label}: malformed JSON: nested too deeply")
    if problems:
        return None, problems
    return Run(run_id=txt_path.stem, txt_path=txt_path, json_path=json_path, label=label, text=text,
               facts=facts, json_text=json_text), []


# ---------------------------------------------------------------------------------------------
# Checking a run on its own
# ---------------------------------------------------------------------------------------------


def _type_name(types: tuple) -> str:
    return " or ".join("null" if t is None else {dict: "object", list: "array", str: "string", bool: "boolean",
                                                  int: "integer", float: "number"}[t] for t in types)


def _has_type(value, types: tuple) -> bool:
    """Exact JSON types: ``True`` is not an integer here, ``None`` is JSON null."""
    return (None if value is None else type(value)) in types


def check_fields(obj: dict, required: dict, where: str, optional: dict | None = None) -> list[str]:
    """Missing, extra and mistyped fields of one JSON object."""
    optional = optional or {}
    problems = []
    if obj.keys() != required.keys():  # the common case skips both scans
        problems += [f"{where}: missing field {name!r}" for name in required if name not in obj]
        problems += [f"{where}: unexpected field {name!r}" for name in obj
                     if name not in required and name not in optional]
    for name, value in obj.items():
        types = required.get(name) or optional.get(name)
        if types and not _has_type(value, types):
            problems.append(f"{where}: field {name!r} must be {_type_name(types)}, got {json.dumps(value)[:40]}")
    return problems


def _is_bad_number(value, allow_negative: bool) -> bool:
    # value - value is 0 for every finite number and NaN for NaN and the infinities.
    return value - value != 0 or (value < 0 and not allow_negative)


def _bad_numbers(value, path: str, allow_negative: bool, found: list | None = None) -> list[tuple[str, float]]:
    """(path, value) of every NaN, infinite (and, unless allowed, negative) number inside ``value``."""
    found = [] if found is None else found
    if type(value) is dict:
        items = ((f"{path}.{k}" if path else k, v) for k, v in value.items())
    elif type(value) is list:
        try:  # the common case, a list of plain numbers (losses), checked by C loops
            if value and (sum(value) - sum(value) == 0) and (allow_negative or min(value) >= 0):
                return found
        except TypeError:  # not all numbers: look at each item
            pass
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        items = [(path, value)]
    for where, item in items:
        kind = type(item)
        if kind is float or kind is int:
            if _is_bad_number(item, allow_negative):
                found.append((where, item))
        elif kind is dict or kind is list:
            _bad_numbers(item, where, allow_negative, found)
    return found


def check_schema(facts: dict, where: str) -> list[str]:
    """The JSON file's fields, types and nested objects; an unknown schema version stops the check."""
    if facts.get("schema_version") != SCHEMA_VERSION:
        return [f"{where}: unknown schema_version {facts.get('schema_version')!r} (this leaderboard reads "
                f"version {SCHEMA_VERSION})"]
    problems = check_fields(facts, RUN_FIELDS, where, RUN_OPTIONAL_FIELDS)
    if problems:
        return problems
    problems += check_fields(facts["code"], CODE_FIELDS, f"{where}: code")
    problems += check_fields(facts["env"], ENV_FIELDS, f"{where}: env")
    if isinstance(facts["env"].get("git"), dict):
        problems += check_fields(facts["env"]["git"], GIT_FIELDS, f"{where}: env.git")
    problems += check_fields(facts["data"], DATA_FIELDS, f"{where}: data")
    for i, point in enumerate(facts["val_curve"]):
        if not isinstance(point, dict):
            problems.append(f"{where}: val_curve[{i}] must be an object")
        elif not _is_val_point(point):
            problems += check_fields(point, VAL_POINT_FIELDS, f"{where}: val_curve[{i}]")
    if not all(_has_type(x, NUMBER) for x in facts["train_losses"]):
        problems.append(f"{where}: train_losses must hold numbers only")
    if facts["status"] not in STATUSES:
        problems.append(f"{where}: unknown status {facts['status']!r} (one of {', '.join(STATUSES)})")
    return problems


def check_config(run: Run) -> list[str]:
    """The config is a full resolved RunConfig (checked once per distinct config: runs share them)."""
    train = run.facts["config"].get("train")
    if not isinstance(train, dict) or type(train.get("seed")) is not int:
        return [f"{json_label(run)}: config.train.seed is missing or not an integer"]
    problem = _config_problem(run.config_key)
    return [f"{json_label(run)}: {problem}"] if problem else []


def config_key(config: dict) -> str:
    """The config without the seed, in the writer's JSON layout: equal for every run of one recipe
    (and equal to what Run.config_key cuts out of a text log)."""
    train = config.get("train")
    if isinstance(train, dict):
        config = {**config, "train": {k: v for k, v in train.items() if k != "seed"}}
    return canonical_json(config)


@functools.lru_cache(maxsize=4096)
def _config_problem(key: str) -> str | None:
    """Why a config (see config_key) is not a full resolved RunConfig, or None. Cached: runs share configs."""
    try:
        config = json.loads(key)
    except json.JSONDecodeError as e:
        return f"config is not valid JSON: {e}"
    if isinstance(config.get("train"), dict):
        config["train"]["seed"] = 0  # the key leaves the seed out; check_config checked it
    try:
        RunConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as e:
        return f"config is not a valid RunConfig: {e}"
    if not _config_is_complete(config):
        return "config is missing RunConfig fields (it must be the full resolved config)"
    return None


CONFIG_SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "train": TrainConfig}
CONFIG_SECTION_FIELDS = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in CONFIG_SECTIONS.items()}
STAGED_SCHEDULE_FIELDS = {f.name for f in dataclasses.fields(StagedSchedule)}
# Fields added to a section after runs were recorded: a config written before them may lack them, and
# from_dict gives them their defaults, which keep the older recipes' meaning (record #89's port, 2026-11-26).
FIELDS_ADDED_LATER = {
    "model": {"bigram_vocab_size", "bigram_dim"},
    "optim": {"muon_momentum_cooldown_steps", "normuon_lr", "normuon_weight_decay", "normuon_beta2",
              "polar_express_coeffs", "adam_lr", "adam_weight_decay"},
}


def _is_val_point(point: dict) -> bool:
    """The common, well-formed case of a val_curve point, tested without building messages."""
    return (point.keys() == VAL_POINT_FIELDS.keys() and type(point["step"]) is int
            and type(point["val_loss"]) in NUMBER and type(point["train_time_ms"]) in NUMBER)


def _config_is_complete(config: dict) -> bool:
    """Every field of the resolved RunConfig is present (from_dict fills missing ones with defaults), but
    for FIELDS_ADDED_LATER, and the schedule section only in staged recipes' configs."""
    if set(config) - {"schedule"} != {"preset", "track", *CONFIG_SECTIONS}:
        return False
    if isinstance(config.get("schedule"), dict) and set(config["schedule"]) != STAGED_SCHEDULE_FIELDS:
        return False
    return all(isinstance(config[name], dict) and set(config[name]) <= fields
               and fields - set(config[name]) <= FIELDS_ADDED_LATER.get(name, set())
               for name, fields in CONFIG_SECTION_FIELDS.items())


def nulls_at_divergence(facts: dict) -> dict:
    """A diverged run's JSON holds null for the non-finite losses where it diverged (strict JSON; older logs
    hold NaN there): read as NaN, in place, so the checks compare them with the text log's "nan"."""
    if facts.get("status") == "diverged":
        losses, curve = facts.get("train_losses"), facts.get("val_curve")
        if isinstance(losses, list) and losses and losses[-1] is None:
            losses[-1] = math.nan
        if isinstance(curve, list) and curve and isinstance(curve[-1], dict) and curve[-1].get("val_loss", 0) is None:
            curve[-1]["val_loss"] = math.nan
    return facts


def _diverged_non_finite(facts: dict) -> set[str]:
    """Paths where a diverged run legitimately holds a non-finite number: the losses at its divergence."""
    if facts.get("status") != "diverged":
        return set()
    allowed = set()
    losses = facts.get("train_losses") or []
    if losses:
        allowed.add(f"train_losses[{len(losses) - 1}]")
    curve = facts.get("val_curve") or []
    if curve:
        allowed.add(f"val_curve[{len(curve) - 1}].val_loss")
    return allowed


def check_numbers(facts: dict, where: str, json_text: str) -> list[str]:
    """No NaN/inf anywhere (except where a diverged run diverged); no negative measurement.

    ``json_text`` is the file's text: JSON spells non-finite numbers NaN/Infinity, so when neither
    word occurs the config (where negative numbers are fine) needs no walk.
    """
    maybe_non_finite = "NaN" in json_text or "Infinity" in json_text
    bad = _bad_numbers({k: v for k, v in facts.items() if k != "config"}, "", allow_negative=False)
    if maybe_non_finite:
        bad += _bad_numbers(facts["config"], "config", allow_negative=True)
    allowed = _diverged_non_finite(facts)
    problems = []
    for path, value in bad:
        if path in allowed and not math.isfinite(value):
            continue
        kind = "negative" if math.isfinite(value) else "non-finite"
        problems.append(f"{where}: {kind} number {value} in {path}")
    return problems


def check_code(run: Run) -> list[str]:
    """Every snapshot file matches its hash, the code hash matches the files, the JSON agrees."""
    text, label = run.text, run.label
    problems = []
    for path, sha in text.code_files.items():
        line = text.code_header_lines[path]
        if path.startswith("/") or ".." in Path(path).parts or "\\" in path:
            problems.append(f"{label}:{line}: code path {path!r} escapes the repository")
        if not source_matches(text.code_sources[path], sha):
            problems.append(f"{label}:{line}: the code snapshot of {path} does not match its sha256 {sha[:12]}…")
    if code_hash(text.code_files) != text.code_sha256:
        problems.append(f"{label}: code_sha256 {text.code_sha256[:12]}… does not match the snapshot's files "
                        f"(recomputed {code_hash(text.code_files)[:12]}…)")
    code = run.facts["code"]
    if code.get("files") != text.code_files or code.get("code_sha256") != text.code_sha256:
        problems.append(f"{json_label(run)}: code hashes differ from the text log's snapshot")
    return problems


def json_label(run: Run) -> str:
    return run.label[:-4] + ".json" if run.label.endswith(".txt") else str(run.json_path)


def check_steps(run: Run) -> list[str]:
    """Step lines: one run length, steps and train times going forward, a last-step validation."""
    text, label, facts = run.text, run.label, run.facts
    problems = []
    num_steps = facts["config"]["train"]["num_steps"]
    lines = sorted([*text.val_lines, *text.train_lines], key=lambda x: x.lineno)
    for line in lines:
        if line.total != num_steps:
            problems.append(f"{label}:{line.lineno}: step line says {line.total} steps, the config {num_steps}")
            break
        if line.step > num_steps:
            problems.append(f"{label}:{line.lineno}: step {line.step} is past the run's {num_steps} steps")
            break
    for kind, seq in (("validation", text.val_lines), ("training", text.train_lines)):
        for prev, line in pairwise(seq):
            if line.step <= prev.step:
                problems.append(f"{label}:{line.lineno}: {kind} step {line.step} does not increase "
                                f"(line {prev.lineno} was step {prev.step})")
                break
    for prev, line in pairwise(text.val_lines):
        if line.train_time_ms <= prev.train_time_ms:
            problems.append(f"{label}:{line.lineno}: train_time {line.train_time_ms}ms does not increase "
                            f"(line {prev.lineno} said {prev.train_time_ms}ms)")
            break
    for prev, line in pairwise(lines):
        if line.train_time_ms < prev.train_time_ms:
            problems.append(f"{label}:{line.lineno}: train_time {line.train_time_ms}ms goes back "
                            f"(line {prev.lineno} said {prev.train_time_ms}ms)")
            break
    for line in lines:
        if line.step == 0 or math.isnan(line.step_avg_ms):
            bad_avg = line.step != 0 or not math.isnan(line.step_avg_ms)
        else:  # step_avg is the unrounded time / step, printed with 2 decimals; the time is rounded to 1 ms
            bad_avg = abs(line.step_avg_ms * line.step - line.train_time_ms) > 0.5 + 0.005 * line.step + 1e-6
        if bad_avg:
            problems.append(f"{label}:{line.lineno}: step_avg {line.step_avg_ms}ms is not train_time "
                            f"{line.train_time_ms}ms / step {line.step}")
            break
    if run.finished and (not text.val_lines or text.val_lines[-1].step != num_steps):
        last = f"the last one is at step {text.val_lines[-1].step}" if text.val_lines else "there is none"
        problems.append(f"{label}: missing final-step validation: status {run.status} needs a val_loss line at "
                        f"step {num_steps}/{num_steps}, {last}")
    for line in text.val_lines:
        if not math.isfinite(line.val_loss) and not (run.status == "diverged" and line is text.val_lines[-1]):
            problems.append(f"{label}:{line.lineno}: non-finite val_loss in a run that did not diverge")
    return problems


def check_agreement(run: Run) -> list[str]:
    """The JSON file says what the text log says."""
    text, facts, label, jlabel = run.text, run.facts, run.label, json_label(run)
    problems = []
    if text.run_id != run.run_id:
        problems.append(f"{label}:2: run_id {text.run_id!r} does not match the file name {run.run_id!r}")
    if facts["run_id"] != run.run_id:
        problems.append(f"{jlabel}: run_id {facts['run_id']!r} does not match the file name {run.run_id!r}")
    if not RUN_ID_PATTERN.match(run.run_id):
        problems.append(f"{label}: run id {run.run_id!r} is not a plain file name (letters, digits, . _ -)")
    problems += _section_agrees(run, "environment", text.env_text, text.env_start, facts["env"], "env")
    problems += _section_agrees(run, "config", text.config_text, text.config_start, facts["config"], "config")
    if text.summary_text is None and facts["status"] != "running":
        problems.append(f"{label}: no summary section, but the JSON says the run ended ({facts['status']})")
    if text.summary_text is not None and text.summary_text + "\n" != run.json_text:
        problems += _summary_agrees(run)
    curve = facts["val_curve"]
    expected = text.val_lines if facts["status"] != "running" else text.val_lines[:len(curve)]
    if len(curve) != len(expected):
        problems.append(f"{jlabel}: val_curve has {len(curve)} points, the text log {len(text.val_lines)} "
                        f"validation lines")
    for point, line in zip(curve, expected, strict=False):
        if not _same_val(point, line):
            problems.append(f"{jlabel}: val_curve point at step {point['step']} disagrees with {label} line "
                            f"{line.lineno} (step {line.step} val_loss {line.val_loss} train_time "
                            f"{line.train_time_ms}ms)")
            break
    config = facts["config"]
    for name, value, logged in (("preset", facts["preset"], config["preset"]),
                                ("seed", facts["seed"], config["train"]["seed"])):
        if value != logged:
            problems.append(f"{jlabel}: {name} {value!r} differs from the config's {logged!r}")
    if facts["track"] is not None and facts["track"] != config["track"]:
        problems.append(f"{jlabel}: track {facts['track']!r} differs from the config's {config['track']!r}")
    problems += _check_outcome(run)
    return problems


def _section_agrees(run: Run, name: str, section_text: str, first_lineno: int, value, field_name: str) -> list[str]:
    # Fast path: both files are written in one canonical JSON layout (sorted keys, indent 2), so the
    # section, indented one level, appears verbatim under its key in the JSON file when they agree.
    nested = f'\n  "{field_name}": ' + section_text.replace("\n", "\n  ")
    at = run.json_text.find(nested)
    if at >= 0 and run.json_text.startswith((",\n", "\n}"), at + len(nested)):
        return []
    try:
        parsed = parse_json_section(section_text, first_lineno, name)
    except LogFormatError as e:
        return [f"{run.label}:{e.lineno}: {e}"]
    if parsed != value:
        return [f"{json_label(run)}: {field_name} differs from the text log's {name} section (line {first_lineno})"]
    return []


def _summary_agrees(run: Run) -> list[str]:
    try:
        summary = nulls_at_divergence(parse_json_section(run.text.summary_text, run.text.summary_start, "summary"))
    except LogFormatError as e:
        return [f"{run.label}:{e.lineno}: {e}"]
    facts = run.facts
    differing = sorted(k for k in set(facts) | set(summary)
                       if canonical_json(facts.get(k)) != canonical_json(summary.get(k)))
    if differing:
        return [f"{json_label(run)}: differs from the text log's summary section in {', '.join(differing)}"]
    return []


def _same_val(point: dict, line: ValLine) -> bool:
    if point["step"] != line.step or abs(point["train_time_ms"] - line.train_time_ms) > 0.5 + 1e-6:
        return False
    if not math.isfinite(point["val_loss"]) or not math.isfinite(line.val_loss):
        return math.isnan(point["val_loss"]) == math.isnan(line.val_loss)
    return abs(point["val_loss"] - line.val_loss) <= 0.00005 + 1e-9


def _check_outcome(run: Run) -> list[str]:
    """Status, final loss, time and step count recomputed from the text log."""
    facts, text, jlabel = run.facts, run.text, json_label(run)
    problems = []
    status, num_steps = facts["status"], facts["config"]["train"]["num_steps"]
    validated_at_end = bool(text.val_lines) and text.val_lines[-1].step == num_steps
    unfinished = status in ("running", "aborted", "diverged", "failed")
    if unfinished and validated_at_end and math.isfinite(text.val_lines[-1].val_loss):
        # the trainer validates at the last step only when every step ran and no loss was NaN: a run that did
        # so was not aborted, diverged or failed (relabelling it would drop a slow run from the statistics)
        last = text.val_lines[-1]
        problems.append(f"{jlabel}: status {status}, but the text log validated at its last step "
                        f"{num_steps} (line {last.lineno}: val_loss {last.val_loss:.4f}): the run finished")
        return problems
    if not run.finished or not validated_at_end:
        if status == "diverged" and facts["diverged_at_step"] is None:
            problems.append(f"{jlabel}: status diverged without diverged_at_step")
        return problems
    last = text.val_lines[-1]
    final = facts["final_val_loss"]
    if final is None or abs(final - last.val_loss) > 0.00005 + 1e-9:
        problems.append(f"{jlabel}: final_val_loss {final} is not the text log's last-step val_loss "
                        f"{last.val_loss:.4f} (line {last.lineno})")
    elif facts["target_val_loss"] is None:
        problems.append(f"{jlabel}: status {status} without a target_val_loss")
    else:
        expected = "success" if final <= facts["target_val_loss"] else "not_converged"
        if status != expected:
            problems.append(f"{jlabel}: status {status}, but final_val_loss {final} against target "
                            f"{facts['target_val_loss']} means {expected}")
    time_ms = facts["train_time_ms"]
    if time_ms is None or abs(time_ms - last.train_time_ms) > 0.5 + 1e-6:
        problems.append(f"{jlabel}: train_time_ms {time_ms} is not the text log's last-step train_time "
                        f"{last.train_time_ms}ms (line {last.lineno})")
    if facts["steps_done"] != num_steps:
        problems.append(f"{jlabel}: steps_done {facts['steps_done']} but status {status} means all {num_steps}")
    tokens = facts["steps_done"] * facts["config"]["data"]["seq_len"] * facts["config"]["data"]["batch_slots"]
    if facts["tokens_seen"] != tokens:
        problems.append(f"{jlabel}: tokens_seen {facts['tokens_seen']} is not steps_done x seq_len x batch_slots "
                        f"= {tokens}")
    return problems


def check_run(run: Run) -> list[str]:
    """Every check of one run on its own; later checks run only when the JSON has the right shape."""
    problems = check_schema(run.facts, json_label(run))
    if problems:
        return problems
    problems += check_config(run)
    if problems:  # the checks below read the config's fields
        return problems
    problems += check_numbers(run.facts, json_label(run), run.json_text)
    problems += check_code(run)
    problems += check_steps(run)
    problems += check_agreement(run)
    return problems


# ---------------------------------------------------------------------------------------------
# Checking a run against a track
# ---------------------------------------------------------------------------------------------


def check_run_on_track(run: Run, track: Track) -> list[str]:
    """The run used the track's data, val token count, target and hardware class."""
    facts, env, label = run.facts, run.facts["env"], json_label(run)
    problems = []
    if facts["track"] != track.name:
        stamped = "no track (its data is not a track's data)" if facts["track"] is None else f"track {facts['track']!r}"
        problems.append(f"{label}: the run was stamped with {stamped}, the record is on {track.name!r}")
    val_tokens = facts["config"]["data"]["val_tokens"]
    if val_tokens != track.val_tokens:
        problems.append(f"{label}: validated on {val_tokens:,} tokens; track {track.name} needs {track.val_tokens:,}")
    data_kind = facts["data"]["kind"]
    if data_kind != TRACK_DATA_KIND[track.data]:
        problems.append(f"{label}: data kind {data_kind!r}; track {track.name} runs on {track.data} "
                        f"(kind {TRACK_DATA_KIND[track.data]!r})")
    problems += _check_target(facts, track, label)
    if track.gpu_count == 0:
        if env["device"] != "cpu" or env["gpu_count"] != 0:
            problems.append(f"{label}: ran on {env['device']} with {env['gpu_count']} GPU(s); track {track.name} "
                            f"is CPU only")
    else:
        if env["device"] != "cuda" or env["gpu_count"] != track.gpu_count or env["world_size"] != track.gpu_count:
            problems.append(f"{label}: ran on {env['gpu_count']} GPU(s) ({env['world_size']} processes on "
                            f"{env['device']}); track {track.name} needs {track.gpu_count}")
        if track.gpu_model and track.gpu_model not in (env["gpu_name"] or ""):
            problems.append(f"{label}: GPU {env['gpu_name']!r} is not a {track.gpu_model}, as track "
                            f"{track.name} needs")
    return problems


def _check_target(facts: dict, track: Track, label: str) -> list[str]:
    """The run's target and validation data are the track's own (track.py), whatever its log says."""
    problems = []
    expected = track.target()
    if facts["target_val_loss"] is None or abs(facts["target_val_loss"] - expected) > 1e-9:
        basis = (f" (its data floor {track.data_floor} + {track.target_margin_over_floor})"
                 if track.target_val_loss is None else "")
        problems.append(f"{label}: target_val_loss {facts['target_val_loss']} is not track {track.name}'s "
                        f"{expected}{basis}")
    sha = facts["data"]["val_shard_sha256"]
    if track.val_data_sha256 is not None and sha != track.val_data_sha256:
        problems.append(f"{label}: validated on val data with sha256 {str(sha)[:12]}…, not track {track.name}'s "
                        f"({track.val_data_sha256[:12]}…)")
    return problems
