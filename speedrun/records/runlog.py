"""The run log format and its one reading: a run parsed once into ``Run``, then checked on its own.

The text log (``<run_id>.txt``, layout in speedrun/runlog.py, which writes it with the markers and line formats
defined here) is the one truth. Every number the leaderboard shows comes from its step lines: a run's final loss
is the ``val_loss`` of its last-step validation line, its time that line's ``train_time``. The JSON file beside
it is derived: an ended run's JSON is, byte for byte, the text log's summary section; a run that never ended
(killed) has no summary and its JSON (status ``running``) stands in for it. Those facts repeat what the text's
sections say (environment, config, code hashes, validation curve, final loss and time) and must say the same.

Problems are plain strings, one per problem, prefixed with the file (and line) they are about.
"""

from __future__ import annotations

import dataclasses
import datetime
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
from speedrun.tracks import Track

SCHEMA_VERSION = 1
# failed: an error ended the run (its message is in "message"); the log is complete all the same
STATUSES = ("running", "success", "not_converged", "completed", "aborted", "diverged", "failed")
FINISHED_STATUSES = ("success", "not_converged")  # ran every step and validated at the last one
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# The layout's fixed lines, and the two kinds of step lines (the loss with 4 decimals, whole milliseconds).
FIRST_LINE = "speedrun run log"
SECTION = "====== {} ======"
ENV_LINE, CONFIG_LINE, LOG_LINE, SUMMARY_LINE = (SECTION.format(s) for s in ("environment", "config", "log", "summary"))
CODE_HEADER = re.compile(r"^====== code: (\S+) sha256=([0-9a-f]{64}) lines=(\d+) eol=(yes|no) ======$")
CODE_HASH_LINE = re.compile(r"^====== code_sha256: ([0-9a-f]{64}) ======$")
# (at most 9 digits in a step, 15 in a loss or a time: 10^9 steps or 30,000 years are no run's, and longer numbers
# would overflow a float)
STEP_LINE = re.compile(r"^step:(\d{1,9})/(\d{1,9})(?: val_loss:(\d{1,15}\.\d{4}|nan|inf))? train_time:(\d{1,15})ms "
                       r"step_avg:(nan|\d{1,15}\.\d{2})ms$")
SEED_LINE = re.compile(r'\n    "seed": -?\d+,(?=\n)')  # in the config section's "train" object (not its last key)
STEP_LINES = re.compile(STEP_LINE.pattern, re.MULTILINE)  # every step line of a section, in one scan

# The JSON facts. A rule is a tuple of JSON types (None: null), a dict (an object with exactly those fields), or a
# one-item list (an array of such items).
NUM = (int, float)
FACTS = {
    "schema_version": (int,), "run_id": (str,), "status": (str,), "track": (str, None), "preset": (str,),
    "target_val_loss": (*NUM, None), "seed": (int,), "config": (dict,), "val_curve": [
        {"step": (int,), "val_loss": NUM, "train_time_ms": NUM}], "train_losses": [NUM],
    "code": {"files": (dict,), "code_sha256": (str,)},
    "env": {"python": (str,), "torch": (str,), "triton": (str, None), "cuda": (str, None), "nccl": (str, int, None),
            "device": (str,), "world_size": (int,), "gpu_name": (str, None), "gpu_count": (int,),
            "cpu_count": (int, None), "platform": (str,), "triton_interpret": (bool,), "nvidia_smi": (str, None),
            "git": {"commit": (str, None), "dirty": (bool, None)}},
    "data": {"dir": (str,), "val_shard": (str,), "kind": (str, None), "val_optimal_loss": (*NUM, None),
             "val_shard_sha256": (str, None)},
    "final_val_loss": (*NUM, None), "train_time_ms": (*NUM, None), "steps_done": (int,), "tokens_seen": (int,),
    "tokens_per_second": (*NUM, None), "mfu": (*NUM, None), "peak_memory_mib": (*NUM, None),
    "diverged_at_step": (int, None), "message": (str, None), "started_at": (str,), "finished_at": (str, None),
}
OPTIONAL_FACTS = {"checkpoint": (str, None), "schedule_changes": (list,)}
UTC_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00$")  # a run's start and end, as the writer stamps
# Unicode's control characters (category Cc: escape sequences, CR...), the bidirectional overrides and isolates,
# which reorder what a terminal or a browser shows, and lone surrogates (a JSON "\ud800", a file name's undecodable
# byte), which no UTF-8 output can hold
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c\ud800-\udfff]")
TRACK_DATA_KIND = {"synth": "synth", "fineweb10B": "download"}  # a track's data -> its runs' manifest kind


def code_hash(file_hashes: dict[str, str]) -> str:
    """The sha256 of "<path> <sha256 of file>\\n" over the sorted paths: recomputable from the snapshot alone."""
    return hashlib.sha256("".join(f"{p} {s}\n" for p, s in sorted(file_hashes.items())).encode()).hexdigest()


def snapshot_section(path: str, source: str, sha256: str) -> str:
    """One file of the code snapshot: its header (line count; ``eol=no``: the file lacks its last newline, which
    the log adds) and its exact text."""
    eol = source.endswith("\n") or source == ""
    body = source if eol else source + "\n"
    header = f"====== code: {path} sha256={sha256} lines={body.count(chr(10))} eol={'yes' if eol else 'no'} ======"
    return f"{header}\n{body}"


def val_line(step: int, num_steps: int, val_loss: float, train_time_s: float) -> str:
    avg = f"{1000 * train_time_s / step:.2f}" if step else "nan"
    return f"step:{step}/{num_steps} val_loss:{val_loss:.4f} train_time:{1000 * train_time_s:.0f}ms step_avg:{avg}ms"


def train_line(step: int, num_steps: int, train_time_s: float) -> str:
    return f"step:{step}/{num_steps} train_time:{1000 * train_time_s:.0f}ms step_avg:{1000 * train_time_s / step:.2f}ms"


def canonical_json(value) -> str:
    """How the writer lays out every JSON section and file (strict JSON: no NaN or infinity)."""
    return json.dumps(value, indent=2, sort_keys=True, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class LogFormatError(ValueError):
    def __init__(self, lineno: int, message: str):
        self.lineno = lineno
        super().__init__(message)


class StepLine(NamedTuple):
    lineno: int
    step: int
    total: int
    val_loss: float | None  # None on a training line
    train_time_ms: int
    step_avg_ms: float  # NaN at step 0


@dataclass
class TextLog:
    """What a text log holds, as written (code sources are kept only when asked for: reproduce)."""

    run_id: str
    code_files: dict[str, str]  # path -> sha256 from its section header
    code_lines: dict[str, int]  # path -> line number of that header
    code_mismatches: list[str]  # paths whose snapshot does not hash to its header's sha256
    code_sha256: str
    env_text: str
    env_start: int  # line number of the section's first line
    config_text: str
    config_start: int
    steps: list[StepLine]
    summary_text: str | None  # None: the run never ended (killed), so no summary was written
    summary_start: int
    sources: dict[str, str] | None = None


@dataclass
class Run:
    """One run: its facts (the summary, or the JSON of a run that never ended) and its validation lines. An
    imported upstream run (speedrun/records/upstream.py) is one too, without a ``text``."""

    run_id: str
    label: str  # how problems name it, e.g. records/tiny-cpu/2025-01-01_x/runs/<id>.txt
    facts: dict
    val_lines: list[StepLine]  # the validation curve (and what duplicates are judged by)
    text: TextLog | None = None
    facts_text: str = ""  # the facts as written (the summary section, else the JSON file)

    @property
    def status(self) -> str:
        return self.facts["status"]

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def final_val_loss(self) -> float | None:
        return self.val_lines[-1].val_loss if self.finished else None

    @property
    def train_time_ms(self) -> float | None:
        return self.val_lines[-1].train_time_ms if self.finished else None

    def in_writer_layout(self, key: str, section: str) -> bool:
        """The facts hold the text log's ``section`` verbatim (indented) as ``key``'s value, as the writer lays
        them out: then the two agree, found by a string search instead of parsing."""
        nested = f'\n  "{key}": ' + section.replace("\n", "\n  ")
        at = self.facts_text.find(nested)
        return at >= 0 and self.facts_text.startswith((",\n", "\n}"), at + len(nested))

    @functools.cached_property
    def config_in_writer_layout(self) -> bool:  # asked twice per run: by config_key and by check_derived
        return self.text is not None and self.in_writer_layout("config", self.text.config_text)

    @functools.cached_property
    def config_key(self) -> str:
        """The config without the seed, as JSON text: equal for every run of one recipe. When the text log's config
        section is the facts' config in the writer's layout, the seed line is cut from it (no JSON encoding)."""
        text = self.text.config_text if self.text else ""
        if self.config_in_writer_layout and len(cut := SEED_LINE.split(text)) == 2 and cut[0].count(
                '\n  "train": {') == 1:
            return "".join(cut)
        train = {k: v for k, v in self.facts["config"]["train"].items() if k != "seed"}
        return canonical_json({**self.facts["config"], "train": train})

    @property
    def json_label(self) -> str:
        return self.label[:-4] + ".json" if self.label.endswith(".txt") else self.label


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def _line_at(text: str, pos: int) -> tuple[str, int]:
    """The line starting at ``pos`` (without its newline) and where the next one starts."""
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    return text[pos:end], end + 1


def parse_text_log(text: str, keep_sources: bool = False) -> TextLog:
    """Parse a text log; raises LogFormatError (1-based line number) when it is malformed. Only "\n" ends a
    line (the writer counts nothing else); sections are cut from the text by position, not copied line by line."""
    if not text.startswith(FIRST_LINE + "\n"):
        raise LogFormatError(1, f"not a speedrun run log (the first line must be {FIRST_LINE!r})")
    line, pos = _line_at(text, len(FIRST_LINE) + 1)
    if not line.startswith("run_id: "):
        raise LogFormatError(2, "the second line must be 'run_id: <id>'")
    run_id, lineno, files, starts, mismatches, sources = line[len("run_id: "):], 3, {}, {}, [], {}
    while not (total := CODE_HASH_LINE.match(line := _line_at(text, pos)[0])):
        if pos >= len(text):
            raise LogFormatError(lineno - 1, "the log ends before its code_sha256 line")
        if not (header := CODE_HEADER.match(line)):
            raise LogFormatError(lineno, f"expected a code section header or the code_sha256 line, got {line[:80]!r}")
        path, sha, n, eol = header[1], header[2], int(header[3]), header[4]
        if bad := unprintable(path):  # a path is shown (problems, reproduce's report) and becomes a file name
            raise LogFormatError(lineno, f"the code path {path!r} holds {bad}")
        if path in files:
            raise LogFormatError(lineno, f"the code snapshot holds {path} twice")
        body = end = pos + len(line) + 1
        for _ in range(n):
            if (end := text.find("\n", end) + 1) == 0:
                raise LogFormatError(lineno, f"the code snapshot of {path} is cut short ({n} lines announced)")
        source = text[body:end - 1] if eol == "no" else text[body:end]
        if hashlib.sha256(source.encode()).hexdigest() != sha:
            mismatches.append(path)
        files[path], starts[path], pos, lineno = sha, lineno, end, lineno + 1 + n
        if keep_sources:
            sources[path] = source
    pos += len(line) + 1

    def section(pos: int, lineno: int, title: str, next_title: str) -> tuple[str, int, int]:
        """(the text after ``title``'s line, at ``pos``, up to ``next_title``'s line; where and at which line
        number that one starts)"""
        line, after = _line_at(text, pos)
        if line != title or pos >= len(text):
            found = repr(line[:80]) if pos < len(text) else "the end of the file"
            raise LogFormatError(lineno, f"expected {title!r}, got {found}")
        end = text.find(f"\n{next_title}\n", after - 1)
        if end < 0 and title != LOG_LINE:  # only the step section may run to the end (a killed run)
            raise LogFormatError(text.count("\n") + 1, f"the log ends before its {next_title!r} line")
        end = len(text) if end < 0 else end
        return text[after:end], end + 1, lineno + text.count("\n", pos, end + 1)

    env_text, pos, config_line = section(pos, lineno + 1, ENV_LINE, CONFIG_LINE)
    config_text, pos, log_line = section(pos, config_line, CONFIG_LINE, LOG_LINE)
    step_text, pos, summary_line = section(pos, log_line, LOG_LINE, SUMMARY_LINE)
    steps, number, at = [], log_line + 1, 0
    for m in STEP_LINES.finditer(step_text):  # the other lines ("final val_loss ...", "schedule at ...") are free
        number, at = number + step_text.count("\n", at, m.start()), m.start()
        if m[3] is None and m[5] == "nan":  # a training line's time per step is a number
            raise LogFormatError(number, f"malformed step line {m[0][:80]!r}")
        steps.append(StepLine(number, int(m[1]), int(m[2]), None if m[3] is None else float(m[3]), int(m[4]),
                              float(m[5])))
    if len(steps) != step_text.count("\nstep:") + step_text.startswith("step:"):  # a "step:" line that is not one
        number, line = next((n, line) for n, line in enumerate(step_text.split("\n"), start=log_line + 1)
                            if line.startswith("step:") and not STEP_LINE.match(line))
        raise LogFormatError(number, f"malformed step line {line[:80]!r}")
    summary = text[pos + len(SUMMARY_LINE) + 1:] if pos < len(text) else None
    return TextLog(run_id=run_id, code_files=files, code_lines=starts, code_mismatches=mismatches,
                   code_sha256=total[1], env_text=env_text, env_start=lineno + 2, config_text=config_text,
                   config_start=config_line + 1, steps=steps, summary_start=summary_line + 1,
                   summary_text=summary[:-1] if summary and summary.endswith("\n") else summary,
                   sources=sources if keep_sources else None)


def unprintable(text: str, allow_newlines: bool = False) -> str | None:
    """The first control character in ``text`` (escape sequences, CR, bidi overrides, lone surrogates...),
    described; or None."""
    for m in CONTROL_CHARACTERS.finditer(text):
        if not (m[0] == "\n" and allow_newlines):
            what = "lone surrogate" if "\ud800" <= m[0] <= "\udfff" else "control character"
            return f"the {what} U+{ord(m[0]):04X} at position {m.start()}"
    return None


def _not_json(name: str):
    raise ValueError(f"non-finite number {name} (strict JSON has none)")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:  # a seed (below 2**63) has 19 digits; a far longer one would overflow a float
        raise ValueError(f"integer {text[:12]}… has more than 19 digits")
    return int(text)


STRICT_JSON = json.JSONDecoder(parse_constant=_not_json, parse_int=_bounded_int)  # no NaN, Infinity or -Infinity


def parse_json_object(text: str, first_lineno: int = 1) -> dict:
    """A JSON object, strictly (no NaN or infinity: the writer writes none); raises LogFormatError (line 0 when no
    line can be named)."""
    try:
        value = STRICT_JSON.decode(text)
    except json.JSONDecodeError as e:
        raise LogFormatError(first_lineno + e.lineno - 1, e.msg) from None
    except (RecursionError, ValueError) as e:
        raise LogFormatError(0, "nested too deeply" if isinstance(e, RecursionError) else str(e)) from None
    if not isinstance(value, dict):
        raise LogFormatError(first_lineno, "must hold a JSON object")
    return nulls_at_divergence(value)


def at_line(where: str, error: LogFormatError) -> str:
    return f"{where}:{error.lineno}" if error.lineno else where


def nulls_at_divergence(facts: dict) -> dict:
    """A diverged run's facts hold null for the non-finite losses where it diverged (strict JSON): read as NaN."""
    if facts.get("status") == "diverged":
        for name, key in (("train_losses", None), ("val_curve", "val_loss")):
            values = facts.get(name)
            if isinstance(values, list) and values:
                if key is None and values[-1] is None:
                    values[-1] = math.nan
                elif key and isinstance(values[-1], dict) and key in values[-1] and values[-1][key] is None:
                    values[-1][key] = math.nan
    return facts


def read_text(path: Path, label: str, needed_as: str = "") -> tuple[str | None, str | None]:
    """(the file's text, None) or (None, the problem); ``needed_as`` says why a missing file is missed."""
    try:
        return path.read_text(encoding="utf-8"), None
    except FileNotFoundError:
        return None, f"{label}: missing" + (f" ({needed_as})" if needed_as else "")
    except UnicodeDecodeError as e:
        return None, f"{label}: not UTF-8 text ({e.reason} at byte {e.start})"
    except OSError as e:
        return None, f"{label}: cannot be read ({e.strerror or e})"


def read_json_object(path: Path, label: str) -> tuple[dict | None, str | None]:
    """(the JSON object in a file, None) or (None, the problem)."""
    text, problem = read_text(path, label)
    try:
        return (parse_json_object(text), None) if text is not None else (None, problem)
    except LogFormatError as e:
        return None, f"{at_line(label, e)}: malformed JSON: {e}"


def load_run(txt_path: Path, json_path: Path, label: str | None = None,
             keep_sources: bool = False) -> tuple[Run | None, list[str]]:
    """Read and parse a run's two files. Returns (run, problems); run is None when they cannot be read."""
    label = label or str(txt_path)
    json_label = label[:-4] + ".json" if label.endswith(".txt") else str(json_path)
    needed_as = "every run needs its .txt and .json log"
    (text, problem), (json_text, json_problem) = (read_text(txt_path, label, needed_as),
                                                  read_text(json_path, json_label, needed_as))
    problems = [p for p in (problem, json_problem) if p]
    log = None
    if text is not None:
        try:
            log = parse_text_log(text, keep_sources)
        except LogFormatError as e:
            problems.append(f"{label}:{e.lineno}: {e}")
    if problems:
        return None, problems
    summary = log.summary_text
    facts_text, at, start = (summary, label, log.summary_start) if summary is not None else (json_text, json_label, 1)
    try:
        facts = parse_json_object(facts_text, start)
        if summary is not None and json_text != summary + "\n":  # the JSON must be the summary: say how it is not
            at = json_label
            stored = parse_json_object(json_text)
            differing = sorted(k for k in set(stored) | set(facts) if json.dumps(stored.get(k), sort_keys=True) !=
                               json.dumps(facts.get(k), sort_keys=True)) or ["layout"]
            return None, [f"{json_label}: differs from the text log's summary section in {', '.join(differing)}"]
    except LogFormatError as e:
        return None, [f"{at_line(at, e)}: malformed JSON: {e}"]
    return Run(run_id=txt_path.stem, label=label, facts=facts, text=log, facts_text=facts_text,
               val_lines=[s for s in log.steps if s.val_loss is not None]), []


# ---------------------------------------------------------------------------------------------
# Checking a run on its own
# ---------------------------------------------------------------------------------------------


def check_fields(value, rule, label: str, path: str = "", optional: dict | None = None) -> list[str]:
    """Where ``value`` breaks ``rule`` (see FACTS; ``optional``: more fields an object may have). Exact JSON types:
    true is no integer."""
    if isinstance(rule, tuple) or type(value) is not (list if isinstance(rule, list) else dict):
        allowed = rule if isinstance(rule, tuple) else (type(rule),)
        if (None if value is None else type(value)) in allowed:
            return []
        names = " or ".join("null" if t is None else {dict: "object", list: "array", str: "string", int: "integer",
                                                       float: "number", bool: "boolean"}[t] for t in allowed)
        return [f"{label}: field {path!r} must be {names}, got {json.dumps(value)[:40]}"]
    if isinstance(rule, list):
        if isinstance(rule[0], tuple) and all(type(v) in rule[0] for v in value):
            return []  # the common case: a list of numbers
        return [p for i, item in enumerate(value) for p in check_fields(item, rule[0], label, f"{path}[{i}]")]
    optional, at = optional or {}, f"{path}." if path else ""
    problems = [f"{label}: missing field {at + name!r}" for name in rule if name not in value]
    problems += [f"{label}: unexpected field {at + name!r}" for name in value if name not in rule | optional]
    for name, item in value.items():
        item_rule = rule.get(name) or optional.get(name)
        if not isinstance(item_rule, tuple) or (None if item is None else type(item)) not in item_rule:
            problems += check_fields(item, item_rule, label, at + name) if item_rule else []
    return problems


def check_schema(facts: dict, label: str) -> list[str]:
    """The facts' fields and types; an unknown schema version stops the check."""
    if facts.get("schema_version") != SCHEMA_VERSION:
        return [f"{label}: unknown schema_version {facts.get('schema_version')!r} (this leaderboard reads version "
                f"{SCHEMA_VERSION})"]
    problems = check_fields(facts, FACTS, label, optional=OPTIONAL_FACTS)
    if not problems and facts["status"] not in STATUSES:
        problems.append(f"{label}: unknown status {facts['status']!r} (one of {', '.join(STATUSES)})")
    if not problems and (type(facts["config"].get("train")) is not dict
                         or type(facts["config"]["train"].get("seed")) is not int):
        problems.append(f"{label}: config.train.seed is missing or not an integer")
    return problems


def check_config(run: Run) -> list[str]:
    problem = _config_problem(run.config_key)
    return [f"{run.json_label}: {problem}"] if problem else []


CONFIG_SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "train": TrainConfig}
# Fields added to a section after runs were recorded: older configs may lack them (from_dict's defaults keep the
# older recipes' meaning; record #89's port, 2026-11-26).
FIELDS_ADDED_LATER = {
    "model": {"bigram_vocab_size", "bigram_dim"},
    "optim": {"muon_momentum_cooldown_steps", "normuon_lr", "normuon_weight_decay", "normuon_beta2",
              "polar_express_coeffs", "adam_lr", "adam_weight_decay"},
}


@functools.lru_cache(maxsize=4096)
def _config_problem(key: str) -> str | None:
    """Why a config (Run.config_key) is not a full resolved RunConfig, or None; cached: runs share configs."""
    config = json.loads(key)
    config["train"]["seed"] = 0
    try:
        RunConfig.from_dict(config)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"config is not a valid RunConfig: {e}"
    fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in CONFIG_SECTIONS.items()}
    complete = set(config) - {"schedule"} == {"preset", "track", *CONFIG_SECTIONS} and all(
        set(config[name]) <= names and names - set(config[name]) <= FIELDS_ADDED_LATER.get(name, set())
        for name, names in fields.items())
    if isinstance(config.get("schedule"), dict):
        complete = complete and set(config["schedule"]) == {f.name for f in dataclasses.fields(StagedSchedule)}
    return None if complete else "config is missing RunConfig fields (it must be the full resolved config)"


def check_numbers(run: Run) -> list[str]:
    """No negative measurement: a time, a loss or a count is never below 0; and none infinite (strict JSON has no
    Infinity, but a number too large for a double, such as 1e999, reads as one; the step lines' numbers are checked
    with them)."""
    facts, label = run.facts, run.json_label
    fields = [*facts.items(), *((f"{name}.{k}", v) for name in ("data", "env") for k, v in facts[name].items())]
    problems = [f"{label}: {'negative' if v < 0 else 'non-finite'} number {v} in {k}" for k, v in fields
                if type(v) in NUM and not 0 <= v < math.inf]
    losses = facts["train_losses"]  # (min and max pass over the NaN a diverged run ends with)
    if losses and not (min(losses) >= 0 and max(losses) < math.inf):
        problems += [f"{label}: {'negative' if v < 0 else 'non-finite'} number {v} in train_losses[{i}]"
                     for i, v in enumerate(losses) if v < 0 or v == math.inf]
    return problems


def check_clock(run: Run) -> list[str]:
    """When the run started and ended (which dates its record): UTC times as the writer stamps them, in order; no
    end for a killed run, one for every run that ended."""
    facts, label = run.facts, run.json_label
    problems = [f"{label}: {key} {facts[key]!r} is not a UTC time like 2025-01-01T12:00:00+00:00"
                for key in ("started_at", "finished_at") if facts[key] is not None and not _is_utc_time(facts[key])]
    if problems:
        return problems
    if (facts["finished_at"] is None) != (facts["status"] == "running"):
        return [f"{label}: status {facts['status']} with finished_at {facts['finished_at']} (the writer stamps the end "
                "of every run that ended, and of no other)"]
    end = facts["finished_at"]
    return [f"{label}: finished_at {end} is before started_at {facts['started_at']}"] if (
        end is not None and end < facts["started_at"]) else []


def _is_utc_time(text: str) -> bool:
    try:
        datetime.datetime.fromisoformat(text)  # (a real date and time of day)
    except ValueError:
        return False
    return UTC_TIME.match(text) is not None


def check_env_text(run: Run) -> list[str]:
    """The environment's texts (versions, GPU names, platform) are shown and go into runs.csv: no control characters
    in them (but the newlines of nvidia-smi's table), none that a spreadsheet reads as a formula."""
    problems = []
    for k, v in run.facts["env"].items():
        if type(v) is not str:
            continue
        if bad := unprintable(v, allow_newlines=k == "nvidia_smi"):
            problems.append(f"{run.json_label}: env.{k} holds {bad}")
        if v.startswith(("=", "+", "-", "@")) and k != "nvidia_smi":  # (its table starts "+---"; not in runs.csv)
            problems.append(f"{run.json_label}: env.{k} {v[:20]!r} starts with {v[0]!r} (a spreadsheet formula in "
                            "runs.csv)")
    return problems


def check_code(run: Run) -> list[str]:
    """Every snapshot file matches its hash, the code hash the files, the facts the snapshot."""
    text, label = run.text, run.label
    problems = [f"{label}:{text.code_lines[p]}: code path {p!r} escapes the repository" for p in text.code_files
                if p.startswith("/") or ".." in Path(p).parts or "\\" in p]
    problems += [f"{label}:{text.code_lines[p]}: the code snapshot of {p} does not match its sha256 "
                 f"{text.code_files[p][:12]}…" for p in text.code_mismatches]
    if (recomputed := code_hash(text.code_files)) != text.code_sha256:
        problems.append(f"{label}: code_sha256 {text.code_sha256[:12]}… does not match the snapshot's files "
                        f"(recomputed {recomputed[:12]}…)")
    if run.facts["code"] != {"files": text.code_files, "code_sha256": text.code_sha256}:
        problems.append(f"{run.json_label}: code hashes differ from the text log's snapshot")
    return problems


def check_steps(run: Run) -> list[str]:
    """One run length; steps and train times going forward; step_avg = time / step; a last-step validation."""
    label, steps, val = run.label, run.text.steps, run.val_lines
    num_steps = run.facts["config"]["train"]["num_steps"]
    problems = [f"{label}:{s.lineno}: step line says {s.total} steps, the config {num_steps}" if s.total != num_steps
                else f"{label}:{s.lineno}: step {s.step} is past the run's {num_steps} steps"
                for s in steps if s.total != num_steps or s.step > num_steps][:1]
    for kind, seq in (("validation", val), ("training", [s for s in steps if s.val_loss is None])):
        problems += [f"{label}:{b.lineno}: {kind} step {b.step} does not increase (line {a.lineno} was step {a.step})"
                     for a, b in pairwise(seq) if b.step <= a.step][:1]
    problems += [f"{label}:{b.lineno}: train_time {b.train_time_ms}ms does not increase (line {a.lineno} said "
                 f"{a.train_time_ms}ms)" for a, b in pairwise(val) if b.train_time_ms <= a.train_time_ms][:1]
    problems += [f"{label}:{b.lineno}: train_time {b.train_time_ms}ms goes back (line {a.lineno} said "
                 f"{a.train_time_ms}ms)" for a, b in pairwise(steps) if b.train_time_ms < a.train_time_ms][:1]
    # step_avg is the unrounded time / step with 2 decimals, the time rounded to 1 ms; NaN exactly at step 0
    problems += [f"{label}:{s.lineno}: step_avg {s.step_avg_ms}ms is not train_time {s.train_time_ms}ms / step {s.step}"
                 for s in steps if (s.step == 0) != math.isnan(s.step_avg_ms) or s.step and
                 abs(s.step_avg_ms * s.step - s.train_time_ms) > 0.5 + 0.005 * s.step + 1e-6][:1]
    if run.finished and (not val or val[-1].step != num_steps):
        last = f"the last one is at step {val[-1].step}" if val else "there is none"
        problems.append(f"{label}: missing final-step validation: status {run.status} needs a val_loss line at step "
                        f"{num_steps}/{num_steps}, {last}")
    problems += [f"{label}:{v.lineno}: non-finite val_loss in a run that did not diverge" for v in val
                 if not math.isfinite(v.val_loss) and not (run.status == "diverged" and v is val[-1])]
    return problems


def _section_in_facts(run: Run, name: str, text: str, start: int, key: str) -> list[str]:
    """The facts' ``key`` is the text log's section: verbatim in the writer's layout, else parsed to the same value."""
    if run.config_in_writer_layout if key == "config" else run.in_writer_layout(key, text):
        return []
    try:
        same = parse_json_object(text, start) == run.facts[key]
    except LogFormatError as e:
        return [f"{at_line(run.label, e)}: the {name} section is not valid JSON: {e}"]
    return [] if same else [f"{run.json_label}: {key} differs from the text log's {name} section (line {start})"]


def check_derived(run: Run) -> list[str]:
    """The facts say what the text log says: ids, sections, curve, and the outcome recomputed from the lines."""
    text, facts, label, jlabel = run.text, run.facts, run.label, run.json_label
    problems = [f"{where}: run_id {value!r} does not match the file name {run.run_id!r}"
                for where, value in ((f"{label}:2", text.run_id), (jlabel, facts["run_id"])) if value != run.run_id]
    if not RUN_ID_PATTERN.match(run.run_id):
        problems.append(f"{label}: run id {run.run_id!r} is not a plain file name (letters, digits, . _ -)")
    problems += _section_in_facts(run, "environment", text.env_text, text.env_start, "env")
    problems += _section_in_facts(run, "config", text.config_text, text.config_start, "config")
    if text.summary_text is None and facts["status"] != "running":
        problems.append(f"{label}: no summary section, but the JSON says the run ended ({facts['status']})")
    curve, lines = facts["val_curve"], run.val_lines
    if len(curve) != len(lines) and not (facts["status"] == "running" and len(curve) < len(lines)):
        problems.append(f"{jlabel}: val_curve has {len(curve)} points, the text log {len(lines)} validation lines")
    for point, line in zip(curve, lines, strict=False):
        if point["step"] != line.step or abs(point["train_time_ms"] - line.train_time_ms) > 0.5 + 1e-6 or not (
                abs(point["val_loss"] - line.val_loss) <= 0.00005 + 1e-9 or
                math.isnan(point["val_loss"]) and math.isnan(line.val_loss)):
            problems.append(f"{jlabel}: val_curve point at step {point['step']} disagrees with {label} line "
                            f"{line.lineno} (step {line.step} val_loss {line.val_loss} train_time "
                            f"{line.train_time_ms}ms)")
            break
    config = facts["config"]
    for name, value, logged in (("preset", facts["preset"], config["preset"]), ("seed", facts["seed"],
                                config["train"]["seed"]), ("track", facts["track"], config["track"])):
        if value != logged and not (name == "track" and value is None):
            problems.append(f"{jlabel}: {name} {value!r} differs from the config's {logged!r}")
    return problems + _check_outcome(run)


def _check_outcome(run: Run) -> list[str]:
    """Status, final loss, time and step count recomputed from the text log."""
    facts, jlabel, status = run.facts, run.json_label, run.facts["status"]
    num_steps = facts["config"]["train"]["num_steps"]
    last = run.val_lines[-1] if run.val_lines and run.val_lines[-1].step == num_steps else None
    if status in ("running", "aborted", "diverged", "failed") and last and math.isfinite(last.val_loss):
        # the trainer validates at the last step only when every step ran and no loss was NaN: such a run was not
        # aborted, diverged or failed (relabelling it would drop a slow run from the statistics)
        return [f"{jlabel}: status {status}, but the text log validated at its last step {num_steps} (line "
                f"{last.lineno}: val_loss {last.val_loss:.4f}): the run finished"]
    if not run.finished or last is None:
        return [f"{jlabel}: status diverged without diverged_at_step"] if (
            status == "diverged" and facts["diverged_at_step"] is None) else []
    problems, final, target = [], facts["final_val_loss"], facts["target_val_loss"]
    if last.train_time_ms <= 0:  # (a time is what the board ranks by, on a log scale)
        problems.append(f"{run.label}:{last.lineno}: the run finished at train_time 0ms: no run trains in no time")
    if final is None or abs(final - last.val_loss) > 0.00005 + 1e-9:
        problems.append(f"{jlabel}: final_val_loss {final} is not the text log's last-step val_loss "
                        f"{last.val_loss:.4f} (line {last.lineno})")
    elif target is None:
        problems.append(f"{jlabel}: status {status} without a target_val_loss")
    elif status != (expected := "success" if final <= target else "not_converged"):
        problems.append(f"{jlabel}: status {status}, but final_val_loss {final} against target {target} means "
                        f"{expected}")
    if facts["train_time_ms"] is None or abs(facts["train_time_ms"] - last.train_time_ms) > 0.5 + 1e-6:
        problems.append(f"{jlabel}: train_time_ms {facts['train_time_ms']} is not the text log's last-step "
                        f"train_time {last.train_time_ms}ms (line {last.lineno})")
    if facts["steps_done"] != num_steps:
        problems.append(f"{jlabel}: steps_done {facts['steps_done']} but status {status} means all {num_steps}")
    data = facts["config"]["data"]
    if facts["tokens_seen"] != (tokens := facts["steps_done"] * data["seq_len"] * data["batch_slots"]):
        problems.append(f"{jlabel}: tokens_seen {facts['tokens_seen']} is not steps_done x seq_len x batch_slots "
                        f"= {tokens}")
    return problems


def check_run(run: Run, track: Track | None = None) -> list[str]:
    """Every check of one run (and, given its track, against it); later checks need the facts' shape."""
    problems = check_schema(run.facts, run.json_label)
    problems = problems or check_config(run)
    if problems:
        return problems
    problems = (check_numbers(run) + check_clock(run) + check_env_text(run) + check_code(run) + check_steps(run)
                + check_derived(run))
    return problems or (check_run_on_track(run, track) if track is not None else [])


def check_run_on_track(run: Run, track: Track) -> list[str]:
    """The run used the track's data, val token count, target and hardware class (speedrun/tracks.py)."""
    facts, env, label = run.facts, run.facts["env"], run.json_label
    problems = []
    if facts["track"] != track.name:
        stamped = "no track (its data is not a track's data)" if facts["track"] is None else f"track {facts['track']!r}"
        problems.append(f"{label}: the run was stamped with {stamped}, the record is on {track.name!r}")
    if (val_tokens := facts["config"]["data"]["val_tokens"]) != track.val_tokens:
        problems.append(f"{label}: validated on {val_tokens:,} tokens; track {track.name} needs {track.val_tokens:,}")
    if (kind := facts["data"]["kind"]) != TRACK_DATA_KIND[track.data]:
        problems.append(f"{label}: data kind {kind!r}; track {track.name} runs on {track.data} "
                        f"(kind {TRACK_DATA_KIND[track.data]!r})")
    target = facts["target_val_loss"]
    if target is None or abs(target - track.target()) > 1e-9:
        basis = f" (its data floor {track.data_floor} + {track.target_margin_over_floor})" if (
            track.target_val_loss is None) else ""
        problems.append(f"{label}: target_val_loss {target} is not track {track.name}'s {track.target()}{basis}")
    sha = facts["data"]["val_shard_sha256"]
    if track.val_data_sha256 is not None and sha != track.val_data_sha256:
        problems.append(f"{label}: validated on val data with sha256 {str(sha)[:12]}…, not track {track.name}'s "
                        f"({track.val_data_sha256[:12]}…)")
    if track.gpu_count == 0 and (env["device"] != "cpu" or env["gpu_count"] != 0):
        problems.append(f"{label}: ran on {env['device']} with {env['gpu_count']} GPU(s); track {track.name} is "
                        "CPU only")
    elif track.gpu_count and (env["device"] != "cuda" or env["gpu_count"] != track.gpu_count
                              or env["world_size"] != track.gpu_count):
        problems.append(f"{label}: ran on {env['gpu_count']} GPU(s) ({env['world_size']} processes on "
                        f"{env['device']}); track {track.name} needs {track.gpu_count}")
    if track.gpu_model and track.gpu_model not in (env["gpu_name"] or ""):
        problems.append(f"{label}: GPU {env['gpu_name']!r} is not a {track.gpu_model}, as track {track.name} needs")
    return problems
