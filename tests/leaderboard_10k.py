"""Benchmark: `leaderboard.py build` on 10,000 synthetic records must take under 5 seconds.

    .venv/bin/python tests/leaderboard_10k.py [--records 10000] [--limit 5.0] [--keep DIR]

Generates the records in a temp folder (through the trainer's own log writer, see
tests/synthetic_records.py, whose validation data stands in for the tracks' here): both tracks, each
record beating the previous one (3 runs each, as a speed-up's test needs), one in four an ml record, the
others systems records. Generation is not timed (and skips fsync:
the folder is thrown away). Then it times `build` (which checks every record first, recomputing every
number from the logs) twice, checks that the second build changed no byte, and exits 1 if the first
build took longer than the limit.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataclasses  # noqa: E402

from synthetic_records import SYNTH_FLOOR, SYNTH_VAL_SHA256, write_synthetic_record  # noqa: E402

from speedrun.records.cli import main as leaderboard_main  # noqa: E402
from speedrun.tracks import TRACKS  # noqa: E402

# the synthetic logs' validation data in place of the CPU track's (as tests/conftest.py: synthetic_track_data)
TRACKS["tiny-cpu"] = dataclasses.replace(TRACKS["tiny-cpu"], data_floor=SYNTH_FLOOR, val_data_sha256=SYNTH_VAL_SHA256)

TRACK_TIMES_MS = {"tiny-cpu": 120_000.0, "8xH100-3.28": 180_000.0}
TRACK_LOSS = {"tiny-cpu": 5.10, "8xH100-3.28": 3.270}


def generate(records_dir: Path, count: int) -> int:
    """Write ``count`` records alternating between the tracks; returns the number of runs."""
    start = datetime.date(1990, 1, 1)
    previous = {name: None for name in TRACKS}
    runs_written = 0
    for index in range(count):
        track = list(TRACKS)[index % len(TRACKS)]
        serial = index // len(TRACKS)
        date = (start + datetime.timedelta(days=serial)).isoformat()
        kind = "ml" if serial % 4 == 0 else "systems"
        n_runs = 3
        time_ms = TRACK_TIMES_MS[track] * 0.9999 ** serial  # each record a little faster than the last (12+ ms)
        # every run's curve its own (records 300 apart share them, but their times differ by 3%: not copies)
        runs = [dict(run_id=f"{track}-{serial:05d}-{i}", seed=i,
                     final_val_loss=TRACK_LOSS[track] - 0.0001 * (3 * (serial % 300) + i),
                     train_time_ms=time_ms + 3 * i) for i in range(n_runs)]
        slug = f"record-{serial:05d}"
        write_synthetic_record(records_dir, track, date, slug, runs, kind=kind, beats=previous[track],
                               title=f"Synthetic record {serial}", authors=("Bench",))
        previous[track] = f"{track}/{date}_{slug}"
        runs_written += n_runs
    return runs_written


def timed_build(records_dir: Path, out_dir: Path) -> float:
    start = time.perf_counter()
    code = leaderboard_main(["build", "--records", str(records_dir), "--out", str(out_dir)])
    elapsed = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"build failed with exit code {code}")
    return elapsed


def outputs(records_dir: Path, out_dir: Path) -> list[bytes]:
    return [(out_dir / "LEADERBOARD.md").read_bytes()] + [p.read_bytes() for p in sorted(records_dir.iterdir())
                                                          if p.is_file()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--limit", type=float, default=5.0, help="seconds allowed for one build")
    parser.add_argument("--keep", type=Path, default=None, help="generate here and keep it (must not exist)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="leaderboard-bench-") as tmp:
        root = args.keep if args.keep is not None else Path(tmp)
        records_dir, out_dir = root / "records", root / "site"
        out_dir.mkdir(parents=True)
        fsync, os.fsync = os.fsync, lambda fd: None  # throwaway data: no need to wait for the disk
        start = time.perf_counter()
        try:
            n_runs = generate(records_dir, args.records)
        finally:
            os.fsync = fsync
        print(f"generated {args.records:,} records ({n_runs:,} runs) in {time.perf_counter() - start:.1f} s")
        first = timed_build(records_dir, out_dir)
        before = outputs(records_dir, out_dir)
        second = timed_build(records_dir, out_dir)
        same = outputs(records_dir, out_dir) == before
        print(f"build: {first:.2f} s, again: {second:.2f} s (limit {args.limit:.1f} s); second build "
              f"{'changed nothing' if same else 'CHANGED THE OUTPUT'}")
        ok = first < args.limit and same
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
