"""Every user error is one line, ``error: <what> (<where>)``, and a non-zero exit, never a traceback; a bug keeps
its traceback; a run that has started never ends without a complete log (speedrun/errors.py, train.py).

Each case is a class of bad input a hostile but fair user tried (issue [5/6]); each runs a command in this
process as the user would and checks the message, the exit code and that nothing was left half-written."""

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_records import write_synthetic_record, write_synthetic_run

import speedrun.train as train_mod
from speedrun.cli import main
from speedrun.data.shards import MANIFEST_NAME, write_shard
from speedrun.data.synth import generate_synth
from speedrun.records.cli import main as leaderboard_main

SEQ_LEN, VAL_TOKENS = 64, 1024


@pytest.fixture(scope="module")
def synth_template(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_synth(out, seed=1, train_tokens=40_000, val_tokens=VAL_TOKENS, shard_tokens=20_000)
    return out


@pytest.fixture
def data(synth_template, tmp_path) -> Path:
    """A fresh copy of the small synthetic data (two train shards), for one test to break."""
    return Path(shutil.copytree(synth_template, tmp_path / "data"))


def run_cli(argv, capsys, entry=main) -> tuple[int, str]:
    """(exit code, stderr) of a command run as the user runs it."""
    try:
        code = entry(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


def assert_user_error(argv, capsys, *fragments, code=1, entry=main) -> str:
    got, err = run_cli(argv, capsys, entry)
    assert got == code, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error:") or code == 2, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def train_argv(data: Path, logs: Path, *extra) -> list[str]:
    return ["train", "--preset", "sub3min-tiny", "--data", str(data), "--seq-len", str(SEQ_LEN), "--val-tokens",
            str(VAL_TOKENS), "--steps", "2", "--val-every", "1", "--log-dir", str(logs), "--quiet", *extra]


def corrupt_magic(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def train_shards(data: Path) -> list[Path]:
    return sorted(data.glob("*_train_*.bin"))


def drop_manifest_entry(data: Path, path: Path) -> None:
    manifest = json.loads((data / MANIFEST_NAME).read_text())
    manifest["files"].pop(path.name, None)
    (data / MANIFEST_NAME).write_text(json.dumps(manifest))


def set_manifest(data: Path, key: str, value) -> None:
    manifest = json.loads((data / MANIFEST_NAME).read_text())
    manifest[key] = value
    (data / MANIFEST_NAME).write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------
# speedrun train: bad data, bad options, unwritable outputs (all before anything is loaded)
# ---------------------------------------------------------------------------------------------

def _empty_train(data):
    for p in train_shards(data):
        write_shard(p, np.zeros(0, dtype=np.uint16))


def _small_train(data):
    for p in train_shards(data):
        write_shard(p, np.full(100, 5, dtype=np.uint16))


def _token_past_vocab(data):
    tokens = np.full(20_000, 7, dtype=np.uint16)
    tokens[1234] = 60_000
    write_shard(train_shards(data)[0], tokens)


def _broken_link(data):
    (data / "synth_train_000099.bin").symlink_to(data / "gone.bin")


def _link_loop(data):
    (data / "synth_train_000098.bin").symlink_to(data / "synth_train_000098.bin")


def _second_val(data):
    shutil.copy(data / "synth_val_000000.bin", data / "synth_val_000001.bin")


BAD_DATA = {  # name: (how the data is broken, fragments of the message)
    "train shard with a bad header": (lambda d: corrupt_magic(train_shards(d)[0]), ["wrong magic number",
                                                                                      "synth_train_000001.bin"]),
    "truncated train shard": (lambda d: truncate(train_shards(d)[0]), ["truncated by 10 bytes"]),
    "empty train shards": (_empty_train, ["the train shards hold 0 of the run's 2 steps", "hold 0"]),
    "data too small for one step": (_small_train, ["hold 0 of the run's 2 steps", "add train shards"]),
    "token id past the vocabulary": (_token_past_vocab, ["token id 60000 >= vocabulary size 2048 at position 1234",
                                                         "synth_train_000001.bin"]),
    "truncated val shard": (lambda d: truncate(d / "synth_val_000000.bin"), ["truncated by 10 bytes",
                                                                             "synth_val_000000.bin"]),
    "broken symbolic link": (_broken_link, ["a broken or looping symbolic link", "synth_train_000099.bin"]),
    "symbolic link loop": (_link_loop, ["a broken or looping symbolic link", "synth_train_000098.bin"]),
    "a listed shard missing": (lambda d: train_shards(d)[1].unlink(), ["1 shard(s) listed in the manifest are "
                                                                       "missing (synth_train_000002.bin)"]),
    "two val shards": (_second_val, ["expected exactly one val shard", "synth_val_000000.bin, synth_val_000001.bin"]),
    "manifest not JSON": (lambda d: (d / MANIFEST_NAME).write_text("{nope"), ["the manifest is not valid JSON"]),
    "manifest not UTF-8": (lambda d: (d / MANIFEST_NAME).write_bytes(b'{"a": "\xff"}'), ["not UTF-8 text"]),
    "manifest a list": (lambda d: (d / MANIFEST_NAME).write_text("[]"), ["a manifest must be a JSON object"]),
    "manifest vocab 'abc'": (lambda d: set_manifest(d, "vocab_size", "abc"), ["vocab_size must be an integer"]),
    "manifest vocab 0": (lambda d: set_manifest(d, "vocab_size", 0), ["vocab_size must be an integer in [2, 65536]"]),
    "manifest vocab 1e9": (lambda d: set_manifest(d, "vocab_size", 10**9), ["got 1000000000"]),
    "manifest eot past the vocabulary": (lambda d: set_manifest(d, "eot_token", 5000),
                                         ["eot_token must be an integer in [0, vocab_size = 2048)", MANIFEST_NAME]),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line_before_anything_runs(case, data, tmp_path, capsys):
    breaks, fragments = BAD_DATA[case]
    breaks(data)
    logs = tmp_path / "logs"
    assert_user_error(train_argv(data, logs), capsys, *fragments)
    assert not list(logs.glob("*.txt"))  # refused before the run: no log, no half-written file
    assert not [p for p in tmp_path.rglob(".*") if p.name.startswith(".") and p.suffix == ".tmp"]


def test_a_folder_without_shards_is_named_so_the_user_can_find_it(tmp_path, capsys):
    """Outside the repository a folder is named by its absolute path (not its last component alone)."""
    (tmp_path / "empty").mkdir()
    assert_user_error(train_argv(tmp_path / "empty", tmp_path / "logs"), capsys,
                      f"no train/val shards in {(tmp_path / 'empty').resolve()}: ")


@pytest.mark.parametrize("split", ["val", "train"])
def test_a_folder_with_one_kind_of_shard_says_which_is_missing(tmp_path, capsys, split):
    folder = tmp_path / "half"
    folder.mkdir()
    write_shard(folder / f"fineweb_{split}_00000{int(split == 'train')}.bin",
                np.random.default_rng(3).integers(0, 50257, 5000, dtype=np.uint16))
    missing = "train" if split == "val" else "val"
    assert_user_error(train_argv(folder, tmp_path / "logs"), capsys, f"no {missing} shard in {folder.resolve()}, "
                      f"only {'its val shard' if split == 'val' else 'train shards'}: a run needs both")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_shard(data, tmp_path, capsys):
    train_shards(data)[0].chmod(0)
    assert_user_error(train_argv(data, tmp_path / "logs"), capsys, "cannot be read")


BAD_OPTIONS = {  # name: (extra train options, fragments, exit code)
    "val tokens past the val shard": (["--val-tokens", "4096"], ["the val shard holds 1,025 tokens",
                                                                 "val_tokens 4,096 needs 4,097"], 1),
    "val tokens not a multiple of seq_len": (["--val-tokens", "1000"], ["must be a multiple of seq_len"], 1),
    "seqs per forward 3": (["--seqs-per-forward", "3"], ["seqs_per_forward 3 must divide the 8 sequences"], 1),
    "seed 2**70": (["--seed", str(2**70)], ["expected a seed below 2**63"], 2),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options(case, data, tmp_path, capsys):
    extra, fragments, code = BAD_OPTIONS[case]
    argv = train_argv(data, tmp_path / "logs")
    for option, value in zip(extra[::2], extra[1::2], strict=True):  # the later one wins in argparse
        argv += [option, value]
    assert_user_error(argv, capsys, *fragments, code=code)


def test_data_path_is_taken_from_the_current_folder(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    shutil.copytree(data, tmp_path / "here" / "synth")
    argv = train_argv(Path("here/synth"), tmp_path / "logs", "--steps", "1")
    assert main(argv) == 1  # trained (not converged): the relative path was found from here
    capsys.readouterr()
    err = assert_user_error(train_argv(Path("nope"), tmp_path / "logs"), capsys,
                            "no such data folder: get the FineWeb shards with `speedrun data download`")
    assert str(tmp_path / "nope") in err


def test_data_path_a_symbolic_link_loop(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert_user_error(train_argv(loop, tmp_path / "logs"), capsys, "no such data folder", str(loop))


def test_unwritable_outputs_are_refused_before_the_run(data, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_user_error(train_argv(data, a_file / "logs"), capsys, "the log folder cannot be written", "a_file")
    logs = tmp_path / "logs"
    assert_user_error(train_argv(data, logs, "--save-checkpoint", str(tmp_path)), capsys,
                      "--save-checkpoint names a folder")
    assert_user_error(train_argv(data, logs, "--save-checkpoint", str(a_file / "ck.pt")), capsys,
                      "the checkpoint's folder cannot be written")
    assert not list(logs.glob("*.txt"))  # no run happened


# ---------------------------------------------------------------------------------------------
# A run that has started ends with a complete log, whatever happens
# ---------------------------------------------------------------------------------------------


def read_strict_json(path: Path) -> dict:
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_data_running_out_mid_run_fails_with_a_complete_log(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_mod, "check_train_data", lambda *a: None)  # as if the count had been wrong
    first, second = train_shards(data)
    second.unlink()
    drop_manifest_entry(data, second)
    # 4 steps of 8 sequences: enough for the 3 warm-up steps, not for the run's 5
    write_shard(first, np.full(4 * SEQ_LEN * 8 + 2, 5, dtype=np.uint16))
    logs = tmp_path / "logs"
    assert_user_error(train_argv(data, logs, "--steps", "5"), capsys, "the train data ran out after 4 steps")
    (json_path,) = logs.glob("*.json")
    facts = read_strict_json(json_path)
    assert facts["status"] == "failed" and "the train data ran out" in facts["message"]
    assert facts["finished_at"] is not None and facts["steps_done"] == 4
    text = json_path.with_suffix(".txt").read_text()
    assert "FAILED (UserError: the train data ran out" in text and "====== summary ======" in text


def test_a_failed_checkpoint_keeps_the_finished_run(data, tmp_path, capsys, monkeypatch):
    def disk_full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(train_mod.torch, "save", disk_full)
    logs, checkpoint = tmp_path / "logs", tmp_path / "ck" / "model.pt"
    err = assert_user_error(train_argv(data, logs, "--save-checkpoint", str(checkpoint)), capsys,
                            "the run's log is complete", "saving the checkpoint failed: No space left on device")
    (json_path,) = logs.glob("*.json")
    facts = read_strict_json(json_path)
    assert facts["status"] in ("success", "not_converged") and facts["steps_done"] == 2
    assert "====== summary ======" in json_path.with_suffix(".txt").read_text()
    assert not list(checkpoint.parent.iterdir())  # no temp file left
    assert "model.pt" in err


def test_ctrl_c_during_the_warm_up(data, tmp_path, capsys, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.Sub3MinRace, "warm_up", interrupted)
    assert_user_error(train_argv(data, tmp_path / "logs"), capsys, "interrupted", code=130)


def test_a_bug_keeps_its_traceback_and_debug_shows_every_one(data, tmp_path, capsys, monkeypatch):
    def bug(self):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train_mod.Sub3MinRace, "warm_up", bug)
    with pytest.raises(ZeroDivisionError):
        main(train_argv(data, tmp_path / "logs"))
    corrupt_magic(train_shards(data)[0])
    code, err = run_cli(["--debug", *train_argv(data, tmp_path / "logs")], capsys)
    assert code == 1 and "Traceback" in err and "error: wrong magic number" in err


# ---------------------------------------------------------------------------------------------
# sample, data, leaderboard
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(synth_template, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck")
    assert main(train_argv(synth_template, out / "logs", "--steps", "1", "--save-checkpoint",
                           str(out / "ck.pt"))) in (0, 1)
    return out / "ck.pt"


@pytest.mark.parametrize("temperature", ["0", "-1", "nan", "inf"])
def test_sample_temperature_must_be_positive(temperature, checkpoint, capsys):
    assert_user_error(["sample", "--checkpoint", str(checkpoint), "--temperature", temperature], capsys,
                      "expected a positive", code=2)


CHECKPOINT_DAMAGE = {  # name: (change to the saved dict, fragment)
    "NaN weights": (lambda s: s["model"]["embed.weight"].fill_(float("nan")), "NaN or infinite values"),
    "config missing": (lambda s: s.pop("config"), "expected 'config' and 'model'"),
    "config wrong": (lambda s: s["config"].update(model="x"), "its config is not a run config"),
    "weight missing": (lambda s: s["model"].pop("embed.weight"), "its weights do not fit its config"),
    "extra weight": (lambda s: s["model"].update(extra=torch.zeros(1)), "its weights do not fit its config"),
    "step past the run": (lambda s: s.update(step=2), "its step 2 is not one of its run's 0..1"),
    "step missing": (lambda s: s.pop("step"), "its step None is not one of its run's 0..1"),
}


@pytest.mark.parametrize("case", CHECKPOINT_DAMAGE)
def test_sample_from_a_damaged_checkpoint(case, checkpoint, tmp_path, capsys):
    damage, fragment = CHECKPOINT_DAMAGE[case]
    state = torch.load(checkpoint, weights_only=True)
    damage(state)
    torch.save(state, tmp_path / "bad.pt")
    assert_user_error(["sample", "--checkpoint", str(tmp_path / "bad.pt"), "--prompt", "5"], capsys, fragment)


NOT_CHECKPOINTS = {  # name: (the file's bytes from the real checkpoint's, torch.load's reason in the message)
    "text": (lambda raw: b"# a README, not a checkpoint\n", "UnpicklingError: Unsupported operand 35)"),
    "foreign pickle": (lambda raw: pickle.dumps({"config": {}, "model": Path("x")}, protocol=4),
                       "UnpicklingError: Unsupported operand 149)"),
    "cut short": (lambda raw: raw[:len(raw) // 2], "RuntimeError: PytorchStreamReader failed reading zip archive"),
}


@pytest.mark.parametrize("case", NOT_CHECKPOINTS)
def test_sample_from_a_file_that_is_no_checkpoint(case, checkpoint, tmp_path, capsys):
    """torch.load's own message runs over many lines of advice (and a foreign pickle warns first): the user gets
    one line with the loader's reason."""
    make, fragment = NOT_CHECKPOINTS[case]
    (tmp_path / "bad.pt").write_bytes(make(checkpoint.read_bytes()))
    err = assert_user_error(["sample", "--checkpoint", str(tmp_path / "bad.pt")], capsys,
                            f"{tmp_path / 'bad.pt'}: not a speedrun checkpoint", fragment)
    assert len(err.strip().splitlines()) == 1 and "weights_only" not in err and "miniz" not in err, err


def test_data_synth_into_a_file_or_a_folder_of_other_shards(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_user_error(["data", "synth", "--out", str(a_file)], capsys, "--out names a file", "a_file")
    other = tmp_path / "other"
    write_shard(other / "fineweb_train_000001.bin", np.arange(10, dtype=np.uint16))
    assert_user_error(["data", "synth", "--out", str(other)], capsys, "holds other shards", "fineweb_train_000001")
    assert sorted(p.name for p in other.iterdir()) == ["fineweb_train_000001.bin"]


def test_data_verify_reports_broken_links(data, capsys):
    _broken_link(data)
    assert main(["data", "verify", str(data)]) == 1
    assert "synth_train_000099.bin: a broken or looping symbolic link" in capsys.readouterr().out


@pytest.mark.usefixtures("synthetic_track_data")  # the synthetic logs' val data stands for the track's
def test_leaderboard_outputs_into_unwritable_places(tmp_path, capsys):
    records = tmp_path / "records"
    write_synthetic_record(records, "tiny-cpu", "2025-01-01", "first",
                           [dict(run_id=f"r{i}", seed=i, final_val_loss=5.1 + 0.001 * i, train_time_ms=6e4 + 50 * i)
                            for i in range(3)])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_user_error(["compare", "tiny-cpu/2025-01-01_first", "tiny-cpu/2025-01-01_first", "--records",
                       str(records), "--plot", str(a_file / "c.svg")], capsys, "a_file", entry=leaderboard_main)
    before = sorted(p.name for p in records.iterdir())
    assert_user_error(["build", "--records", str(records), "--out", str(a_file / "out")], capsys, "a_file",
                      entry=leaderboard_main)
    assert sorted(p.name for p in records.iterdir()) == before  # nothing of the build written: all or none


@pytest.mark.usefixtures("synthetic_track_data")  # the synthetic logs' val data stands for the track's
def test_submit_with_a_readme_that_is_not_utf8(tmp_path, capsys):
    logs = [write_synthetic_run(tmp_path / "logs", f"r{i}", seed=i)[0] for i in range(3)]
    readme = tmp_path / "notes.md"
    readme.write_bytes(b"caf\xe9")
    records = tmp_path / "records"
    code = leaderboard_main(["submit", *map(str, logs), "--records", str(records), "--track", "tiny-cpu", "--title",
                             "T", "--author", "A", "--description", "D.", "--readme", str(readme)])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert "notes.md: not UTF-8 text" in out + err and not records.exists()


def test_record89_data_shortfall_is_found_before_the_run(tmp_path, capsys):
    """Record #89's packed stream: the planned steps' tokens (a lower bound: packing skips document tails)."""
    generate_synth(tmp_path / "s", seed=1, train_tokens=30_000, val_tokens=140_000)
    assert_user_error(["train", "--preset", "record89-tiny", "--data", str(tmp_path / "s"), "--steps", "200",
                       "--log-dir", str(tmp_path / "logs")], capsys,
                      "the train shards hold 30,000 tokens in 1 shard(s); the run's 200 steps need at least 628,288")
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").iterdir())
