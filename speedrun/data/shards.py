"""The token shard format, its manifest, and ``speedrun data verify``.

A shard is the format of the published ``kjj0/fineweb10B-gpt2`` files:

    header   256 x int32, little-endian: [0] = 20240520 (magic), [1] = 1 (version), [2] = token count N,
             every other slot 0
    body     N x uint16 little-endian token ids

so a valid file is exactly 1024 + 2*N bytes. Files are named ``<name>_val_NNNNNN.bin`` (the validation
shard, number 0) and ``<name>_train_NNNNNN.bin`` (1, 2, ...), and used in sorted-name order.

A folder of shards may hold ``manifest.json``: the size and sha256 of each shard, the vocabulary the
tokens come from, and whatever its producer knows about the data (the synthetic generator writes the
exact optimal validation loss there)::

    {"schema_version": 1, "kind": "download" | "tokenize" | "synth",
     "vocab_size": 50257, "eot_token": 50256,
     "files": {"<file name>": {"tokens": N, "bytes": B, "sha256": "<hex>"}, ...},
     ...producer-specific keys...}

Every write here is atomic (temp file in the same folder, fsync, rename), so an interrupted write
never leaves a file that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from speedrun.errors import UserError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1


class ShardError(UserError):
    """A shard file is malformed or unusable. The message names the file and the exact problem."""

    def __init__(self, path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(problem, path)


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def atomic_write_bytes(path, chunks: Iterable[bytes] | bytes) -> None:
    """Write ``chunks`` to ``path`` through a temp file in the same folder, fsync, then rename."""
    atomic_write_files({path: chunks})


def atomic_write_files(files: dict) -> None:
    """Write every {path: bytes or chunks} as atomic_write_bytes does, all or none: each goes to a temp file
    beside its path first, and the renames happen only when every temp file is complete."""
    staged = []
    try:
        for path, chunks in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            # os.open with mode 0o666 (not mkstemp's 0o600) so the file gets the permissions the umask gives.
            tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                for chunk in [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Reading and writing shards
# ---------------------------------------------------------------------------------------------


def make_header(num_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, num_tokens
    return header.tobytes()


def write_shard(path, tokens) -> None:
    """Write ``tokens`` (any integer array-like, values in [0, 65535]) as a shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be integers, got {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"token ids must fit uint16, got range [{tokens.min()}, {tokens.max()}]")
    if tokens.size >= 2**31:
        raise ValueError(f"a shard holds fewer than 2**31 tokens, got {tokens.size}")
    body = tokens.astype("<u2", copy=False)
    atomic_write_bytes(path, [make_header(body.size), body.tobytes()])


def read_header(path) -> int:
    """Validate the header and the file size of a shard; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(path, "no such file") from None
    except IsADirectoryError:
        raise ShardError(path, "is a folder, not a shard file") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(path, f"header truncated: {len(raw)} of {HEADER_BYTES} bytes")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise ShardError(path, f"wrong magic number {int(header[0])} (expected {MAGIC})")
    if header[1] != VERSION:
        raise ShardError(path, f"unknown version {int(header[1])} (expected {VERSION})")
    num_tokens = int(header[2])
    if num_tokens < 0:
        raise ShardError(path, f"negative token count {num_tokens}")
    expected = HEADER_BYTES + 2 * num_tokens
    if size < expected:
        raise ShardError(path, f"truncated by {expected - size} bytes: header says {num_tokens} tokens "
                               f"({expected} bytes), file has {size} bytes")
    if size > expected:
        raise ShardError(path, f"{size - expected} trailing bytes after the {num_tokens} tokens the header gives")
    return num_tokens


def read_shard(path, check_tokens: bool = False, vocab_size: int = GPT2_VOCAB_SIZE, mmap: bool = True) -> np.ndarray:
    """The tokens of a shard as a uint16 array (memory-mapped unless ``mmap=False``).

    With ``check_tokens`` every token is checked to be < ``vocab_size`` (a full scan of the file).
    """
    num_tokens = read_header(path)
    if mmap and num_tokens > 0:
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    else:
        with open(path, "rb") as f:
            f.seek(HEADER_BYTES)
            tokens = np.frombuffer(f.read(2 * num_tokens), dtype="<u2")
    if check_tokens and num_tokens > 0:
        check_token_range(path, tokens, vocab_size)
    return tokens


def check_token_range(path, tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> None:
    for start in range(0, tokens.size, chunk):
        part = tokens[start:start + chunk]
        bad = np.flatnonzero(part >= vocab_size)
        if bad.size:
            i = start + int(bad[0])
            raise ShardError(path, f"token id {int(tokens[i])} >= vocabulary size {vocab_size} at position {i} "
                                   f"({int(bad.size)} such tokens in this block)")


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------


def file_sha256(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_entry(path) -> dict:
    """{"tokens", "bytes", "sha256"} of a (validated) shard file."""
    path = Path(path)
    return {"tokens": read_header(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _is_loss(value) -> bool:
    return type(value) in (int, float) and 0 <= value < float("inf")


MANIFEST_FACTS = {
    "kind": (lambda v: isinstance(v, str), "a string"),
    "val_optimal_loss": (_is_loss, "a non-negative number"),
    "val_optimal_loss_prefix": (lambda v: isinstance(v, dict) and all(map(_is_loss, v.values())),
                                "an object of non-negative numbers (val tokens -> floor)"),
}


def read_manifest(folder) -> dict | None:
    """The folder's manifest, or None if it has none. A malformed manifest is an error."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"the manifest is not valid JSON ({e})", path) from None
    except UnicodeDecodeError as e:
        raise UserError(f"the manifest is not UTF-8 text ({e.reason} at byte {e.start})", path) from None
    except RecursionError:
        raise UserError("the manifest is nested too deeply", path) from None
    if not isinstance(manifest, dict):
        raise UserError("a manifest must be a JSON object", path)
    if manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise UserError(f"unknown manifest schema_version {manifest.get('schema_version')!r} "
                        f"(expected {MANIFEST_SCHEMA_VERSION})", path)
    if not isinstance(manifest.get("files"), dict):
        raise UserError("the manifest has no 'files' object", path)
    for name, (valid, what) in MANIFEST_FACTS.items():  # what runs read from it and stamp into their logs
        if name in manifest and not valid(manifest[name]):
            raise UserError(f"the manifest's {name} must be {what}, got {json.dumps(manifest[name])[:40]}", path)
    return manifest


def write_manifest(folder, manifest: dict) -> None:
    manifest = {"schema_version": MANIFEST_SCHEMA_VERSION, **manifest}
    atomic_write_text(Path(folder) / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def data_vocab(folder) -> tuple[int, int]:
    """(vocab_size, eot_token) of the shards in ``folder``: the manifest's, else GPT-2's; checked (uint16
    tokens: a vocabulary of 2 to 65,536 ids, the end-of-text id one of them)."""
    manifest = read_manifest(folder) or {}
    vocab_size, eot = manifest.get("vocab_size", GPT2_VOCAB_SIZE), manifest.get("eot_token", GPT2_EOT)
    where = Path(folder) / MANIFEST_NAME
    if type(vocab_size) is not int or not 2 <= vocab_size <= 65536:
        raise UserError(f"manifest vocab_size must be an integer in [2, 65536], got {vocab_size!r}", where)
    if type(eot) is not int or not 0 <= eot < vocab_size:
        raise UserError(f"manifest eot_token must be an integer in [0, vocab_size = {vocab_size}), got {eot!r}",
                        where)
    return vocab_size, eot


# ---------------------------------------------------------------------------------------------
# Finding shards
# ---------------------------------------------------------------------------------------------


def list_shards(folder, split: str) -> list[Path]:
    """Shards of ``split`` ("train" or "val") in ``folder``, in sorted-name order. A name that is not a readable
    file (a broken or looping symbolic link, a folder) is an error, never skipped."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    paths = sorted(Path(folder).glob(f"*_{split}_*.bin"))
    for p in paths:
        if not p.exists():  # also False for a symbolic link loop
            raise ShardError(p, "a broken or looping symbolic link")
        if not p.is_file():
            raise ShardError(p, "is not a regular file")
        if not os.access(p, os.R_OK):
            raise ShardError(p, "cannot be read (permission denied)")
    return paths


def the_val_shard(folder) -> Path:
    """The one val shard of ``folder`` (several would make "the validation loss" ambiguous)."""
    found = list_shards(folder, "val")
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise UserError(f"expected exactly one val shard (*_val_*.bin), found {len(found)}: {names}", folder)
    return found[0]


def val_shard_sha256(path, manifest: dict | None) -> str:
    """The sha256 of the val shard's bytes, read now (what the run validates on; the manifest's value is not
    copied); a manifest that lists another hash for it is an error (a malformed shard is reported as such)."""
    read_header(path)
    digest = file_sha256(path)
    listed = ((manifest or {}).get("files") or {}).get(Path(path).name)
    if isinstance(listed, dict) and listed.get("sha256") not in (None, digest):
        raise ShardError(path, f"sha256 {digest} does not match {MANIFEST_NAME} ({listed.get('sha256')!r}): "
                               "the val shard changed since the manifest was written")
    return digest


# ---------------------------------------------------------------------------------------------
# speedrun data verify
# ---------------------------------------------------------------------------------------------


def _manifest_vocab_size(manifest: dict | None) -> int:
    if manifest is None or "vocab_size" not in manifest:
        return GPT2_VOCAB_SIZE
    vocab_size = manifest["vocab_size"]
    if type(vocab_size) is not int or not 2 <= vocab_size <= 65536:
        raise UserError(f"manifest vocab_size must be an integer in [2, 65536], got {vocab_size!r}")
    return vocab_size


def verify_shard(path, vocab_size: int = GPT2_VOCAB_SIZE, manifest: dict | None = None) -> int:
    """Check one shard fully (header, size, every token, and its manifest entry); return its token count.

    ``manifest`` is the manifest of the shard's folder, if it has one: the shard must then be listed
    in it with the same token count, size and sha256. Raises ShardError naming the first problem.
    """
    path = Path(path)
    num_tokens = len(read_shard(path, check_tokens=True, vocab_size=vocab_size))
    if manifest is None:
        return num_tokens
    entry = manifest["files"].get(path.name)
    if entry is None:
        raise ShardError(path, f"not listed in {MANIFEST_NAME}")
    if not isinstance(entry, dict):
        raise ShardError(path, f"its {MANIFEST_NAME} entry is not an object: {entry!r}")
    if entry.get("tokens") != num_tokens:
        raise ShardError(path, f"has {num_tokens} tokens, {MANIFEST_NAME} says {entry.get('tokens')!r}")
    size = path.stat().st_size
    if entry.get("bytes") != size:
        raise ShardError(path, f"has {size} bytes, {MANIFEST_NAME} says {entry.get('bytes')!r}")
    digest = file_sha256(path)
    if entry.get("sha256") != digest:
        raise ShardError(path, f"sha256 {digest} does not match {MANIFEST_NAME} ({entry.get('sha256')!r})")
    return num_tokens


def _verify_results(arg: str):
    """Yield (ok, line) for every file that ``arg`` (a shard file or a folder of shards) stands for."""
    path = Path(arg)
    if not path.exists():
        yield False, f"BAD  {arg}: no such file or folder"
        return
    folder = path if path.is_dir() else path.parent
    try:
        manifest = read_manifest(folder)
        vocab_size = _manifest_vocab_size(manifest)
    except (ValueError, OSError) as e:
        # Without a readable manifest the shards are still checked, against the GPT-2 vocabulary.
        yield False, f"BAD  {folder / MANIFEST_NAME}: {e}"
        manifest, vocab_size = None, GPT2_VOCAB_SIZE
    shards = sorted(path.glob("*.bin")) if path.is_dir() else [path]  # broken links too: reported below
    if path.is_dir() and not shards:
        yield False, f"BAD  {arg}: no shard files (*.bin) in this folder"
    for shard in shards:
        try:
            num_tokens = verify_shard(shard, vocab_size, manifest)
        except ShardError as e:
            if shard.is_symlink() and not shard.exists():
                yield False, f"BAD  {shard}: a broken or looping symbolic link"
            else:
                yield False, f"BAD  {shard}: {e.problem}"
        except OSError as e:
            yield False, f"BAD  {shard}: cannot read ({e.strerror or e})"
        else:
            yield True, f"OK   {shard}  ({num_tokens:,} tokens)"
    if path.is_dir() and manifest is not None:
        present = {p.name for p in shards}
        for name in sorted(set(manifest["files"]) - present):
            yield False, f"BAD  {path / name}: listed in {MANIFEST_NAME} but missing"


def verify_command(paths: list[str]) -> int:
    """``speedrun data verify PATH...``: check shard files and folders of shards; 0 if all are good.

    Prints one line per file (``OK   path  (N tokens)`` or ``BAD  path: problem``) and a count line.
    """
    if not paths:
        print("error: give at least one shard file or folder to verify")
        return 1
    n_ok = n_bad = 0
    for arg in paths:
        for ok, line in _verify_results(arg):
            print(line, flush=True)
            n_ok, n_bad = n_ok + ok, n_bad + (not ok)
    print(f"{n_ok} OK, {n_bad} BAD" + ("" if n_bad else ": all shards are good"))
    return 0 if n_bad == 0 else 1
