"""``check``: every record folder, its ``record.json`` and its runs, and the claims records make about each other.

Nothing in ``record.json`` is a number about the runs: a record's time is the mean train time of its finished runs
and its loss the mean final validation loss, both recomputed from the text logs every time. ``check_tree`` returns
one line per problem; an empty list means the records are valid. One bad entry never stops the others' checks.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from speedrun import REPO_ROOT
from speedrun.config import RunConfig
from speedrun.errors import UserError
from speedrun.records import stats
from speedrun.records.runlog import Run, check_fields, check_run, load_run, read_json_object, unprintable
from speedrun.records.upstream import check_upstream_dir
from speedrun.tracks import TRACKS, Track

RECORDS_DIR = REPO_ROOT / "records"
RECORD_SCHEMA_VERSION = 1
RECORD_FIELDS = {"schema_version": (int,), "title": (str,), "authors": [(str,)], "date": (str,),
                 "track": (str,), "beats": (str, None), "kind": (str,), "description": (str,)}
KINDS = ("ml", "systems")
# The config fields a systems record (the same math, faster) may change from the record it beats: how the work is
# run, checked and logged, never what is computed.
SYSTEMS_KNOBS = {"preset", "train.seed", "train.kernels", "train.compile", "train.warmup_steps", "train.val_every",
                 "train.log_every", "data.data_dir", "data.seqs_per_forward", "schedule.val_batch_tokens"}
RECORD_FOLDER_PATTERN = re.compile(r"^(\d{4}-\d{2}-\d{2})_([a-z0-9][a-z0-9-]{0,63})$")
SLUG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
RECORD_LABEL = re.compile(r"records/[^/:]+/[^/:]+")  # how a problem about a record begins: Record.label
UPSTREAM_DIR_NAME = "upstream"
GENERATED_FILES = ("README.md", "runs.csv", "index.html", *(f"progression-{t}.svg" for t in TRACKS))  # build's
TEMP_PREFIX = "."  # submit builds a record in a hidden temp folder, then renames it into place
DUPLICATE_TIME_TOLERANCE = 0.005  # relative: two runs timed this close at every validation are one run
# What every run of one record shares: one recipe, one machine class, one data set.
AGREEMENT = (
    ("code hash", lambda run: run.facts["code"]["code_sha256"]),
    ("GPU model", lambda run: run.facts["env"]["gpu_name"]),
    ("GPU count", lambda run: run.facts["env"]["gpu_count"]),
    ("torch version", lambda run: run.facts["env"]["torch"]),
    ("config (apart from the seed)", lambda run: run.config_key),
    ("target", lambda run: run.facts["target_val_loss"]),
    ("validation data (val shard sha256)", lambda run: run.facts["data"]["val_shard_sha256"]),
)


@dataclass
class RecordStats:
    """What the leaderboard shows for a record, from its runs' text logs."""

    runs_total: int
    times_ms: list[float]  # of finished runs, in run-id order
    losses: list[float]
    target: float | None
    p_value: float | None = None  # the loss test (check_tree runs it for every record at once)

    def __post_init__(self):
        self.runs_finished = len(self.times_ms)
        self.mean_time_ms = statistics.fmean(self.times_ms) if self.times_ms else None
        self.time_sd_ms = stats.sd(self.times_ms) if len(self.times_ms) > 1 else None
        self.time_ci95_ms = stats.mean_ci95(self.times_ms)
        self.mean_loss = statistics.fmean(self.losses) if self.losses else None


@dataclass
class Record:
    path: str  # relative to the records folder, e.g. "tiny-cpu/2025-01-01_first"
    folder: Path  # where its files are (a temp folder while `submit` checks it)
    meta: dict | None = None  # record.json, None when unreadable
    runs: list[Run] = field(default_factory=list)  # its checked runs
    problems: list[str] = field(default_factory=list)
    stats: RecordStats | None = None  # None unless every run checked

    @property
    def label(self) -> str:
        return f"records/{self.path}"

    @property
    def track(self) -> Track | None:
        return TRACKS.get(self.path.split("/")[0])

    @property
    def date(self) -> str:
        return self.path.split("/")[1][:10]


@dataclass
class CheckResult:
    records: list[Record]
    problems: list[str]
    warnings: list[str]
    upstream: list[Run] = field(default_factory=list)  # imported modded-nanogpt runs (records/upstream)
    history: list[dict] = field(default_factory=list)  # the public record history (records/upstream/history.csv)

    @property
    def valid_records(self) -> list[Record]:
        return [r for r in self.records if r.stats is not None and not r.problems]

    def by_track(self) -> dict[str, list[Record]]:
        """The valid records of each track, every track present."""
        grouped = {name: [] for name in TRACKS}
        for record in self.valid_records:
            grouped[record.path.split("/")[0]].append(record)
        return grouped


def progression_name(track: str) -> str:
    return f"progression-{track}.svg"


def parse_date(text: str) -> datetime.date | None:
    try:
        return datetime.date.fromisoformat(text) if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text) else None
    except ValueError:
        return None


def today_utc() -> datetime.date:
    return datetime.datetime.now(datetime.timezone.utc).date()


def valid_record_path(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and parts[0] in TRACKS and RECORD_FOLDER_PATTERN.match(parts[1]) is not None


def check_meta(meta: dict, record_path: str, today: datetime.date) -> list[str]:
    """record.json on its own, and against its folder's name."""
    where = f"records/{record_path}/record.json"
    if meta.get("schema_version") != RECORD_SCHEMA_VERSION:
        return [f"{where}: unknown schema_version {meta.get('schema_version')!r} (this leaderboard reads version "
                f"{RECORD_SCHEMA_VERSION})"]
    if problems := check_fields(meta, RECORD_FIELDS, where):
        return problems
    track_name, folder = record_path.split("/")
    if meta["track"] != track_name:
        problems.append(f"{where}: track {meta['track']!r} but the record is in records/{track_name}/")
    if (date := parse_date(meta["date"])) is None:
        problems.append(f"{where}: date {meta['date']!r} is not a YYYY-MM-DD date")
    elif meta["date"] != folder[:10]:
        problems.append(f"{where}: date {meta['date']} differs from the folder's {folder[:10]}")
    elif date > today:
        problems.append(f"{where}: date {meta['date']} is in the future (today is {today.isoformat()} UTC)")
    if meta["kind"] not in KINDS:
        problems.append(f"{where}: kind {meta['kind']!r} must be one of {', '.join(KINDS)}")
    for name in ("title", "description"):
        if bad := unprintable(meta[name], allow_newlines=name == "description"):
            problems.append(f"{where}: {name} holds {bad} (text from a record reaches terminals and web pages)")
        if not meta[name].strip():
            problems.append(f"{where}: {name} is empty")
    problems += [f"{where}: author {a!r} holds {bad}" for a in meta["authors"] if (bad := unprintable(a))]
    if not meta["authors"] or not all(a.strip() for a in meta["authors"]):
        problems.append(f"{where}: authors must be a non-empty list of names")
    if meta["beats"] is not None and not valid_record_path(meta["beats"]):
        problems.append(f"{where}: beats {meta['beats']!r} is not a record path like '<track>/<YYYY-MM-DD>_<slug>' "
                        "inside records/")
    return problems


def scan(folder: Path, label: str) -> tuple[dict[str, os.DirEntry], list[str]]:
    """A folder's entries by name (``os.scandir``: types without a stat per file) but its symbolic links and names
    that cannot be shown, which are problems: everything under records/ is a plain file or folder, named in text."""
    with os.scandir(folder) as entries:
        entries = sorted(entries, key=lambda e: e.name)
    unshown = {e.name: bad for e in entries if (bad := unprintable(e.name))}
    problems = [f"{label}/{name!r}: the name holds {bad}" for name, bad in unshown.items()]
    entries = [e for e in entries if e.name not in unshown]
    return ({e.name: e for e in entries if not e.is_symlink()},
            problems + [f"{label}/{e.name}: is a symbolic link (records/ holds plain files and folders only)"
                        for e in entries if e.is_symlink()])


def _run_ids(runs_dir: Path, label: str) -> tuple[list[str], list[str]]:
    """Run ids with a regular .txt and .json file in runs/ (nothing else is opened: a FIFO would block), and
    problems with the entries."""
    entries, problems = scan(runs_dir, label)
    logs = {n for n, e in entries.items() if n.endswith((".txt", ".json")) and e.is_file(follow_symlinks=False)}
    problems += [f"{label}/{n}: unexpected entry (runs/ holds <run_id>.txt and <run_id>.json files only)"
                 for n in entries if n not in logs]
    stems = sorted({n.rpartition(".")[0] for n in entries if n.endswith((".txt", ".json"))})
    problems += [f"{label}/{n}: missing (every run needs its .txt and .json log)" for stem in stems
                 for n in (f"{stem}.txt", f"{stem}.json") if n not in entries and not (runs_dir / n).is_symlink()]
    return [s for s in stems if f"{s}.txt" in logs and f"{s}.json" in logs], problems


def load_record(folder: Path, record_path: str, today: datetime.date | None = None, keep_sources: bool = False
                ) -> Record:
    """Read a record folder and run every check that needs only this record but the loss test (check_outcomes runs
    it for many records at once). Unreadable files are problems, not crashes."""
    record = Record(path=record_path, folder=folder)
    try:
        _load_record(record, today or today_utc(), keep_sources)
    except (OSError, RecursionError, UnicodeError) as e:
        what = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        return Record(path=record_path, folder=folder, problems=[f"{record.label}: cannot be read ({what})"])
    return record


def _load_record(record: Record, today: datetime.date, keep_sources: bool) -> None:
    label = record.label
    entries, record.problems = scan(record.folder, label)
    where = f"{label}/record.json"
    if "record.json" not in entries or not entries["record.json"].is_file(follow_symlinks=False):
        # a folder or a FIFO (a read would block) is not opened
        record.problems.append(f"{where}: " + ("not a regular file" if "record.json" in entries else "missing"))
    elif (meta := read_json_object(record.folder / "record.json", where))[1]:
        record.problems.append(meta[1])
    else:
        problems = check_meta(meta[0], record.path, today)
        record.meta = None if problems else meta[0]  # (the claims of a record.json with problems are not judged)
        record.problems += problems
    if "README.md" not in entries or not entries["README.md"].is_file():
        record.problems.append(f"{label}/README.md: missing (the author's write-up)")
    if "runs" not in entries or not entries["runs"].is_dir():
        return record.problems.append(f"{label}/runs: missing (the folder of every run's logs)")
    runs_dir = record.folder / "runs"
    run_ids, problems = _run_ids(runs_dir, f"{label}/runs")
    record.problems += problems or ([] if run_ids else [f"{label}/runs: no run logs"])
    for run_id in run_ids:
        run, problems = load_run(runs_dir / f"{run_id}.txt", runs_dir / f"{run_id}.json",
                                 f"{label}/runs/{run_id}.txt", keep_sources)
        problems = problems or check_run(run, record.track)
        record.problems += problems
        if not problems:
            record.runs.append(run)
    if record.runs and len(record.runs) == len(run_ids):
        record.problems += check_runs_agree(record) + _dated_before_runs(record)
        finished = [r for r in record.runs if r.finished]
        targets = {r.facts["target_val_loss"] for r in finished}
        record.stats = RecordStats(len(record.runs), [r.train_time_ms for r in finished],
                                   [r.final_val_loss for r in finished], targets.pop() if len(targets) == 1 else None)


def check_runs_agree(record: Record) -> list[str]:
    problems = []
    for what, get in AGREEMENT:
        groups = defaultdict(list)
        for run in record.runs:
            groups[get(run)].append(run.run_id)
        if len(groups) > 1:
            described = "; ".join(f"{_short(v)} in {', '.join(ids)}"
                                  for v, ids in sorted(groups.items(), key=lambda kv: kv[1]))
            problems.append(f"{record.label}: its runs differ in {what}: {described}")
    return problems


def _dated_before_runs(record: Record) -> list[str]:
    """A record is dated on or after the (UTC) day its runs ended: backdated, it would win ties in rank and move up
    its track's progression. (A killed run has no end: its start stands in.)"""
    run = max(record.runs, key=lambda r: (r.facts["finished_at"] or r.facts["started_at"], r.run_id))
    what, when = ("ended", run.facts["finished_at"]) if run.facts["finished_at"] else (
        "started (killed)", run.facts["started_at"])
    return [f"{record.label}: dated {record.date}, but its run {run.run_id} {what} {when} (a record is dated on or "
            "after the day its runs ended)"] if when[:10] > record.date else []


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12] + "…"
    return text if len(text) <= 60 else f"config sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}…"


def check_outcomes(records: list[Record]) -> None:
    """Every record reached the target: the loss test for ml records (one batched call), the mean for systems."""
    tested = [r for r in records if r.stats is not None and r.stats.target is not None]
    p_values = stats.loss_p_values([r.stats.losses for r in tested], [r.stats.target for r in tested])
    for record, p in zip(tested, p_values, strict=True):
        record.stats.p_value = p
    for record in records:
        if record.stats is not None and record.meta is not None and not record.problems:
            record.problems += filter(None, [_outcome_problem(record)])


def _outcome_problem(record: Record) -> str | None:
    s, label = record.stats, record.label
    if s.runs_finished == 0:
        return f"{label}: no finished run (a run must validate at its last step to count)"
    if s.target is None:
        return f"{label}: its runs have no single target loss"
    if record.meta["kind"] == "systems":
        return (f"{label}: mean final val loss {s.mean_loss:.4f} over {s.runs_finished} runs is above the target "
                f"{s.target}") if s.mean_loss > s.target else None
    if s.runs_finished < stats.MIN_ML_RUNS:
        return (f"{label}: an ml record needs at least {stats.MIN_ML_RUNS} finished runs for the loss test, it "
                f"has {s.runs_finished}")
    by_seed, by_losses = defaultdict(list), defaultdict(list)
    for run in sorted((r for r in record.runs if r.finished), key=lambda r: r.run_id):
        by_seed[run.facts["seed"]].append(run.run_id)
        by_losses[tuple(run.facts["train_losses"])].append(run.run_id)
    if shared := {seed: ids for seed, ids in by_seed.items() if len(ids) > 1}:
        # runs of one seed repeat one sample (bit for bit where training is deterministic): the test would count
        # the same luck several times
        return (f"{label}: the loss test needs independent runs, but finished runs share a seed ("
                + "; ".join(f"seed {seed}: {', '.join(ids)}" for seed, ids in sorted(shared.items()))
                + "): give each run its own --seed")
    if same := [ids for losses, ids in by_losses.items() if len(ids) > 1 and len(losses) > 1]:
        # one sample too, whatever the seeds say: runs of their own seeds never agree at every step to the last bit
        return (f"{label}: the loss test needs independent runs, but finished runs logged the same training loss "
                f"at every step ({'; '.join(', '.join(ids) for ids in same)}): their seeds made no difference")
    return None if s.p_value < stats.SIGNIFICANCE_LEVEL else (
        f"{label}: fails the significance test: mean final val loss {s.mean_loss:.4f} over {s.runs_finished} runs "
        f"is not below the target {s.target} at p < {stats.SIGNIFICANCE_LEVEL} (one-sided t-test p = "
        f"{s.p_value:.4g})")


# ---------------------------------------------------------------------------------------------
# The whole tree
# ---------------------------------------------------------------------------------------------


def find_record_folders(root: Path) -> tuple[list[tuple[str, Path]], list[str], list[str]]:
    """(record path, folder) of every record under ``root``, problems with the layout, and warnings."""
    if not root.is_dir():
        return [], [f"{root}: no records folder"], []
    found, warnings = [], []
    tracks, problems = scan(root, "records")
    for name, entry in tracks.items():
        if not entry.is_dir():
            problems += [] if name in GENERATED_FILES else [
                f"records/{name}: unexpected file (records/ holds one folder per track)"]
        elif name not in TRACKS and name != UPSTREAM_DIR_NAME and not name.startswith(TEMP_PREFIX):
            problems.append(f"records/{name}: unknown track {name!r} (known: {', '.join(TRACKS)})")
        elif name in TRACKS:
            folders, links = scan(Path(entry.path), f"records/{name}")
            problems += links
            for folder_name, folder in folders.items():
                where = f"records/{name}/{folder_name}"
                if folder_name.startswith(TEMP_PREFIX):
                    warnings.append(f"{where}: leftover temp folder of an interrupted submit; not a record, remove it")
                elif not folder.is_dir():
                    problems.append(f"{where}: unexpected entry (a track folder holds record folders only)")
                elif not RECORD_FOLDER_PATTERN.match(folder_name):
                    problems.append(f"{where}: a record folder is named <YYYY-MM-DD>_<slug> (slug: a-z 0-9 -)")
                else:
                    found.append((f"{name}/{folder_name}", Path(folder.path)))
    return found, problems, warnings


def duplicate_problems(records: list[Record]) -> list[str]:
    """Runs that are one run: the same id, or the same logged losses with times within the tolerance everywhere."""
    problems, seen_ids, by_losses = [], {}, defaultdict(list)
    for run in (run for record in records for run in record.runs):
        if run.run_id in seen_ids:
            problems.append(f"{run.label}: duplicate run id: also {seen_ids[run.run_id]}")
        seen_ids.setdefault(run.run_id, run.label)
        key = tuple((v.step, v.val_loss) for v in run.val_lines)
        for other in by_losses[key]:
            if all(abs(a.train_time_ms - b.train_time_ms) <= DUPLICATE_TIME_TOLERANCE * max(a.train_time_ms,
                   b.train_time_ms) + 2 for a, b in zip(run.val_lines, other.val_lines, strict=True)):
                problems.append(f"{run.label}: duplicate run (the same validation losses and times within "
                                f"{DUPLICATE_TIME_TOLERANCE:.1%} at every step): also {other.label}")
                break
        by_losses[key].append(run)
    return problems


def beats_problems(records: list[Record]) -> list[str]:
    """A record beats the one it names (same track, not later, faster by the speed-up test), or, naming none, is
    its track's first."""
    by_path, problems, tests = {r.path: r for r in records}, [], []
    for record in (r for r in records if r.meta is not None and r.stats is not None):
        beats, where, track = record.meta.get("beats"), f"{record.label}/record.json", record.path.split("/")[0]
        other = by_path.get(beats)
        if beats is None:
            earlier = [r.path for r in records if r.path.startswith(track + "/") and r.date < record.date]
            problems += [f"{where}: beats is null, but {track} has earlier records ({earlier[-1]}): name the record "
                         "this one beats"] if earlier else []
        elif not valid_record_path(beats):
            pass  # reported by check_meta
        elif other is None:
            problems.append(f"{where}: beats {beats!r}, which is not a record")
        elif other is record:
            problems.append(f"{where}: a record cannot beat itself")
        elif not beats.startswith(track + "/"):
            problems.append(f"{where}: beats {beats!r}, a record on another track")
        elif other.date > record.date:
            problems.append(f"{where}: beats {beats!r}, which is dated later ({other.date})")
        elif other.stats is None or not other.stats.times_ms:
            problems.append(f"{where}: beats {beats!r}, whose time cannot be computed (see its problems)")
        elif record.meta["kind"] == "systems" and (changed := math_changes(record, other)):
            problems.append(f"{where}: a systems record keeps the math of the record it beats, but its config "
                            f"differs from {beats}'s in {', '.join(changed)} (submit it as an ml record: the loss "
                            "test applies)")
        elif min(record.stats.runs_finished, other.stats.runs_finished) < stats.MIN_BEATS_RUNS:
            problems.append(f"{record.label}: claims to beat {beats}, but a speed-up is tested on at least "
                            f"{stats.MIN_BEATS_RUNS} finished runs of each record; they have "
                            f"{record.stats.runs_finished} and {other.stats.runs_finished}")
        else:
            tests.append((record, other))
    p_values = stats.speedup_p_values([(r.stats.times_ms, o.stats.times_ms) for r, o in tests])
    return problems + [
        f"{r.label}: claims to beat {o.path} but its runs do not support it: mean train time "
        f"{r.stats.mean_time_ms / 1000:.3f} s against {o.stats.mean_time_ms / 1000:.3f} s is not faster at "
        f"p < {stats.BEATS_SIGNIFICANCE_LEVEL} (one-sided Welch t-test p = {p:.3g})"
        for (r, o), p in zip(tests, p_values, strict=True) if not p < stats.BEATS_SIGNIFICANCE_LEVEL]


def ungrounded_systems_problems(records: list[Record]) -> list[str]:
    """A systems record is exempt from the loss test because its math passed it: a valid ml record of its track has
    its config but the systems knobs. (Else a track's first record, and every systems record after it, would have
    no loss test behind them: one lucky run below the target would do.)"""
    judged = [r for r in records if r.meta is not None and r.stats is not None and not r.problems]
    tested = {(r.path.split("/")[0], _math_key(r.runs[0].config_key)) for r in judged if r.meta["kind"] == "ml"}
    return [f"{r.label}: a systems record is exempt from the loss test only where its math passed it, but no valid ml "
            f"record of {track} has its config (apart from the systems knobs): submit it as an ml record"
            for r in judged if r.meta["kind"] == "systems" and (
                track := r.path.split("/")[0], _math_key(r.runs[0].config_key)) not in tested]


@functools.lru_cache(maxsize=4096)
def _math_key(config_key: str) -> str:
    """A config's math (the fields but the systems knobs) as one comparable text."""
    fields = _config_fields(config_key)
    return json.dumps({k: v for k, v in fields.items() if k not in SYSTEMS_KNOBS}, sort_keys=True)


def math_changes(record: Record, other: Record) -> list[str]:
    """The config fields but the systems knobs in which two records' runs differ (the runs of one record agree)."""
    a, b = (_config_fields(r.runs[0].config_key) for r in (record, other))
    return sorted(k for k in a.keys() | b.keys() if k not in SYSTEMS_KNOBS and a.get(k) != b.get(k))


@functools.lru_cache(maxsize=4096)
def _config_fields(config_key: str) -> dict[str, object]:
    """A config (Run.config_key: checked, without the seed) flattened, with every field: one added to the config
    after the run was logged has its default, which keeps older recipes' meaning."""
    return flatten(RunConfig.from_dict(json.loads(config_key)).to_dict())


def flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def differences(a: dict, b: dict, keys=None) -> list[tuple[str, object, object]]:
    """(key, a's value, b's value) for every flattened key (of ``keys``, when given) that differs."""
    a, b = flatten(a), flatten(b)
    keys = sorted(set(a) | set(b)) if keys is None else keys
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def check_tree(root: Path = RECORDS_DIR, today: datetime.date | None = None,
               replace: tuple[str, Path] | None = None) -> CheckResult:
    """Load and check every record under ``root`` (and the imported upstream runs beside them).

    ``replace`` = (record path, folder) checks the record in ``folder`` as if it were at ``record path`` (how
    ``submit`` checks a record in its temp folder before moving it into place).
    """
    today = today or today_utc()
    folders, problems, warnings = find_record_folders(root)
    if replace is not None:
        folders = sorted([(p, f) for p, f in folders if p != replace[0]] + [replace])
    records = [load_record(folder, path, today) for path, folder in folders]
    check_outcomes(records)
    for record in records:
        problems += record.problems
    across = duplicate_problems(records) + beats_problems(records) + ungrounded_systems_problems(records)
    by_label = {r.label: r for r in records}
    for problem in across:  # each names its record first: it leaves the record out of show's table, as its own do
        by_label[RECORD_LABEL.match(problem)[0]].problems.append(problem)
    problems += across
    upstream_dir, upstream, history = root / UPSTREAM_DIR_NAME, [], []
    if upstream_dir.is_dir() and not upstream_dir.is_symlink():  # (find_record_folders reports a link)
        entries, scan_problems = scan(upstream_dir, f"records/{UPSTREAM_DIR_NAME}")
        upstream, history, upstream_problems = check_upstream_dir(upstream_dir, entries)
        problems += scan_problems + upstream_problems
    return CheckResult(records, problems, warnings, upstream, history)


def find_record(spec: str, records_dir: Path = RECORDS_DIR, keep_sources: bool = False) -> Record:
    """Load and check a record given as a folder or as '<track>/<folder>' inside ``records_dir``; raises
    UserError naming its problems."""
    path = Path(spec)
    if not path.is_dir() and (records_dir / spec).is_dir():
        path = records_dir / spec
    if not (path / "record.json").is_file():
        raise UserError(f"{spec}: not a record folder (no record.json)")
    path = path.resolve()
    try:
        record_path = path.relative_to(records_dir.resolve()).as_posix()
    except ValueError:
        record_path = f"{path.parent.name}/{path.name}"
    record = load_record(path, record_path, keep_sources=keep_sources)
    check_outcomes([record])
    if record.problems:
        raise UserError("\n".join(record.problems))
    return record
