"""``build`` and ``show``: the leaderboard, generated from checked records.

``build`` writes ``LEADERBOARD.md`` (per track: the ranked table and the progression of records),
``records/progression.png`` (record times in record order, log scale), ``records/runs.csv`` (every run of
every record) and ``records/index.html`` (the same as one self-contained web page:
speedrun/leaderboard_page.py). Every number comes from ``speedrun.records``, i.e. from the runs' text logs. The output
is a pure function of the records: no timestamps, fixed ordering, and PNG metadata without the
matplotlib version, so building twice gives byte-identical files.
"""

from __future__ import annotations

import csv
import html
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from speedrun.data.shards import atomic_write_bytes, atomic_write_files
from speedrun.records import CheckResult, Record
from speedrun.tracks import TRACKS, Track

LEADERBOARD_NAME = "LEADERBOARD.md"
PROGRESSION_NAME = "progression.png"
RUNS_CSV_NAME = "runs.csv"
PAGE_NAME = "index.html"
CSV_COLUMNS = ("track", "record", "run_id", "status", "counted", "seed", "final_val_loss", "train_time_ms",
               "num_steps", "target_val_loss", "device", "gpu_name", "gpu_count", "torch", "code_sha256")


@dataclass
class Row:
    """One record's line in the table, every cell already formatted."""

    rank: int
    record: Record
    time: str
    ci95: str
    loss: str
    target: str
    p_value: str
    runs: str


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def seconds(ms: float) -> str:
    return f"{ms / 1000:.2f}"


def ranked_rows(records: list[Record]) -> list[Row]:
    """A track's records fastest first (ties: earlier date, then path), formatted."""
    ordered = sorted(records, key=lambda r: (r.stats.mean_time_ms, r.date, r.path))
    rows = []
    for rank, record in enumerate(ordered, start=1):
        s = record.stats
        time = seconds(s.mean_time_ms) + (f" ± {seconds(s.time_sd_ms)}" if s.time_sd_ms is not None else "")
        # a time is positive: an interval reaching below 0 (few, spread-out runs) is shown from 0
        ci = f"{seconds(max(0.0, s.time_ci95_ms[0]))} – {seconds(s.time_ci95_ms[1])}" if s.time_ci95_ms else "—"
        if record.meta["kind"] == "systems":
            p_value = "exempt (systems)"
        else:
            p_value = f"{s.p_value:.2g}" if s.p_value is not None else "—"
        rows.append(Row(rank=rank, record=record, time=time, ci95=ci, loss=f"{s.mean_loss:.4f}",
                        target=f"{s.target:.4f}", p_value=p_value, runs=f"{s.runs_finished}/{s.runs_total}"))
    return rows


def speedup_intervals(pairs: list[tuple[Record, Record]]) -> list[str]:
    """For each (record, the one it beats): " (95% CI a–b%)", the interval of the speed-up 1 - ratio of the
    geometric mean times (leaderboard_compare.ratio_ci95); "" where a side has fewer than 2 runs."""
    from speedrun.leaderboard_compare import ratio_ci95s

    intervals = ratio_ci95s([(previous.stats.times_ms, record.stats.times_ms) for record, previous in pairs])
    return ["" if ci is None else f" (95% CI {100 * (1 - ci[1]):.1f}–{100 * (1 - ci[0]):.1f}%)"
            for _, ci in intervals]


def progression(records: list[Record]) -> list[tuple[Record, float | None]]:
    """The chain of records that beat the one before them (``beats``, checked by a significance test), from
    the track's first record, in date order, each with its improvement over the previous one (None for the
    first). A record that beats no record of the chain (a re-measurement, a side branch) is not in it."""
    chain = []
    for record in sorted(records, key=lambda r: (r.date, r.path)):
        beats = record.meta.get("beats")
        if not chain and beats is None:
            chain.append((record, None))
        elif chain and beats == chain[-1][0].path:
            best = chain[-1][0].stats.mean_time_ms
            chain.append((record, (best - record.stats.mean_time_ms) / best))
    return chain


def track_target_text(track: Track) -> str:
    if track.target_val_loss is not None:
        return f"target val loss {track.target_val_loss}"
    return f"target val loss = the data's optimal loss + {track.target_margin_over_floor}"


def escape_cell(text: str) -> str:
    """Text from a record as literal text in a Markdown table cell: no HTML, links, emphasis or code."""
    text = html.escape(" ".join(text.split()), quote=False)  # one line; <, > and & shown as themselves
    return re.sub(r"([\\`*_\[\]|#!~])", r"\\\1", text)


def markdown(result: CheckResult, link_prefix: str, plot_link: str, csv_link: str) -> str:
    """LEADERBOARD.md. ``link_prefix`` is the records folder relative to the markdown file."""
    by_track = result.by_track()
    records = result.valid_records
    runs = sum(len(r.runs) for r in records)
    out = ["# Leaderboard", "",
           "Generated by `python leaderboard.py build` from the run logs under `records/`: do not edit by hand.",
           "Every number is recomputed from the runs' text logs. A run's time is the `train_time` of its final "
           "validation line and its loss that line's `val_loss`; a record's time is the mean over its finished "
           "runs (± their standard deviation, and the 95% interval of the mean, from 0 at the lowest), its p the "
           "one-sided t-test that its mean loss is below the target (ml records need p < 0.01 over at least 3 "
           "runs).", "",
           f"{len(records)} records, {runs} runs. Progression plot: [{PROGRESSION_NAME}]({plot_link}) · "
           f"every run: [{RUNS_CSV_NAME}]({csv_link})", ""]
    for name, track in TRACKS.items():
        out += _track_markdown(track, by_track[name], link_prefix)
    if result.upstream:
        out += _upstream_markdown(result.upstream, link_prefix)
    return "\n".join(out) + "\n"


def _track_markdown(track: Track, records: list[Record], link_prefix: str) -> list[str]:
    out = [f"## {track.name}", "",
           f"{track.description}. {track_target_text(track)}, {track.val_tokens:,} validation tokens, "
           f"hardware: {track.hardware}.", ""]
    if not records:
        return out + ["No records yet: no verified runs exist for this track, so there is nothing to show.", ""]
    out += ["| # | time (s) | 95% CI (s) | mean val loss | target | p | runs | date | title | authors | record |",
            "|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for row in ranked_rows(records):
        meta = row.record.meta
        out.append(f"| {row.rank} | {row.time} | {row.ci95} | {row.loss} | {row.target} | {row.p_value} | "
                   f"{row.runs} | {row.record.date} | {escape_cell(meta['title'])} | "
                   f"{escape_cell(', '.join(meta['authors']))} | "
                   f"[{row.record.path.split('/')[1]}]({link_prefix}/{row.record.path}) |")
    out += ["", f"### Progression ({track.name})", "",
            "| date | time (s) | improvement | title | record |", "|---|---:|---:|---|---|"]
    chain = progression(records)
    intervals = [""] + speedup_intervals([(record, chain[k][0]) for k, (record, _) in enumerate(chain[1:])])
    for (record, gain), interval in zip(chain, intervals, strict=True):
        improvement = "first record" if gain is None else f"{100 * gain:.1f}% faster{interval}"
        link = f"[{record.path.split('/')[1]}]({link_prefix}/{record.path})"
        out.append(f"| {record.date} | {seconds(record.stats.mean_time_ms)} | {improvement} | "
                   f"{escape_cell(record.meta['title'])} | {link} |")
    return out + [""]


def _upstream_markdown(upstream: list[dict], link_prefix: str) -> list[str]:
    out = ["## Imported upstream runs (modded-nanogpt; for comparison, not ranked)", "",
           "| log | final val loss | time (s) | status | GPUs | torch |", "|---|---:|---:|---|---|---|"]
    for facts in sorted(upstream, key=lambda f: f["run_id"]):
        env = facts["env"]
        loss = f"{facts['final_val_loss']:.4f}" if facts["final_val_loss"] is not None else "—"
        time = seconds(facts["train_time_ms"]) if facts["train_time_ms"] is not None else "—"
        out.append(f"| [{facts['upstream']['file']}]({link_prefix}/upstream/{facts['upstream']['file']}) | {loss} | "
                   f"{time} | {facts['status']} | {env['gpu_count']}x {escape_cell(str(env['gpu_name']))} | "
                   f"{env['torch']} |")
    return out + [""]


def runs_csv(result: CheckResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in sorted(result.records, key=lambda r: r.path):
        for run in sorted(record.runs, key=lambda r: r.run_id):
            writer.writerow([record.path.split("/")[0], record.path, run.run_id, run.status,
                             "yes" if run.finished else "no", run.seed,
                             f"{run.final_val_loss:.4f}" if run.finished else "",
                             run.train_time_ms if run.finished else "", run.num_steps, run.target_val_loss,
                             run.device, run.gpu_name or "", run.gpu_count, run.torch, run.code_sha256])
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Plots (shared by build, compare and reproduce)
# ---------------------------------------------------------------------------------------------


def new_figure(width: float = 8.0, height: float = 4.5, rows: int = 1, cols: int = 1):
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def save_png(figure, path: Path) -> None:
    """Save without the variable metadata (software version), atomically: same input, same bytes."""
    atomic_write_bytes(path, png_bytes(figure))


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def progression_png(result: CheckResult) -> bytes:
    """One panel per track with records: every record's time in record order (records of one day would
    stack on a date axis), labelled with its date, and the progression chain as a step line."""
    by_track = result.by_track()
    tracks = [name for name in TRACKS if by_track[name]]
    figure, axes = new_figure(height=4.5 * max(1, len(tracks)), rows=max(1, len(tracks)))
    if not tracks:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no records yet", ha="center", va="center", fontsize=14)
    for ax, name in zip(axes, tracks, strict=False):
        ordered = sorted(by_track[name], key=lambda r: (r.date, r.path))
        position = {r.path: i for i, r in enumerate(ordered)}
        ax.scatter(range(len(ordered)), [r.stats.mean_time_ms / 1000 for r in ordered], s=12, alpha=0.35,
                   label="records")
        chain = progression(ordered)
        ax.step([position[r.path] for r, _ in chain], [r.stats.mean_time_ms / 1000 for r, _ in chain],
                where="post", marker="o", label="progression")
        every = max(1, len(ordered) // 12)  # a dozen date labels at most
        ax.set_xticks(range(0, len(ordered), every), [r.date for r in ordered[::every]], rotation=30, ha="right")
        ax.set_xlim(-0.5, len(ordered) - 0.5)
        ax.set_yscale("log")
        ax.set_xlabel("record (in date order)")
        ax.set_ylabel("record time (s, log scale)")
        ax.set_title(f"{name}: time of each record")
        ax.legend(loc="upper right")
        ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    return png_bytes(figure)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def build(result: CheckResult, records_dir: Path, out_dir: Path) -> list[Path]:
    """Write the four outputs of a valid check result, all or none; returns their paths."""
    from speedrun.leaderboard_page import page  # the page is built from this module's tables

    markdown_path = out_dir / LEADERBOARD_NAME
    plot_path, csv_path, page_path = (records_dir / name for name in (PROGRESSION_NAME, RUNS_CSV_NAME, PAGE_NAME))
    link_prefix = Path(os.path.relpath(records_dir, out_dir)).as_posix()
    text = markdown(result, link_prefix, f"{link_prefix}/{PROGRESSION_NAME}", f"{link_prefix}/{RUNS_CSV_NAME}")
    atomic_write_files({csv_path: runs_csv(result).encode(), plot_path: progression_png(result),
                        page_path: page(result, ".").encode(), markdown_path: text.encode()})
    return [markdown_path, plot_path, csv_path, page_path]


def terminal_table(result: CheckResult, track_name: str | None = None) -> str:
    """The leaderboard as aligned plain text."""
    by_track = result.by_track()
    out = []
    for name, track in TRACKS.items():
        if track_name is not None and name != track_name:
            continue
        out.append(f"{name}: {track.description} ({track_target_text(track)})")
        records = by_track[name]
        if not records:
            out += ["  no records yet", ""]
            continue
        header = ("#", "time (s)", "95% CI (s)", "val loss", "target", "p", "runs", "date", "title", "record")
        rows = [header] + [(str(r.rank), r.time, r.ci95, r.loss, r.target, r.p_value, r.runs, r.record.date,
                            r.record.meta["title"], r.record.path) for r in ranked_rows(records)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        out += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        out.append("")
    return "\n".join(out)
