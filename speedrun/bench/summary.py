"""The GPU suite's summary: one markdown file made from the files the suite's steps wrote.

    python -m speedrun.bench.summary DIR    reads DIR/{steps.tsv, env.txt, tests.txt, kernels.csv, train.md,
                                            converge.md} (whichever exist) and writes DIR/summary.md

Every number in it is read from those files; a missing file is named as missing, never filled in.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from speedrun.data.shards import atomic_write_text


def _steps(folder: Path) -> list[str]:
    path = folder / "steps.tsv"
    if not path.exists():
        return ["steps.tsv missing: the suite did not record its steps"]
    lines = ["| step | result | seconds |", "|---|---|---|"]
    for row in csv.reader(path.read_text().splitlines(), delimiter="\t"):
        if len(row) == 3:
            name, rc, seconds = row
            result = "ok" if rc == "0" else "FAILED: over its time budget" if rc == "124" else f"FAILED (exit {rc})"
            lines.append(f"| {name} | {result} | {seconds} |")
    return lines


def _environment(folder: Path) -> list[str]:
    path = folder / "env.txt"
    if not path.exists():
        return ["env.txt missing"]
    keep = [line for line in path.read_text().splitlines() if line.startswith(("date:", "git:", "python ", "gpu:"))]
    return [f"- {line}" for line in keep]


def _tests(folder: Path) -> list[str]:
    path = folder / "tests.txt"
    if not path.exists():
        return ["tests.txt missing"]
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [f"pytest: `{lines[-1].strip('= ')}`" if lines else "tests.txt is empty"]


def _kernels(folder: Path) -> list[str]:
    """The recipe shapes' rows: per op and mode, each variant's median and speed-ups."""
    path = folder / "kernels.csv"
    if not path.exists():
        return ["kernels.csv missing"]
    rows = [r for r in csv.DictReader(path.read_text().splitlines()) if r["recipe"] == "True"]
    if not rows:
        return ["kernels.csv has no rows for the recipe's shapes"]
    out = [f"dtype {rows[0]['dtype']}; recipe shapes; times are medians (ms).", "",
           "| op | shape | mode | variant | status | median ms | TFLOP/s | GB/s | x torch | x compile |",
           "|---|---|---|---|---|---|---|---|---|---|"]

    def num(text, spec):
        return format(float(text), spec) if text not in ("", None) else "-"

    for r in rows:
        out.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['variant']} | {r['status']} | "
                   f"{num(r['median_ms'], '.3f')} | {num(r['tflops'], '.1f')} | {num(r['gbps'], '.0f')} | "
                   f"{num(r['speedup_vs_torch'], '.2f')} | {num(r['speedup_vs_compile'], '.2f')} |")
    bad = [r for r in rows if r["status"] in ("wrong", "error")]
    if bad:
        out += ["", "Wrong or failed: " + "; ".join(f"{r['op']} {r['variant']} {r['mode']}: {r['detail']}"
                                                    for r in bad)]
    return out


def _section_table(folder: Path, name: str, first_table_only: bool) -> list[str]:
    """The body of a markdown file another step wrote, without its title (the first table only if asked)."""
    path = folder / name
    if not path.exists():
        return [f"{name} missing"]
    lines = path.read_text().splitlines()[1:]
    if first_table_only:
        end = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
        lines = lines[:end]
    return lines


def summary(folder: Path) -> str:
    env = folder / "env.txt"
    cpu = env.exists() and "gpu: none (CPU)" in env.read_text()
    lines = [f"# GPU suite summary: {folder.name}", ""]
    if cpu:
        lines += ["**Dry run on a CPU** (Triton interpreter): this checks the suite's pipeline; "
                  "none of its times says anything about a GPU.", ""]
    lines += ["## Environment", "", *_environment(folder), "", "## Steps", "", *_steps(folder), "",
              "## Kernel tests", "", *_tests(folder), "", "## Kernels (source: kernels.csv)", "", *_kernels(folder),
              "", "## Training step (source: train.md)", *_section_table(folder, "train.md", True),
              "## Convergence, --kernels torch vs triton (source: converge.md)",
              *_section_table(folder, "converge.md", False)]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m speedrun.bench.summary DIR", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    if not folder.is_dir():
        print(f"{folder}: not a folder", file=sys.stderr)
        return 2
    atomic_write_text(folder / "summary.md", summary(folder))
    print(f"wrote {folder / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
