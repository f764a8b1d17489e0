"""``speedrun data download``, with only the network call replaced: files, validation, manifest, offline."""

import hashlib
import json
import math
import os

import numpy as np
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from speedrun.cli import main as cli_main
from speedrun.data import download
from speedrun.data.shards import read_shard, verify_command, write_manifest, write_shard


class FakeHub:
    """Stands in for hf_hub_download: writes a real shard (or a corrupt file) where the hub would."""

    def __init__(self, corrupt=(), fail_at=None, error=None):
        self.rng = np.random.default_rng(101)
        self.calls, self.tokens = [], {}
        self.corrupt, self.fail_at, self.error = set(corrupt), fail_at, error

    def __call__(self, repo_id, filename, *, repo_type=None, local_dir=None, force_download=False, **kwargs):
        self.calls.append({"repo_id": repo_id, "filename": filename, "repo_type": repo_type,
                           "local_dir": str(local_dir), "force_download": force_download})
        if self.fail_at is not None and len(self.calls) > self.fail_at:
            raise self.error
        path = os.path.join(local_dir, filename)
        tokens = self.rng.integers(0, 50257, size=int(self.rng.integers(1, 3000)))
        write_shard(path, tokens)
        if filename in self.corrupt:
            os.truncate(path, os.path.getsize(path) - 3)
        self.tokens[filename] = tokens
        return path


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fake = FakeHub()
    monkeypatch.setattr(download, "hf_hub_download", fake)
    return fake


def expected_names(n):
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n + 1)]


def test_default_shard_count_covers_the_recipe():
    # The loader leaves a shard when fewer than batch + 1 tokens remain: steps per 100M-token shard.
    batch, shard_tokens, steps = 524_288, 100_000_000, 1393
    steps_per_shard = sum(1 for pos in range(0, shard_tokens, batch) if pos + batch + 1 < shard_tokens)
    assert steps * batch == 730_333_184
    assert download.RECIPE_TRAIN_SHARDS == math.ceil(steps / steps_per_shard) == 8
    assert download.DEFAULT_TRAIN_SHARDS == 10


def test_download_success_and_manifest(tmp_path, hub):
    out = tmp_path / "fw"
    manifest = download.download_shards(out, train_shards=3, repo_id="kjj0/fineweb10B-gpt2", log=lambda s: None)
    names = expected_names(3)
    assert [c["filename"] for c in hub.calls] == names
    assert all(c["repo_type"] == "dataset" and c["local_dir"] == str(out) for c in hub.calls)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == {**manifest, "schema_version": 1}
    assert on_disk["kind"] == "download" and on_disk["repo_id"] == "kjj0/fineweb10B-gpt2"
    assert on_disk["vocab_size"] == 50257 and on_disk["eot_token"] == 50256
    assert sorted(on_disk["files"]) == sorted(names)
    for name in names:
        data = (out / name).read_bytes()
        assert on_disk["files"][name] == {"tokens": len(hub.tokens[name]), "bytes": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()}
        np.testing.assert_array_equal(read_shard(out / name), hub.tokens[name])
    assert verify_command([str(out)]) == 0


def test_command_default_count(tmp_path, hub, capsys):
    assert download.download_command(None, str(tmp_path / "fw"), "kjj0/fineweb10B-gpt2") == 0
    assert [c["filename"] for c in hub.calls] == expected_names(10)
    total = sum(len(t) for t in hub.tokens.values())
    assert f"11 shards ({total:,} tokens)" in capsys.readouterr().out


def test_cli_download(tmp_path, hub):
    assert cli_main(["data", "download", "--train-shards", "1", "--dir", str(tmp_path / "fw")]) == 0
    assert sorted(p.name for p in (tmp_path / "fw").glob("*.bin")) == sorted(expected_names(1))


def test_corrupt_download_is_deleted_and_reported(tmp_path, hub, capsys):
    hub.corrupt = {"fineweb_train_000002.bin"}
    out = tmp_path / "fw"
    assert download.download_command(3, str(out), "kjj0/fineweb10B-gpt2") == 1
    err = capsys.readouterr().err
    assert "fineweb_train_000002.bin (truncated by 3 bytes" in err and "Traceback" not in err
    assert not (out / "fineweb_train_000002.bin").exists()
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(set(expected_names(3)) - hub.corrupt)
    # The next run fetches only the missing file.
    hub.corrupt, hub.calls = set(), []
    assert download.download_command(3, str(out), "kjj0/fineweb10B-gpt2") == 0
    assert [c["filename"] for c in hub.calls] == ["fineweb_train_000002.bin"]


def test_present_files_are_not_downloaded_again(tmp_path, hub):
    out = tmp_path / "fw"
    download.download_shards(out, train_shards=2, log=lambda s: None)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.bin")}
    hub.calls = []
    manifest = download.download_shards(out, train_shards=3, log=lambda s: None)
    assert [c["filename"] for c in hub.calls] == ["fineweb_train_000003.bin"]
    assert all((out / n).stat().st_mtime_ns == m and (out / n).read_bytes() == b for n, (m, b) in before.items())
    assert sorted(manifest["files"]) == sorted(expected_names(3))


def test_copied_in_file_is_recorded_and_invalid_one_refetched(tmp_path, hub, monkeypatch):
    out = tmp_path / "fw"
    out.mkdir()
    copied = np.random.default_rng(102).integers(0, 50257, size=777)
    write_shard(out / "fineweb_val_000000.bin", copied)  # copied in by hand, no manifest
    (out / "fineweb_train_000001.bin").write_bytes(b"garbage")  # an invalid leftover
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    manifest = download.download_shards(out, train_shards=1, log=lambda s: None)
    assert [(c["filename"], c["force_download"]) for c in hub.calls] == [("fineweb_train_000001.bin", True)]
    data = (out / "fineweb_val_000000.bin").read_bytes()
    assert manifest["files"]["fineweb_val_000000.bin"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["files"]["fineweb_val_000000.bin"]["tokens"] == 777
    assert verify_command([str(out)]) == 0


def assert_offline_message(text, out):
    assert "Traceback" not in text
    assert "cannot reach the Hugging Face hub" in text
    assert f"copy the shards into {out}" in text
    assert "speedrun data tokenize" in text and "./run.sh --preset sub3min-tiny" in text


def test_offline_env_fails_fast(tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "fw"
    assert download.download_command(4, str(out), "kjj0/fineweb10B-gpt2") == 1
    err = capsys.readouterr().err
    assert_offline_message(err, out)
    assert "HF_HUB_OFFLINE is set" in err and "5 shard(s) are missing" in err
    assert hub.calls == [] and not out.exists()


def test_offline_env_with_everything_present_succeeds(tmp_path, hub, monkeypatch):
    out = tmp_path / "fw"
    download.download_shards(out, train_shards=1, log=lambda s: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.calls = []
    assert download.download_command(1, str(out), "kjj0/fineweb10B-gpt2") == 0
    assert hub.calls == []


@pytest.mark.parametrize("error", [
    LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"),
    ConnectionError("[Errno -2] Name or service not known"),
])
def test_connection_error_fails_with_instructions(tmp_path, hub, capsys, error):
    hub.fail_at, hub.error = 1, error  # the first file arrives, then the network goes
    out = tmp_path / "fw"
    assert download.download_command(2, str(out), "kjj0/fineweb10B-gpt2") == 1
    err = capsys.readouterr().err
    assert_offline_message(err, out)
    assert "2 shard(s) are missing" in err and type(error).__name__ in err
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert list(files) == ["fineweb_val_000000.bin"]  # what arrived is kept and recorded


def test_other_hub_error_is_a_message(tmp_path, hub, capsys):
    hub.fail_at, hub.error = 0, RuntimeError("404 Client Error: Entry Not Found")
    assert download.download_command(1, str(tmp_path / "fw"), "someone/other-repo") == 1
    err = capsys.readouterr().err
    assert "downloading fineweb_val_000000.bin from dataset someone/other-repo failed" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("train_shards, repo_id, message", [
    (-1, "kjj0/fineweb10B-gpt2", "non-negative integer"),
    (104, "kjj0/fineweb10B-gpt2", "has 103 train shards"),
    (1, "no-slash", "owner/name"),
])
def test_bad_arguments(tmp_path, hub, capsys, train_shards, repo_id, message):
    assert download.download_command(train_shards, str(tmp_path / "fw"), repo_id) == 1
    assert message in capsys.readouterr().err
    assert hub.calls == [] and not (tmp_path / "fw").exists()


def test_refuses_folder_of_other_data(tmp_path, hub, capsys):
    out = tmp_path / "fw"
    write_manifest(out, {"kind": "tokenize", "vocab_size": 50257, "files": {}})
    assert download.download_command(1, str(out), "kjj0/fineweb10B-gpt2") == 1
    assert "holds shards of kind 'tokenize'" in capsys.readouterr().err
    assert hub.calls == []


def test_out_dir_is_a_file(tmp_path, hub, capsys):
    (tmp_path / "f").write_text("x")
    assert download.download_command(1, str(tmp_path / "f"), "kjj0/fineweb10B-gpt2") == 1
    assert "is not a folder" in capsys.readouterr().err
