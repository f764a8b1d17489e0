"""Record #89's data: whole documents packed from BOS, per rank, and the unaligned validation chunks.

Train (spec recipe-frontier.md 1.2-1.5). Each optimizer step reads 8 sequences (``batch_slots``), one per
"virtual rank", each of T + 1 tokens with T = batch_tokens / 8 (the step's plan: speedrun/schedule.py).
A shard's BOS positions (token ``bos``, 50256 for GPT-2) are indexed once; a cursor walks them. Sequence
v = 0..7 of the step is built by taking pieces until it holds T + 1 tokens:

    while length <= T:
        start = the BOS under the cursor; advance the cursor
        end   = min(the next BOS (or the shard's end), start + max_doc_len, start + (T + 1 - length))
        the piece [start, end) joins the sequence; length += end - start

so every piece starts at a BOS, a document longer than max_doc_len keeps only its first max_doc_len tokens
(its rest is never read), and the last piece is cut to fill the sequence exactly (the rest of that
document is skipped: the next sequence starts at the next BOS). If the cursor runs off the shard's last
BOS while building the step, the step's pieces are dropped, the rest of the shard is never read, and the
whole step is built again from the next shard's first BOS (the shards are used once, in sorted order).

A sequence's inputs are its first T tokens (int32), its targets the last T (int64): targets run across
pieces (no loss masking). cu_seqlens is [0, l1, l1 + l2, ..., T] with the last piece counted one shorter,
padded with T to the plan's fixed number of slots. The bigram hash of the inputs goes with them.

World size W (A = 8 / W micro-steps per process): process r at micro-step m takes sequence v = m * W + r.
The step is always built whole, as the record built it on its 8 GPUs, so every world size reads exactly
the record's 8-GPU stream. (The record's own code, run on W < 8 GPUs, builds one micro-step's W sequences
at a time; it then differs from its 8-GPU stream in one case only: when a shard runs out partway through a
step, it keeps the micro-steps already built from the old shard, where 8 GPUs rebuild the whole step from
the next shard. This loader always does the latter.)

Validation (spec 1.6): the first val_tokens + 1 tokens of the val shard, not aligned to documents, in
chunks of T_val = val_batch_tokens / 8 tokens: chunk k reads tokens k*T_val .. (k+1)*T_val (+1 for the
targets); process r takes chunks r, r + W, r + 2W, ... Its cu_seqlens is [0, every BOS position in the
inputs, T_val, T_val, ...] (a chunk has no context from the one before it).

The bigram hash (spec 1.4), for a rank's inputs tok with M = bigram_vocab_size - 1: p = tok with p[0]
replaced by M; h[0] = M and h[t] = ((36313 p[t]) XOR (27191 p[t-1])) mod M in int32 arithmetic that wraps
(27191 * M overflows at t = 1 for the record's M = 754,559), floor modulo, so h is in [0, M].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from speedrun.data.loader import (
    PrefetchingLoader,
    _check_int,
    _check_world,
    check_val_prefix,
    load_checked,
    stream_position,
    train_shard_paths,
)
from speedrun.data.shards import read_shard, the_val_shard
from speedrun.errors import UserError
from speedrun.schedule import cu_seqlens_slots

BIGRAM_MULTIPLIERS = (36313, 27191)


def bigram_hash(inputs: np.ndarray, bigram_vocab_size: int) -> np.ndarray:
    """Hashed-bigram row of every position of one rank's ``inputs`` (T,) -> (T,) int32 in [0, size - 1]."""
    mod = bigram_vocab_size - 1
    prev = np.asarray(inputs, dtype=np.int32).copy()
    prev[0] = mod
    out = np.empty_like(prev)
    out[0] = mod
    # int32 products wrap (numpy does not check array overflow); % with a positive modulus is floor modulo
    out[1:] = np.bitwise_xor(np.int32(BIGRAM_MULTIPLIERS[0]) * prev[1:],
                             np.int32(BIGRAM_MULTIPLIERS[1]) * prev[:-1]) % np.int32(mod)
    return out


def pack_step(bos: np.ndarray, shard_size: int, cursor: int, sequences: int, tokens: int,
              max_doc_len: int) -> tuple[list[list[tuple[int, int]]], int] | None:
    """The pieces [(start, end), ...] of ``sequences`` sequences of ``tokens`` + 1 tokens each, taken from
    the BOS index ``bos`` of a shard of ``shard_size`` tokens from ``cursor`` on, and the cursor after
    them; None when the shard's BOS run out first (the step must then come from the next shard)."""
    out = []
    for _ in range(sequences):
        pieces, length = [], 0
        while length <= tokens:
            if cursor >= len(bos):
                return None
            start = int(bos[cursor])
            cursor += 1
            next_bos = int(bos[cursor]) if cursor < len(bos) else shard_size
            end = min(next_bos, start + max_doc_len, start + tokens + 1 - length)
            pieces.append((start, end))
            length += end - start
        out.append(pieces)
    return out, cursor


def cu_seqlens(boundaries: list[int], tokens: int, slots: int, where: str) -> np.ndarray:
    """[0, *boundaries] padded with ``tokens`` to ``slots`` entries (int32); a clear error if they do not fit."""
    if len(boundaries) + 1 > slots:
        raise ValueError(f"{where}: {len(boundaries)} documents in a sequence of {tokens:,} tokens, but the "
                         f"recipe's cu_seqlens holds at most {slots - 1} (documents this short are not "
                         "what the recipe was made for)")
    cu = np.full(slots, tokens, dtype=np.int32)
    cu[0] = 0
    cu[1:len(boundaries) + 1] = boundaries
    return cu


class PackedTrainStream:
    """The packed train stream of one process, in numpy (no threads, no devices).

    ``plan(step)`` is speedrun.schedule.plan for the run (the step's tokens_per_rank, max_doc_len, cu_slots).
    ``next_step()``: this process's A = batch_slots / world_size micro-batches for the next step, each
    (inputs (T,) int32, targets (T,) int64, cu_seqlens (slots,) int32, bigram (T,) int32).
    """

    def __init__(self, paths: list[Path], plan, batch_slots: int, world_size: int, rank: int, bos: int,
                 bigram_vocab_size: int, vocab_size: int | None = None):
        self.paths, self.plan, self.batch_slots = paths, plan, batch_slots
        self.world_size, self.rank, self.bos_token = world_size, rank, bos
        self.bigram_vocab_size, self.vocab_size = bigram_vocab_size, vocab_size
        self._loaded = None  # (shard index, tokens, bos index)
        self.seek({"step": 0, "shard_index": 0, "cursor": 0})

    def seek(self, state: dict) -> None:
        self.step, self.shard_index, self.cursor = stream_position(state, ("step", "shard_index", "cursor"),
                                                                   len(self.paths))
        self._load(self.shard_index)

    def state(self) -> dict:
        return {"step": self.step, "shard_index": self.shard_index, "cursor": self.cursor}

    def _load(self, index: int) -> None:
        if self._loaded is None or self._loaded[0] != index:
            tokens = load_checked(self.paths[index], self.vocab_size)
            self._loaded = (index, tokens, np.flatnonzero(tokens == self.bos_token))

    def next_step(self) -> list[tuple[np.ndarray, ...]]:
        p = self.plan(self.step)
        T = p.tokens_per_rank
        while True:
            _, tokens, bos = self._loaded
            packed = pack_step(bos, len(tokens), self.cursor, self.batch_slots, T, p.max_doc_len)
            if packed is not None:
                break
            if self.shard_index + 1 == len(self.paths):
                raise UserError(f"the train data ran out at step {self.step}: {len(self.paths)} shard(s) ending "
                                   f"with {self.paths[-1].name} hold no more whole steps of {self.batch_slots} x "
                                   f"{T + 1:,} tokens from document starts. Add train shards or run fewer steps")
            self.shard_index, self.cursor = self.shard_index + 1, 0
            self._load(self.shard_index)
        sequences, self.cursor = packed
        out = []
        for micro in range(self.batch_slots // self.world_size):
            pieces = sequences[micro * self.world_size + self.rank]
            buf = np.concatenate([tokens[a:b] for a, b in pieces])
            inputs, targets = buf[:-1].astype(np.int32), buf[1:].astype(np.int64)
            lengths = np.array([b - a for a, b in pieces])
            lengths[-1] -= 1  # the sequence's last token is only a target
            where = f"{self.paths[self.shard_index].name}, step {self.step}"
            cu = cu_seqlens(np.cumsum(lengths).tolist(), T, p.cu_slots, where)
            out.append((inputs, targets, cu, bigram_hash(inputs, self.bigram_vocab_size)))
        self.step += 1
        return out


class PackedTrainLoader(PrefetchingLoader):
    """Record #89's train stream of one process (see the module docstring), prefetched on a thread:
    ``next_step()`` returns this process's micro-batches for the next step as tensors on ``device``:
    [(inputs (T,) int32, targets (T,) int64, cu_seqlens (slots,) int32, bigram (T,) int32), ...].

    ``plan``: speedrun.schedule.plan bound to the run's config (a function of the step). ``shards``: a
    folder or a list of shard paths. ``state_dict()`` is {"step", "shard_index", "cursor"}.
    """

    def __init__(self, shards, plan, batch_slots: int = 8, world_size: int = 1, rank: int = 0, bos: int = 50256,
                 bigram_vocab_size: int = 754_560, device="cpu", prefetch: bool = True, vocab_size: int | None = None):
        batch_slots = _check_int("batch_slots", batch_slots, 1)
        world_size, rank = _check_world(world_size, rank)
        if batch_slots % world_size:
            raise ValueError(f"world_size {world_size} must divide the {batch_slots} sequences of a step")
        _check_int("bigram_vocab_size", bigram_vocab_size, 2)
        stream = PackedTrainStream(train_shard_paths(shards), plan, batch_slots, world_size, rank, int(bos),
                                   bigram_vocab_size, vocab_size)
        super().__init__(stream, device, prefetch, ("step", "shard_index", "cursor"))


def val_shard_path(val_shard) -> Path:
    """The val shard itself, or the one val shard (*_val_*.bin) in a folder."""
    path = Path(val_shard)
    return the_val_shard(path) if path.is_dir() else path


def packed_val_chunks(val_shard, val_tokens: int, val_batch_tokens: int, batch_slots: int = 8, world_size: int = 1,
                      rank: int = 0, bos: int = 50256, bigram_vocab_size: int = 754_560, vocab_size: int | None = None):
    """This process's validation chunks (see the module docstring), in order, as an iterator of numpy arrays
    (inputs (T_val,) int32, targets (T_val,) int64, cu_seqlens (slots,) int32, bigram (T_val,) int32).
    The arguments, the shard's size and (with ``vocab_size``) its tokens are checked now."""
    val_tokens = _check_int("val_tokens", val_tokens, 1)
    val_batch_tokens = _check_int("val_batch_tokens", val_batch_tokens, 1)
    batch_slots = _check_int("batch_slots", batch_slots, 1)
    world_size, rank = _check_world(world_size, rank)
    if val_batch_tokens % batch_slots or val_tokens % val_batch_tokens:
        raise UserError(f"val_tokens {val_tokens:,} must be a multiple of the validation batch {val_batch_tokens:,}, "
                         f"itself a multiple of {batch_slots} chunks")
    if batch_slots % world_size:
        raise ValueError(f"world_size {world_size} must divide the {batch_slots} chunks of a validation batch")
    path = val_shard_path(val_shard)
    check_val_prefix(path, val_tokens, vocab_size)
    chunk = val_batch_tokens // batch_slots
    return _val_chunks(path, range(rank, val_tokens // chunk, world_size), chunk, bos, bigram_vocab_size)


def _val_chunks(path: Path, chunks: range, chunk: int, bos: int, bigram_vocab_size: int):
    slots = cu_seqlens_slots(chunk)
    tokens = read_shard(path)
    for k in chunks:
        buf = np.array(tokens[k * chunk:(k + 1) * chunk + 1], dtype=np.int64)
        inputs = buf[:-1].astype(np.int32)
        starts = np.flatnonzero(inputs == bos).tolist()
        # the last slot must stay T_val: it closes the chunk's last document
        cu = cu_seqlens(starts, chunk, slots - 1, f"{path.name}, validation chunk {k}")
        yield inputs, buf[1:], np.append(cu, np.int32(chunk)), bigram_hash(inputs, bigram_vocab_size)
