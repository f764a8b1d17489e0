"""The GPU suite's summary: one markdown file made from the files the suite's steps wrote.

    python -m speedrun.bench.summary DIR    reads DIR/{steps.tsv, env.txt, tests.txt, launch.md, kernels.csv,
                                            train.md, record89/train.md, record89_compiled/train.md,
                                            converge.md} and writes DIR/summary.md

Every number in it is read from those files. A section appears when its step ran (steps.tsv) or its file
exists; a file its step should have written is named as missing, never filled in.
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


def _launch(folder: Path) -> list[str]:
    """The count line of launch.md and its failed rows."""
    path = folder / "launch.md"
    if not path.exists():
        return ["launch.md missing"]
    lines = path.read_text().splitlines()
    counts = [line for line in lines if " launches of " in line]
    failed = [line for line in lines if line.startswith("| ") and not line.startswith("| kernel |")
              and line.split(" | ")[3] != "ok"]
    header = ["| kernel | config | dtype | status | ms (first launch, compile included) |", "|---|---|---|---|---|"]
    return counts + (["", "Failed launches:", "", *header, *failed] if failed else [])


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


def _ran(folder: Path) -> set[str]:
    path = folder / "steps.tsv"
    rows = csv.reader(path.read_text().splitlines(), delimiter="\t") if path.exists() else []
    return {row[0] for row in rows if row}


def summary(folder: Path) -> str:
    env = folder / "env.txt"
    cpu = env.exists() and "gpu: none (CPU)" in env.read_text()
    lines = [f"# GPU suite summary: {folder.name}", ""]
    if cpu:
        lines += ["**Dry run on a CPU** (Triton interpreter): this checks the suite's pipeline; "
                  "none of its times says anything about a GPU.", ""]
    lines += ["## Environment", "", *_environment(folder), "", "## Steps", "", *_steps(folder), ""]
    ran = _ran(folder)
    sections = [  # (steps that write it, file, title, body)
        (("tests", "model check"), "tests.txt", "## Tests (source: tests.txt)", lambda: ["", *_tests(folder), ""]),
        (("bench launch",), "launch.md", "## Kernel launches on the card (source: launch.md)",
         lambda: ["", *_launch(folder), ""]),
        (("bench kernels",), "kernels.csv", "## Kernels (source: kernels.csv)", lambda: ["", *_kernels(folder), ""]),
        (("bench train",), "train.md", "## Training step (source: train.md)",
         lambda: _section_table(folder, "train.md", True)),
        (("bench train record89",), "record89/train.md", "## Training step, record #89 (source: record89/train.md)",
         lambda: _section_table(folder, "record89/train.md", True)),
        (("bench train record89 compiled",), "record89_compiled/train.md",
         "## Training step, record #89 compiled (source: record89_compiled/train.md)",
         lambda: _section_table(folder, "record89_compiled/train.md", True)),
        (("bench converge",), "converge.md", "## Convergence, --kernels torch vs triton (source: converge.md)",
         lambda: _section_table(folder, "converge.md", False)),
    ]
    for steps, name, title, body in sections:
        if ran & set(steps) or (folder / name).exists() or not ran:
            lines += [title, *body()]
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
