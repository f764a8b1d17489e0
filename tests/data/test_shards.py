"""The shard reader/writer, its failure modes, atomic writes, and ``speedrun data verify``."""

import hashlib
import json
import os
import struct

import numpy as np
import pytest

from speedrun.cli import main as cli_main
from speedrun.data import shards
from speedrun.data.shards import (
    ShardError,
    manifest_entry,
    read_header,
    read_manifest,
    read_shard,
    verify_command,
    write_manifest,
    write_shard,
)
from speedrun.errors import UserError


def random_tokens(rng, n, high=50257):
    return rng.integers(0, high, size=n, dtype=np.int64)


def expected_file_bytes(tokens):
    # An independent encoding of the format: 256 little-endian int32, then uint16 tokens.
    header = struct.pack("<256i", 20240520, 1, len(tokens), *([0] * 253))
    return header + struct.pack(f"<{len(tokens)}H", *(int(t) for t in tokens))


def patch_int32(path, slot, value):
    with open(path, "r+b") as f:
        f.seek(4 * slot)
        f.write(struct.pack("<i", value))


@pytest.fixture
def rng():
    return np.random.default_rng(113)  # seeded: a failure replays


# --- reader / writer ---------------------------------------------------------------------------


def test_round_trip(tmp_path, rng):
    tokens = random_tokens(rng, int(rng.integers(1, 5000)))
    path = tmp_path / "x_train_000001.bin"
    write_shard(path, tokens)
    assert path.read_bytes() == expected_file_bytes(tokens)
    assert read_header(path) == len(tokens)
    np.testing.assert_array_equal(read_shard(path), tokens)
    np.testing.assert_array_equal(read_shard(path, mmap=False, check_tokens=True), tokens)


def test_empty_shard_round_trip(tmp_path):
    path = tmp_path / "empty.bin"
    write_shard(path, np.zeros(0, dtype=np.uint16))
    assert path.stat().st_size == 1024
    assert len(read_shard(path, check_tokens=True)) == 0


def test_wrong_magic(tmp_path, rng):
    path = tmp_path / "s.bin"
    write_shard(path, random_tokens(rng, 100))
    bad_magic = int(rng.integers(1, 10**6))
    patch_int32(path, 0, bad_magic)
    with pytest.raises(ShardError, match=f"wrong magic number {bad_magic} "):
        read_header(path)


def test_unknown_version(tmp_path, rng):
    path = tmp_path / "s.bin"
    write_shard(path, random_tokens(rng, 100))
    patch_int32(path, 1, 7)
    with pytest.raises(ShardError, match="unknown version 7"):
        read_shard(path)


def test_truncated_by_exact_bytes(tmp_path, rng):
    n = int(rng.integers(10, 1000))
    cut = int(rng.integers(1, 2 * n))
    path = tmp_path / "s.bin"
    write_shard(path, random_tokens(rng, n))
    os.truncate(path, 1024 + 2 * n - cut)
    with pytest.raises(ShardError, match=f"truncated by {cut} bytes"):
        read_header(path)


def test_header_truncated(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(ShardError, match="header truncated: 100 of 1024 bytes"):
        read_header(path)


def test_trailing_bytes(tmp_path, rng):
    extra = int(rng.integers(1, 50))
    path = tmp_path / "s.bin"
    write_shard(path, random_tokens(rng, 64))
    with open(path, "ab") as f:
        f.write(b"\1" * extra)
    with pytest.raises(ShardError, match=f"{extra} trailing bytes"):
        read_header(path)


def test_token_out_of_range_only_when_checked(tmp_path, rng):
    tokens = random_tokens(rng, 3000)
    position = int(rng.integers(0, 3000))
    bad_token = int(rng.integers(50257, 65536))
    tokens[position] = bad_token
    path = tmp_path / "s.bin"
    write_shard(path, tokens)
    assert read_shard(path)[position] == bad_token  # not checked: read as is
    with pytest.raises(ShardError, match=f"token id {bad_token} >= vocabulary size 50257 at position {position}"):
        read_shard(path, check_tokens=True)


def test_write_shard_rejects_bad_tokens(tmp_path):
    with pytest.raises(ValueError, match="fit uint16"):
        write_shard(tmp_path / "s.bin", [1, 70000])
    with pytest.raises(ValueError, match="1-D"):
        write_shard(tmp_path / "s.bin", np.zeros((2, 2), dtype=np.int64))
    assert list(tmp_path.iterdir()) == []


# --- atomic writes -----------------------------------------------------------------------------


class DiskFullAfterFirstWrite:
    """A file object whose second write fails, as a full disk would after the header."""

    def __init__(self, real):
        self.real, self.writes = real, 0

    def write(self, data):
        self.writes += 1
        if self.writes > 1:
            raise OSError(28, "No space left on device")
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def test_failed_write_leaves_no_file(tmp_path, rng, monkeypatch):
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: DiskFullAfterFirstWrite(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        write_shard(tmp_path / "fineweb_train_000001.bin", random_tokens(rng, 500))
    assert list(tmp_path.iterdir()) == []  # neither the shard nor a temp file


def test_failed_overwrite_keeps_old_file(tmp_path, rng, monkeypatch):
    path = tmp_path / "fineweb_val_000000.bin"
    old = random_tokens(rng, 300)
    write_shard(path, old)
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: DiskFullAfterFirstWrite(real_fdopen(*a, **k)))
    with pytest.raises(OSError):
        write_shard(path, random_tokens(rng, 900))
    monkeypatch.undo()
    np.testing.assert_array_equal(read_shard(path), old)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_interrupted_chunk_stream_leaves_no_file(tmp_path):
    def chunks():
        yield shards.make_header(10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shards.atomic_write_bytes(tmp_path / "s.bin", chunks())
    assert list(tmp_path.iterdir()) == []


# --- verify ------------------------------------------------------------------------------------


def make_folder(folder, rng, count=3, with_manifest=True):
    folder.mkdir()
    for i in range(count):
        name = "d_val_000000.bin" if i == 0 else f"d_train_{i:06d}.bin"
        write_shard(folder / name, random_tokens(rng, int(rng.integers(1, 2000))))
    if with_manifest:
        files = {}
        for p in folder.glob("*.bin"):  # the entries, computed here independently of manifest_entry
            data = p.read_bytes()
            files[p.name] = {"tokens": (len(data) - 1024) // 2, "bytes": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()}
        write_manifest(folder, {"kind": "synth", "vocab_size": 50257, "eot_token": 50256, "files": files})
    return sorted(folder.glob("*.bin"))


def test_manifest_entry_matches_independent_computation(tmp_path, rng):
    paths = make_folder(tmp_path / "d", rng)
    recorded = json.loads((tmp_path / "d" / "manifest.json").read_text())["files"]
    for p in paths:
        assert manifest_entry(p) == recorded[p.name]


def test_verify_good_folder(tmp_path, rng, capsys):
    paths = make_folder(tmp_path / "d", rng)
    assert verify_command([str(tmp_path / "d")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(paths) + 1
    for p, line in zip(paths, lines[:-1], strict=True):
        assert line == f"OK   {p}  ({read_header(p):,} tokens)"
    assert lines[-1].startswith(f"{len(paths)} OK, 0 BAD")


def test_verify_folder_with_good_and_bad_files(tmp_path, rng, capsys):
    folder = tmp_path / "d"
    make_folder(folder, rng, count=2, with_manifest=False)
    cut = int(rng.integers(1, 100))
    write_shard(folder / "d_train_000002.bin", random_tokens(rng, 200))
    os.truncate(folder / "d_train_000002.bin", 1024 + 400 - cut)
    write_shard(folder / "d_train_000003.bin", random_tokens(rng, 50))
    patch_int32(folder / "d_train_000003.bin", 0, 1234)
    tokens = random_tokens(rng, 50)
    tokens[7] = 60000
    write_shard(folder / "d_train_000004.bin", tokens)
    assert verify_command([str(folder)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6  # one per file, then the count
    by_name = {line.split()[1].rstrip(":").rsplit("/", 1)[1]: line for line in lines[:-1]}
    assert by_name["d_val_000000.bin"].startswith("OK   ") and by_name["d_train_000001.bin"].startswith("OK   ")
    assert by_name["d_train_000002.bin"].startswith(f"BAD  {folder / 'd_train_000002.bin'}: truncated by {cut} bytes")
    assert "wrong magic number 1234" in by_name["d_train_000003.bin"]
    assert "token id 60000 >= vocabulary size 50257 at position 7" in by_name["d_train_000004.bin"]
    assert lines[-1].startswith("2 OK, 3 BAD")


def test_verify_detects_checksum_mismatch(tmp_path, rng, capsys):
    paths = make_folder(tmp_path / "d", rng)
    target = paths[int(rng.integers(0, len(paths)))]
    data = bytearray(target.read_bytes())
    first = struct.unpack_from("<H", data, 1024)[0]
    struct.pack_into("<H", data, 1024, (first + 1) % 50257)  # still a valid shard, other content
    target.write_bytes(bytes(data))
    assert verify_command([str(tmp_path / "d")]) == 1
    out = capsys.readouterr().out
    assert f"BAD  {target}: sha256 {hashlib.sha256(data).hexdigest()} does not match manifest.json" in out
    assert out.count("OK   ") == len(paths) - 1


def test_verify_manifest_disagreements(tmp_path, rng, capsys):
    folder = tmp_path / "d"
    paths = make_folder(folder, rng)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][paths[0].name]["tokens"] += 1
    manifest["files"]["d_train_000099.bin"] = manifest["files"][paths[1].name]
    write_manifest(folder, manifest)
    write_shard(folder / "d_train_000050.bin", random_tokens(rng, 10))  # not listed
    assert verify_command([str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"BAD  {paths[0]}: has {read_header(paths[0])} tokens, manifest.json says" in out
    assert f"BAD  {folder / 'd_train_000050.bin'}: not listed in manifest.json" in out
    assert f"BAD  {folder / 'd_train_000099.bin'}: listed in manifest.json but missing" in out


def test_verify_uses_manifest_vocab_size(tmp_path, rng, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    write_shard(folder / "s_val_000000.bin", [0, 5, 300])
    write_manifest(folder, {"kind": "synth", "vocab_size": 256, "files": {
        "s_val_000000.bin": manifest_entry(folder / "s_val_000000.bin")}})
    assert verify_command([str(folder / "s_val_000000.bin")]) == 1
    assert "token id 300 >= vocabulary size 256 at position 2" in capsys.readouterr().out


def test_verify_missing_path_and_empty_folder(tmp_path, rng, capsys):
    (tmp_path / "empty").mkdir()
    good = make_folder(tmp_path / "d", rng, count=1, with_manifest=False)[0]
    assert verify_command([str(tmp_path / "nope"), str(tmp_path / "empty"), str(good)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"BAD  {tmp_path / 'nope'}: no such file or folder"
    assert lines[1] == f"BAD  {tmp_path / 'empty'}: no shard files (*.bin) in this folder"
    assert lines[2].startswith(f"OK   {good}")
    assert lines[3].startswith("1 OK, 2 BAD")


def test_verify_malformed_manifest(tmp_path, rng, capsys):
    paths = make_folder(tmp_path / "d", rng, count=1, with_manifest=False)
    (tmp_path / "d" / "manifest.json").write_text("{not json")
    assert verify_command([str(tmp_path / "d")]) == 1
    out = capsys.readouterr().out
    assert f"BAD  {tmp_path / 'd' / 'manifest.json'}: " in out and "not valid JSON" in out
    assert f"OK   {paths[0]}" in out  # the shards are still checked


@pytest.mark.parametrize("field, value", [("val_optimal_loss_prefix", 2.5), ("val_optimal_loss_prefix", {"8": "x"}),
                                          ("val_optimal_loss", -1), ("val_optimal_loss", None), ("kind", 7)])
def test_manifest_facts_of_the_wrong_type_are_user_errors(tmp_path, rng, field, value):
    """(Found by fuzzing a data folder: a non-object val_optimal_loss_prefix stopped the trainer with a TypeError.)"""
    make_folder(tmp_path / "d", rng, count=1)
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({**manifest, field: value}))
    with pytest.raises(UserError, match=f"the manifest's {field} must be"):
        read_manifest(tmp_path / "d")


def test_cli_verify(tmp_path, rng, capsys):
    folder = tmp_path / "d"
    paths = make_folder(folder, rng)
    assert cli_main(["data", "verify", str(folder)]) == 0
    assert cli_main(["data", "verify", str(paths[0]), str(tmp_path / "missing.bin")]) == 1
    out = capsys.readouterr().out
    assert f"BAD  {tmp_path / 'missing.bin'}: no such file or folder" in out
