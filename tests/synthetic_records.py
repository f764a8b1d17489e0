"""Synthetic run logs and records, for the leaderboard's tests.

The logs are written by the trainer's own writer (``speedrun.runlog.RunLog``) with the trainer's line
formats, so a change to the log format shows up here as failing tests, not as a silent mismatch.
Nothing here is ever used to make a real record: those come from ``speedrun train``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from pathlib import Path
from unittest import mock

from speedrun.config import get_preset
from speedrun.data.shards import atomic_write_text
from speedrun.records.check import RECORD_SCHEMA_VERSION
from speedrun.runlog import RunLog
from speedrun.tracks import get_track

# The validation data synthetic tiny-cpu runs claim: its floor (target = floor + the track's margin) and val
# shard hash. Not the real track's (speedrun/tracks.py): tests that check these runs on the track put them in
# place of the real ones (tests/conftest.py: synthetic_track_data).
SYNTH_FLOOR = 5.0619
SYNTH_VAL_SHA256 = "5" * 64
DEFAULT_CODE = {
    "speedrun/model.py": "class GPT:\n    n_layer = 4\n",
    "speedrun/__init__.py": "",
}
H100_NAME = "NVIDIA H100 80GB HBM3"


def synthetic_env(track: str, torch_version: str = "2.13.0", gpu_name: str | None = None,
                  gpu_count: int | None = None) -> dict:
    """An environment section with every field the trainer writes."""
    gpu = get_track(track).gpu_count > 0
    return {
        "python": "3.12.3", "torch": torch_version, "triton": "3.5.0", "cuda": "12.8" if gpu else None,
        "nccl": "2.27.3" if gpu else None, "device": "cuda" if gpu else "cpu",
        "world_size": (gpu_count if gpu_count is not None else get_track(track).gpu_count) if gpu else 1,
        "gpu_name": gpu_name if gpu_name is not None else (H100_NAME if gpu else None),
        "gpu_count": gpu_count if gpu_count is not None else get_track(track).gpu_count,
        "cpu_count": 2, "platform": "Linux-6.8.0-x86_64-with-glibc2.39", "triton_interpret": not gpu,
        "nvidia_smi": None, "git": {"commit": "0" * 40, "dirty": False},
    }


def synthetic_config(track: str, num_steps: int, val_every: int, seed: int, val_tokens: int | None = None) -> dict:
    cfg = get_preset("sub3min-tiny" if track == "tiny-cpu" else "sub3min")
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, num_steps=num_steps, val_every=val_every, seed=seed),
        data=dataclasses.replace(cfg.data, val_tokens=val_tokens if val_tokens is not None else cfg.data.val_tokens))
    return cfg.to_dict()


def write_synthetic_run(log_dir: Path, run_id: str, track: str = "tiny-cpu", seed: int = 0,
                        final_val_loss: float = 5.10, train_time_ms: float = 60_000.0, num_steps: int = 20,
                        val_every: int = 5, code: dict[str, str] | None = None, env: dict | None = None,
                        outcome: str = "finished", stop_step: int | None = None, data_floor: float = SYNTH_FLOOR,
                        val_sha256: str = SYNTH_VAL_SHA256, val_tokens: int | None = None,
                        ended_at: str = "1990-01-01T12:00:00+00:00") -> tuple[Path, Path]:
    """Write ``<run_id>.txt`` and ``.json`` of a run that ends as ``outcome`` at the UTC time ``ended_at`` (it
    started a minute before its train time; a killed run's log says only when it started).

    outcome: "finished" (every step, status from the loss), "aborted" or "diverged" after ``stop_step``
    steps, or "running" (killed: no summary, status still running).
    """
    config = synthetic_config(track, num_steps, val_every, seed, val_tokens)
    the_track = get_track(track)
    floor = data_floor if the_track.target_val_loss is None else None
    target = the_track.target(floor)
    log = RunLog(log_dir, run_id, config, env or synthetic_env(track), code or DEFAULT_CODE, target, track=track,
                 echo=False)
    started = datetime.datetime.fromisoformat(ended_at) - datetime.timedelta(milliseconds=train_time_ms, minutes=1)
    log.facts["started_at"] = started.isoformat(timespec="seconds")
    log.facts["data"] = {"dir": "data/synth" if floor is not None else "data/fineweb10B",
                         "val_shard": "synth_val_000000.bin" if floor is not None else "fineweb_val_000000.bin",
                         "kind": "synth" if floor is not None else "download", "val_optimal_loss": floor,
                         "val_shard_sha256": val_sha256}
    last_step = num_steps if outcome == "finished" else (stop_step if stop_step is not None else num_steps // 2)
    val_steps = [s for s in range(1, num_steps + 1) if s == num_steps or s % val_every == 0]
    val_pause_ms = 0.25  # the device sync around a validation; the clock is stopped during the pass itself
    # Slightly uneven steps (seeded), scaled so that the run's train time is exactly train_time_ms.
    raw = [1.0 + 0.01 * math.sin(seed + step) for step in range(1, num_steps + 1)]
    scale = (train_time_ms - val_pause_ms * len(val_steps)) / sum(raw)
    start_loss = final_val_loss + 2.5
    elapsed = 0.0
    for step in range(last_step + 1):
        if step > 0:
            elapsed += raw[step - 1] * scale
            log.facts["train_losses"].append(start_loss - 2.4 * step / num_steps)
            log.line(f"step:{step}/{num_steps} train_time:{elapsed:.0f}ms step_avg:{elapsed / step:.2f}ms")
        if step == num_steps or step % val_every == 0:
            diverging = outcome == "diverged" and step == last_step
            loss = float("nan") if diverging else (
                final_val_loss if step == num_steps else start_loss - (start_loss - final_val_loss) * step / num_steps)
            val_ms = elapsed + val_pause_ms if step else 0.0
            avg = f"{val_ms / step:.2f}" if step else "nan"
            log.line(f"step:{step}/{num_steps} val_loss:{loss:.4f} train_time:{val_ms:.0f}ms step_avg:{avg}ms")
            log.facts["val_curve"].append({"step": step, "val_loss": loss, "train_time_ms": round(val_ms, 3)})
            elapsed = val_ms
    if outcome == "diverged":
        log.facts["train_losses"][-1] = float("nan")
    if outcome == "running":
        log._txt.close()
        log.write_json()
        return log.txt_path, log.json_path
    status = {"finished": "success" if final_val_loss <= target else "not_converged",
              "aborted": "aborted", "diverged": "diverged"}[outcome]
    tokens = last_step * config["data"]["seq_len"] * config["data"]["batch_slots"]
    log.facts.update(status=status, final_val_loss=None if outcome == "diverged" else (
        final_val_loss if outcome == "finished" else log.facts["val_curve"][-1]["val_loss"]),
        train_time_ms=round(elapsed, 3), steps_done=last_step, tokens_seen=tokens,
        tokens_per_second=tokens / (elapsed / 1000) if elapsed else None, peak_memory_mib=512.0,
        diverged_at_step=last_step if outcome == "diverged" else None)
    with mock.patch("speedrun.runlog.utc_now", return_value=ended_at):  # the writer stamps the end
        log.finish([f"final val_loss {final_val_loss:.4f} at step {last_step} (target {target:.4f}): {status}"])
    return log.txt_path, log.json_path


def write_record_files(folder: Path, track: str, date: str, title: str = "A synthetic record",
                       authors: tuple[str, ...] = ("Test Author",), beats: str | None = None, kind: str = "ml",
                       description: str = "Synthetic record for tests.") -> None:
    """record.json and README.md of a record folder (its runs go into ``folder/runs``)."""
    meta = {"schema_version": RECORD_SCHEMA_VERSION, "title": title, "authors": list(authors), "date": date,
            "track": track, "beats": beats, "kind": kind, "description": description}
    atomic_write_text(folder / "record.json", json.dumps(meta, indent=2) + "\n")
    atomic_write_text(folder / "README.md", f"# {title}\n\n{description}\n")


def write_synthetic_record(records_dir: Path, track: str, date: str, slug: str, runs: list[dict],
                           **meta) -> Path:
    """A complete record folder: ``runs`` are keyword arguments for ``write_synthetic_run`` (by default each run
    ended at noon (UTC) on the record's date)."""
    folder = records_dir / track / f"{date}_{slug}"
    (folder / "runs").mkdir(parents=True)
    write_record_files(folder, track, date, **meta)
    for spec in runs:
        write_synthetic_run(folder / "runs", track=track, **{"ended_at": f"{date}T12:00:00+00:00", **spec})
    return folder
