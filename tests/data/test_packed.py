"""speedrun/data/packed.py: record #89's BOS-aligned train stream and validation chunks, against the record's
own loader output (golden tokens.pt) and against a plain document-level reference written from the spec."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from speedrun import schedule
from speedrun.config import Stage, get_preset
from speedrun.data.packed import PackedTrainLoader, bigram_hash, packed_val_chunks
from speedrun.data.shards import write_shard
from speedrun.errors import UserError

BOS = 50256


# ---------------------------------------------------------------------------------------------
# An independent reference, document by document (spec 1.2)
# ---------------------------------------------------------------------------------------------


def documents(tokens: np.ndarray) -> list[np.ndarray]:
    """The shard cut before every BOS; what precedes the first BOS is never read."""
    starts = [i for i, t in enumerate(tokens.tolist()) if t == BOS]
    return [tokens[a:b] for a, b in zip(starts, starts[1:] + [len(tokens)], strict=True)]


class ReferenceStream:
    """The record's 8-GPU stream: per step, 8 sequences of T + 1 tokens from whole documents."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards, self.shard, self.doc = [documents(s) for s in shards], 0, 0

    def step(self, T: int, max_len: int, n: int = 8) -> list[tuple[list[int], list[int]]]:
        while True:
            docs, i, out = self.shards[self.shard], self.doc, []
            for _ in range(n):
                seq, lengths = [], []
                while len(seq) <= T and i < len(docs):
                    piece = docs[i][:min(max_len, T + 1 - len(seq))].tolist()
                    i += 1
                    seq += piece
                    lengths.append(len(piece))
                if len(seq) <= T:
                    break
                out.append((seq, lengths))
            if len(out) == n:
                self.doc = i
                return out
            self.shard, self.doc = self.shard + 1, 0  # the step is built again from the next shard


def reference_cu(lengths: list[int], T: int, slots: int) -> list[int]:
    lengths = lengths[:-1] + [lengths[-1] - 1]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu + [T] * (slots - len(cu))


def reference_hash(tokens: list[int], size: int) -> list[int]:
    """Python integers, wrapped to int32 by hand, floor modulo (spec 1.4)."""
    def wrap(v):
        return (v + 2**31) % 2**32 - 2**31

    mod = size - 1
    prev = [mod] + tokens[1:]
    return [mod] + [(wrap(36313 * prev[t]) ^ wrap(27191 * prev[t - 1])) % mod for t in range(1, len(tokens))]


# ---------------------------------------------------------------------------------------------
# Helpers: shards of random documents, a small staged config
# ---------------------------------------------------------------------------------------------


def random_shard(rng: np.random.Generator, n_tokens: int, min_doc: int, max_doc: int) -> np.ndarray:
    out = [rng.integers(0, BOS, size=rng.integers(0, 5))]  # a few tokens before the first BOS
    total = len(out[0])
    while total < n_tokens:
        n = int(rng.integers(min_doc, max_doc + 1))
        out.append(np.concatenate([[BOS], rng.integers(0, BOS, size=n - 1)]))
        total += n
    return np.concatenate(out)[:n_tokens].astype(np.uint16)


def write_shards(folder, shards: list[np.ndarray]) -> None:
    for i, tokens in enumerate(shards):
        write_shard(folder / f"t_train_{i + 1:06d}.bin", tokens)


def small_staged_config(steps_per_stage: int = 2):
    """record89's structure at toy sizes: 3 stages of ``steps_per_stage`` steps, T = 64 / 128 / 192 tokens."""
    cfg = get_preset("record89")
    stages = (
        Stage(1 / 3, 8 * 64, 40, (1, 3), 1.0, (1.0, 0.5, 0.25), (1.0, 0.5, 0.0)),
        Stage(1 / 3, 8 * 128, 96, (3, 7), 1.52, (1.0, 0.5), (1.0, 0.0)),
        Stage(1 / 3, 8 * 192, 96, (5, 11), 1.73, (1.0,), (1.0,)),
        Stage(None, 8 * 192, 96, (6, 13), 1.0, (1.0,), (1.0,)),
    )
    sched = dataclasses.replace(cfg.schedule, stages=stages, scheduled_steps=3 * steps_per_stage, extension_steps=2)
    return dataclasses.replace(cfg, schedule=sched,
                               train=dataclasses.replace(cfg.train, num_steps=sched.total_steps, val_every=2))


def loader(folder, cfg, world_size=1, rank=0, prefetch=False, bigram=8192):
    return PackedTrainLoader(folder, lambda s: schedule.plan(cfg, s), 8, world_size, rank, BOS, bigram,
                             prefetch=prefetch)


# ---------------------------------------------------------------------------------------------
# The record's own loader output
# ---------------------------------------------------------------------------------------------


def test_batches_equal_the_records_loader(golden89, tmp_path):
    """The record's loader on the golden shards (world size 1, 8 micro-steps, T = 512, documents cut to 224,
    128 cu_seqlens slots, bigram table 8192): 3 steps x 8 micro-batches, every tensor equal."""
    tokens = golden89.tensors("tokens")
    write_shards(tmp_path, [tokens["shard1_stream"].numpy().astype(np.uint16),
                            tokens["shard2_stream"].numpy().astype(np.uint16)])
    cfg = golden89.run_config()
    stream = loader(tmp_path, cfg, bigram=golden89.config["bigram_vocab_size"])
    for step in range(golden89.config["n_steps"]):
        batches = stream.next_step()
        assert len(batches) == 8
        for micro, got in enumerate(batches):
            for name, value in zip(("inputs", "targets", "cum_seqlens", "bigram_inputs"), got, strict=True):
                expected = tokens[f"step{step}/micro{micro}/{name}"]
                assert value.dtype == expected.dtype, (step, micro, name)
                assert torch.equal(value, expected), (step, micro, name)


def test_bigram_hash_wraps_like_int32_at_the_records_size():
    """754,560 rows: 27191 * 754,559 overflows int32 at position 1 (spec 1.4: -957,622,711 after the wrap)."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50304, size=300).astype(np.int32)
    tokens[:3] = [50256, 50303, 0]
    got = bigram_hash(tokens, 754_560)
    assert got.dtype == np.int32
    assert got.tolist() == reference_hash(tokens.tolist(), 754_560)
    assert np.array([754_559], dtype=np.int32) * np.int32(27191) == -957_622_711
    assert got[0] == 754_559 and ((0 <= got[1:]) & (got[1:] < 754_559)).all()


# ---------------------------------------------------------------------------------------------
# Against the reference, every world size, across shard boundaries and stage changes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_every_world_size_reads_the_records_8_gpu_stream(tmp_path, world_size):
    """Three shards sized so that a shard runs out in the middle of a step, twice; documents both shorter
    and longer than the document cap; stage changes (T 64 -> 128 -> 192, cap 40 -> 96). Every process's
    micro-batches are the reference's sequences m * W + r, inputs, targets, cu_seqlens and bigram hash."""
    rng = np.random.default_rng(7)
    shards = [random_shard(rng, n, 3, 150) for n in (2500, 3100, 40_000)]
    write_shards(tmp_path, shards)
    cfg = small_staged_config()
    ref = ReferenceStream(shards)
    streams = [loader(tmp_path, cfg, world_size, r, prefetch=r % 2 == 1) for r in range(world_size)]
    for step in range(cfg.train.num_steps):
        p = schedule.plan(cfg, step)
        expected = ref.step(p.tokens_per_rank, p.max_doc_len)
        per_rank = [s.next_step() for s in streams]
        for r, batches in enumerate(per_rank):
            assert len(batches) == 8 // world_size
            for m, (x, y, cu, bigram) in enumerate(batches):
                seq, lengths = expected[m * world_size + r]
                assert x.tolist() == seq[:-1] and y.tolist() == seq[1:], (step, r, m)
                assert (x.dtype, y.dtype) == (torch.int32, torch.int64)
                assert cu.dtype == bigram.dtype == torch.int32
                assert cu.tolist() == reference_cu(lengths, p.tokens_per_rank, p.cu_slots), (step, r, m)
                assert bigram.tolist() == reference_hash(seq[:-1], 8192), (step, r, m)
    assert ref.shard == 2  # both boundaries were crossed
    assert streams[0].state_dict()["shard_index"] == 2


def test_a_step_that_does_not_fit_moves_whole_to_the_next_shard(tmp_path):
    """The first shard holds 7 whole sequences: step 0 comes entirely from the second shard's start."""
    rng = np.random.default_rng(3)
    first = np.concatenate([np.concatenate([[BOS], rng.integers(0, BOS, 64)]) for _ in range(7)]).astype(np.uint16)
    second = random_shard(rng, 5000, 10, 30)
    write_shards(tmp_path, [first, second])
    batches = loader(tmp_path, small_staged_config()).next_step()
    assert batches[0][0].tolist() == second[:64].tolist()


def test_running_out_of_data_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(4)
    write_shards(tmp_path, [random_shard(rng, 1200, 10, 60)])
    stream = loader(tmp_path, small_staged_config())
    stream.next_step()
    with pytest.raises(UserError, match=r"train data ran out at step 1: 1 shard\(s\) ending with t_train_000001"):
        for _ in range(5):
            stream.next_step()


def test_too_many_documents_for_cu_seqlens_is_a_clear_error(tmp_path):
    """T = 64 gets 128 cu_seqlens slots: 2-token documents make 33 pieces, fine; the 896-slot validation
    chunks are checked the same way (below)."""
    short_docs = np.tile(np.array([BOS, 5], dtype=np.uint16), 70_000)
    write_shards(tmp_path, [short_docs])
    cfg = small_staged_config()
    assert len(loader(tmp_path, cfg).next_step()) == 8
    tiny_slots = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, stages=(
        dataclasses.replace(cfg.schedule.stages[0], batch_tokens=8 * 16_384), *cfg.schedule.stages[1:])))
    with pytest.raises(ValueError, match=r"8193 documents in a sequence of 16,384 tokens, but the recipe's "
                                         r"cu_seqlens holds at most 63"):
        loader(tmp_path, tiny_slots).next_step()


def test_prefetch_reset_and_state(tmp_path):
    rng = np.random.default_rng(5)
    write_shards(tmp_path, [random_shard(rng, 30_000, 5, 100)])
    cfg = small_staged_config()
    plain, threaded = loader(tmp_path, cfg), loader(tmp_path, cfg, prefetch=True)
    first = [plain.next_step() for _ in range(3)]
    assert all(torch.equal(a, b) for x, y in zip(first, [threaded.next_step() for _ in range(3)], strict=True)
               for p, q in zip(x, y, strict=True) for a, b in zip(p, q, strict=True))
    state = threaded.state_dict()
    assert state["step"] == 3 and state["shard_index"] == 0 and state["cursor"] > 0
    fourth = threaded.next_step()
    threaded.reset()
    again = threaded.next_step()
    assert all(torch.equal(a, b) for p, q in zip(first[0], again, strict=True) for a, b in zip(p, q, strict=True))
    threaded.load_state_dict(state)
    assert all(torch.equal(a, b) for p, q in zip(fourth, threaded.next_step(), strict=True)
               for a, b in zip(p, q, strict=True))
    threaded.close()
    with pytest.raises(ValueError, match="world_size 3 must divide"):
        loader(tmp_path, cfg, world_size=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no train shards"):
        loader(tmp_path / "empty", cfg)


# ---------------------------------------------------------------------------------------------
# Validation chunks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_val_chunks_are_the_first_val_tokens_unaligned(tmp_path, world_size):
    rng = np.random.default_rng(6)
    tokens = random_shard(rng, 9000, 20, 300)
    tokens[512] = BOS  # a chunk that starts with BOS: a zero-length first document
    path = tmp_path / "t_val_000000.bin"
    write_shard(path, tokens)
    val_tokens, val_batch = 4096, 1024  # 4 micro-steps of 8 chunks of 128 tokens
    chunks = list(packed_val_chunks(tmp_path, val_tokens, val_batch, 8, world_size, 0, BOS, 8192))
    chunks += [c for r in range(1, world_size) for c in packed_val_chunks(path, val_tokens, val_batch, 8,
                                                                          world_size, r, BOS, 8192)]
    assert len(chunks) == 32
    order = [k for r in range(world_size) for k in range(r, 32, world_size)]
    slots = schedule.cu_seqlens_slots(128)
    for k, (x, y, cu, bigram) in zip(order, chunks, strict=True):
        window = tokens[k * 128:(k + 1) * 128 + 1].astype(np.int64)
        assert x.tolist() == window[:-1].tolist() and y.tolist() == window[1:].tolist()
        starts = [i for i in range(128) if window[i] == BOS]
        assert cu.tolist() == [0] + starts + [128] * (slots - 1 - len(starts))
        assert bigram.tolist() == reference_hash(window[:-1].tolist(), 8192)
    assert chunks[order.index(4)][2][:2].tolist() == [0, 0]


def test_val_chunks_check_their_arguments(tmp_path):
    path = tmp_path / "t_val_000000.bin"
    write_shard(path, np.tile(np.array([BOS, 1, 2, 3], dtype=np.uint16), 1000))
    with pytest.raises(ValueError, match="holds 4,000 tokens; val_tokens 4,096 needs 4,097"):
        packed_val_chunks(path, 4096, 1024)
    with pytest.raises(ValueError, match="must be a multiple of the validation batch"):
        packed_val_chunks(path, 3000, 1024)
    with pytest.raises(ValueError, match="world_size 3 must divide"):
        packed_val_chunks(path, 2048, 1024, world_size=3)
    # The record's 262,144-token chunks have 896 cu_seqlens slots: 2-token documents do not fit.
    write_shard(path, np.tile(np.array([BOS, 7], dtype=np.uint16), 1_048_577))
    with pytest.raises(ValueError, match=r"validation chunk 0: 131072 documents .* at most 894"):
        next(packed_val_chunks(path, 2_097_152, 2_097_152))
