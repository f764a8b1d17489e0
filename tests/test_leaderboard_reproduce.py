"""`speedrun reproduce`: the record's code snapshot is materialized and run; the report compares.

The fast test uses a record whose code snapshot is a stand-in `speedrun/cli.py` that writes a run log
the way the trainer does (in a second), so the whole path runs: check the record, restore the
snapshot over a copy of the working tree, launch `python -m speedrun.cli train` there with the
logged options, collect the logs, write the report. The slow test runs the real trainer from a real
record's snapshot (10 steps of it).
"""

import dataclasses
import datetime
import json
import shutil
from pathlib import Path

import pytest
from synthetic_records import write_synthetic_record

import speedrun.train as train_mod
from speedrun import REPO_ROOT
from speedrun.cli import build_parser
from speedrun.config import PRESETS, get_preset
from speedrun.errors import UserError
from speedrun.records.check import find_record
from speedrun.records.reproduce import reproduce, seeds_for, train_arguments
from speedrun.tracks import TRACKS

STAND_IN_CLI = '''"""A stand-in for `speedrun train` (reproduce test): writes a run log like the trainer's."""
import argparse
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the checkout's test fixtures
from synthetic_records import write_synthetic_run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["train"])
    for name in ("--preset", "--steps", "--val-every", "--seq-len", "--val-tokens", "--seed", "--kernels", "--device",
                 "--log-dir"):
        parser.add_argument(name, required=True)
    parser.add_argument("--no-compile", action="store_true", required=True)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    from speedrun.config import sub3min_tiny
    cfg = sub3min_tiny()
    expected = ("sub3min-tiny", "cpu", "torch", str(cfg.data.seq_len), str(cfg.data.val_tokens))
    assert (args.preset, args.device, args.kernels, args.seq_len, args.val_tokens) == expected
    seed = int(args.seed)
    write_synthetic_run(Path(args.log_dir), str(uuid.uuid4()), seed=seed, num_steps=int(args.steps),
                        val_every=int(args.val_every), final_val_loss=5.12 + 0.001 * seed,
                        train_time_ms=55_000 + 100 * seed, code={"speedrun/cli.py": Path(__file__).read_text()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def stand_in_record(records: Path) -> Path:
    runs = [dict(run_id=f"r{i}", seed=i, final_val_loss=5.10 + 0.001 * i, train_time_ms=60_000 + 50 * i,
                 code={"speedrun/cli.py": STAND_IN_CLI}) for i in range(3)]
    return write_synthetic_record(records, "tiny-cpu", "2025-01-01", "stand-in", runs)


@pytest.mark.usefixtures("synthetic_track_data")  # the stand-in logs claim the synthetic val data
def test_train_arguments_and_seeds_come_from_the_logs(tmp_path):
    record = find_record(str(stand_in_record(tmp_path / "records")), tmp_path / "records")
    facts = record.runs[0].facts
    args = train_arguments(facts, seed=7, log_dir=tmp_path / "logs")
    data = facts["config"]["data"]
    assert args[:12] == ["--preset", "sub3min-tiny", "--steps", "20", "--val-every", "5",
                         "--seq-len", str(data["seq_len"]), "--val-tokens", str(data["val_tokens"]), "--seed", "7"]
    assert "--no-compile" in args and args[args.index("--device") + 1] == "cpu" and "--data" not in args
    assert "--warmup-steps" not in args  # the preset's (a record's older trainer may not know the option)
    assert seeds_for(record, 2) == [0, 1] and seeds_for(record, 5) == [0, 1, 2, 3, 4]
    changed = {**facts, "config": {**facts["config"], "train": {**facts["config"]["train"], "warmup_steps": 0}}}
    args = train_arguments(changed, seed=7, log_dir=tmp_path / "logs")
    assert args[args.index("--warmup-steps") + 1] == "0"


@pytest.mark.parametrize("preset", PRESETS)
def test_the_trainer_takes_reproduces_arguments_back_to_the_logged_config(preset, tmp_path):
    """For every preset, the command reproduce runs, read by the trainer's own parser, gives the logged config
    back (record #89's presets refuse --seq-len: their stages set the sequence lengths)."""
    cfg = get_preset(preset)
    logged = dataclasses.replace(cfg, train=dataclasses.replace(  # every option reproduce may pass, changed
        cfg.train, num_steps=cfg.train.num_steps // 2, val_every=7, seed=5, kernels="torch", compile=False,
        warmup_steps=cfg.train.warmup_steps + 1), data=dataclasses.replace(
        cfg.data, val_tokens=2 * cfg.data.val_tokens, data_dir="elsewhere/shards",
        **({} if cfg.schedule else {"seq_len": cfg.data.seq_len // 2, "seqs_per_forward": 2})))
    facts = {"config": logged.to_dict(), "env": {"device": "cpu"}}
    args = build_parser().parse_args(["train", *train_arguments(facts, seed=5, log_dir=tmp_path)])
    assert train_mod.resolve_config(args, cuda=False).to_dict() == logged.to_dict()


@pytest.mark.usefixtures("synthetic_track_data")  # the stand-in logs claim the synthetic val data
def test_reproduce_refuses_a_record_that_does_not_check(tmp_path):
    folder = stand_in_record(tmp_path / "records")
    text = (folder / "runs/r0.txt").read_text()
    (folder / "runs/r0.txt").write_text(text.replace("import argparse\n", "import argparse  # edited\n", 1))
    with pytest.raises(UserError, match="the code snapshot of speedrun/cli.py does not match"):
        reproduce(str(folder), runs=1, out=tmp_path / "out", records_dir=tmp_path / "records",
                  data_root=tmp_path / "data", echo=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.usefixtures("synthetic_track_data")  # the stand-in logs claim the synthetic val data
@pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(), reason="needs the git checkout")
def test_reproduce_runs_the_snapshot_and_writes_the_report(tmp_path):
    records = tmp_path / "records"
    folder = stand_in_record(records)
    out = tmp_path / "reproduction"
    result, all_valid = reproduce("tiny-cpu/2025-01-01_stand-in", runs=2, out=out, records_dir=records,
                                  data_root=tmp_path / "data", echo=False)
    assert result == out and all_valid and not out.with_name(out.name + ".partial").exists()
    logs = sorted((out / "runs").glob("*.json"))
    assert len(logs) == 2
    seeds = sorted(json.loads(p.read_text())["seed"] for p in logs)
    assert seeds == [0, 1]
    report = (out / "report.md").read_text()
    assert "a copy of the current working tree (this repository does not have commit 0000" in report
    assert "Every reproduced run's code hash equals the record's" in report
    assert "ratio B / A (geometric means) 0.9" in report  # 55 s vs 60 s
    assert "| reproduction |" in report and "| record | r0 | 0 | success | 60.00 | 5.1000 |" in report
    assert "None: same GPU, counts, versions, config (apart from the seed) and validation data" in report
    assert (out / "report.svg").read_text().startswith("<svg")
    assert (REPO_ROOT / "speedrun/cli.py").read_text() != STAND_IN_CLI  # the repository is untouched
    assert folder.exists()


@pytest.mark.slow
def test_submit_build_show_reproduce_with_the_real_trainer(tmp_path, tiny_track_run, monkeypatch):
    """End to end on tiny-cpu with real training: the shared real run made a record, and the real trainer runs
    from that record's code snapshot. The reproduction trains 10 of the record's 300 steps (the whole run took
    over 3 of the suite's 15 minutes); comparing whole runs is the fast test's, with the stand-in trainer."""
    from speedrun.records import reproduce as reproduce_mod
    from speedrun.records.cli import main as leaderboard_main

    monkeypatch.setattr(reproduce_mod, "train_arguments",
                        lambda *args: [*train_arguments(*args), "--steps", "10"])  # (the last --steps counts)

    data, logs, _ = tiny_track_run
    records, track = tmp_path / "records", TRACKS["tiny-cpu"]
    # One run makes a systems record, which needs the loss test of its math: an ml record of three (stand-in)
    # runs of the real run's config, on the track's data, of the same day (a track's first records)
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    write_synthetic_record(records, "tiny-cpu", today, "tested", [
        dict(run_id=f"t{i}", seed=100 + i, final_val_loss=track.target() - 0.05 + 0.001 * i, num_steps=300,
             val_every=150, data_floor=track.data_floor, val_sha256=track.val_data_sha256,
             ended_at=f"{today}T00:00:00+00:00") for i in range(3)])
    assert leaderboard_main(["submit", *map(str, logs.glob("*.txt")), "--records", str(records), "--track",
                             "tiny-cpu", "--title", "Tiny baseline", "--author", "Test", "--kind", "systems",
                             "--description", "One real run of the tiny preset.", "--date", today]) == 0
    assert leaderboard_main(["build", "--records", str(records), "--out", str(tmp_path)]) == 0
    assert leaderboard_main(["show", "--records", str(records)]) == 0
    (record,) = (records / "tiny-cpu").glob("*_tiny-baseline")
    out, all_valid = reproduce(str(record), runs=1, out=tmp_path / "reproduction", records_dir=records,
                               data_root=data, echo=False)
    report = (out / "report.md").read_text()
    assert all_valid, report
    assert "Every reproduced run's code hash equals the record's" in report
    (new_log,) = (out / "runs").glob("*.json")
    assert json.loads(new_log.read_text())["val_curve"][-1]["step"] == 10


@pytest.mark.usefixtures("synthetic_track_data")  # the stand-in logs claim the synthetic val data
def test_reproduce_says_it_runs_the_logged_code_and_asks_first(tmp_path, capsys, monkeypatch):
    from speedrun.records.cli import main as leaderboard_main

    folder = stand_in_record(tmp_path / "records")
    argv = ["reproduce", str(folder), "--runs", "1", "--out", str(tmp_path / "out"), "--records",
            str(tmp_path / "records")]
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)  # no terminal (CI, a pipe): refused without --yes
    assert leaderboard_main(argv) == 1
    out, err = capsys.readouterr()
    assert "reproduce runs the code logged in records/tiny-cpu/2025-01-01_stand-in's run logs" in out
    assert "with your permissions" in out and "pass --yes to run it" in err
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert leaderboard_main(argv) == 1
    assert "not reproduced (its code was not run)" in capsys.readouterr().out
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_the_cpu_tracks_data_identity_and_a_forged_floor(tiny_track_run, tmp_path):
    """speedrun/tracks.py's tiny-cpu data floor and val shard hash are those of `speedrun data synth`'s data
    (regenerated by the shared fixture); a manifest edited to raise the floor changes nothing: the run is on
    the track by its val shard's bytes and gets the track's target."""
    import dataclasses

    from speedrun import train as train_mod
    from speedrun.config import get_preset
    from speedrun.data.shards import MANIFEST_NAME, file_sha256

    data = tiny_track_run[0] / "synth"
    manifest = json.loads((data / MANIFEST_NAME).read_text())
    track = TRACKS["tiny-cpu"]
    assert manifest["val_optimal_loss_prefix"][str(track.val_tokens)] == track.data_floor
    assert file_sha256(data / "synth_val_000000.bin") == track.val_data_sha256
    forged = tmp_path / "forged"
    forged.mkdir()
    shutil.copy(data / "synth_val_000000.bin", forged)
    manifest["val_optimal_loss_prefix"][str(track.val_tokens)] = 9.0
    manifest["files"] = {"synth_val_000000.bin": manifest["files"]["synth_val_000000.bin"]}
    (forged / MANIFEST_NAME).write_text(json.dumps(manifest))
    cfg = get_preset("sub3min-tiny")
    assert train_mod.track_of_run(cfg, forged, manifest) == (track, True, 4.6117)
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_tokens=65536))  # not the track's
    assert train_mod.track_of_run(other, forged, manifest)[1] is False


def test_speedrun_reproduce_is_the_leaderboards_reproduce(tmp_path, capsys):
    from speedrun.cli import main

    assert main(["reproduce", str(tmp_path / "nothing"), "--yes"]) == 1
    out, err = capsys.readouterr()
    assert "nothing: not a record folder (no record.json)" in out and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    assert capsys.readouterr().out.startswith("usage: speedrun reproduce ")
