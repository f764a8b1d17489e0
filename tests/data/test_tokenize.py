"""``speedrun data tokenize`` on real FineWeb text, checked against tiktoken directly."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from speedrun.cli import main as cli_main
from speedrun.data import tokenize_text
from speedrun.data.shards import read_manifest, read_shard, verify_command
from speedrun.data.tokenize_text import TokenizeError, tokenize_command, tokenize_to_shards

EOT = 50256


@pytest.fixture
def encoder(tiktoken_cache):
    import tiktoken

    return tiktoken.get_encoding("gpt2")


@pytest.fixture
def sample(shared_data, tiktoken_cache):
    return shared_data / "fineweb-sample"


def expected_stream(encoder, documents):
    # The published recipe, written out directly: EOT before each document, documents concatenated.
    return np.array([t for doc in documents for t in [EOT] + encoder.encode_ordinary(doc)], dtype=np.uint16)


def read_stream(folder, name="fineweb"):
    paths = [folder / f"{name}_val_000000.bin"] + sorted(folder.glob(f"{name}_train_*.bin"))
    assert all(p.exists() for p in paths)
    return [np.asarray(read_shard(p)) for p in paths]


def random_documents(rng, n):
    words = ["the", "speed", "run", "Ünïcode", "日本語", "<|endoftext|>", "  spaces", "tab\there", "émoji 🚀", "42"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(n)]


def test_lines_file_exact_stream_and_boundaries(tmp_path, sample, encoder):
    path = sample / "fineweb_sample_small.txt"
    documents = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    expected = expected_stream(encoder, documents)
    shard_tokens = int(np.random.default_rng(119).integers(300, 1500))
    manifest = tokenize_to_shards([str(path)], tmp_path / "out", shard_tokens=shard_tokens, workers=1, progress=False)
    shards = read_stream(tmp_path / "out")
    assert len(shards) == -(-len(expected) // shard_tokens)
    assert all(len(s) == shard_tokens for s in shards[:-1]) and 0 < len(shards[-1]) <= shard_tokens
    np.testing.assert_array_equal(np.concatenate(shards), expected)
    assert any(s[0] != EOT for s in shards[1:])  # some document was split across a boundary
    assert manifest["tokens"] == len(expected) == sum(len(encoder.encode_ordinary(d)) + 1 for d in documents)
    assert manifest["documents"] == len(documents)
    assert manifest["kind"] == "tokenize" and manifest["vocab_size"] == 50257 and manifest["eot_token"] == EOT
    assert manifest["inputs"] == [str(path)] and manifest["shard_tokens"] == shard_tokens
    assert read_manifest(tmp_path / "out")["files"] == manifest["files"]
    assert verify_command([str(tmp_path / "out")]) == 0


def test_whole_file_document_longer_than_a_shard(tmp_path, sample, encoder):
    # README of the sample: 217,888 GPT-2 tokens; as one document that is one EOT more.
    path = sample / "fineweb_edu_sample.txt"
    manifest = tokenize_to_shards([path], tmp_path / "out", shard_tokens=50_000, txt_mode="file",
                                  name="edu", workers=1, progress=False)
    assert manifest["tokens"] == 217_889 and manifest["documents"] == 1
    shards = read_stream(tmp_path / "out", "edu")
    assert [len(s) for s in shards] == [50_000] * 4 + [17_889]
    expected = expected_stream(encoder, [path.read_text(encoding="utf-8")])
    np.testing.assert_array_equal(np.concatenate(shards), expected)


def test_two_workers_match_one(tmp_path, sample, monkeypatch):
    monkeypatch.setattr(tokenize_text, "BATCH_CHARS", 20_000)  # many tasks, so the order is exercised
    path = sample / "fineweb_edu_sample.txt"
    tokenize_to_shards([path], tmp_path / "one", shard_tokens=30_000, workers=1, progress=False)
    tokenize_to_shards([path], tmp_path / "two", shard_tokens=30_000, workers=2, progress=False)
    one, two = sorted((tmp_path / "one").glob("*.bin")), sorted((tmp_path / "two").glob("*.bin"))
    assert [p.name for p in one] == [p.name for p in two] and len(one) > 2
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two, strict=True))


def test_jsonl_and_parquet_inputs(tmp_path, encoder, monkeypatch):
    rng = np.random.default_rng(120)
    docs_jsonl, docs_parquet = random_documents(rng, 30), random_documents(rng, 40)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs_jsonl)) + "\n")
    parquet = tmp_path / "b.parquet"
    pd.DataFrame({"text": docs_parquet, "n": range(len(docs_parquet))}).to_parquet(parquet)
    monkeypatch.setattr(tokenize_text, "PARQUET_BATCH_ROWS", 7)  # several parquet batches
    manifest = tokenize_to_shards([jsonl, parquet], tmp_path / "out", shard_tokens=97, workers=1, progress=False)
    expected = expected_stream(encoder, docs_jsonl + docs_parquet)
    np.testing.assert_array_equal(np.concatenate(read_stream(tmp_path / "out")), expected)
    assert manifest["documents"] == 70 and manifest["inputs"] == [str(jsonl), str(parquet)]


def test_txt_modes_differ(tmp_path, encoder):
    path = tmp_path / "t.txt"
    path.write_text("first doc\n\n   \nsecond doc\r\nthird")
    tokenize_to_shards([path], tmp_path / "lines", shard_tokens=1000, workers=1, progress=False)
    tokenize_to_shards([path], tmp_path / "file", shard_tokens=1000, workers=1, progress=False, txt_mode="file")
    np.testing.assert_array_equal(read_stream(tmp_path / "lines")[0],
                                  expected_stream(encoder, ["first doc", "second doc", "third"]))
    np.testing.assert_array_equal(read_stream(tmp_path / "file")[0],
                                  expected_stream(encoder, ["first doc\n\n   \nsecond doc\nthird"]))


def test_existing_empty_folder_is_used(tmp_path, sample, tiktoken_cache):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.md").write_text("mine")
    tokenize_to_shards([sample / "fineweb_sample_small.txt"], tmp_path / "out", shard_tokens=5000, workers=1,
                       progress=False)
    assert (tmp_path / "out" / "notes.md").read_text() == "mine"
    assert verify_command([str(tmp_path / "out")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_cli_tokenize(tmp_path, sample, tiktoken_cache, capsys):
    argv = ["data", "tokenize", str(sample / "fineweb_sample_small.txt"), "--out", str(tmp_path / "o"),
            "--shard-tokens", "2000", "--workers", "1", "--name", "mine"]
    assert cli_main(argv) == 0
    assert (tmp_path / "o" / "mine_val_000000.bin").exists() and (tmp_path / "o" / "mine_train_000001.bin").exists()
    assert "documents" in capsys.readouterr().out
    # Run again: the folder now holds shards, which are not overwritten.
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    assert cli_main(argv) == 1
    assert "already holds shards; refusing to overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before


def write_bad_inputs(tmp_path):
    good = "\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(200))
    (tmp_path / "late_error.jsonl").write_text(good + '\n{"title": "no text here"}\n')
    (tmp_path / "bad_json.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "spaces.txt").write_text("  \n\n")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    pd.DataFrame({"body": ["x"]}).to_parquet(tmp_path / "no_text.parquet")
    pd.DataFrame({"text": ["fine", None]}).to_parquet(tmp_path / "null.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")


@pytest.mark.parametrize("inputs, kwargs, message", [
    (["late_error.jsonl"], {}, 'late_error.jsonl:201: no string "text" field'),
    (["bad_json.jsonl"], {}, "bad_json.jsonl:2: not valid JSON"),
    (["blank.jsonl"], {}, "blank.jsonl: holds no documents (empty input)"),
    (["empty.txt"], {}, "empty.txt: holds no documents (empty input)"),
    (["spaces.txt"], {}, "spaces.txt: holds no documents (empty input)"),
    (["data.csv"], {}, "unknown input type '.csv'"),
    (["missing.txt"], {}, "missing.txt: no such file"),
    (["late_error.jsonl", "../{tmp}/late_error.jsonl"], {}, "late_error.jsonl: given twice (also as "),
    (["latin1.txt"], {}, "latin1.txt: not UTF-8 text"),
    (["no_text.parquet"], {}, "no_text.parquet: no 'text' column (it has: body)"),
    (["null.parquet"], {}, "null.parquet: row 1 (counting from 0): 'text' is NoneType"),
    (["broken.parquet"], {}, "broken.parquet: not a readable parquet file"),
    (["spaces.txt"], {"txt_mode": "words"}, "txt_mode must be one of"),
    (["late_error.jsonl"], {"name": "../escape"}, "name must be letters"),
    (["late_error.jsonl"], {"shard_tokens": 0}, "shard_tokens must be an integer"),
    (["late_error.jsonl"], {"workers": 0}, "workers must be a positive integer"),
])
def test_errors_write_nothing(tmp_path, tiktoken_cache, capsys, inputs, kwargs, message):
    write_bad_inputs(tmp_path)
    inputs = [p.format(tmp=tmp_path.name) for p in inputs]  # ("../{tmp}/x": x spelled another way)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = {"shard_tokens": 100, "txt_mode": "lines", "name": "x", "workers": 1, **kwargs}
    with pytest.raises(TokenizeError) as info:
        tokenize_to_shards([str(tmp_path / p) for p in inputs], tmp_path / "out", progress=False, **args)
    assert message in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging folder
    assert tokenize_command([str(tmp_path / p) for p in inputs], str(tmp_path / "out"), **args) == 1
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_error_in_worker_run_writes_nothing(tmp_path, tiktoken_cache, monkeypatch):
    write_bad_inputs(tmp_path)
    monkeypatch.setattr(tokenize_text, "BATCH_CHARS", 500)
    with pytest.raises(TokenizeError, match="late_error.jsonl:201"):
        tokenize_to_shards([tmp_path / "late_error.jsonl"], tmp_path / "out", shard_tokens=50, workers=2,
                           progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "tokenizing" in p.name]


def test_out_dir_is_a_file(tmp_path, sample, tiktoken_cache):
    (tmp_path / "out").write_text("x")
    with pytest.raises(TokenizeError, match="exists and is not a folder"):
        tokenize_to_shards([sample / "fineweb_sample_small.txt"], tmp_path / "out", workers=1, progress=False)


def test_failed_move_into_existing_folder_rolls_back(tmp_path, sample, monkeypatch):
    (tmp_path / "out").mkdir()
    real_replace, calls = tokenize_text.os.replace, []

    def replace_failing_on_third(src, dst):  # os.replace is shared: count only the moves into "out"
        if Path(dst).parent == tmp_path / "out":
            calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(tokenize_text.os, "replace", replace_failing_on_third)
    with pytest.raises(OSError, match="No space left"):
        tokenize_to_shards([sample / "fineweb_sample_small.txt"], tmp_path / "out", shard_tokens=1000, workers=1,
                           progress=False)
    monkeypatch.undo()
    assert len(calls) == 3
    assert list((tmp_path / "out").iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_cleans_up(signum, tmp_path, tiktoken_cache, monkeypatch, capsys):
    """SIGTERM (a job scheduler's stop) and Ctrl-C in the middle: exit 130, no staging folder and no shards left."""
    import os
    import signal

    (tmp_path / "in.txt").write_text("".join(f"document {i} about the speedrun\n" for i in range(3000)))
    real_read = tokenize_text.read_documents

    def read_then_signal(path, txt_mode):
        for i, document in enumerate(real_read(path, txt_mode)):
            if i == 2000:  # shards are being written into the staging folder by now
                assert [p for p in tmp_path.iterdir() if "tokenizing" in p.name]
                os.kill(os.getpid(), getattr(signal, signum))
            yield document

    monkeypatch.setattr(tokenize_text, "read_documents", read_then_signal)
    monkeypatch.setattr(tokenize_text, "BATCH_CHARS", 2000)
    before = signal.getsignal(signal.SIGTERM)
    # Ctrl-C as a terminal delivers it, also when the suite was started with SIGINT ignored (a background job of a
    # script: Python then installs no KeyboardInterrupt handler)
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = tokenize_command([str(tmp_path / "in.txt")], str(tmp_path / "out"), shard_tokens=1000,
                                txt_mode="lines", name="fineweb", workers=1)
    finally:
        signal.signal(signal.SIGINT, interrupt)
    assert code == 130 and "interrupted; nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the command's only


def test_the_summary_counts_val_and_train_shards_and_warns_without_a_train_shard(tmp_path, tiktoken_cache, capsys):
    """Too little text for --shard-tokens fills only the val shard; `speedrun train` then finds no train shard
    and told the user to run tokenize, which they just had."""
    (tmp_path / "in.txt").write_text("the speed run\nanother line of text\n" * 20, encoding="utf-8")
    for shard_tokens, train in ((100_000, 0), (50, 3)):
        out = tmp_path / f"out{shard_tokens}"
        assert tokenize_command([str(tmp_path / "in.txt")], str(out), shard_tokens=shard_tokens, txt_mode="lines",
                                name="fineweb", workers=1) == 0
        printed = capsys.readouterr()
        assert f"40 documents, 180 tokens -> 1 val + {train} train shard(s) in {out}" in printed.out
        assert ("warning: every token went into the val shard" in printed.err) == (train == 0)
        assert len(read_manifest(out)["files"]) == 1 + train
