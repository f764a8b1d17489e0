"""Writing run logs: ``logs/<run_id>.txt`` (for people, in the public speedrun's line format; the one truth) and
``logs/<run_id>.json`` (its facts for programs: once the run ends, a copy of the text log's summary section). They
are the only output of a run and the contract with everything downstream (leaderboard, reproduce, compare), so
their layout is versioned; its markers and line formats, and its one reading, are in speedrun/records/runlog.py.

The text log::

    speedrun run log
    run_id: <uuid>
    ====== code: speedrun/model.py sha256=<hex> lines=<n> eol=yes ======
    <the file's exact source: n lines>
    ... one section per source file the run imported ...
    ====== code_sha256: <hex> ======
    ====== environment ======
    <json>                  (versions, GPU, git commit, world size)
    ====== config ======
    <json>                  (the full resolved RunConfig)
    ====== log ======
    step:0/300 val_loss:7.6246 train_time:0ms step_avg:nanms
    step:1/300 train_time:512ms step_avg:512.00ms
    ...
    ====== summary ======
    <json>                  (the facts: the JSON file's contents, byte for byte)

The code hash is the sha256 of the lines "<path> <sha256 of file>\\n" over the sorted snapshot paths,
so it can be recomputed from the snapshot sections alone. Paths are relative to the repository.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from speedrun import REPO_ROOT
from speedrun.data.shards import atomic_write_text
from speedrun.records.runlog import FIRST_LINE, SCHEMA_VERSION, SECTION, canonical_json, code_hash, snapshot_section

# ---------------------------------------------------------------------------------------------
# What the run is made of
# ---------------------------------------------------------------------------------------------


def imported_source_files(root: Path = REPO_ROOT) -> list[Path]:
    """The project's source files this process has imported (the code a run actually ran)."""
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        path = Path(path).resolve()
        try:
            rel = path.relative_to(root)
        except ValueError:
            continue
        if rel.parts[0] in ("speedrun", "kernels") or rel.name == "leaderboard.py":
            files.add(rel)
    return sorted(files)


def code_snapshot(root: Path = REPO_ROOT) -> dict[str, str]:
    """{relative path: source text} of every imported project file."""
    return {rel.as_posix(): (root / rel).read_text() for rel in imported_source_files(root)}


def _run(cmd: list[str], cwd: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(root: Path = REPO_ROOT) -> dict:
    commit = _run(["git", "rev-parse", "HEAD"], root)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], root)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment(world_size: int, device_type: str) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "nccl": None,
        "device": device_type,
        "world_size": world_size,
        "gpu_name": None,
        "gpu_count": 0,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "nvidia_smi": None,
        "git": git_state(),
    }
    if device_type == "cuda" and torch.cuda.is_available():
        env["gpu_name"] = torch.cuda.get_device_name()
        env["gpu_count"] = world_size  # GPUs used by this run: one per process
        nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
        if shutil.which("nvidia-smi"):
            env["nvidia_smi"] = _run(["nvidia-smi"])
    return env


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


class RunLog:
    """Writes one run's text log line by line and its JSON atomically. Only rank 0 writes."""

    def __init__(self, log_dir, run_id: str, config: dict, env: dict, snapshot: dict[str, str],
                 target_val_loss: float | None, track: str | None, enabled: bool = True, echo: bool = True,
                 quiet: bool = False):
        self.run_id = run_id
        self.enabled = enabled
        self.echo = echo
        self.quiet = quiet
        log_dir = Path(log_dir)
        if not log_dir.is_absolute():
            log_dir = REPO_ROOT / log_dir
        self.txt_path = log_dir / f"{run_id}.txt"
        self.json_path = log_dir / f"{run_id}.json"
        file_hashes = {p: hashlib.sha256(src.encode()).hexdigest() for p, src in snapshot.items()}
        self.facts = {
            "schema_version": SCHEMA_VERSION,
            "run_id": run_id,
            "status": "running",
            "track": track,  # None when the run's data is not its preset's track data
            "preset": config["preset"],
            "target_val_loss": target_val_loss,
            "seed": config["train"]["seed"],
            "config": config,
            "code": {"files": file_hashes, "code_sha256": code_hash(file_hashes)},
            "env": env,
            "val_curve": [],
            "train_losses": [],
            "final_val_loss": None,
            "train_time_ms": None,
            "steps_done": 0,
            "tokens_seen": 0,
            "tokens_per_second": None,
            "mfu": None,
            "peak_memory_mib": None,
            "diverged_at_step": None,
            "message": None,
            "started_at": utc_now(),
            "finished_at": None,
        }
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        parts = [FIRST_LINE, f"run_id: {run_id}"]
        for path in sorted(snapshot):
            parts.append(snapshot_section(path, snapshot[path], file_hashes[path])[:-1])  # "\n".join adds it back
        parts.append(SECTION.format(f"code_sha256: {self.facts['code']['code_sha256']}"))
        parts.append(SECTION.format("environment"))
        parts.append(canonical_json(env))
        parts.append(SECTION.format("config"))
        parts.append(canonical_json(config))
        parts.append(SECTION.format("log"))
        atomic_write_text(self.txt_path, "\n".join(parts) + "\n")
        self._txt = open(self.txt_path, "a", encoding="utf-8")
        self.write_json()

    def line(self, text: str, important: bool = True) -> None:
        """Append a line to the text log (and print it unless quiet and unimportant)."""
        if not self.enabled:
            return
        self._txt.write(text + "\n")
        self._txt.flush()
        if self.echo and (important or not self.quiet):
            print(text, flush=True)

    def write_json(self) -> None:
        if self.enabled:
            atomic_write_text(self.json_path, facts_json(self.facts) + "\n")

    def finish(self, summary_lines: list[str]) -> None:
        """Write the summary section and the final JSON; the text log is closed."""
        if not self.enabled:
            return
        self.facts["finished_at"] = utc_now()
        for text in summary_lines:
            self.line(text)
        self._txt.write(SECTION.format("summary") + "\n")
        self._txt.write(facts_json(self.facts) + "\n")
        self._txt.flush()
        os.fsync(self._txt.fileno())
        self._txt.close()
        self.write_json()


def facts_json(facts: dict) -> str:
    """The facts as strict JSON: a non-finite number (a diverged run's loss) is written as null, which every
    JSON parser reads (the status says why it is missing)."""
    return canonical_json(_finite_or_null(facts))


def _finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def repo_or_absolute_path(path) -> str:
    """``path`` relative to the repository when inside it (logs and committed output must not reveal where
    the clone lives), else absolute (so that it still leads somewhere on this machine: e.g. the data folder
    of a run, which reproduce passes on)."""
    resolved = Path(path).resolve()
    return relative_to_repo(resolved) if resolved.is_relative_to(REPO_ROOT) else str(resolved)


def relative_to_repo(path) -> str:
    """A path as it may appear in a log: relative to the repository when inside it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.name
