"""`ruff check` is clean (the project's lint rules are in pyproject.toml; ruff comes with the dev extras)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (install the dev extras: pip install -e .[dev])")
    result = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_random_test_inputs_are_seeded():
    """Every numpy generator in the tests is seeded, so a failure replays (torch ones use manual_seed)."""
    call = "default_rng" + "()"  # spelled apart, so this file does not match itself
    unseeded = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "tests").rglob("*.py"))
                for n, line in enumerate(path.read_text().splitlines(), 1) if call in line]
    assert not unseeded, f"unseeded np.random.{call} at {', '.join(unseeded)}"


def test_readme_links_point_at_committed_files():
    import re

    text = (REPO / "README.md").read_text()
    links = {m for m in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in m}
    missing = sorted(link for link in links if not (REPO / link).exists())
    assert links and not missing, f"README.md links to missing files: {missing}"


def test_readme_performance_numbers_are_the_results_files():
    """Numbers a user sees are measured, not typed: every kernel time ("<n> ms") in README's Performance section is,
    as rounded there, the median of a row of kernels.csv in a results folder its bullet links to, and every
    record time ("<mean> ± <sd>") is in LEADERBOARD.md (which `leaderboard.py build` computes from the logs)."""
    import csv
    import re

    performance = (REPO / "README.md").read_text().split("\n## Performance\n")[1].split("\n## ")[0]
    unsourced, times_checked = [], 0
    for bullet in re.split(r"\n(?=- )", performance):
        medians = [float(row["median_ms"]) for folder in set(re.findall(r"\(bench/results/([^/)]+)/", bullet))
                   if (table := REPO / "bench/results" / folder / "kernels.csv").exists()
                   for row in csv.DictReader(table.open()) if row["median_ms"]]
        for shown in re.findall(r"(\d+(?:\.\d+)?) ms\b", bullet):
            decimals = len(shown.partition(".")[2])
            times_checked += 1
            if not any(f"{m:.{decimals}f}" == shown for m in medians):
                unsourced.append(f"{shown} ms")
    board = (REPO / "LEADERBOARD.md").read_text()
    unsourced += [f"{t} s" for t in re.findall(r"\d+\.\d+ ± \d+\.\d+(?= s)", performance) if f"| {t} |" not in board]
    assert times_checked and not unsourced, f"README's Performance numbers without a source: {unsourced}"

def test_the_project_has_no_import_cycles():
    """No module imports, at its top level, a module that imports it back (directly or through others): each
    one reads on its own, and `python -m` of any of them cannot half-initialise another."""
    import ast

    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in sorted([*(REPO / "speedrun").rglob("*.py"), *(REPO / "kernels").rglob("*.py")])}
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.parse(path.read_text()).body:  # top level only: imports inside functions are deferred
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        imports[name] = sorted(m for m in found if m in modules and m != name)

    acyclic = set()  # modules from which no cycle can be reached

    def cycle_from(name, path):
        for other in imports[name]:
            if other in path:
                return path[path.index(other):] + [other]
            if other not in acyclic and (found := cycle_from(other, path + [other])):
                return found
        acyclic.add(name)
        return None

    cycles = [c for name in imports if (c := cycle_from(name, [name]))]
    assert not cycles, f"import cycles: {cycles[:3]}"
