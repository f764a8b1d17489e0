"""Records: the folders under ``records/``, their ``record.json``, their statistics, and ``check``.

Layout::

    records/<track>/<YYYY-MM-DD>_<slug>/record.json   title, authors, date, track, beats, kind, description
                                        README.md     the author's write-up
                                        runs/         <run_id>.txt + <run_id>.json of EVERY run launched
    records/upstream/                                  public modded-nanogpt logs imported for comparison

Nothing in ``record.json`` is a number about the runs: a record's time is the mean train time of its
finished runs and its loss the mean final validation loss, both recomputed from the text logs every
time. ``check_tree`` returns one line per problem; an empty list means the records are valid.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from speedrun import REPO_ROOT
from speedrun.records_runlog import (
    Run,
    check_fields,
    check_run,
    check_run_on_track,
    load_run,
)
from speedrun.tracks import TRACKS, Track

RECORDS_DIR = REPO_ROOT / "records"
RECORD_SCHEMA_VERSION = 1
RECORD_FIELDS = {"schema_version": (int,), "title": (str,), "authors": (list,), "date": (str,),
                 "track": (str,), "beats": (str, None), "kind": (str,), "description": (str,)}
KINDS = ("ml", "systems")
SIGNIFICANCE_LEVEL = 0.01  # an ml record's mean final loss must be below the target at p < this
MIN_ML_RUNS = 3
BEATS_SIGNIFICANCE_LEVEL = 0.05  # a record that beats another is faster at p < this (one-sided Welch t-test)
MIN_BEATS_RUNS = 3
RECORD_FOLDER_PATTERN = re.compile(r"^(\d{4}-\d{2}-\d{2})_([a-z0-9][a-z0-9-]{0,63})$")
SLUG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
UPSTREAM_DIR_NAME = "upstream"
# Files `build` writes into records/ (everything else at the top level must be a track folder).
GENERATED_FILES = ("README.md", "progression.png", "runs.csv", "index.html")
TEMP_PREFIX = "."  # submit builds a record in a hidden temp folder, then renames it into place


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def mean_and_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value); plain Python: records have few runs."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def loss_p_value(losses: list[float], target: float) -> float | None:
    """One-sided one-sample t-test that the mean loss is below ``target`` (see loss_p_values)."""
    return loss_p_values([losses], [target])[0]


def loss_p_values(samples: list[list[float]], targets: list[float]) -> list[float | None]:
    """For each sample, the p of scipy.stats.ttest_1samp(sample, target, alternative="less"): one call per
    sample size for all of them (scipy's per-call cost would dominate a build of thousands of records). A
    sample without spread gives 0 below the target, else 1 (the statistic is undefined); None below 2 values."""
    out: list[float | None] = [None] * len(samples)
    groups = defaultdict(list)
    for i, sample in enumerate(samples):
        if len(sample) >= 2 and len(set(sample)) == 1:
            out[i] = 0.0 if sample[0] < targets[i] else 1.0
        elif len(sample) >= 2:
            groups[len(sample)].append(i)
    for index in groups.values():
        result = stats.ttest_1samp(np.array([samples[i] for i in index]), np.array([[targets[i]] for i in index]),
                                   axis=1, alternative="less")
        for i, p in zip(index, result.pvalue, strict=True):
            out[i] = float(p)
    return out


def speedup_p_values(pairs: list[tuple[list[float], list[float]]]) -> list[float]:
    """For each (times, baseline times) with 2+ values each, the p of the one-sided Welch t-test that the times
    are smaller: scipy.stats.ttest_ind(times, baseline, equal_var=False, alternative="less"), one call per
    pair of sample sizes. Samples without spread: 0 if faster, else 1."""
    out = [1.0] * len(pairs)
    groups = defaultdict(list)
    for i, (times, baseline) in enumerate(pairs):
        if len(set(times)) == 1 and len(set(baseline)) == 1:
            out[i] = 0.0 if times[0] < baseline[0] else 1.0
        else:
            groups[(len(times), len(baseline))].append(i)
    for index in groups.values():
        result = stats.ttest_ind(np.array([pairs[i][0] for i in index]), np.array([pairs[i][1] for i in index]),
                                 axis=1, equal_var=False, alternative="less")
        for i, p in zip(index, result.pvalue, strict=True):
            out[i] = float(p)
    return out


def mean_ci95(values: list[float]) -> tuple[float, float] | None:
    """The two-sided 95% t-interval of the mean; None with fewer than 2 values."""
    if len(values) < 2:
        return None
    mean, sd = mean_and_sd(values)
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sd / math.sqrt(len(values))
    return mean - half, mean + half


@dataclass
class RecordStats:
    """What the leaderboard shows for a record, computed from its runs' text logs."""

    runs_total: int
    runs_finished: int
    times_ms: list[int]  # of finished runs, in run-id order
    losses: list[float]
    target: float | None
    mean_time_ms: float | None
    time_sd_ms: float | None
    time_ci95_ms: tuple[float, float] | None
    mean_loss: float | None
    p_value: float | None


def record_stats(runs: list[Run], p_value: bool = True) -> RecordStats:
    """A record's numbers from its runs; ``p_value=False`` leaves the loss test to the caller (check_tree
    runs it for every record at once: loss_p_values)."""
    finished = [r for r in runs if r.finished]
    times = [r.train_time_ms for r in finished]
    losses = [r.final_val_loss for r in finished]
    targets = {r.facts["target_val_loss"] for r in finished}
    target = targets.pop() if len(targets) == 1 else None
    mean_time, sd_time = mean_and_sd(times) if finished else (None, None)
    return RecordStats(
        runs_total=len(runs), runs_finished=len(finished), times_ms=times, losses=losses, target=target,
        mean_time_ms=mean_time, time_sd_ms=sd_time, time_ci95_ms=mean_ci95(times),
        mean_loss=mean_and_sd(losses)[0] if finished else None,
        p_value=loss_p_value(losses, target) if target is not None and p_value else None)


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass
class Record:
    path: str  # relative to the records folder, e.g. "tiny-cpu/2025-01-01_first"
    folder: Path  # where its files are (a temp folder while `submit` checks it)
    meta: dict | None  # record.json, None when unreadable
    runs: list[Run] = field(default_factory=list)  # checked runs (RunSummary objects in a CheckResult)
    problems: list[str] = field(default_factory=list)
    stats: RecordStats | None = None

    @property
    def label(self) -> str:
        return f"records/{self.path}"

    @property
    def track(self) -> Track | None:
        return TRACKS.get(self.path.split("/")[0])

    @property
    def date(self) -> str:
        return self.path.split("/")[1][:10]


def parse_date(text: str) -> datetime.date | None:
    try:
        return datetime.date.fromisoformat(text) if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text) else None
    except ValueError:
        return None


def today_utc() -> datetime.date:
    return datetime.datetime.now(datetime.timezone.utc).date()


def check_meta(meta: dict, record_path: str, today: datetime.date) -> list[str]:
    """record.json on its own, and against its folder's name."""
    where = f"records/{record_path}/record.json"
    if meta.get("schema_version") != RECORD_SCHEMA_VERSION:
        return [f"{where}: unknown schema_version {meta.get('schema_version')!r} (this leaderboard reads "
                f"version {RECORD_SCHEMA_VERSION})"]
    problems = check_fields(meta, RECORD_FIELDS, where)
    if problems:
        return problems
    track_name, folder = record_path.split("/")
    if meta["track"] != track_name:
        problems.append(f"{where}: track {meta['track']!r} but the record is in records/{track_name}/")
    date = parse_date(meta["date"])
    if date is None:
        problems.append(f"{where}: date {meta['date']!r} is not a YYYY-MM-DD date")
    else:
        if meta["date"] != folder[:10]:
            problems.append(f"{where}: date {meta['date']} differs from the folder's {folder[:10]}")
        if date > today:
            problems.append(f"{where}: date {meta['date']} is in the future (today is {today.isoformat()} UTC)")
    if meta["kind"] not in KINDS:
        problems.append(f"{where}: kind {meta['kind']!r} must be one of {', '.join(KINDS)}")
    for name in ("title", "description"):
        if bad := unprintable(meta[name], allow_newlines=name == "description"):
            problems.append(f"{where}: {name} holds {bad} (text from a record reaches terminals and web pages)")
    for author in meta["authors"]:
        if isinstance(author, str) and (bad := unprintable(author)):
            problems.append(f"{where}: author {author!r} holds {bad}")
    if not meta["title"].strip():
        problems.append(f"{where}: title is empty")
    if not meta["description"].strip():
        problems.append(f"{where}: description is empty")
    if not meta["authors"] or not all(isinstance(a, str) and a.strip() for a in meta["authors"]):
        problems.append(f"{where}: authors must be a non-empty list of names")
    if meta["beats"] is not None and not valid_record_path(meta["beats"]):
        problems.append(f"{where}: beats {meta['beats']!r} is not a record path like "
                        "'<track>/<YYYY-MM-DD>_<slug>' inside records/")
    return problems


# bidirectional overrides and isolates: they reorder what a terminal or a browser shows
BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


def unprintable(text: str, allow_newlines: bool = False) -> str | None:
    """A description of the first control character in ``text`` (escape sequences, CR, bidi overrides...),
    or None when it has none (a newline is allowed where ``allow_newlines``)."""
    for i, ch in enumerate(text):
        if ch == "\n" and allow_newlines:
            continue
        if unicodedata.category(ch) == "Cc" or ch in BIDI_CONTROLS:
            return f"the control character U+{ord(ch):04X} at position {i}"
    return None


def valid_record_path(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and parts[0] in TRACKS and RECORD_FOLDER_PATTERN.match(parts[1]) is not None


def list_entries(folder: Path) -> list[os.DirEntry]:
    """A folder's entries sorted by name (``os.scandir``: type checks without a stat per file)."""
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda e: e.name)


def _run_files(runs_dir: Path, label: str) -> tuple[list[str], list[str]]:
    """Run ids with both a .txt and a .json regular file in runs/ (nothing else is ever opened: a FIFO would
    block), and problems with its entries."""
    problems, regular, stems, present = [], set(), set(), set()
    for entry in list_entries(runs_dir):
        present.add(entry.name)
        where = f"{label}/runs/{entry.name}"
        stem, dot, suffix = entry.name.rpartition(".")
        if dot and suffix in ("txt", "json"):
            stems.add(stem)
        if entry.is_symlink():
            problems.append(f"{where}: is a symbolic link (a record holds plain files only)")
        elif not entry.is_file(follow_symlinks=False) or not dot or suffix not in ("txt", "json"):
            problems.append(f"{where}: unexpected entry (runs/ holds <run_id>.txt and <run_id>.json files only)")
        else:
            regular.add(entry.name)
    complete = []
    for stem in sorted(stems):
        pair = [f"{stem}.txt", f"{stem}.json"]
        if all(name in regular for name in pair):
            complete.append(stem)
        for name in pair:
            if name not in present:  # (one present but not regular is reported above)
                problems.append(f"{label}/runs/{name}: missing (every run needs its .txt and .json log)")
    return complete, problems


def load_record(folder: Path, record_path: str, today: datetime.date, outcome: bool = True) -> Record:
    """Read a record folder and run every check that needs only this record (``outcome=False``: all but the
    loss test, which check_tree runs for every record at once)."""
    record = Record(path=record_path, folder=folder, meta=None)
    label = record.label
    entries = {e.name: e for e in list_entries(folder)}
    for name, entry in entries.items():
        if entry.is_symlink():
            record.problems.append(f"{label}/{name}: is a symbolic link (a record holds plain files only)")
    meta_entry = entries.get("record.json")
    if meta_entry is None:
        record.problems.append(f"{label}/record.json: missing")
    elif not meta_entry.is_file(follow_symlinks=False):  # a folder, a FIFO (which would block a read), ...
        record.problems.append(f"{label}/record.json: not a regular file")
    else:
        try:
            meta = json.loads((folder / "record.json").read_text(encoding="utf-8"))
            if isinstance(meta, dict):
                record.meta = meta
                record.problems += check_meta(meta, record_path, today)
            else:
                record.problems.append(f"{label}/record.json: must hold a JSON object")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            record.problems.append(f"{label}/record.json: malformed JSON: {e}")
        except RecursionError:
            record.problems.append(f"{label}/record.json: malformed JSON: nested too deeply")
        except OSError as e:
            record.problems.append(f"{label}/record.json: cannot be read ({e.strerror or e})")
    if "README.md" not in entries or not entries["README.md"].is_file():
        record.problems.append(f"{label}/README.md: missing (the author's write-up)")
    if "runs" not in entries or entries["runs"].is_symlink() or not entries["runs"].is_dir():
        record.problems.append(f"{label}/runs: missing (the folder of every run's logs)")
        return record
    runs_dir = folder / "runs"
    run_ids, problems = _run_files(runs_dir, label)
    record.problems += problems
    for run_id in run_ids:
        run, problems = load_run(runs_dir / f"{run_id}.txt", runs_dir / f"{run_id}.json",
                                 label=f"{label}/runs/{run_id}.txt")
        record.problems += problems
        if run is None:
            continue
        run_problems = check_run(run)
        if not run_problems and record.track is not None:
            run_problems = check_run_on_track(run, record.track)
        record.problems += run_problems
        if not run_problems:
            record.runs.append(run)
    if not run_ids:
        record.problems.append(f"{label}/runs: no run logs")
    if len(record.runs) == len(run_ids) and record.runs:
        if len(record.runs) > 1:
            record.problems += check_runs_agree(record)
        record.stats = record_stats(record.runs, p_value=outcome)
        if outcome and record.meta is not None and not record.problems:
            record.problems += check_outcome(record)
    return record


# What must be the same in every run of one record: one recipe, one machine class, one data set.
AGREEMENT = (
    ("code hash", lambda run: run.facts["code"]["code_sha256"]),
    ("GPU model", lambda run: run.facts["env"]["gpu_name"]),
    ("GPU count", lambda run: run.facts["env"]["gpu_count"]),
    ("torch version", lambda run: run.facts["env"]["torch"]),
    ("config (apart from the seed)", lambda run: run.config_key),
    ("target", lambda run: run.facts["target_val_loss"]),
    ("validation data (val shard sha256)", lambda run: run.facts["data"]["val_shard_sha256"]),
)


def check_runs_agree(record: Record) -> list[str]:
    problems = []
    for what, get in AGREEMENT:
        groups = defaultdict(list)
        for run in record.runs:
            groups[json.dumps(get(run))].append(run.run_id)
        if len(groups) > 1:
            described = "; ".join(f"{_short(json.loads(value))} in {', '.join(ids)}"
                                  for value, ids in sorted(groups.items(), key=lambda kv: kv[1]))
            problems.append(f"{record.label}: its runs differ in {what}: {described}")
    return problems


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return text if len(text) <= 60 else f"config sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}…"


def check_outcome(record: Record) -> list[str]:
    """The record reached the target: the t-test for ml records, the mean for systems records."""
    stats, label = record.stats, record.label
    if stats.runs_finished == 0:
        return [f"{label}: no finished run (a run must validate at its last step to count)"]
    if stats.target is None:
        return [f"{label}: its runs have no single target loss"]
    if record.meta["kind"] == "systems":
        if stats.mean_loss > stats.target:
            return [f"{label}: mean final val loss {stats.mean_loss:.4f} over {stats.runs_finished} runs is above "
                    f"the target {stats.target}"]
        return []
    if stats.runs_finished < MIN_ML_RUNS:
        return [f"{label}: an ml record needs at least {MIN_ML_RUNS} finished runs for the loss test, it has "
                f"{stats.runs_finished}"]
    if not stats.p_value < SIGNIFICANCE_LEVEL:
        return [f"{label}: fails the significance test: mean final val loss {stats.mean_loss:.4f} over "
                f"{stats.runs_finished} runs is not below the target {stats.target} at p < {SIGNIFICANCE_LEVEL} "
                f"(one-sided t-test p = {stats.p_value:.4g})"]
    return []


# ---------------------------------------------------------------------------------------------
# The whole tree
# ---------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    records: list[Record]  # their runs are RunSummary objects
    problems: list[str]
    warnings: list[str]
    upstream: list[dict] = field(default_factory=list)  # imported modded-nanogpt runs (records/upstream)

    @property
    def valid_records(self) -> list[Record]:
        """Records without problems (all of them when the check passes)."""
        return [r for r in self.records if r.stats is not None and not r.problems]

    def by_track(self) -> dict[str, list[Record]]:
        """The valid records of each track, every track present (empty ones too)."""
        grouped = {name: [] for name in TRACKS}
        for record in self.valid_records:
            grouped[record.path.split("/")[0]].append(record)
        return grouped


def find_record_folders(root: Path) -> tuple[list[tuple[str, Path]], list[str], list[str]]:
    """(record path, folder) of every record under ``root``, problems with the layout, and warnings."""
    found, problems, warnings = [], [], []
    if not root.is_dir():
        return found, [f"{root}: no records folder"], warnings
    for track_dir in list_entries(root):
        name = track_dir.name
        if track_dir.is_symlink():
            problems.append(f"records/{name}: is a symbolic link (records/ holds plain files and folders only)")
        elif not track_dir.is_dir():
            if name not in GENERATED_FILES:
                problems.append(f"records/{name}: unexpected file (records/ holds one folder per track)")
        elif name == UPSTREAM_DIR_NAME or name.startswith(TEMP_PREFIX):
            continue
        elif name not in TRACKS:
            problems.append(f"records/{name}: unknown track {name!r} (known: {', '.join(TRACKS)})")
        else:
            for folder in list_entries(Path(track_dir.path)):
                where = f"records/{name}/{folder.name}"
                if folder.name.startswith(TEMP_PREFIX):
                    warnings.append(f"{where}: leftover temp folder of an interrupted submit; not a record, "
                                    "remove it")
                elif folder.is_symlink() or not folder.is_dir():
                    problems.append(f"{where}: unexpected entry (a track folder holds record folders only)")
                elif not RECORD_FOLDER_PATTERN.match(folder.name):
                    problems.append(f"{where}: a record folder is named <YYYY-MM-DD>_<slug> (slug: a-z 0-9 -)")
                else:
                    found.append((f"{name}/{folder.name}", Path(folder.path)))
    return found, problems, warnings


DUPLICATE_TIME_TOLERANCE = 0.005  # relative: two runs timed this close at every validation are one run


def cross_record_problems(records: list[Record]) -> list[str]:
    """Duplicate runs (by id, or by content) across records, and claims to beat another record."""
    problems = []
    seen_ids, by_losses = {}, defaultdict(list)
    for record in records:
        for run in record.runs:
            if run.run_id in seen_ids:
                problems.append(f"{run.label}: duplicate run id: also {seen_ids[run.run_id]}")
            else:
                seen_ids[run.run_id] = run.label
            # the same validation losses (as logged) at the same steps, and times that agree at every one
            key = tuple((step, loss) for step, loss, _ in run.val_points)
            for other in by_losses[key]:
                if same_times(run.val_points, other.val_points):
                    problems.append(f"{run.label}: duplicate run (the same validation losses and times within "
                                    f"{DUPLICATE_TIME_TOLERANCE:.1%} at every step): also {other.label}")
                    break
            by_losses[key].append(run)
    by_path = {r.path: r for r in records}
    tests = []
    for record in records:
        if record.meta is not None and record.stats is not None:
            problems += _check_beats(record, by_path, tests)
    return problems + _speedup_problems(tests)


def same_times(a: tuple, b: tuple) -> bool:
    return all(abs(ta - tb) <= DUPLICATE_TIME_TOLERANCE * max(ta, tb) + 2
               for (_, _, ta), (_, _, tb) in zip(a, b, strict=True))


def _check_beats(record: Record, by_path: dict[str, Record], tests: list) -> list[str]:
    """A record beats the one it names (same track, not later, faster), or, naming none, is its track's first."""
    beats, label = record.meta.get("beats"), record.label
    track = record.path.split("/")[0]
    if beats is None:
        earlier = [r.path for r in by_path.values() if r.path.split("/")[0] == track and r.date < record.date]
        if earlier:
            return [f"{label}/record.json: beats is null, but {track} has earlier records ({earlier[-1]}): name "
                    "the record this one beats"]
        return []
    if not valid_record_path(beats):
        return []  # reported by check_meta
    other = by_path.get(beats)
    if other is None:
        return [f"{label}/record.json: beats {beats!r}, which is not a record"]
    if beats == record.path:
        return [f"{label}/record.json: a record cannot beat itself"]
    if beats.split("/")[0] != track:
        return [f"{label}/record.json: beats {beats!r}, a record on another track"]
    if other.date > record.date:
        return [f"{label}/record.json: beats {beats!r}, which is dated later ({other.date})"]
    if other.stats is None or other.stats.mean_time_ms is None:
        return [f"{label}/record.json: beats {beats!r}, whose time cannot be computed (see its problems)"]
    mine, theirs = record.stats.times_ms, other.stats.times_ms
    if len(mine) < MIN_BEATS_RUNS or len(theirs) < MIN_BEATS_RUNS:
        return [f"{label}: claims to beat {beats}, but a speed-up is tested on at least {MIN_BEATS_RUNS} finished "
                f"runs of each record; they have {len(mine)} and {len(theirs)}"]
    tests.append((record, other))  # the speed-up test, for all records at once (cross_record_problems)
    return []


def _speedup_problems(tests: list[tuple[Record, Record]]) -> list[str]:
    p_values = speedup_p_values([(record.stats.times_ms, other.stats.times_ms) for record, other in tests])
    return [f"{record.label}: claims to beat {other.path} but its runs do not support it: mean train time "
            f"{_seconds(record.stats.mean_time_ms)} against {_seconds(other.stats.mean_time_ms)} is not faster at "
            f"p < {BEATS_SIGNIFICANCE_LEVEL} (one-sided Welch t-test p = {p:.3g})"
            for (record, other), p in zip(tests, p_values, strict=True) if not p < BEATS_SIGNIFICANCE_LEVEL]


def _seconds(ms: float | None) -> str:
    return "unknown" if ms is None else f"{ms / 1000:.3f} s"


def load_summarized_record(folder: Path, record_path: str, today: datetime.date, outcome: bool = True) -> Record:
    """load_record, keeping only each run's RunSummary (the leaderboard needs numbers, not code). A record
    whose files cannot be read is reported as a problem of its own; the other records are still checked."""
    try:
        record = load_record(folder, record_path, today, outcome)
    except (OSError, RecursionError, UnicodeError) as e:
        what = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        return Record(path=record_path, folder=folder, meta=None,
                      problems=[f"records/{record_path}: cannot be read ({what})"])
    record.runs = [run.summary() for run in record.runs]
    return record


def check_tree(root: Path = RECORDS_DIR, today: datetime.date | None = None,
               replace: tuple[str, Path] | None = None) -> CheckResult:
    """Load and check every record under ``root``.

    ``replace`` = (record path, folder) checks the record found in ``folder`` as if it were at
    ``record path`` (how ``submit`` checks a record in its temp folder before moving it into place).
    """
    today = today or today_utc()
    folders, problems, warnings = find_record_folders(root)
    if replace is not None:
        folders = [(p, f) for p, f in folders if p != replace[0]] + [replace]
        folders.sort()
    records = [load_summarized_record(folder, path, today, outcome=False) for path, folder in folders]
    tested = [r for r in records if r.stats is not None and r.stats.target is not None]
    for record, p in zip(tested, loss_p_values([r.stats.losses for r in tested], [r.stats.target for r in tested]),
                         strict=True):
        record.stats.p_value = p
    for record in records:  # the loss test, now that every record has its p-value
        if record.stats is not None and record.meta is not None and not record.problems:
            record.problems += check_outcome(record)
    for record in records:
        problems += record.problems
    problems += cross_record_problems(records)
    from speedrun.records_upstream import check_upstream_dir  # upstream logs live beside the tracks
    upstream_dir, upstream = root / UPSTREAM_DIR_NAME, []
    if upstream_dir.is_symlink():
        problems.append(f"records/{UPSTREAM_DIR_NAME}: is a symbolic link")
    elif upstream_dir.is_dir():
        upstream, upstream_problems = check_upstream_dir(upstream_dir)
        problems += upstream_problems
    return CheckResult(records=records, problems=problems, warnings=warnings, upstream=upstream)

