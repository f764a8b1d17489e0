"""``speedrun data tokenize``: turn raw text into shards made exactly like the published FineWeb ones.

This follows the script that made ``kjj0/fineweb10B-gpt2`` (llm.c / modded-nanogpt ``data/fineweb.py``):
each document is encoded with GPT-2's tiktoken ``encode_ordinary`` (text that looks like a special
token is plain text) and preceded by the end-of-text token 50256; the documents are concatenated in
input order and cut into shards of exactly ``shard_tokens`` tokens, so a document that does not fit
fills the current shard and continues in the next. Shard 0 is the validation shard
``<name>_val_000000.bin``, then come ``<name>_train_000001.bin``, ...; the last, partial shard is
written too.

Inputs: ``.txt`` (one document per non-empty line, or the whole file as one document), ``.jsonl``
(a string ``"text"`` field on every line) and ``.parquet`` (a ``text`` column). The shards are
written into a staging folder next to the output folder and moved into place only when everything
succeeded, so a failure never leaves half a dataset behind.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import sys
from collections import deque
from pathlib import Path

import numpy as np
from tqdm import tqdm

from speedrun.data.shards import GPT2_EOT, GPT2_VOCAB_SIZE, MANIFEST_NAME, manifest_entry, write_manifest, write_shard
from speedrun.errors import UserError

TXT_MODES = ("lines", "file")
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
BATCH_CHARS = 1 << 20  # about this many characters of text go to a worker per task
PARQUET_BATCH_ROWS = 1024
SHARD_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class TokenizeError(UserError):
    """Bad input or output folder; the message names the file (and line) and the problem."""


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------


def _txt_documents(path: Path, txt_mode: str):
    with open(path, encoding="utf-8") as f:  # universal newlines: "\r\n" arrives as "\n"
        if txt_mode == "file":
            text = f.read()
            if text:
                yield text
            return
        for line in f:
            if line.strip():
                yield line.rstrip("\n")


def _jsonl_documents(path: Path):
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TokenizeError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise TokenizeError(f'{path}:{line_number}: no string "text" field in this line')
            yield text


def _parquet_documents(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise TokenizeError(f"{path}: not a readable parquet file ({e})") from None
    columns = parquet.schema_arrow.names
    if "text" not in columns:
        raise TokenizeError(f"{path}: no 'text' column (it has: {', '.join(columns) or 'no columns'})")
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise TokenizeError(f"{path}: row {row} (counting from 0): 'text' is "
                                    f"{type(text).__name__}, not a string")
            yield text
            row += 1


def read_documents(path, txt_mode: str = "lines"):
    """Yield the documents of one input file, in order; errors name the file (and line or row)."""
    path = Path(path)
    readers = {".txt": lambda: _txt_documents(path, txt_mode), ".jsonl": lambda: _jsonl_documents(path),
               ".parquet": lambda: _parquet_documents(path)}
    num_documents = 0
    try:
        for document in readers[path.suffix.lower()]():
            num_documents += 1
            yield document
    except UnicodeDecodeError as e:
        raise TokenizeError(f"{path}: not UTF-8 text ({e.reason})") from None
    if num_documents == 0:
        raise TokenizeError(f"{path}: holds no documents (empty input)")


def _batches(documents):
    """Group documents into lists of about BATCH_CHARS characters: one worker task each."""
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# Tokenizing (runs in the worker processes)
# ---------------------------------------------------------------------------------------------

_encoder = None


def load_encoder():
    """The GPT-2 tiktoken encoding, loaded once per process; a clear error if it cannot be had."""
    global _encoder
    if _encoder is None:
        import tiktoken

        try:
            _encoder = tiktoken.get_encoding("gpt2")
        except Exception as e:  # noqa: BLE001 -- tiktoken raises network errors of several libraries
            raise TokenizeError(
                f"cannot load the GPT-2 vocabulary ({type(e).__name__}: {e}). tiktoken downloads it once and "
                "caches it; on a machine with no network, copy that cache over and point TIKTOKEN_CACHE_DIR "
                "at it") from None
    return _encoder


def tokenize_documents(documents: list[str]) -> np.ndarray:
    """[EOT] + encode_ordinary(doc) for every document, concatenated, as uint16."""
    encoder = load_encoder()
    tokens = []
    for document in documents:
        tokens.append(GPT2_EOT)
        tokens.extend(encoder.encode_ordinary(document))
    return np.array(tokens, dtype=np.uint16)  # GPT-2 ids are < 50257, so they fit


def _ignore_interrupts() -> None:
    """In each worker: Ctrl-C is the parent's to handle (which cleans up and stops the pool); a worker that
    took it too would print its own traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _token_batches(batches, workers: int):
    """Tokenized batches, in input order, from ``workers`` processes (1: in this process)."""
    if workers == 1:
        for batch in batches:
            yield tokenize_documents(batch)
        return
    # Pool.imap would feed tasks from a thread that reads the whole input ahead into memory; a
    # bounded window of apply_async results keeps memory small, keeps the order, and lets reading
    # errors surface here at once. "spawn" gives workers the current environment (TIKTOKEN_CACHE_DIR).
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_interrupts) as pool:
        in_flight = deque()
        for batch in batches:
            in_flight.append(pool.apply_async(tokenize_documents, (batch,)))
            if len(in_flight) >= 4 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


# ---------------------------------------------------------------------------------------------
# Cutting the token stream into shards
# ---------------------------------------------------------------------------------------------


class ShardCutter:
    """Cuts a stream of token arrays into shards of exactly ``shard_tokens`` tokens in ``folder``."""

    def __init__(self, folder: Path, name: str, shard_tokens: int):
        self.folder, self.name = folder, name
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.filled = 0
        self.paths: list[Path] = []

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:  # a document longer than a shard spans several
            take = min(tokens.size, self.buffer.size - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.buffer.size:
                self._write()

    def finish(self) -> list[Path]:
        if self.filled:
            self._write()  # the final, partial shard
        return self.paths

    def _write(self) -> None:
        index = len(self.paths)
        split = "val" if index == 0 else "train"
        path = self.folder / f"{self.name}_{split}_{index:06d}.bin"
        write_shard(path, self.buffer[:self.filled])
        self.paths.append(path)
        self.filled = 0


# ---------------------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------------------


def _check_arguments(inputs, out_dir: Path, shard_tokens, txt_mode, name, workers) -> None:
    if isinstance(inputs, (str, Path)) or not inputs:
        raise TokenizeError("give a list of one or more input files (.txt, .jsonl or .parquet)")
    seen = {}  # resolved path -> as given: a file given twice would put its documents in the shards twice
    for path in inputs:
        if not isinstance(path, (str, Path)) or not str(path):
            raise TokenizeError(f"an input must be a file path, got {path!r}")
        path = Path(path)
        if path.suffix.lower() not in INPUT_SUFFIXES:
            raise TokenizeError(f"{path}: unknown input type {path.suffix or '(no extension)'!r}; "
                                f"expected one of {', '.join(INPUT_SUFFIXES)}")
        if not path.exists():
            raise TokenizeError(f"{path}: no such file")
        if not path.is_file():
            raise TokenizeError(f"{path}: not a file")
        if path.stat().st_size == 0:
            raise TokenizeError(f"{path}: holds no documents (empty input)")
        if (first := seen.setdefault(path.resolve(), path)) is not path:
            raise TokenizeError(f"{path}: given twice (also as {first}); its documents would be tokenized twice")
    if not isinstance(shard_tokens, int) or isinstance(shard_tokens, bool) or not 0 < shard_tokens < 2**31:
        raise TokenizeError(f"shard_tokens must be an integer in [1, 2**31), got {shard_tokens!r}")
    if txt_mode not in TXT_MODES:
        raise TokenizeError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    if not isinstance(name, str) or not SHARD_NAME_PATTERN.fullmatch(name):
        raise TokenizeError(f"name must be letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                            f"got {name!r}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise TokenizeError(f"workers must be a positive integer, got {workers!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise TokenizeError(f"{out_dir} exists and is not a folder")
    _check_no_shards(out_dir)


def _check_no_shards(out_dir: Path) -> None:
    if out_dir.is_dir() and (any(out_dir.glob("*.bin")) or (out_dir / MANIFEST_NAME).exists()):
        raise TokenizeError(f"{out_dir} already holds shards; refusing to overwrite them "
                            "(choose another --out folder, or remove the old shards yourself)")


def _move_into_place(stage: Path, out_dir: Path) -> None:
    """Move the finished shards from ``stage`` into ``out_dir``; the manifest goes last."""
    if not out_dir.exists():
        os.rename(stage, out_dir)  # one atomic step
        return
    _check_no_shards(out_dir)  # something may have appeared while we worked
    moved = []
    try:
        for path in sorted(stage.glob("*.bin")) + [stage / MANIFEST_NAME]:
            os.replace(path, out_dir / path.name)
            moved.append(out_dir / path.name)
    except BaseException:
        for path in moved:  # our own new files: take them out again rather than leave half a dataset
            path.unlink(missing_ok=True)
        raise
    stage.rmdir()


def tokenize_to_shards(inputs, out_dir, shard_tokens: int = 100_000_000, txt_mode: str = "lines",
                       name: str = "fineweb", workers: int | None = None, progress: bool = True) -> dict:
    """Tokenize ``inputs`` into shards in ``out_dir`` (which must hold none yet); return the manifest."""
    out_dir = Path(out_dir)
    _check_arguments(inputs, out_dir, shard_tokens, txt_mode, name, workers)
    workers = workers or os.cpu_count() or 1
    load_encoder()  # fail now, not in every worker, when the vocabulary is unavailable
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.tokenizing-{os.getpid()}-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        cutter = ShardCutter(stage, name, shard_tokens)
        counts = {"documents": 0, "tokens": 0}

        def all_documents():
            for path in inputs:
                for document in read_documents(path, txt_mode):
                    counts["documents"] += 1
                    yield document

        with tqdm(desc="tokenizing", unit="tok", unit_scale=True, file=sys.stderr, disable=not progress) as bar:
            for tokens in _token_batches(_batches(all_documents()), workers):
                cutter.add(tokens)
                counts["tokens"] += tokens.size
                bar.update(tokens.size)
        paths = cutter.finish()
        manifest = {"kind": "tokenize", "vocab_size": GPT2_VOCAB_SIZE, "eot_token": GPT2_EOT,
                    "tokenizer": "tiktoken gpt2, encode_ordinary, EOT before each document",
                    "inputs": [str(p) for p in inputs], "shard_tokens": shard_tokens, "txt_mode": txt_mode,
                    "name": name, **counts, "files": {p.name: manifest_entry(p) for p in paths}}
        write_manifest(stage, manifest)
        _move_into_place(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def tokenize_command(inputs: list[str], out_dir: str, shard_tokens: int, txt_mode: str, name: str,
                     workers: int | None) -> int:
    """``speedrun data tokenize``: 0 on success; 1 (and nothing written) on any error; SIGTERM and Ctrl-C
    clean up (the staging folder is removed) and exit 130."""
    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        manifest = tokenize_to_shards(inputs, out_dir, shard_tokens, txt_mode, name, workers)
    except (TokenizeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; nothing was written to {out_dir}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    train = sum("_train_" in shard for shard in manifest["files"])
    print(f"{manifest['documents']:,} documents, {manifest['tokens']:,} tokens -> 1 val + {train} train shard(s) in "
          f"{out_dir} (check them with `speedrun data verify {out_dir}`)")
    if not train:  # (the first shard_tokens tokens are the val shard, as in the published data)
        print(f"warning: every token went into the val shard (its size is --shard-tokens {shard_tokens:,}): training "
              "needs a train shard too; give more text or a smaller --shard-tokens", file=sys.stderr)
    return 0
