"""``submit``: make a record folder from run logs, check it, and move it into place only if it passes.

The record is assembled in a hidden temp folder beside its final place (same file system), checked together with
every other record as if it were already in place, and renamed into place in one step. A refusal or an
interruption (Ctrl-C included) removes the temp folder: either the whole record appears or nothing does.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from speedrun.data.shards import atomic_write_bytes, atomic_write_text
from speedrun.errors import UserError
from speedrun.records.check import (
    KINDS,
    RECORD_SCHEMA_VERSION,
    SLUG_PATTERN,
    TEMP_PREFIX,
    check_tree,
    parse_date,
    today_utc,
    valid_record_path,
)
from speedrun.records.runlog import read_text
from speedrun.tracks import TRACKS


@dataclass
class Submission:
    logs: list[Path]
    track: str
    title: str
    authors: list[str]
    kind: str = "ml"
    beats: str | None = None  # 'track/folder', 'records/track/folder' or a path ending in them
    date: str | None = None  # YYYY-MM-DD, default today (UTC)
    description: str = ""
    readme: Path | None = None  # the author's write-up; default: a page made from title and description
    slug: str | None = None  # default: made from the title

    @property
    def beats_path(self) -> str | None:
        parts = [p for p in Path(self.beats).as_posix().split("/") if p] if self.beats else []
        return "/".join(parts[-2:]) if len(parts) >= 2 else self.beats


def request_problems(sub: Submission, records_dir: Path, today: datetime.date) -> tuple[str, list[str]]:
    """The record's path ('track/date_slug') and every problem with the request itself."""
    problems = []
    if sub.track not in TRACKS:
        problems.append(f"--track {sub.track!r}: unknown track (known: {', '.join(TRACKS)})")
    if sub.kind not in KINDS:
        problems.append(f"--kind {sub.kind!r}: must be one of {', '.join(KINDS)}")
    date = parse_date(sub.date) if sub.date else today
    if date is None:
        problems.append(f"--date {sub.date!r}: not a YYYY-MM-DD date")
    elif date > today:
        problems.append(f"--date {sub.date}: in the future (today is {today.isoformat()} UTC)")
    if not sub.title.strip():
        problems.append("--title: empty")
    if not sub.authors or not all(a.strip() for a in sub.authors):
        problems.append("--author: give at least one non-empty name")
    if not sub.description.strip():
        problems.append("--description: empty (one or two sentences on what changed)")
    slug = sub.slug if sub.slug is not None else (
        re.sub(r"[^a-z0-9]+", "-", sub.title.lower()).strip("-")[:48].rstrip("-"))
    if not SLUG_PATTERN.match(slug):
        problems.append(f"slug {slug!r}: a record folder's slug is a-z, 0-9 and '-' (pass --slug)")
    if sub.beats is not None and not valid_record_path(sub.beats_path):
        problems.append(f"--beats {sub.beats!r}: not a record path like '<track>/<YYYY-MM-DD>_<slug>'")
    record_path = f"{sub.track}/{(date or today).isoformat()}_{slug}"
    if not problems and (records_dir / record_path).exists():
        problems.append(f"records/{record_path}: already exists (choose another --slug)")
    return record_path, problems


def run_log_pairs(logs: list[Path]) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """{run id: (.txt, .json)} from the given files (either file of a pair names the run)."""
    pairs, problems = {}, [] if logs else ["no run logs given"]
    for log in logs:
        txt, js = log.with_suffix(".txt"), log.with_suffix(".json")
        if log.suffix not in (".txt", ".json"):
            problems.append(f"{log}: a run log is <run_id>.txt or <run_id>.json")
        elif missing := [str(p) for p in (txt, js) if not p.is_file()]:
            problems.append(f"{log}: missing {' and '.join(missing)} (a run is its .txt and .json log)")
        elif log.stem in pairs and pairs[log.stem][0].resolve() != txt.resolve():
            problems.append(f"{log}: run id {log.stem} given twice ({pairs[log.stem][0]} and {txt})")
        else:
            pairs[log.stem] = (txt, js)
    return pairs, problems


def readme_text(sub: Submission, meta: dict) -> tuple[str | None, str | None]:
    """(README.md's text, None) or (None, the problem): the author's write-up, read once (what is checked is what
    is copied), or a page made from the request."""
    if sub.readme is not None:
        return read_text(sub.readme, f"--readme {sub.readme}")
    beats = f" · beats [{meta['beats']}](../../{meta['beats']})" if meta["beats"] else ""
    return (f"# {meta['title']}\n\n{', '.join(meta['authors'])} · {meta['date']} · track `{meta['track']}` · "
            f"{meta['kind']} change{beats}\n\n{meta['description'].strip()}\n\n"
            "Every run launched for this record is in [runs/](runs/), failed ones included. Its time, loss and "
            "significance are computed from those logs by `python leaderboard.py check` and `build` (see "
            "LEADERBOARD.md); no number is written here by hand.\n"), None


def submit(sub: Submission, records_dir: Path, today: datetime.date | None = None) -> Path:
    """Create the record; returns its folder. Raises UserError, one problem per line, leaving nothing behind."""
    today = today or today_utc()
    record_path, problems = request_problems(sub, records_dir, today)
    meta = {"schema_version": RECORD_SCHEMA_VERSION, "title": sub.title.strip(),
            "authors": [a.strip() for a in sub.authors], "date": record_path.split("/")[1][:10],
            "track": sub.track, "beats": sub.beats_path, "kind": sub.kind, "description": sub.description.strip()}
    readme, readme_problem = readme_text(sub, meta)
    pairs, log_problems = run_log_pairs(sub.logs)
    problems += [readme_problem] if readme_problem else []
    if problems + log_problems:
        raise UserError("\n".join(problems + log_problems))
    final = records_dir / record_path
    created = [d for d in (records_dir, final.parent) if not d.exists()]  # removed again on refusal
    temp = final.parent / f"{TEMP_PREFIX}submit-{final.name}-{secrets.token_hex(4)}"
    try:
        (temp / "runs").mkdir(parents=True)
        atomic_write_text(temp / "record.json", json.dumps(meta, indent=2) + "\n")
        atomic_write_text(temp / "README.md", readme)
        for run_id, (txt, js) in sorted(pairs.items()):
            atomic_write_bytes(temp / "runs" / f"{run_id}.txt", txt.read_bytes())
            atomic_write_bytes(temp / "runs" / f"{run_id}.json", js.read_bytes())
        result = check_tree(records_dir, today, replace=(record_path, temp))
        if result.problems:
            raise UserError("\n".join(result.problems))
        os.rename(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:  # not empty: someone else put something there meanwhile
                pass
        raise
    return final
