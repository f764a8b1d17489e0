"""``compare A B``: two records or runs side by side (curves on one plot, times with Welch's t-test).

A side is a record folder, one of our run logs (``.txt`` or ``.json``), an imported upstream run
(``records/upstream/<name>.json``) or a raw modded-nanogpt log. Every side is checked before it is
compared: numbers come from the logs, never from a file that only claims them.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from speedrun.records import RECORDS_DIR, load_record, today_utc
from speedrun.records_runlog import FIRST_LINE, Run, check_run, load_run
from speedrun.records_upstream import load_upstream_json, read_upstream_log

# Environment facts shown when two sides differ in them.
ENV_KEYS = ("gpu_name", "gpu_count", "device", "world_size", "torch", "triton", "cuda", "nccl", "python",
            "cpu_count", "platform", "triton_interpret")


@dataclass
class CurveRun:
    run_id: str
    finished: bool
    final_val_loss: float | None
    train_time_ms: float | None
    curve: list[tuple[int, float, float]]  # (step, train_time_ms, val_loss)
    env: dict
    target: float | None


@dataclass
class Side:
    label: str
    runs: list[CurveRun]

    @property
    def finished(self) -> list[CurveRun]:
        return [r for r in self.runs if r.finished]

    @property
    def times_ms(self) -> list[float]:
        return [r.train_time_ms for r in self.finished]

    @property
    def losses(self) -> list[float]:
        return [r.final_val_loss for r in self.finished]


class SideError(ValueError):
    """A side cannot be compared; the message lists every problem, one per line."""


def curve_run_from_ours(run: Run) -> CurveRun:
    return CurveRun(run_id=run.run_id, finished=run.finished, final_val_loss=run.final_val_loss,
                    train_time_ms=run.train_time_ms, curve=run.curve, env=run.facts["env"],
                    target=run.facts["target_val_loss"])


def curve_run_from_upstream(facts: dict) -> CurveRun:
    finished = facts["final_val_loss"] is not None
    return CurveRun(run_id=facts["run_id"], finished=finished, final_val_loss=facts["final_val_loss"],
                    train_time_ms=facts["train_time_ms"],
                    curve=[(p["step"], p["train_time_ms"], p["val_loss"]) for p in facts["val_curve"]],
                    env=facts["env"], target=facts["target_val_loss"])


def load_side(spec: str, records_dir: Path = RECORDS_DIR) -> Side:
    """Resolve ``spec`` (a path, or a record path relative to the records folder) into a checked side."""
    path = Path(spec)
    if not path.exists() and (records_dir / spec).exists():
        path = records_dir / spec
    if path.is_dir():
        return _record_side(path, records_dir)
    if path.is_file() and path.suffix in (".txt", ".json"):
        return _run_side(path)
    raise SideError(f"{spec}: not a record folder, a run log (.txt/.json) or an upstream log")


def _record_side(folder: Path, records_dir: Path) -> Side:
    folder = folder.resolve()
    try:
        record_path = folder.relative_to(records_dir.resolve()).as_posix()
    except ValueError:
        record_path = f"{folder.parent.name}/{folder.name}"
    if not (folder / "record.json").is_file():
        raise SideError(f"{folder}: not a record folder (no record.json)")
    record = load_record(folder, record_path, today_utc())
    if record.problems:
        raise SideError("\n".join(record.problems))
    return Side(label=record.label, runs=[curve_run_from_ours(r) for r in record.runs])


def _run_side(path: Path) -> Side:
    if path.suffix == ".json":
        try:
            facts = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SideError(f"{path}: cannot read: {e}") from None
        if isinstance(facts, dict) and facts.get("source") == "upstream":
            facts, problems = load_upstream_json(path)
            if problems:
                raise SideError("\n".join(problems))
            return Side(label=str(path), runs=[curve_run_from_upstream(facts)])
        txt_path, json_path = path.with_suffix(".txt"), path
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline().rstrip("\n")
        if first != FIRST_LINE:  # not ours: a public modded-nanogpt log
            facts, problem = read_upstream_log(path)
            if problem:
                raise SideError(problem)
            return Side(label=str(path), runs=[curve_run_from_upstream(facts)])
        txt_path, json_path = path, path.with_suffix(".json")
    run, problems = load_run(txt_path, json_path, label=str(txt_path))
    if run is not None:
        problems = check_run(run)
    if problems:
        raise SideError("\n".join(problems))
    return Side(label=str(txt_path), runs=[curve_run_from_ours(run)])


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


@dataclass
class Welch:
    difference: float  # mean(b) - mean(a)
    p_value: float  # two-sided
    ci95: tuple[float, float]
    df: float


def welch_test(a: list[float], b: list[float]) -> Welch | None:
    """Welch's unequal-variance t-test of mean(b) - mean(a) (scipy.stats.ttest_ind, two-sided, with its 95%
    interval); None unless both sides have 2+ values."""
    if len(a) < 2 or len(b) < 2:
        return None
    difference = math.fsum(b) / len(b) - math.fsum(a) / len(a)
    if len(set(a)) == 1 and len(set(b)) == 1:  # no spread: scipy's statistic is undefined
        return Welch(difference, 1.0 if difference == 0 else 0.0, (difference, difference), float("inf"))
    result = stats.ttest_ind(b, a, equal_var=False)
    low, high = result.confidence_interval(0.95)
    return Welch(difference, float(result.pvalue), (float(low), float(high)), float(result.df))


def ratio_ci95(a: list[float], b: list[float]) -> tuple[float, tuple[float, float] | None]:
    """Ratio of the geometric mean times b / a, with Welch's 95% interval on the log scale (None
    unless both sides have 2+ runs)."""
    return ratio_ci95s([(a, b)])[0]


def ratio_ci95s(pairs: list[tuple[list[float], list[float]]]) -> list[tuple[float, tuple[float, float] | None]]:
    """ratio_ci95 of each (a, b), with scipy's ttest_ind called once per pair of sample sizes (a leaderboard
    build asks for thousands). Samples without spread on both sides: the interval is the point."""
    logs = [(np.log(np.asarray(a, dtype=np.float64)), np.log(np.asarray(b, dtype=np.float64))) for a, b in pairs]
    out = [(float(np.exp(lb.mean() - la.mean())), None) for la, lb in logs]
    groups = defaultdict(list)
    for i, (la, lb) in enumerate(logs):
        if len(la) >= 2 and len(lb) >= 2:
            groups[(len(la), len(lb))].append(i)
    for index in groups.values():
        la, lb = np.array([logs[i][0] for i in index]), np.array([logs[i][1] for i in index])
        with np.errstate(invalid="ignore", divide="ignore"):
            ci = stats.ttest_ind(lb, la, axis=1, equal_var=False).confidence_interval(0.95)
        point = lb.mean(axis=1) - la.mean(axis=1)
        for k, i in enumerate(index):
            low, high = (ci.low[k], ci.high[k]) if np.isfinite(ci.low[k]) else (point[k], point[k])
            out[i] = (out[i][0], (math.exp(low), math.exp(high)))
    return out


def environment_differences(env_a: dict, env_b: dict) -> list[tuple[str, object, object]]:
    keys = [k for k in ENV_KEYS if k in env_a or k in env_b]
    diffs = [(k, env_a.get(k), env_b.get(k)) for k in keys if env_a.get(k) != env_b.get(k)]
    commit_a, commit_b = (env_a.get("git") or {}).get("commit"), (env_b.get("git") or {}).get("commit")
    if commit_a != commit_b:
        diffs.append(("git commit", commit_a, commit_b))
    return diffs


def side_environment(side: Side) -> dict:
    """The environment of a side's first run (a record's runs all share GPU, count and torch)."""
    return side.runs[0].env if side.runs else {}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def describe_side(name: str, side: Side) -> str:
    n, total = len(side.finished), len(side.runs)
    if not n:
        return f"{name}: {side.label}: no finished run ({total} run(s) listed)"
    times = np.asarray(side.times_ms) / 1000
    spread = f" ± {times.std(ddof=1):.2f}" if n > 1 else ""
    return (f"{name}: {side.label}: {n} finished run(s) of {total}, time {times.mean():.2f}{spread} s, "
            f"mean final val loss {np.mean(side.losses):.4f}")


def comparison_lines(a: Side, b: Side) -> list[str]:
    lines = [describe_side("A", a), describe_side("B", b)]
    if a.finished and b.finished:
        mean_a, mean_b = np.mean(a.times_ms), np.mean(b.times_ms)
        diff = (mean_b - mean_a) / 1000
        lines.append(f"time B - A: {diff:+.2f} s ({100 * (mean_b / mean_a - 1):+.1f}%)")
        test = welch_test(a.times_ms, b.times_ms)
        if test is None:
            lines.append("Welch t-test: needs at least 2 finished runs on each side")
        else:
            lines.append(f"Welch t-test on time (two-sided): p = {test.p_value:.3g}, 95% CI of B - A: "
                         f"[{test.ci95[0] / 1000:+.2f}, {test.ci95[1] / 1000:+.2f}] s")
        loss_test = welch_test(a.losses, b.losses)
        loss_p = f", Welch p = {loss_test.p_value:.3g}" if loss_test else ""
        lines.append(f"final val loss B - A: {np.mean(b.losses) - np.mean(a.losses):+.4f}{loss_p}")
    diffs = environment_differences(side_environment(a), side_environment(b))
    if diffs:
        lines.append("environment differences (A vs B):")
        lines += [f"  {key}: {value_a!r} vs {value_b!r}" for key, value_a, value_b in diffs]
    else:
        lines.append("environment: same GPU, counts and versions")
    return lines


def curves_png(sides: list[tuple[str, Side]], path: Path, title: str) -> None:
    """Validation curves of every run of each side: loss over step and over train time."""
    from speedrun.leaderboard_build import new_figure, save_png

    figure, (by_step, by_time) = new_figure(width=11, height=4.5, cols=2)
    for index, (name, side) in enumerate(sides):
        color = f"C{index}"
        for run_index, run in enumerate(side.runs):
            if not run.curve:
                continue
            steps, times, losses = zip(*run.curve, strict=True)
            label = f"{name} ({len(side.runs)} run{'s' if len(side.runs) > 1 else ''})" if run_index == 0 else None
            by_step.plot(steps, losses, color=color, alpha=0.7, linewidth=1, label=label)
            by_time.plot(np.asarray(times) / 1000, losses, color=color, alpha=0.7, linewidth=1, label=label)
    targets = {r.target for _, side in sides for r in side.runs if r.target is not None}
    for ax, xlabel in ((by_step, "step"), (by_time, "train time (s)")):
        for target in sorted(targets):
            ax.axhline(target, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right")
    figure.suptitle(title)
    save_png(figure, path)


def compare(spec_a: str, spec_b: str, plot_path: Path, records_dir: Path = RECORDS_DIR) -> list[str]:
    """Check both sides, write the plot, return the report lines; raises SideError."""
    a, b = load_side(spec_a, records_dir), load_side(spec_b, records_dir)
    curves_png([("A: " + a.label, a), ("B: " + b.label, b)], plot_path, "validation loss, A vs B")
    return comparison_lines(a, b) + [f"plot: {plot_path}"]
