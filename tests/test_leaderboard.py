"""Records and the leaderboard: every rejection `check` makes, build/show/submit/compare/import-upstream,
and the pieces of reproduce. Every fixture is written here, through the trainer's own log writer."""

import datetime
import hashlib
import html.parser
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from synthetic_records import synthetic_env, write_synthetic_record, write_synthetic_run

from speedrun import REPO_ROOT
from speedrun.records.check import check_tree
from speedrun.records.cli import main as leaderboard_main
from speedrun.records.stats import loss_p_value, mean_ci95, ratio_ci95, speedup_p_values, welch_test
from speedrun.records.upstream import upstream_facts
from speedrun.tracks import TRACKS

REAL_TINY_CPU = TRACKS["tiny-cpu"]
pytestmark = pytest.mark.usefixtures("synthetic_track_data")  # the synthetic logs' val data is the track's
TARGET = TRACKS["tiny-cpu"].target(5.0619)  # the synthetic runs' data floor + the track's margin


def good_runs(prefix="r", n=3, time_ms=60_000.0, loss=5.10, seed_offset=0, **extra):
    return [dict(run_id=f"{prefix}{i}", seed=seed_offset + i, final_val_loss=loss + 0.001 * i,
                 train_time_ms=time_ms + 50 * i, **extra) for i in range(n)]


@pytest.fixture
def records(tmp_path) -> Path:
    return tmp_path / "records"


def make(records, slug="first", date="2025-01-01", track="tiny-cpu", runs=None, **meta) -> Path:
    return write_synthetic_record(records, track, date, slug, runs if runs is not None else good_runs(slug[0]),
                                  **meta)


def problems_of(records) -> list[str]:
    return check_tree(records).problems


def assert_one_problem_like(records, *fragments) -> str:
    problems = problems_of(records)
    hits = [p for p in problems if all(f in p for f in fragments)]
    assert hits, f"no problem containing {fragments}; got:\n" + "\n".join(problems)
    return hits[0]


def edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def edit_json(path: Path, change) -> None:
    facts = json.loads(path.read_text())
    change(facts)
    path.write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")


def step_line(txt: Path, prefix: str) -> tuple[int, str]:
    """(line number, text) of the first line of a text log that starts with ``prefix``."""
    lines = txt.read_text().split("\n")
    index = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    return index + 1, lines[index]


def edit_run_facts(txt: Path, change) -> None:
    """Change the facts in both the JSON file and the text log's summary (they must agree)."""
    edit_json(txt.with_suffix(".json"), change)
    text = txt.read_text()
    head, _, summary = text.partition("====== summary ======\n")
    facts = json.loads(summary)
    change(facts)
    txt.write_text(head + "====== summary ======\n" + json.dumps(facts, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def test_loss_p_value_is_scipys_one_sided_t_test():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 20):
        losses = list(3.278 + 0.002 * rng.standard_normal(n))
        expected = scipy.stats.ttest_1samp(losses, 3.28, alternative="less").pvalue
        assert loss_p_value(losses, 3.28) == pytest.approx(expected, rel=1e-9)
    assert loss_p_value([3.27, 3.27, 3.27], 3.28) == 0.0  # no spread, below: certain
    assert loss_p_value([3.29, 3.29, 3.29], 3.28) == 1.0
    assert loss_p_value([3.27], 3.28) is None


def test_a_side_without_spread_gives_scipys_values_without_a_warning():
    """Three runs of one time (whole milliseconds: tiny runs) against three that differ: scipy's tests handle the
    zero variance exactly but warn of precision loss, which check and build printed on every call."""
    fast, constant = [40_000.0, 40_050.0, 40_100.0], [60_000.0] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = scipy.stats.ttest_ind(fast, constant, equal_var=False, alternative="less").pvalue
        expected_loss = scipy.stats.ttest_1samp([5.1, 5.1, 5.2], 5.3, alternative="less").pvalue
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert speedup_p_values([(fast, constant)]) == [pytest.approx(expected, rel=1e-12)]
        assert loss_p_value([5.1, 5.1, 5.2], 5.3) == pytest.approx(expected_loss, rel=1e-12)
        assert welch_test(constant, fast).p_value == pytest.approx(2 * expected, rel=1e-9)
        ratio, (low, high) = ratio_ci95(constant, fast)
        assert ratio == pytest.approx(math.exp(np.mean(np.log(fast)) - math.log(60_000))) and low < ratio < high


def test_mean_ci95_and_welch_match_scipy():
    values = [10.0, 12.0, 11.5, 10.7]
    low, high = mean_ci95(values)
    expected = scipy.stats.ttest_1samp(values, 0).confidence_interval(0.95)
    assert (low, high) == pytest.approx((expected.low, expected.high))
    a, b = [10.0, 11.0, 10.5, 10.2], [9.0, 9.6, 9.3]
    test = welch_test(a, b)
    reference = scipy.stats.ttest_ind(b, a, equal_var=False)
    assert test.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    ci = reference.confidence_interval(0.95)
    assert test.ci95 == pytest.approx((ci.low, ci.high))
    ratio, interval = ratio_ci95(a, b)
    assert ratio == pytest.approx(math.exp(np.mean(np.log(b)) - np.mean(np.log(a))))
    assert interval[0] < ratio < interval[1] < 1
    assert welch_test([1.0], b) is None


# ---------------------------------------------------------------------------------------------
# check: valid records
# ---------------------------------------------------------------------------------------------


def test_valid_records_pass_and_numbers_come_from_the_text_log(records):
    make(records, "first", runs=good_runs("a") + [dict(run_id="a-aborted", outcome="aborted", stop_step=7),
                                                   dict(run_id="a-diverged", seed=9, outcome="diverged", stop_step=10),
                                                   dict(run_id="a-killed", seed=8, outcome="running", stop_step=12)])
    make(records, "second", date="2025-01-02", runs=good_runs("b", time_ms=50_000.0), kind="systems",
         beats="tiny-cpu/2025-01-01_first")
    result = check_tree(records)
    assert result.problems == []
    first = next(r for r in result.records if r.path.endswith("_first"))
    assert first.stats.runs_total == 6 and first.stats.runs_finished == 3  # failed runs listed, not counted
    times = []
    for run in sorted(first.runs, key=lambda r: r.run_id):
        if run.finished:
            text = (first.folder / "runs" / f"{run.run_id}.txt").read_text()
            last_val = [ln for ln in text.splitlines() if ln.startswith("step:") and "val_loss" in ln][-1]
            times.append(int(last_val.split("train_time:")[1].split("ms")[0]))
    assert first.stats.times_ms == times
    assert first.stats.mean_time_ms == pytest.approx(np.mean(times))
    assert first.stats.p_value == pytest.approx(
        scipy.stats.ttest_1samp(first.stats.losses, TARGET, alternative="less").pvalue)


def test_the_config_key_cut_from_the_text_equals_the_encoded_one(tmp_path):
    """A run's config key (what "its runs differ in config" compares) is cut from the text log's config section
    when that is the facts' config in the writer's layout; it equals the facts' config, less the seed, encoded."""
    from speedrun.records.runlog import canonical_json, load_run

    txt, js = write_synthetic_run(tmp_path, "r0", seed=3)
    run, problems = load_run(txt, js)
    config = run.facts["config"]
    encoded = canonical_json({**config, "train": {k: v for k, v in config["train"].items() if k != "seed"}})
    assert problems == [] and run.config_key == encoded and '"seed"' not in run.config_key
    run.facts_text = run.facts_text.replace('\n  "config": {', '\n  "config":  {')  # another layout: encoded
    del run.config_key, run.config_in_writer_layout
    assert not run.config_in_writer_layout and run.config_key == encoded


def test_the_committed_records_pass_check(monkeypatch):
    monkeypatch.setitem(TRACKS, "tiny-cpu", REAL_TINY_CPU)  # the real track, not the synthetic logs' stand-in
    result = check_tree()  # the repository's own records/
    assert result.problems == [], "\n".join(result.problems)


def test_the_committed_leaderboard_is_what_build_makes_of_the_committed_records(monkeypatch, tmp_path):
    """LEADERBOARD.md and records/'s generated files are current: a build of a copy of records/ remakes them."""
    monkeypatch.setitem(TRACKS, "tiny-cpu", REAL_TINY_CPU)
    shutil.copytree(REPO_ROOT / "records", tmp_path / "records")
    assert leaderboard_main(["build", "--records", str(tmp_path / "records"), "--out", str(tmp_path)]) == 0
    generated = ["LEADERBOARD.md"] + [f"records/{p.name}" for p in (tmp_path / "records").iterdir() if p.is_file()]
    stale = [name for name in generated if (tmp_path / name).read_bytes() != (REPO_ROOT / name).read_bytes()]
    assert not stale, f"{stale} differ from a fresh build: run `python leaderboard.py build` and commit them"


def test_the_cli_entry_point_runs_from_the_repository_root(records):
    out = subprocess.run([sys.executable, "leaderboard.py", "check"], cwd=REPO_ROOT,  # the committed records
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "check: ok: 2 record(s), 5 run(s)" in out.stdout
    make(records)  # synthetic logs claim other val data than the real track's: rejected, one line each
    out = subprocess.run([sys.executable, "leaderboard.py", "check", "--records", str(records)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "not track tiny-cpu's (866d84c8fffc…)" in out.stdout


# ---------------------------------------------------------------------------------------------
# check: every rejection
# ---------------------------------------------------------------------------------------------


def test_rejects_malformed_run_json_with_its_line(records):
    folder = make(records)
    (folder / "runs/f0.json").write_text('{\n  "schema_version": 1,\n  oops\n}\n')
    assert_one_problem_like(records, "runs/f0.json:3: malformed JSON")
    assert leaderboard_main(["check", "--records", str(records)]) == 1


def test_rejects_malformed_text_log_with_its_line(records):
    folder = make(records)
    txt = folder / "runs/f0.txt"
    lineno, line = step_line(txt, "step:3/20 train_time:")
    edit(txt, line, line.replace("train_time:", "train_tim:"))
    assert_one_problem_like(records, f"runs/f0.txt:{lineno}: malformed step line")
    lineno, line = step_line(folder / "runs/f1.txt", "step:4/20 train_time:")
    edit(folder / "runs/f1.txt", line, line.split("step_avg:")[0] + "step_avg:nanms")  # only step 0 has no average
    assert_one_problem_like(records, f"runs/f1.txt:{lineno}: malformed step line")
    edit(txt, "====== config ======", "====== konfig ======")
    assert_one_problem_like(records, "runs/f0.txt", "the log ends before its '====== config ======' line")


def test_rejects_malformed_record_json(records):
    folder = make(records)
    (folder / "record.json").write_text("{not json")
    assert_one_problem_like(records, "_first/record.json:1: malformed JSON")


def test_rejects_unknown_schema_versions(records):
    folder = make(records)
    edit_run_facts(folder / "runs/f0.txt", lambda f: f.update(schema_version=2))
    assert_one_problem_like(records, "runs/f0.json: unknown schema_version 2")
    edit_json(folder / "record.json", lambda m: m.update(schema_version=7))
    assert_one_problem_like(records, "record.json: unknown schema_version 7")


def test_rejects_unknown_track(records):
    make(records)
    shutil.copytree(records / "tiny-cpu", records / "tiny-gpu")
    assert_one_problem_like(records, "records/tiny-gpu: unknown track 'tiny-gpu'")


def test_rejects_missing_and_extra_fields(records):
    folder = make(records)
    edit_run_facts(folder / "runs/f0.txt", lambda f: f.pop("mfu"))
    edit_run_facts(folder / "runs/f1.txt", lambda f: f.update(claimed_time_ms=1))
    edit_json(folder / "record.json", lambda m: (m.pop("description"), m.update(time_s=12.5)))
    assert_one_problem_like(records, "runs/f0.json: missing field 'mfu'")
    assert_one_problem_like(records, "runs/f1.json: unexpected field 'claimed_time_ms'")
    assert_one_problem_like(records, "record.json: missing field 'description'")
    assert_one_problem_like(records, "record.json: unexpected field 'time_s'")


def test_rejects_an_incomplete_config(records):
    folder = make(records)
    edit_run_facts(folder / "runs/f0.txt", lambda f: f["config"]["train"].pop("dtype"))
    assert_one_problem_like(records, "runs/f0.json: config is missing RunConfig fields")


def test_rejects_nan_inf_and_negative_numbers(records):
    folder = make(records, runs=good_runs("f", n=5))
    edit_run_facts(folder / "runs/f0.txt", lambda f: (f.update(peak_memory_mib=-3.0), f["env"].update(cpu_count=-2)))
    edit_run_facts(folder / "runs/f1.txt", lambda f: f.update(tokens_per_second=float("inf")))
    edit_run_facts(folder / "runs/f2.txt", lambda f: f["train_losses"].__setitem__(3, -0.5))
    lineno, line = step_line(folder / "runs/f2.txt", "step:10/20 val_loss:")
    assert_one_problem_like(records, "runs/f0.json: negative number -3.0 in peak_memory_mib")
    assert_one_problem_like(records, "runs/f0.json: negative number -2 in env.cpu_count")
    assert_one_problem_like(records, "runs/f1.txt: malformed JSON: non-finite number Infinity (strict JSON has none)")
    assert_one_problem_like(records, "runs/f2.json: negative number -0.5 in train_losses[3]")
    for path in (folder / "runs/f3.txt", folder / "runs/f3.json"):  # too large for a double: read as infinity
        path.write_text(re.sub(r'("tokens_per_second": )[0-9.e+-]+', r"\g<1>1e999", path.read_text()))
        path.write_text(re.sub(r'("train_losses": \[\n *)[0-9.e+-]+', r"\g<1>1e999", path.read_text()))
    for path in (folder / "runs/f4.txt", folder / "runs/f4.json"):
        path.write_text(re.sub(r'("val_optimal_loss": )[0-9.e+-]+', r"\g<1>1e999", path.read_text()))
    assert_one_problem_like(records, "runs/f3.json: non-finite number inf in tokens_per_second")
    assert_one_problem_like(records, "runs/f3.json: non-finite number inf in train_losses[0]")
    assert_one_problem_like(records, "runs/f4.json: non-finite number inf in data.val_optimal_loss")
    edit(folder / "runs/f2.txt", line, line.replace("val_loss:", "val_loss:-"))
    assert_one_problem_like(records, f"runs/f2.txt:{lineno}: malformed step line")


def test_rejects_a_code_snapshot_that_does_not_match_its_hash(records):
    folder = make(records)
    edit(folder / "runs/f0.txt", "    n_layer = 4\n", "    n_layer = 5\n")
    assert_one_problem_like(records, "runs/f0.txt:", "the code snapshot of speedrun/model.py does not match")


def test_rejects_a_code_hash_that_does_not_match_the_files(records):
    folder = make(records)
    text = (folder / "runs/f0.txt").read_text()
    total = text.split("====== code_sha256: ")[1][:64]
    edit(folder / "runs/f0.txt", f"code_sha256: {total}", "code_sha256: " + "0" * 64)
    assert_one_problem_like(records, "runs/f0.txt: code_sha256 000000000000… does not match")


@pytest.mark.parametrize("run_options, what", [
    ({"code": {"speedrun/model.py": "class GPT:\n    n_layer = 6\n"}}, "code hash"),
    ({"env": synthetic_env("tiny-cpu", torch_version="2.12.0")}, "torch version"),
])
def test_rejects_runs_of_one_record_that_differ(records, run_options, what):
    runs = good_runs("f")
    runs[2].update(run_options)
    make(records, runs=runs)
    assert_one_problem_like(records, f"records/tiny-cpu/2025-01-01_first: its runs differ in {what}")


def test_rejects_runs_on_different_gpu_models(records):
    runs = good_runs("h", time_ms=180_000, loss=3.27)
    runs[1]["env"] = synthetic_env("8xH100-3.28", gpu_name="NVIDIA H100 PCIe")
    make(records, "h100", track="8xH100-3.28", runs=runs)
    assert_one_problem_like(records, "its runs differ in GPU model")


def test_rejects_gpu_count_and_val_tokens_that_do_not_fit_the_track(records):
    runs = good_runs("h", time_ms=180_000, loss=3.27)
    runs[0]["env"] = synthetic_env("8xH100-3.28", gpu_count=4)
    runs[1]["val_tokens"] = 1_048_576
    make(records, "h100", track="8xH100-3.28", runs=runs)
    assert_one_problem_like(records, "runs/h0.json: ran on 4 GPU(s)", "needs 8")
    assert_one_problem_like(records, "runs/h1.json: validated on 1,048,576 tokens; track 8xH100-3.28 needs 10,485,760")


def test_rejects_a_wrong_target(records):
    folder = make(records)
    edit_run_facts(folder / "runs/f0.txt", lambda f: f.update(target_val_loss=9.0, status="success"))
    assert_one_problem_like(records, "runs/f0.json: target_val_loss 9.0 is not track tiny-cpu's")


def test_rejects_duplicate_run_ids_and_logs_across_records(records):
    make(records)
    second = make(records, "second", date="2025-01-02", runs=good_runs("s", time_ms=40_000),
                  beats="tiny-cpu/2025-01-01_first")
    shutil.copy(records / "tiny-cpu/2025-01-01_first/runs/f0.txt", second / "runs/f0.txt")
    shutil.copy(records / "tiny-cpu/2025-01-01_first/runs/f0.json", second / "runs/f0.json")
    assert_one_problem_like(records, "_second/runs/f0.txt: duplicate run id: also records/tiny-cpu/2025-01-01_first")


def test_rejects_a_copied_log_under_a_new_run_id(records):
    folder = make(records)
    for suffix in (".txt", ".json"):
        shutil.copy(folder / f"runs/f0{suffix}", folder / f"runs/copy{suffix}")
    edit(folder / "runs/copy.txt", "run_id: f0", "run_id: copy")
    edit_run_facts(folder / "runs/copy.txt", lambda f: f.update(run_id="copy"))
    assert_one_problem_like(records, "runs/f0.txt: duplicate run (the same validation losses and times", "copy.txt")


def test_rejects_a_disguised_copy_in_another_record(records):
    """A record copied under fresh run ids with a step time moved by 1 ms is still the same runs."""
    first = make(records)
    copy = records / "tiny-cpu/2025-01-02_copy"
    shutil.copytree(first, copy)
    edit(copy / "record.json", '"2025-01-01"', '"2025-01-02"')
    edit(copy / "record.json", '"beats": null', '"beats": "tiny-cpu/2025-01-01_first"')
    for i in range(3):
        for suffix in (".txt", ".json"):
            (copy / f"runs/f{i}{suffix}").rename(copy / f"runs/c{i}{suffix}")
        edit(copy / f"runs/c{i}.txt", f"run_id: f{i}", f"run_id: c{i}")
        edit_run_facts(copy / f"runs/c{i}.txt", lambda f, i=i: f.update(run_id=f"c{i}"))
    text = (copy / "runs/c0.txt").read_text()
    line = re.search(r"^step:3/20 train_time:(\d+)ms step_avg:[\d.]+ms$", text, re.M)
    ms = int(line[1]) + 1
    edit(copy / "runs/c0.txt", line[0], f"step:3/20 train_time:{ms}ms step_avg:{ms / 3:.2f}ms")
    problems = problems_of(records)
    duplicates = [p for p in problems if "duplicate run (the same validation losses" in p]
    assert len(duplicates) == 3 and all("_copy/runs/c" in p and "_first/runs/f" in p for p in duplicates), problems


def test_same_losses_at_other_speeds_are_not_duplicates(records):
    """A systems record: the same math (the same seeds give the same losses on a CPU), another speed."""
    make(records)
    make(records, "faster", date="2025-01-02", runs=good_runs("g", time_ms=40_000), beats="tiny-cpu/2025-01-01_first")
    assert not [p for p in problems_of(records) if "duplicate" in p]


def test_rejects_a_finished_run_relabelled_aborted(records):
    """Relabelling a slow finished run "aborted" would drop it from the record's time; its log says otherwise."""
    folder = make(records)
    edit_run_facts(folder / "runs/f2.txt", lambda f: f.update(status="aborted", final_val_loss=None))
    assert_one_problem_like(records, "runs/f2.json: status aborted, but the text log validated at its last step 20")


def test_non_regular_and_deeply_nested_files_are_problems_not_crashes(records):
    bad_json = make(records, "nested", date="2025-01-03")
    (bad_json / "record.json").write_text("[" * 100_000 + "]" * 100_000)
    folder_meta = make(records, "folder", date="2025-01-04")
    (folder_meta / "record.json").unlink()
    (folder_meta / "record.json").mkdir()
    fifo = make(records, "fifo", date="2025-01-05")
    (fifo / "record.json").unlink()
    os.mkfifo(fifo / "record.json")  # opening it would block forever
    (fifo / "runs/f0.json").unlink()
    os.mkfifo(fifo / "runs/f0.json")
    deep_run = make(records, "deep", date="2025-01-06")
    (deep_run / "runs/d0.json").write_text("[" * 100_000 + "]" * 100_000)
    problems = problems_of(records)
    for fragment in ("_nested/record.json: malformed JSON: nested too deeply",
                     "_folder/record.json: not a regular file", "_fifo/record.json: not a regular file",
                     "_fifo/runs/f0.json: unexpected entry", "_deep/runs/d0.json: malformed JSON: nested too deeply"):
        assert any(fragment in p for p in problems), (fragment, problems)


@pytest.mark.parametrize("field, value, fragment", [
    ("title", "Fast \x1b[2J\x1b[31mred", "title holds the control character U+001B"),
    ("title", "over\rwrite", "title holds the control character U+000D"),
    ("description", "looks \u202eresrever", "description holds the control character U+202E"),
    ("authors", ["Ada\x07"], "author 'Ada\\x07' holds the control character U+0007"),
    ("title", "\ud800 half a character", "title holds the lone surrogate U+D800"),  # JSON's "\ud800": no UTF-8
])
def test_rejects_control_characters_in_record_text(records, field, value, fragment):
    folder = make(records)
    edit_json(folder / "record.json", lambda meta: meta.update({field: value}))
    assert_one_problem_like(records, fragment)


def test_rejects_control_characters_in_a_runs_environment(records):
    """A run's environment texts reach terminals (check's "its runs differ in torch version: ...") and the runs'
    CSV; nvidia-smi's table keeps its newlines."""
    smi = "+-----+\n| 0  NVIDIA H100 80GB HBM3  On |\n+-----+"
    runs = good_runs("f", env=synthetic_env("tiny-cpu", torch_version="2.13\x1b[2J"))
    runs[1:] = good_runs("f", env={**synthetic_env("tiny-cpu"), "nvidia_smi": smi})[1:]
    make(records, runs=runs)
    assert_one_problem_like(records, "runs/f0.json: env.torch holds the control character U+001B at position 4")
    assert not [p for p in problems_of(records) if "nvidia_smi" in p or "\x1b" in p]
    edit_run_facts(records / "tiny-cpu/2025-01-01_first/runs/f1.txt",
                   lambda facts: facts["env"].update(gpu_name='=HYPERLINK("http://x")'))
    assert_one_problem_like(records, "runs/f1.json: env.gpu_name '=HYPERLINK(\"http://x' starts with '=' (a "
                                     "spreadsheet formula in runs.csv)")


def test_file_names_that_cannot_be_shown_are_problems(records, capsys):
    """A file name with a byte that is not UTF-8 (Python: a lone surrogate) or a control character is named
    escaped, in records/ and records/upstream/ alike; check's output stays UTF-8 text."""
    folder = make(records)
    (records / "upstream").mkdir()
    try:
        for where in (folder / "runs", records / "upstream"):
            (where / os.fsdecode(b"bad\xff.txt")).write_text("x")
            (where / "esc\x1b[2J.txt").write_text("x")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses such names")
    assert leaderboard_main(["check", "--records", str(records)]) == 1
    out = capsys.readouterr().out
    out.encode("utf-8")  # printable as UTF-8: nothing raw
    for where in (f"{folder.relative_to(records.parent)}/runs", "records/upstream"):
        assert f"{where}/'bad\\udcff.txt': the name holds the lone surrogate U+DCFF at position 3" in out
        assert f"{where}/'esc\\x1b[2J.txt': the name holds the control character U+001B at position 3" in out
    assert "\x1b" not in out and len(out.splitlines()) == 4, out


def test_record_text_is_shown_escaped(records, tmp_path):
    make(records, title="<img src=x onerror=alert(1)> | [click](http://evil) *x*")
    assert leaderboard_main(["build", "--records", str(records), "--out", str(tmp_path)]) == 0
    board = (tmp_path / "LEADERBOARD.md").read_text()
    assert "&lt;img src=x onerror=alert(1)&gt; \\| \\[click\\](http://evil) \\*x\\*" in board
    assert "<img" not in board


def test_numbers_too_long_for_a_float_are_problems_not_crashes(records):
    """A 400-digit time or loss would overflow a float in the checks' arithmetic (OverflowError, for every record):
    step lines take at most 15 digits, JSON integers at most 19 (a seed's), upstream logs' lines as ours."""
    folder = make(records)
    lineno, line = step_line(folder / "runs/f0.txt", "step:20/20 val_loss:")
    edit(folder / "runs/f0.txt", line, re.sub(r"train_time:\d+", "train_time:" + "9" * 16, line))
    for path in (folder / "runs/f1.txt", folder / "runs/f1.json"):
        path.write_text(re.sub(r'("final_val_loss": )[0-9.]+', r"\g<1>" + "9" * 400, path.read_text()))
    assert_one_problem_like(records, f"runs/f0.txt:{lineno}: malformed step line")
    assert_one_problem_like(records, "runs/f1.txt: malformed JSON: integer 999999999999… has more than 19 digits")
    lines = upstream_log().split("\n")
    upstream_lineno = next(i for i, line in enumerate(lines, start=1) if line.startswith("step:20/20 val_loss:"))
    lines[upstream_lineno - 1] = re.sub(r"train_time:\d+", "train_time:" + "9" * 400, lines[upstream_lineno - 1])
    with pytest.raises(ValueError, match="malformed step line") as error:
        upstream_facts("\n".join(lines), "long.txt")
    assert error.value.lineno == upstream_lineno


def test_rejects_missing_final_step_validation(records):
    folder = make(records)
    edit(folder / "runs/f0.txt", "step:20/20 val_loss:", "step:19/20 val_loss:")
    edit_run_facts(folder / "runs/f0.txt", lambda f: f["val_curve"][-1].update(step=19))
    assert_one_problem_like(records, "runs/f0.txt: missing final-step validation")


def test_rejects_steps_and_train_times_that_do_not_increase(records):
    folder = make(records)
    lineno, _ = step_line(folder / "runs/f0.txt", "step:3/20 train_time:")
    lines = (folder / "runs/f0.txt").read_text().split("\n")
    lines[lineno - 1], lines[lineno] = lines[lineno], lines[lineno - 1]
    (folder / "runs/f0.txt").write_text("\n".join(lines))
    assert_one_problem_like(records, f"runs/f0.txt:{lineno + 1}: training step 3 does not increase")
    folder = make(records, "second", date="2025-01-02", runs=good_runs("s", time_ms=40_000),
                  beats="tiny-cpu/2025-01-01_first")
    _, val_line = step_line(folder / "runs/s0.txt", "step:10/20 val_loss:")
    edit(folder / "runs/s0.txt", val_line, val_line.split(" train_time:")[0] + " train_time:9000ms step_avg:900.00ms")
    assert_one_problem_like(records, "runs/s0.txt:", "train_time 9000ms does not increase")


def test_rejects_a_run_that_finished_in_no_time(records, tmp_path):
    """Without a validation at step 0 nothing stops every time of a log from being 0 ms; such a record passed
    check and then stopped build (the progression plot's log scale) with a traceback."""
    runs = [dict(run_id=f"f{i}", seed=i, final_val_loss=5.10 + 0.001 * i, train_time_ms=0.5, val_every=20)
            for i in range(3)]  # every line's time rounds to 0 ms
    folder = make(records, runs=runs)
    for txt in sorted((folder / "runs").glob("*.txt")):
        edit(txt, f"\n{step_line(txt, 'step:0/20 val_loss:')[1]}", "")
        edit_run_facts(txt, lambda f: f.update(val_curve=f["val_curve"][1:]))
    for i in range(3):
        assert_one_problem_like(records, f"runs/f{i}.txt:", ": the run finished at train_time 0ms: no run trains in "
                                "no time")
    assert len(problems_of(records)) == 3
    assert leaderboard_main(["build", "--records", str(records), "--out", str(tmp_path)]) == 1


def test_rejects_a_step_avg_that_is_not_time_over_step(records):
    folder = make(records)
    lineno, line = step_line(folder / "runs/f0.txt", "step:8/20 train_time:")
    edit(folder / "runs/f0.txt", line, line.split(" step_avg:")[0] + " step_avg:1.00ms")
    assert_one_problem_like(records, f"runs/f0.txt:{lineno}: step_avg 1.0ms is not train_time")


def test_rejects_a_record_dated_in_the_future(records):
    tomorrow = (datetime.datetime.now(datetime.timezone.utc).date() + datetime.timedelta(days=2)).isoformat()
    make(records, date=tomorrow)
    assert_one_problem_like(records, f"record.json: date {tomorrow} is in the future")


def test_rejects_a_record_dated_before_its_runs(records):
    """Backdating a record would win rank ties (the earlier date first) and move it up its track's progression:
    a record is dated on or after the day its last run ended, by the UTC times the trainer logs."""
    late = good_runs("f", ended_at="2025-01-03T09:30:00+00:00")
    make(records, runs=late + good_runs("g", n=1, seed_offset=3, loss=5.12))  # (g0 ends on the record's day)
    problem = assert_one_problem_like(records, "2025-01-01_first: dated 2025-01-01, but its run f", "ended "
                                      "2025-01-03T09:3", "(a record is dated on or after the day its runs ended)")
    assert len(problems_of(records)) == 1, problem
    shutil.rmtree(records / "tiny-cpu")
    make(records, date="2025-01-03", runs=good_runs("f", ended_at="2025-01-03T23:59:59+00:00"))
    assert problems_of(records) == []
    killed = dict(run_id="k", seed=9, final_val_loss=5.2, outcome="running", ended_at="2025-01-04T00:02:00+00:00")
    write_synthetic_run(records / "tiny-cpu/2025-01-03_first/runs", **killed)  # no end: its start, the 4th, dates it
    assert_one_problem_like(records, "_first: dated 2025-01-03, but its run k started (killed) 2025-01-04T00:00:")


@pytest.mark.parametrize("change, fragment", [
    (lambda f: f.pop("started_at"), "missing field 'started_at'"),
    (lambda f: f.pop("finished_at"), "missing field 'finished_at'"),
    (lambda f: f.update(started_at="2025-01-01 12:00"), "started_at '2025-01-01 12:00' is not a UTC time like "),
    (lambda f: f.update(finished_at="2025-02-30T12:00:00+00:00"), "finished_at '2025-02-30T12:00:00+00:00' is not"),
    (lambda f: f.update(finished_at="2025-01-01T01:00:00+02:00"), "finished_at '2025-01-01T01:00:00+02:00' is not"),
    (lambda f: f.update(finished_at=None), "status success with finished_at None (the writer stamps the end"),
    (lambda f: f.update(started_at="2025-01-01T12:00:00+00:00", finished_at="2025-01-01T11:59:59+00:00"),
     "finished_at 2025-01-01T11:59:59+00:00 is before started_at 2025-01-01T12:00:00+00:00"),
])
def test_rejects_run_times_that_are_missing_or_malformed(records, change, fragment):
    """Without its times a run could not be dated: the writer stamps both (finished_at null: a killed run)."""
    folder = make(records)
    edit_run_facts(folder / "runs/f1.txt", change)
    assert_one_problem_like(records, "runs/f1.json: ", fragment)


def test_rejects_paths_that_escape_or_break_the_layout(records, tmp_path):
    folder = make(records)
    edit_json(folder / "record.json", lambda m: m.update(beats="../../etc/passwd"))
    assert_one_problem_like(records, "beats '../../etc/passwd' is not a record path")
    (records / "tiny-cpu/2025-01-01_Not A Slug").mkdir()
    assert_one_problem_like(records, "records/tiny-cpu/2025-01-01_Not A Slug: a record folder is named")
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("secret")
    (folder / "runs/link.txt").symlink_to(outside)
    assert_one_problem_like(records, "runs/link.txt: is a symbolic link")
    assert leaderboard_main(["check", "--records", str(records), str(tmp_path)]) == 1


def test_rejects_a_code_snapshot_path_that_escapes_the_repository(records):
    make(records, runs=good_runs("f", code={"../outside.py": "print('hi')\n", "speedrun/model.py": "x = 1\n"}))
    assert_one_problem_like(records, "runs/f0.txt:", "code path '../outside.py' escapes the repository")


def test_rejects_a_code_snapshot_path_with_a_control_character(records):
    make(records, runs=good_runs("f", code={"speedrun/\x1b[2Jmodel.py": "x = 1\n"}))
    problem = assert_one_problem_like(records, "runs/f0.txt:3: the code path 'speedrun/\\x1b[2Jmodel.py' holds the "
                                               "control character U+001B at position 9")
    assert "\x1b" not in "".join(problems_of(records)), problem


def test_check_reports_a_path_outside_the_records_folder(records, tmp_path, capsys):
    make(records)
    assert leaderboard_main(["check", "--records", str(records), str(tmp_path)]) == 1
    assert "outside the records folder" in capsys.readouterr().out


def test_rejects_an_ml_record_that_fails_the_significance_test(records):
    make(records, runs=good_runs("f", loss=TARGET - 0.002) + [dict(run_id="f9", seed=9, final_val_loss=TARGET + 0.01)])
    assert_one_problem_like(records, "fails the significance test", "p < 0.01")


def test_rejects_an_ml_record_with_fewer_than_three_finished_runs(records):
    make(records, runs=good_runs("f", n=2))
    assert_one_problem_like(records, "an ml record needs at least 3 finished runs", "it has 2")


def test_rejects_an_ml_record_whose_runs_share_a_seed(records):
    """Three runs of one seed (the preset's, when --seed is not given) are one sample: on deterministic hardware
    the same losses three times, which the loss test would read as no spread at all (p = 0)."""
    runs = [dict(run_id=f"s{i}", seed=0, final_val_loss=TARGET - 0.05, train_time_ms=60_000.0 + 1_000 * i)
            for i in range(3)] + [dict(run_id="s3", seed=4, final_val_loss=TARGET - 0.04)]
    make(records, runs=runs)
    problem = assert_one_problem_like(records, "the loss test needs independent runs", "seed 0: s0, s1, s2",
                                      "give each run its own --seed")
    assert "seed 4" not in problem and len(problems_of(records)) == 1
    systems = records.parent / "systems-records"
    make(systems, runs=runs, kind="systems")  # the same runs as a systems record: a time needs no seeds
    make(systems, "tested", runs=good_runs("t"))  # (the loss test of its math)
    assert problems_of(systems) == []


def test_rejects_an_ml_record_whose_runs_are_one_sample_under_several_seeds(records):
    """Code that ignores --seed makes every run the same (bit for bit where training is deterministic): three
    seeds then give the loss test one sample three times, and no spread (p = 0). Independent runs never log the
    same training loss at every step."""
    runs = [dict(run_id=f"s{i}", seed=i, final_val_loss=TARGET - 0.05, train_time_ms=60_000.0 + 1_000 * i)
            for i in range(3)] + [dict(run_id="s3", seed=3, final_val_loss=TARGET - 0.04)]
    make(records, runs=runs)
    problem = assert_one_problem_like(records, "the loss test needs independent runs, but finished runs logged the "
                                      "same training loss at every step (s0, s1, s2): their seeds made no difference")
    assert len(problems_of(records)) == 1, problem


def test_systems_records_are_exempt_from_the_test_but_must_reach_the_target(records):
    make(records, "tested", runs=good_runs("t", loss=5.09))  # the math's loss test (an ml record), see the test below
    make(records, runs=good_runs("f", n=1), kind="systems")
    assert problems_of(records) == []
    make(records, "slow", date="2025-01-02", runs=good_runs("s", n=1, loss=TARGET + 0.05), kind="systems",
         beats="tiny-cpu/2025-01-01_first")
    assert_one_problem_like(records, "_slow: mean final val loss", "is above the target")


def test_a_systems_record_needs_an_ml_record_of_its_math(records):
    """A systems record is exempt from the loss test because its math passed it. A track's first record, or a
    chain of systems records from it, that is "systems" would have no loss test behind it at all: one lucky run
    below the target would do. Its math must be that of an ml record of its track that passes the test."""
    make(records, runs=good_runs("f"), kind="systems")
    make(records, "faster", date="2025-01-02", runs=good_runs("s", time_ms=40_000), kind="systems",
         beats="tiny-cpu/2025-01-01_first")
    for slug in ("first", "faster"):
        assert_one_problem_like(records, f"_{slug}: a systems record is exempt from the loss test only where its "
                                         "math passed it, but no valid ml record of tiny-cpu has its config (apart "
                                         "from the systems knobs): submit it as an ml record")
    assert len(problems_of(records)) == 2
    make(records, "other-math", runs=good_runs("o", num_steps=15))  # an ml record of other math
    assert len(problems_of(records)) == 2
    make(records, "failing", runs=good_runs("x", loss=TARGET + 0.01, seed_offset=3))  # its math, but failing
    assert len(problems_of(records)) == 3
    make(records, "tested", runs=good_runs("t", val_every=4, seed_offset=6))  # its math, run otherwise: passes
    assert [p for p in problems_of(records) if "_failing: fails the significance test" not in p] == []


def test_a_systems_record_keeps_the_math_of_the_record_it_beats(records):
    """Fewer steps is faster but not the same computation: such a record takes the loss test (kind ml). Running
    the same math differently (here: validating less often, other seeds) is a systems change."""
    make(records, runs=good_runs("f", num_steps=20))
    make(records, "fewer", date="2025-01-02", runs=good_runs("s", time_ms=40_000, num_steps=15), kind="systems",
         beats="tiny-cpu/2025-01-01_first")
    problem = assert_one_problem_like(records, "_fewer/record.json: a systems record keeps the math of the record "
                                               "it beats", "differs from tiny-cpu/2025-01-01_first's in "
                                               "train.num_steps (submit it as an ml record")
    assert "seed" not in problem and len(problems_of(records)) == 2  # and no ml record has its math (see above)
    shutil.rmtree(records / "tiny-cpu/2025-01-02_fewer")
    make(records, "knobs", date="2025-01-02", runs=good_runs("k", time_ms=40_000, val_every=4, seed_offset=7),
         kind="systems", beats="tiny-cpu/2025-01-01_first")
    assert problems_of(records) == []


def test_rejects_a_claimed_time_the_logs_do_not_support(records):
    make(records)
    make(records, "slower", date="2025-01-02", runs=good_runs("s", time_ms=70_000), beats="tiny-cpu/2025-01-01_first")
    assert_one_problem_like(records, "_slower: claims to beat tiny-cpu/2025-01-01_first but its runs do not support it")


def test_rejects_beats_claims_that_name_no_earlier_record(records):
    make(records)
    make(records, "orphan", date="2025-01-03", runs=good_runs("o", time_ms=40_000))
    make(records, "ghost", date="2025-01-04", runs=good_runs("g", time_ms=30_000), beats="tiny-cpu/2024-12-31_none")
    assert_one_problem_like(records, "_orphan/record.json: beats is null, but tiny-cpu has earlier records")
    assert_one_problem_like(records, "_ghost/record.json: beats 'tiny-cpu/2024-12-31_none', which is not a record")


def test_rejects_text_and_json_that_disagree(records):
    folder = make(records)
    edit_run_facts(folder / "runs/f0.txt", lambda f: f.update(final_val_loss=4.0))
    edit_run_facts(folder / "runs/f1.txt", lambda f: f.update(train_time_ms=1000.0))
    edit_json(folder / "runs/f2.json", lambda f: f["env"].update(torch="9.9.9"))  # the JSON alone
    second = make(records, "second", date="2025-01-02", runs=good_runs("s", time_ms=40_000),
                  beats="tiny-cpu/2025-01-01_first")
    edit_run_facts(second / "runs/s0.txt", lambda f: f["env"].update(torch="9.9.9"))  # the summary too
    assert_one_problem_like(records, "runs/f0.json: final_val_loss 4.0 is not the text log's last-step val_loss")
    assert_one_problem_like(records, "runs/f1.json: train_time_ms 1000.0 is not the text log's last-step train_time")
    assert_one_problem_like(records, "runs/f2.json: differs from the text log's summary section in env")
    assert_one_problem_like(records, "runs/s0.json: env differs from the text log's environment section")


def test_rejects_a_status_the_losses_do_not_support(records):
    folder = make(records)
    edit_run_facts(folder / "runs/f0.txt", lambda f: f.update(status="not_converged"))
    assert_one_problem_like(records, "runs/f0.json: status not_converged, but final_val_loss")


def test_rejects_runs_on_the_wrong_data(records):
    folder = make(records)
    edit_run_facts(folder / "runs/f0.txt", lambda f: f["data"].update(kind="tokenize"))
    assert_one_problem_like(records, "runs/f0.json: data kind 'tokenize'; track tiny-cpu runs on synth")


def test_rejects_a_record_json_whose_track_or_date_contradicts_its_folder(records):
    folder = make(records)
    edit_json(folder / "record.json", lambda m: m.update(track="8xH100-3.28", date="2025-01-05"))
    assert_one_problem_like(records, "record.json: track '8xH100-3.28' but the record is in records/tiny-cpu/")
    assert_one_problem_like(records, "record.json: date 2025-01-05 differs from the folder's 2025-01-01")


def test_warns_about_leftover_temp_folders_without_failing(records):
    make(records)
    (records / "tiny-cpu/.submit-2025-01-02_x-0a0b").mkdir()
    result = check_tree(records)
    assert result.problems == [] and "leftover temp folder" in result.warnings[0]


# ---------------------------------------------------------------------------------------------
# build and show
# ---------------------------------------------------------------------------------------------


def test_build_writes_the_leaderboard_deterministically(records, tmp_path, capsys):
    make(records)
    make(records, "faster", date="2025-02-01", runs=good_runs("s", time_ms=45_000), kind="systems",
         beats="tiny-cpu/2025-01-01_first")
    out = tmp_path / "site"
    out.mkdir()
    assert leaderboard_main(["build", "--records", str(records), "--out", str(out)]) == 0
    paths = [out / "LEADERBOARD.md", records / "progression-tiny-cpu.svg", records / "runs.csv", records / "index.html"]
    first = [p.read_bytes() for p in paths]
    assert leaderboard_main(["build", "--records", str(records), "--out", str(out)]) == 0
    assert [p.read_bytes() for p in paths] == first  # byte-identical
    assert problems_of(records) == []  # the generated files are allowed in records/

    board = (out / "LEADERBOARD.md").read_text()
    result = check_tree(records)
    first_record = next(r for r in result.records if r.path.endswith("_first"))
    mean_s = f"{first_record.stats.mean_time_ms / 1000:.2f}"
    assert f"| 2 | {mean_s} ± " in board  # the slower record ranks second, its time from its logs
    assert "| 1 | 45.05 ± " in board and "exempt (systems)" in board
    assert "## 8xH100-3.28" in board and "No records yet" in board
    assert "[2025-01-01_first](../records/tiny-cpu/2025-01-01_first)" in board
    faster_record = next(r for r in result.records if r.path.endswith("_faster"))
    gain = 100 * (1 - faster_record.stats.mean_time_ms / first_record.stats.mean_time_ms)
    ratio, (low, high) = ratio_ci95(first_record.stats.times_ms, faster_record.stats.times_ms)
    assert f"| 2025-02-01 | 45.05 | {gain:.1f}% faster (95% CI {100 * (1 - high):.1f}–{100 * (1 - low):.1f}%) |" \
        in board
    csv_lines = (records / "runs.csv").read_text().splitlines()
    assert csv_lines[0].startswith("track,record,run_id,status,counted")
    assert len(csv_lines) == 1 + 6
    svg = (records / "progression-tiny-cpu.svg").read_text()
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"') and svg.count("<circle") == 2  # two records
    assert "![tiny-cpu: the time of each record, in record order](../records/progression-tiny-cpu.svg)" in board


def test_build_refuses_and_writes_nothing_when_check_fails(records, tmp_path):
    make(records, runs=good_runs("f", n=2))
    assert leaderboard_main(["build", "--records", str(records), "--out", str(tmp_path)]) == 1
    assert not (tmp_path / "LEADERBOARD.md").exists() and not (records / "runs.csv").exists()


def test_build_of_an_empty_tree_invents_nothing(records, tmp_path):
    records.mkdir()
    assert leaderboard_main(["build", "--records", str(records), "--out", str(tmp_path)]) == 0
    board = (tmp_path / "LEADERBOARD.md").read_text()
    assert board.count("No records yet") == len(TRACKS) and "| 1 |" not in board


def test_show_prints_the_table(records, capsys):
    make(records)
    assert leaderboard_main(["show", "--records", str(records), "--track", "tiny-cpu"]) == 0
    out = capsys.readouterr().out
    assert "tiny-cpu/2025-01-01_first" in out and "8xH100" not in out


def test_show_leaves_out_every_record_with_a_problem(records, capsys):
    """show says "records with problems are left out of the table above": those of problems found across
    records too (a beats claim its runs do not support, run ids used twice), which it listed all the same."""
    make(records)
    make(records, "claim", date="2025-01-02", runs=good_runs("c", time_ms=59_990.0, loss=5.12),
         beats="tiny-cpu/2025-01-01_first")
    make(records, "copy", date="2025-01-02", runs=good_runs("f", time_ms=50_000.0, loss=5.13, seed_offset=3),
         beats="tiny-cpu/2025-01-01_first")  # faster, but its run ids are the first record's
    assert leaderboard_main(["show", "--records", str(records)]) == 1
    out, err = capsys.readouterr()
    table = out[:out.index("\nrecords/")]  # (the problems follow the table)
    assert "_claim: claims to beat tiny-cpu/2025-01-01_first but its runs do not support it" in out
    assert "_copy/runs/f0.txt: duplicate run id" in out
    assert "tiny-cpu/2025-01-01_first" in table and "_claim" not in table and "_copy" not in table
    assert "records with problems are left out of the table above" in err


# ---------------------------------------------------------------------------------------------
# submit
# ---------------------------------------------------------------------------------------------


def write_logs(folder: Path, runs: list[dict]) -> list[Path]:
    return [write_synthetic_run(folder, **spec)[0] for spec in runs]


def submit_args(records, logs, *extra):
    return ["submit", *map(str, logs), "--records", str(records), "--track", "tiny-cpu", "--title", "Tiny baseline",
            "--author", "Ada", "--description", "The tiny preset as it is.", "--date", "2025-03-01", *extra]


def test_submit_creates_a_checked_record(records, tmp_path):
    logs = write_logs(tmp_path / "logs", good_runs("r"))
    write_up = tmp_path / "notes.md"
    write_up.write_text("# Tiny baseline\n\nWhy it works.\n")
    assert leaderboard_main(submit_args(records, logs, "--readme", str(write_up))) == 0
    folder = records / "tiny-cpu/2025-03-01_tiny-baseline"
    expected = [f"r{i}{suffix}" for i in range(3) for suffix in (".json", ".txt")]
    assert sorted(p.name for p in (folder / "runs").iterdir()) == expected
    meta = json.loads((folder / "record.json").read_text())
    assert meta == {"schema_version": 1, "title": "Tiny baseline", "authors": ["Ada"], "date": "2025-03-01",
                    "track": "tiny-cpu", "beats": None, "kind": "ml", "description": "The tiny preset as it is."}
    assert (folder / "runs/r0.txt").read_bytes() == logs[0].read_bytes()
    assert (folder / "README.md").read_text() == write_up.read_text()
    assert problems_of(records) == []
    assert [p.name for p in (records / "tiny-cpu").iterdir()] == [folder.name]  # no temp folder left


def test_submit_refuses_a_failing_record_and_leaves_nothing(records, tmp_path, capsys):
    logs = write_logs(tmp_path / "logs", good_runs("r", n=2))
    assert leaderboard_main(submit_args(records, logs)) == 1
    assert "an ml record needs at least 3 finished runs" in capsys.readouterr().out
    assert not records.exists()  # not even the folders it would have created


def test_submit_interrupted_leaves_nothing(records, tmp_path, monkeypatch):
    import speedrun.records.submit as submit_module

    make(records, runs=good_runs("f"))
    logs = write_logs(tmp_path / "logs", good_runs("r", time_ms=30_000))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(submit_module, "check_tree", interrupted)
    assert leaderboard_main(submit_args(records, logs, "--beats", "tiny-cpu/2025-01-01_first")) == 130
    assert sorted(p.name for p in (records / "tiny-cpu").iterdir()) == ["2025-01-01_first"]


def test_submit_rejects_bad_requests_clearly(records, tmp_path, capsys):
    logs = write_logs(tmp_path / "logs", good_runs("r"))
    future = (datetime.datetime.now(datetime.timezone.utc).date() + datetime.timedelta(days=3)).isoformat()
    args = submit_args(records, [*logs, tmp_path / "missing.txt"], "--beats", "nowhere", "--date", future)
    assert leaderboard_main(args) == 1
    out = capsys.readouterr().out
    assert f"--date {future}: in the future" in out
    assert "--beats 'nowhere': not a record path" in out
    assert "missing.txt: missing" in out
    assert not records.exists()
    assert leaderboard_main(submit_args(records, logs)) == 0
    readme = (records / "tiny-cpu/2025-03-01_tiny-baseline/README.md").read_text()
    assert readme.startswith("# Tiny baseline\n\nAda · 2025-03-01 · track `tiny-cpu` · ml change")
    assert leaderboard_main(submit_args(records, logs)) == 1  # the same folder again
    assert "already exists" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# compare and import-upstream
# ---------------------------------------------------------------------------------------------


def upstream_log(final_loss=3.2792, num_steps=20, gpus=8) -> str:
    gpu_row = "|   {}  NVIDIA H100 80GB HBM3          On  |   00000000:61:00.0 Off |                    0 |\n"
    usage_row = "| N/A   32C    P0            116W /  700W |    7746MiB /  81559MiB |      0%      Default |\n"
    smi_rows = "".join(gpu_row.format(i) + usage_row for i in range(gpus))
    steps, time_ms = [f"step:0/{num_steps} val_loss:10.8258 train_time:0ms step_avg:nanms"], 0
    for step in range(1, num_steps + 1):
        time_ms += 125
        steps.append(f"step:{step}/{num_steps} train_time:{time_ms}ms step_avg:125.00ms")
        if step % 10 == 0:
            loss = final_loss if step == num_steps else 4.0
            steps.append(f"step:{step}/{num_steps} val_loss:{loss:.4f} train_time:{time_ms + 2}ms step_avg:125.10ms")
            time_ms += 2
    return ("import os\nwith open(sys.argv[0]) as f:\n    code = f.read()\n" + "=" * 100 + "\n"
            "Running Python 3.12.7 (main, Jan 17 2025, 03:57:17) [GCC 13.2.0]\n"
            "Running PyTorch 2.7.0.dev20250110+cu126 compiled for CUDA 12.6\nFri Jan 17 05:37:55 2025       \n"
            "+-----------------------------------------------------------------------------------------+\n"
            "|=========================================+========================+======================|\n"
            + smi_rows + "\n" + "=" * 100 + "\n" + "\n".join(steps) + "\npeak memory allocated: 37653 MiB\n")


def test_an_upstream_log_that_finished_in_no_time_is_refused(tmp_path, capsys):
    text = re.sub(r"train_time:\d+ms", "train_time:0ms", upstream_log())
    text = re.sub(r"step:(0|10)/20 val_loss:\S+ train_time:0ms step_avg:\S+\n", "", text)  # (times increase)
    log = tmp_path / "zero.txt"
    log.write_text(text)
    assert leaderboard_main(["compare", str(log), str(log), "--plot", str(tmp_path / "c.svg")]) == 1
    assert "zero.txt:48: the run finished at train_time 0ms: no run trains in no time" in capsys.readouterr().out


def test_import_upstream_reads_public_logs(records, tmp_path, capsys):
    log = tmp_path / "c8cbdf48-220a-443b-b145-8ac6a32d4e07.txt"
    log.write_text(upstream_log())
    assert leaderboard_main(["import-upstream", str(log), "--records", str(records)]) == 0
    assert "final val_loss 3.2792 at 2.504 s, 8x NVIDIA H100 80GB HBM3" in capsys.readouterr().out
    imported = records / "upstream" / log.name
    assert imported.read_bytes() == log.read_bytes() and sorted(os.listdir(records / "upstream")) == [log.name]
    (upstream,) = check_tree(records).upstream  # the log is the one truth: every reader derives the run again
    facts = upstream.facts
    assert facts["status"] == "success" and facts["track"] == "8xH100-3.28"
    assert upstream.final_val_loss == 3.2792 and upstream.train_time_ms == 2504.0
    assert facts["env"]["gpu_count"] == 8 and facts["env"]["torch"] == "2.7.0.dev20250110+cu126"
    assert problems_of(records) == []
    lineno, line = step_line(imported, "step:20/20 val_loss")
    edit(imported, line, line.replace("train_time:", "train_time:x"))
    assert_one_problem_like(records, f"records/upstream/c8cbdf48-220a-443b-b145-8ac6a32d4e07.txt:{lineno}: "
                                     "malformed step line")
    (records / "upstream" / "notes.json").write_text("{}")
    assert_one_problem_like(records, "records/upstream/notes.json: unexpected entry")


def test_import_upstream_rejects_malformed_logs_with_the_line(tmp_path, capsys):
    text = upstream_log()
    bad = tmp_path / "bad.txt"
    bad.write_text(text.replace("step:7/20 train_time:875ms", "step:7/20 train_time:87x5ms"))
    lineno = text.split("\n").index("step:7/20 train_time:875ms step_avg:125.00ms") + 1
    no_separator = tmp_path / "nosep.txt"
    no_separator.write_text(text.replace("=" * 100 + "\n", ""))
    out_dir = tmp_path / "out"
    assert leaderboard_main(["import-upstream", str(bad), str(no_separator), "--out", str(out_dir)]) == 1
    out = capsys.readouterr().out
    assert f"bad.txt:{lineno}: malformed step line" in out
    assert "nosep.txt:" in out and "no line of '=' characters" in out
    assert not out_dir.exists()
    with pytest.raises(ValueError, match="validation step 10 does not increase"):
        upstream_facts(text.replace("step:20/20 val_loss", "step:10/20 val_loss"), "x.txt")


def test_an_upstream_header_reaches_the_leaderboard_clean(records, tmp_path, capsys):
    """The versions and GPU names a log's header gives are shown: control characters (a terminal's escape
    sequences) refuse the log, naming the line; table syntax and HTML in them are shown as text."""
    text = upstream_log()
    torch_line = "Running PyTorch 2.7.0.dev20250110+cu126 compiled for CUDA 12.6"
    escape = tmp_path / "escape.txt"
    escape.write_text(text.replace("NVIDIA H100 80GB HBM3", "NVIDIA H100 \x1b[2J80GB", 1))
    lineno = next(i for i, line in enumerate(text.split("\n"), start=1) if "NVIDIA H100 80GB HBM3" in line)
    assert leaderboard_main(["import-upstream", str(escape), "--records", str(records)]) == 1
    assert f"escape.txt:{lineno}: the version and GPU header holds the control character U+001B" in (
        capsys.readouterr().out)
    html_like = tmp_path / "html.txt"
    html_like.write_text(text.replace(torch_line, "Running PyTorch 2.7|<img/src=x>"))
    assert leaderboard_main(["import-upstream", str(html_like), "--records", str(records)]) == 0
    assert leaderboard_main(["build", "--records", str(records), "--out", str(tmp_path)]) == 0
    (row,) = [line for line in (tmp_path / "LEADERBOARD.md").read_text().splitlines() if "html.txt" in line]
    assert row.endswith("| 2.7\\|&lt;img/src=x&gt; |"), row


def test_compare_two_records_and_an_upstream_log(records, tmp_path, capsys):
    make(records)
    make(records, "faster", date="2025-02-01", runs=good_runs("s", time_ms=45_000), beats="tiny-cpu/2025-01-01_first")
    plot = tmp_path / "cmp.svg"
    assert leaderboard_main(["compare", "tiny-cpu/2025-01-01_first", str(records / "tiny-cpu/2025-02-01_faster"),
                             "--records", str(records), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    a = [60_000 + 50 * i for i in range(3)]
    assert "time B - A: -15.0" in out and "Welch t-test on time (two-sided): p = " in out
    assert plot.read_text().startswith("<svg") and plot.read_text().count("<polyline") == 2 * 6
    log = tmp_path / "up.txt"
    log.write_text(upstream_log())
    run = records / "tiny-cpu/2025-01-01_first/runs/f0.txt"
    assert leaderboard_main(["compare", str(run), str(log), "--records", str(records), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "needs at least 2 finished runs on each side" in out and "gpu_count: 0 vs 8" in out
    assert a  # the record side's times are the synthetic runs' (checked in the valid-records test)


def test_compare_refuses_a_broken_side(records, tmp_path, capsys):
    folder = make(records)
    edit(folder / "runs/f0.txt", "    n_layer = 4\n", "    n_layer = 5\n")
    assert leaderboard_main(["compare", str(folder / "runs/f0.txt"), str(folder / "runs/f1.txt"),
                             "--plot", str(tmp_path / "x.svg")]) == 1
    assert "does not match its sha256" in capsys.readouterr().out


def test_a_time_interval_reaching_below_zero_is_shown_from_zero(records, tmp_path):
    runs = [dict(run_id="w0", seed=0, final_val_loss=5.1, train_time_ms=10_000.0),
            dict(run_id="w1", seed=1, final_val_loss=5.1, train_time_ms=200_000.0)]
    make(records, "spread", runs=runs, kind="systems")
    make(records, "tested", runs=good_runs("t"))  # the loss test of its math
    low, high = check_tree(records).records[0].stats.time_ci95_ms
    assert low < 0  # two runs far apart: the t-interval of the mean reaches below 0
    assert leaderboard_main(["build", "--records", str(records), "--out", str(tmp_path)]) == 0
    board = (tmp_path / "LEADERBOARD.md").read_text()
    assert f"| 0.00 – {high / 1000:.2f} |" in board and "-" + f"{abs(low) / 1000:.2f}" not in board


def test_import_upstream_reads_lowercase_versions_and_a_line_of_equals_in_the_code():
    text = upstream_log().replace("Running PyTorch 2.7.0.dev20250110+cu126 compiled for CUDA 12.6",
                                  "Running pytorch 2.6.0.dev20241203+cu124")
    text = text.replace("import os\n", "import os\n" + "=" * 80 + "\n# a banner in the script\n", 1)
    facts = upstream_facts(text, "x.txt")
    env = facts["env"]
    assert env["torch"] == "2.6.0.dev20241203+cu124" and env["cuda"] == "12.4"
    code = text.split("=" * 100 + "\n")[0]  # the script, its own line of '=' included
    assert code.startswith("import os\n" + "=" * 80 + "\n# a banner") and code.endswith("code = f.read()\n")
    assert facts["code"]["files"]["train_gpt.py"] == hashlib.sha256(code.encode()).hexdigest()
    assert env["python"] == "3.12.7" and env["gpu_count"] == 8


def test_the_public_record_history_is_shown_for_reference_not_ranked(records, tmp_path):
    """records/upstream/history.csv: the public modded-nanogpt records (as its README gives them), shown on the
    8xH100 track for reference; checked row by row like everything else under records/."""
    shutil.copytree(REPO_ROOT / "records/upstream", records / "upstream")
    make(records)
    assert problems_of(records) == []
    assert leaderboard_main(["build", "--records", str(records), "--out", str(tmp_path)]) == 0
    board = (tmp_path / "LEADERBOARD.md").read_text()
    h100 = board.split("## 8xH100-3.28")[1].split("## tiny-cpu")[0]
    assert "not ours, not ranked" in h100 and "No records yet" in h100  # reference rows are not records
    assert "| 89 | 2026-07-17 | 73.8 | MLP down projection in FP8" in h100  # 1.23 minutes, in seconds
    assert "| 20 | 2025-01-16 | 179.5 | Merged QKV weights" in h100
    assert "public #" in (records / "index.html").read_text()
    history = records / "upstream/history.csv"
    lines = history.read_text().splitlines()
    lines[2] = lines[2].replace("2024-06-06", "2024-13-06")  # file line 3
    lines[4] = lines[4].replace(",22.3,", ",-1,")
    lines[6] = lines[6].replace("Distributed", "Dis\x1b[2Jtributed")
    history.write_text("\n".join(lines) + "\n")
    for fragment in ("history.csv:3: not number,YYYY-MM-DD date", "history.csv:5: record numbers increase and times "
                     "are positive", "history.csv:7: holds the control character U+001B"):
        assert_one_problem_like(records, fragment)


def test_the_target_and_val_data_are_the_tracks_not_the_logs(records):
    """A data folder's manifest is anyone's to edit: a log whose data floor (and so target) was raised, or
    that validated on other data, is rejected; the track (speedrun/tracks.py) says what both must be."""
    folder = make(records)

    def raise_the_floor(facts):
        facts["data"]["val_optimal_loss"], facts["target_val_loss"] = 9.0, 9.15

    edit_run_facts(folder / "runs/f0.txt", raise_the_floor)
    assert_one_problem_like(records, "runs/f0.json: target_val_loss 9.15 is not track tiny-cpu's 5.2119")
    edit_run_facts(folder / "runs/f1.txt", lambda f: f["data"].update(val_shard_sha256="6" * 64))
    assert_one_problem_like(records, "runs/f1.json: validated on val data with sha256 666666666666…, not track "
                                     "tiny-cpu's (555555555555…)")


def test_beating_a_record_takes_a_significant_speed_up_on_three_runs_each(records):
    """The same code re-run is not a record: faster on average because of one slow run of the baseline is
    not enough (one-sided Welch t-test, p < 0.05), nor is a comparison with fewer than 3 runs a side."""
    make(records, runs=[dict(run_id=f"f{i}", seed=i, final_val_loss=5.10 + 0.001 * i, train_time_ms=t)
                        for i, t in enumerate([113_000, 636_000, 110_000])])  # one noisy run
    make(records, "again", date="2025-02-01", runs=good_runs("a", time_ms=108_000), beats="tiny-cpu/2025-01-01_first")
    problem = assert_one_problem_like(records, "_again: claims to beat tiny-cpu/2025-01-01_first but its runs do "
                                               "not support it", "one-sided Welch t-test p = ")
    p = scipy.stats.ttest_ind([108_000, 108_050, 108_100], [113_000, 636_000, 110_000], equal_var=False,
                              alternative="less").pvalue
    assert f"p = {p:.3g}" in problem and p > 0.05
    make(records, "two", date="2025-03-01", runs=good_runs("t", n=2, time_ms=50_000), kind="systems",
         beats="tiny-cpu/2025-01-01_first")
    assert_one_problem_like(records, "_two: claims to beat", "at least 3 finished runs of each record; they have "
                                                             "2 and 3")


class PageStructure(html.parser.HTMLParser):
    """What the checks below need of records/index.html: tables, rows, plot elements, every URL."""

    def __init__(self):
        super().__init__()
        self.tables, self.rows, self.polylines, self.targets, self.urls, self.scripts = 0, 0, 0, 0, [], []
        self.in_body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tables += tag == "table" and "sortable" in (attrs.get("class") or "")
        self.in_body = self.in_body or tag == "tbody"
        self.rows += tag == "tr" and self.in_body
        self.polylines += tag == "polyline"
        self.targets += tag == "line" and attrs.get("class") == "target"
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "script":
            self.scripts.append(attrs)

    def handle_endtag(self, tag):
        self.in_body = self.in_body and tag != "tbody"


def test_build_writes_a_self_contained_page(records, tmp_path):
    make(records)
    make(records, "faster", date="2025-02-01", runs=good_runs("s", time_ms=45_000), kind="systems",
         beats="tiny-cpu/2025-01-01_first", title="<b>bold</b> & co")
    assert leaderboard_main(["build", "--records", str(records), "--out", str(tmp_path)]) == 0
    text = (records / "index.html").read_text()
    structure = PageStructure()
    structure.feed(text)
    assert structure.tables == 1 and structure.rows == 2  # tiny-cpu's table; the empty track has none
    # per record: a curve per run and the target; the progression: the records' points and its step line
    assert structure.polylines == 3 + 3 + 1 and structure.targets == 2 and text.count("<circle") == 2
    assert structure.urls == ["./tiny-cpu/2025-02-01_faster", "./tiny-cpu/2025-01-01_first"]  # fastest first
    assert structure.scripts == [{}]  # inline only: no network
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in text and "<b>bold" not in text
    assert 'data-value="45050.000"' in text  # the sort key of the time column: milliseconds, from the logs


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium binary on PATH to render the page")
def test_the_page_sorts_and_draws_in_a_browser(records, tmp_path):
    make(records)
    make(records, "faster", date="2025-02-01", runs=good_runs("s", time_ms=45_000), kind="systems",
         beats="tiny-cpu/2025-01-01_first")
    assert leaderboard_main(["build", "--records", str(records), "--out", str(tmp_path)]) == 0
    page = (records / "index.html").read_text()
    clicks = "<script>const th = document.querySelectorAll('th')[1]; th.click(); th.click();</script></body>"
    (tmp_path / "page.html").write_text(page.replace("</body>", clicks))  # time: ascending, then descending
    # no network here: nothing in the background tries to reach one; a fresh profile each time
    out = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (tmp_path / "page.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert 'aria-sort="descending"' in dom
    assert dom.index("2025-01-01_first</a>") < dom.index("2025-02-01_faster</a>")  # slower first now
    assert dom.count("<polyline") == 7
