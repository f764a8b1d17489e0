"""``compare A B``: two records or runs side by side (their curves plotted, times with Welch's t-test); also the
comparison in ``reproduce``'s report.

A side is a record folder, one of our run logs (``.txt`` or ``.json``) or a modded-nanogpt log (imported into
``records/upstream/`` or not). Every side is checked before it is compared:
numbers come from the logs, never from a file that only claims them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from speedrun.data.shards import atomic_write_text
from speedrun.errors import UserError
from speedrun.records.check import RECORDS_DIR, differences, find_record
from speedrun.records.page import comparison_svg
from speedrun.records.runlog import FIRST_LINE, Run, check_run, load_run
from speedrun.records.stats import ratio_ci95, welch_test
from speedrun.records.upstream import read_upstream_log

# Environment facts shown when two sides differ in them.
ENV_KEYS = ("gpu_name", "gpu_count", "device", "world_size", "torch", "triton", "cuda", "nccl", "python",
            "cpu_count", "platform", "triton_interpret")


def load_side(spec: str, records_dir: Path = RECORDS_DIR) -> tuple[str, list[Run]]:
    """(label, checked runs) of a side given as a path, or as a record path inside the records folder."""
    path = Path(spec)
    if not path.exists() and (records_dir / spec).exists():
        path = records_dir / spec
    if path.is_dir():
        record = find_record(str(path), records_dir)
        return record.label, record.runs
    if not path.is_file() or path.suffix not in (".txt", ".json"):
        raise UserError(f"{spec}: not a record folder, a run log (.txt/.json) or an upstream log")
    if path.suffix == ".txt" and _first_line(path) != FIRST_LINE:  # not ours: a modded-nanogpt log
        run, problem = read_upstream_log(path)
        problems = [problem] if problem else []
    else:
        txt = path.with_suffix(".txt")
        run, problems = load_run(txt, path.with_suffix(".json"), str(txt))
        problems = problems or check_run(run)
    if problems:
        raise UserError("\n".join(problems))
    return run.label, [run]


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline().rstrip("\n")


def describe(name: str, label: str, runs: list[Run]) -> str:
    finished = [r for r in runs if r.finished]
    if not finished:
        return f"{name}: {label}: no finished run ({len(runs)} run(s) listed)"
    times = np.asarray([r.train_time_ms for r in finished]) / 1000
    spread = f" ± {times.std(ddof=1):.2f}" if len(times) > 1 else ""
    return (f"{name}: {label}: {len(finished)} finished run(s) of {len(runs)}, time {times.mean():.2f}{spread} s, "
            f"mean final val loss {np.mean([r.final_val_loss for r in finished]):.4f}")


def comparison_lines(a: list[Run], b: list[Run]) -> list[str]:
    """Times (difference, Welch's test, ratio with its interval) and final losses of two sets of runs."""
    a, b = [r for r in a if r.finished], [r for r in b if r.finished]
    if not a or not b:
        return ["no comparison: a side has no finished run"]
    times_a, times_b = [r.train_time_ms for r in a], [r.train_time_ms for r in b]
    ratio, interval = ratio_ci95(times_a, times_b)
    lines = [f"time B - A: {(np.mean(times_b) - np.mean(times_a)) / 1000:+.2f} s; ratio B / A (geometric means) "
             f"{ratio:.3f}" + (f", 95% interval {interval[0]:.3f} – {interval[1]:.3f}" if interval else "")]
    test = welch_test(times_a, times_b)
    lines.append("Welch t-test: needs at least 2 finished runs on each side" if test is None else
                 f"Welch t-test on time (two-sided): p = {test.p_value:.3g}, 95% CI of B - A: "
                 f"[{test.ci95[0] / 1000:+.2f}, {test.ci95[1] / 1000:+.2f}] s")
    losses_a, losses_b = [r.final_val_loss for r in a], [r.final_val_loss for r in b]
    loss_test = welch_test(losses_a, losses_b)
    return lines + [f"final val loss B - A: {np.mean(losses_b) - np.mean(losses_a):+.4f}"
                    + (f", Welch p = {loss_test.p_value:.3g}" if loss_test else "")]


def compare(spec_a: str, spec_b: str, plot_path: Path, records_dir: Path = RECORDS_DIR) -> list[str]:
    """Check both sides, write the plot, return the report lines; raises UserError."""
    (label_a, a), (label_b, b) = load_side(spec_a, records_dir), load_side(spec_b, records_dir)
    atomic_write_text(plot_path, comparison_svg([("A", a), ("B", b)], f"A: {label_a}  vs  B: {label_b}"))
    env_a, env_b = a[0].facts["env"], b[0].facts["env"]
    diffs = differences(env_a, env_b, ENV_KEYS + ("git.commit",))
    return [describe("A", label_a, a), describe("B", label_b, b), *comparison_lines(a, b),
            *(["environment differences (A vs B):"] + [f"  {k}: {x!r} vs {y!r}" for k, x, y in diffs] if diffs
              else ["environment: same GPU, counts and versions"]), f"plot: {plot_path}"]

