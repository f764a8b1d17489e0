"""`check` and `build` on damaged records: whatever a record's files hold, every problem is reported and nothing
crashes (a crash stops the check of every record). Seeded mutations of a small synthetic tree: every field of
record.json given each wrong kind of value, and random changes to run facts, to a run's environment and config
(in the text log's section and the summary alike, so that they reach the checks past the copies' agreement) and
to the lines of text logs. (The first test found that "beats": true crashed the check of every record.)"""

import copy
import json
import random
import shutil

import pytest
from synthetic_records import write_synthetic_record

from speedrun.records.board import markdown, runs_csv, terminal_table
from speedrun.records.check import check_tree
from speedrun.records.page import page

WRONG_VALUES = [None, True, -1, 0, 2.5, 1e308, 10**400, "", "x", "\x1b[2J", [], [None], {}, {"a": 1}]
SECTION_TITLES = {"env": "====== environment ======\n", "config": "====== config ======\n"}
SUMMARY_TITLE = "====== summary ======\n"
TRIES = 100  # damaged trees per kind of change


@pytest.fixture
def tree(tmp_path, synthetic_track_data):
    """Two tiny-cpu records, the second (systems) beating the first, and an 8xH100 one (the synthetic logs' val
    data standing in for the tiny-cpu track's)."""
    records = tmp_path / "tree"
    runs = [dict(run_id=f"{p}{i}", seed=i, final_val_loss=5.10 + 0.001 * i, train_time_ms=t + 50 * i)
            for p, t in (("a", 60_000.0), ("b", 40_000.0)) for i in range(3)]
    write_synthetic_record(records, "tiny-cpu", "2025-01-01", "first", runs[:3])
    write_synthetic_record(records, "tiny-cpu", "2025-01-02", "second", runs[3:], beats="tiny-cpu/2025-01-01_first",
                           kind="systems")
    write_synthetic_record(records, "8xH100-3.28", "2025-01-03", "gpu", [
        dict(run_id=f"g{i}", seed=i, final_val_loss=3.27 - 0.001 * i, train_time_ms=180_000.0 + 9 * i)
        for i in range(3)])
    assert check_tree(records).problems == []
    return records


def paths_in(value, at=()):
    """Every path to a value inside nested dicts and lists."""
    yield at
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from paths_in(item, (*at, key))


def replaced(value, at, new, drop: bool):
    """A copy of ``value`` with the item at path ``at`` set to ``new`` (or removed)."""
    if not at:
        return new
    value = copy.deepcopy(value)
    parent = value
    for key in at[:-1]:
        parent = parent[key]
    if drop and isinstance(parent, dict):
        del parent[at[-1]]
    else:
        parent[at[-1]] = new
    return value


def dumps(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


def write_run(txt, head: str, facts: dict) -> None:
    """The text log ``head`` + its summary, and the JSON: the facts in both, as the writer lays them out."""
    txt.write_text(head + SUMMARY_TITLE + dumps(facts) + "\n")
    txt.with_suffix(".json").write_text(dumps(facts) + "\n")


def change_facts(rng, txt):
    """A random fact of a finished run, in its summary and JSON alike."""
    head, summary = txt.read_text().split(SUMMARY_TITLE)
    facts = json.loads(summary)
    facts = replaced(facts, rng.choice(list(paths_in(facts))), rng.choice(WRONG_VALUES), rng.random() < 0.2)
    write_run(txt, head, facts)


def change_section(rng, txt):
    """A random value of the run's environment or config, in the text log's section and the summary alike."""
    head, summary = txt.read_text().split(SUMMARY_TITLE)
    facts, name = json.loads(summary), rng.choice(["env", "config"])
    new = replaced(facts[name], rng.choice(list(paths_in(facts[name]))), rng.choice(WRONG_VALUES + [7, "cuda"]),
                   rng.random() < 0.2)
    head = head.replace(SECTION_TITLES[name] + dumps(facts[name]), SECTION_TITLES[name] + dumps(new), 1)
    facts[name] = new
    write_run(txt, head, facts)


def change_lines(rng, txt):
    """Lines of the text log dropped, repeated or with a character changed (the JSON kept or made the summary)."""
    lines = txt.read_text().split("\n")
    for _ in range(rng.randint(1, 3)):
        i, how = rng.randrange(len(lines)), rng.random()
        if how < 0.3:
            del lines[i]
        elif how < 0.5:
            lines.insert(i, rng.choice(lines))
        elif lines[i]:
            j = rng.randrange(len(lines[i]))
            lines[i] = lines[i][:j] + rng.choice("0123456789-.:/ =\r\x00é{}[]\"naf") + lines[i][j + 1:]
    text = "\n".join(lines)
    txt.write_text(text)
    if SUMMARY_TITLE in text and rng.random() < 0.7:
        txt.with_suffix(".json").write_text(text.split(SUMMARY_TITLE)[-1])


def check_and_build(records):
    """Everything check and build compute from a tree; returns check's problems."""
    result = check_tree(records)
    markdown(result, ".")
    runs_csv(result)
    page(result, ".")
    terminal_table(result)
    return result.problems


@pytest.mark.parametrize("field", ["schema_version", "title", "authors", "date", "track", "beats", "kind",
                                   "description"])
def test_every_wrong_record_json_value_is_a_problem(tree, tmp_path, field):
    """Every value that is no string (every field of this record needs one) is a problem; strings may be valid."""
    for value in [*WRONG_VALUES, "tiny-cpu/2025-01-01_first", "2025-01-02", "systems", "ml"]:
        records = tmp_path / "records"
        shutil.rmtree(records, ignore_errors=True)
        shutil.copytree(tree, records)
        meta_path = records / "tiny-cpu/2025-01-02_second/record.json"
        meta = json.loads(meta_path.read_text())
        if meta[field] == value:
            continue
        meta_path.write_text(json.dumps({**meta, field: value}))
        problems = check_and_build(records)
        assert problems or isinstance(value, str), f"record.json {field}: {value!r} passed check"


@pytest.mark.parametrize("change", [change_facts, change_section, change_lines])
def test_damaged_run_logs_never_crash_check_or_build(tree, tmp_path, change):
    rng, damaged = random.Random(change.__name__), 0
    for _ in range(TRIES):
        records = tmp_path / "records"
        shutil.rmtree(records, ignore_errors=True)
        shutil.copytree(tree, records)
        for _ in range(rng.randint(1, 2)):
            change(rng, rng.choice(sorted(records.glob("*/*/runs/*.txt"))))
        damaged += bool(check_and_build(records))
    assert damaged > TRIES // 2  # (most changes break a record: the mutations reach the checks)
