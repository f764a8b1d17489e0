"""The train stream and validation batches, on small shards of random tokens written here.

Random token ids make any mis-slicing visible; the expected batches come from the recipe's rule
restated in ``recipe_steps`` below, and from hand-computed positions on shards of consecutive ids.
"""

import gc
import threading

import numpy as np
import pytest
import torch

from speedrun.data.loader import TrainLoader, ValLoader, val_batches
from speedrun.data.shards import ShardError, write_shard
from speedrun.errors import UserError


def write_train_shards(folder, sizes, rng):
    shards = []
    for i, size in enumerate(sizes):
        tokens = rng.integers(0, 65536, size=size)
        write_shard(folder / f"rand_train_{i + 1:06d}.bin", tokens)
        shards.append(tokens)
    return shards


def recipe_steps(shards, seq_len, batch_slots):
    """Every step's batch_slots (inputs, targets) pairs, by the recipe's rule, until the data runs out."""
    global_batch = seq_len * batch_slots
    steps, shard, pos = [], 0, 0
    while True:
        while pos + global_batch + 1 >= len(shards[shard]):
            shard, pos = shard + 1, 0
            if shard == len(shards):
                return steps
        tokens = shards[shard]
        steps.append([(tokens[pos + s * seq_len:pos + (s + 1) * seq_len],
                       tokens[pos + s * seq_len + 1:pos + (s + 1) * seq_len + 1]) for s in range(batch_slots)])
        pos += global_batch


def take(loader, n):
    return [[(x.numpy().copy(), y.numpy().copy()) for x, y in loader.next_step()] for _ in range(n)]


def assert_same_steps(got, expected):
    assert len(got) == len(expected)
    for step_got, step_expected in zip(got, expected, strict=False):
        assert len(step_got) == len(step_expected)
        for (x, y), (ex, ey) in zip(step_got, step_expected, strict=False):
            np.testing.assert_array_equal(x, ex)
            np.testing.assert_array_equal(y, ey)


# ---------------------------------------------------------------------------------------------
# Train stream
# ---------------------------------------------------------------------------------------------


def test_hand_checked_positions(tmp_path):
    # Token = its position, so every slice says where it came from.
    write_shard(tmp_path / "pos_train_000001.bin", np.arange(100))
    write_shard(tmp_path / "pos_train_000002.bin", np.arange(1000, 1100))
    loader = TrainLoader(tmp_path, seq_len=4, batch_slots=2, prefetch=False)
    steps = take(loader, 13)
    (x0, y0), (x1, y1) = steps[0]
    assert x0.tolist() == [0, 1, 2, 3] and y0.tolist() == [1, 2, 3, 4]
    assert x1.tolist() == [4, 5, 6, 7] and y1.tolist() == [5, 6, 7, 8]
    assert steps[1][0][0].tolist() == [8, 9, 10, 11]
    # pos 88: 88 + 8 + 1 < 100, the last step in shard 1; pos 96 would need token 104: next shard
    assert steps[11][1][1].tolist() == [93, 94, 95, 96]
    assert steps[12][0][0].tolist() == [1000, 1001, 1002, 1003]
    assert loader.state_dict() == {"step": 13, "shard_index": 1, "pos": 8}


def test_dtypes_and_shapes(tmp_path):
    write_train_shards(tmp_path, [500], np.random.default_rng(103))
    (x, y), = TrainLoader(tmp_path, seq_len=16, batch_slots=4, world_size=4, rank=2, prefetch=False).next_step()
    assert x.dtype == torch.int32 and y.dtype == torch.int64 and x.shape == y.shape == (16,)
    assert torch.equal(x[1:].long(), y[:-1])


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_every_world_size_sees_the_recipe_stream(tmp_path, world_size):
    rng = np.random.default_rng(104)
    seq_len, slots = 16, 8
    shards = write_train_shards(tmp_path, [700, 129, 1000, 389, 300], rng)  # 129: too small for a step
    expected = recipe_steps(shards, seq_len, slots)
    assert len(expected) == 5 + 0 + 7 + 3 + 2
    loaders = [TrainLoader(tmp_path, seq_len, slots, world_size, rank, prefetch=rank % 2 == 0)
               for rank in range(world_size)]
    for loader in loaders:
        assert loader.micro_steps == slots // world_size
    # Rank r's micro-steps, concatenated over ranks, are the step's slots in order.
    got = [[pair for loader in loaders for pair in take(loader, 1)[0]] for _ in expected]
    assert_same_steps(got, expected)
    for loader in loaders:
        with pytest.raises(UserError, match="ran out after 17 steps"):
            loader.next_step()
        loader.close()


def test_prefetch_gives_the_same_batches(tmp_path):
    rng = np.random.default_rng(105)
    write_train_shards(tmp_path, [3000, 2000], rng)
    with_thread = TrainLoader(tmp_path, 32, 4, world_size=2, rank=1, prefetch=True)
    without = TrainLoader(tmp_path, 32, 4, world_size=2, rank=1, prefetch=False)
    assert_same_steps(take(with_thread, 30), take(without, 30))
    with_thread.close()


def test_reset_and_state_dict_replay_the_stream(tmp_path):
    write_train_shards(tmp_path, [1500, 1500], np.random.default_rng(106))
    loader = TrainLoader(tmp_path, 16, 8, prefetch=True)
    first = take(loader, 3)  # e.g. untimed warm-up steps
    loader.reset()
    assert_same_steps(take(loader, 3), first)
    take(loader, 10)  # into the second shard
    state = loader.state_dict()
    assert state == {"step": 13, "shard_index": 1, "pos": 128 * 2}
    following = take(loader, 4)
    other = TrainLoader(tmp_path, 16, 8, prefetch=False)
    other.load_state_dict(state)
    assert_same_steps(take(other, 4), following)
    loader.close()


def test_thread_error_reaches_the_consumer(tmp_path):
    # The thread runs out of data after two steps (rewriting a shard under it instead would race with
    # its memory map: truncating a mapped file kills the process with SIGBUS).
    write_train_shards(tmp_path, [300], np.random.default_rng(107))
    loader = TrainLoader(tmp_path, 16, 8, prefetch=True)
    take(loader, 2)
    with pytest.raises(UserError, match="ran out after 2 steps"):
        loader.next_step()
    with pytest.raises(UserError, match="ran out"):
        loader.next_step()  # not swallowed, not replaced by a hang
    loader.close()


def loader_threads():
    return [t for t in threading.enumerate() if t.name == "TrainLoader"]


def test_thread_stops_on_close_and_on_garbage_collection(tmp_path):
    write_train_shards(tmp_path, [5000], np.random.default_rng(108))
    before = len(loader_threads())
    loader = TrainLoader(tmp_path, 16, 8, prefetch=True)
    assert len(loader_threads()) == before + 1
    loader.close()
    loader.close()
    assert len(loader_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        loader.next_step()
    loader = TrainLoader(tmp_path, 16, 8, prefetch=True)
    loader.next_step()
    del loader
    gc.collect()
    assert len(loader_threads()) == before


def test_align_to_bos(tmp_path):
    rng = np.random.default_rng(109)
    seq_len, slots, eot = 16, 4, 65535
    tokens = rng.integers(0, 1000, size=2000)
    tokens[rng.choice(2000, size=60, replace=False)] = eot
    tokens[300:400] = 7  # a document longer than a sequence: those slots keep their nominal start ...
    tokens[400] = eot  # ... even the one right before this eot, which starts the next slot
    write_shard(tmp_path / "doc_train_000001.bin", tokens)
    loader = TrainLoader(tmp_path, seq_len, slots, prefetch=False, align_to_bos=True, eot_token=eot)
    global_batch = seq_len * slots
    aligned = unaligned = 0
    for step in range(25):
        for slot, (x, y) in enumerate(loader.next_step()):
            nominal = step * global_batch + slot * seq_len
            window = tokens[nominal:nominal + seq_len]
            start = nominal + int(np.argmax(window == eot)) if (window == eot).any() else nominal
            np.testing.assert_array_equal(x.numpy(), tokens[start:start + seq_len])
            np.testing.assert_array_equal(y.numpy(), tokens[start + 1:start + seq_len + 1])
            aligned += int(x[0] == eot)
            unaligned += int(x[0] != eot)
    assert aligned > 0 and unaligned > 0
    # the shard switch reserves a sequence: pos 1856 + 64 + 16 + 1 < 2000, but 1920 + 81 >= 2000
    take(loader, 5)
    with pytest.raises(UserError, match="ran out after 30 steps"):
        loader.next_step()


def test_train_loader_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="no train shards"):
        TrainLoader(tmp_path, 16, 8)
    with pytest.raises(ValueError, match="not a folder"):
        TrainLoader(tmp_path / "missing", 16, 8)
    with pytest.raises(ValueError, match="empty"):
        TrainLoader([], 16, 8)
    write_train_shards(tmp_path, [1000], np.random.default_rng(110))
    with pytest.raises(ValueError, match="world_size 3 must divide batch_slots 8"):
        TrainLoader(tmp_path, 16, 8, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        TrainLoader(tmp_path, 16, 8, world_size=2, rank=2)
    with pytest.raises(ValueError, match="seq_len"):
        TrainLoader(tmp_path, 0, 8)
    with pytest.raises(TypeError, match="batch_slots"):
        TrainLoader(tmp_path, 16, 8.0)
    with pytest.raises(ShardError, match="no such file"):
        TrainLoader([tmp_path / "gone_train_000001.bin"], 16, 8)
    loader = TrainLoader(tmp_path, 16, 8, prefetch=False)
    with pytest.raises(ValueError, match="state"):
        loader.load_state_dict({"step": 0})
    with pytest.raises(ValueError, match="shard_index"):
        loader.load_state_dict({"step": 0, "shard_index": 5, "pos": 0})


@pytest.mark.gpu
def test_cuda_batches_match_cpu(tmp_path):
    write_train_shards(tmp_path, [3000], np.random.default_rng(111))
    on_gpu = TrainLoader(tmp_path, 32, 8, world_size=2, rank=1, device="cuda", prefetch=True)
    on_cpu = TrainLoader(tmp_path, 32, 8, world_size=2, rank=1, prefetch=False)
    for _ in range(5):
        for (gx, gy), (cx, cy) in zip(on_gpu.next_step(), on_cpu.next_step(), strict=False):
            assert gx.is_cuda and torch.equal(gx.cpu(), cx) and torch.equal(gy.cpu(), cy)
    on_gpu.close()


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def test_val_sequences_split_over_ranks(tmp_path):
    rng = np.random.default_rng(112)
    tokens = rng.integers(0, 65536, size=1000)
    path = tmp_path / "rand_val_000000.bin"
    write_shard(path, tokens)
    seq_len, val_tokens = 8, 512  # 64 sequences, the last reads token 512
    single = [(x.numpy(), y.numpy()) for x, y in val_batches(path, val_tokens, seq_len)]
    assert len(single) == 64
    for i, (x, y) in enumerate(single):
        np.testing.assert_array_equal(x, tokens[i * seq_len:(i + 1) * seq_len])
        np.testing.assert_array_equal(y, tokens[i * seq_len + 1:(i + 1) * seq_len + 1])
    for world_size in (2, 4, 8):
        seen = {}
        for rank in range(world_size):
            batches = ValLoader(tmp_path, val_tokens, seq_len, world_size, rank)  # the folder works too
            assert len(batches) == 64 // world_size
            for k, (x, y) in enumerate(batches):
                assert x.dtype == torch.int32 and y.dtype == torch.int64
                seen[rank + k * world_size] = (x.numpy(), y.numpy())
        assert sorted(seen) == list(range(64))
        for i, (x, y) in seen.items():
            np.testing.assert_array_equal(x, single[i][0])
            np.testing.assert_array_equal(y, single[i][1])


def test_val_errors(tmp_path):
    path = tmp_path / "rand_val_000000.bin"
    write_shard(path, np.arange(512))
    with pytest.raises(ValueError, match="multiple of seq_len \\* world_size"):
        val_batches(path, 512, 8, world_size=3)
    with pytest.raises(ValueError, match="needs 513"):
        val_batches(path, 512, 8)  # 512 targets need 513 tokens
    assert len(val_batches(path, 504, 8)) == 63
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found 0"):
        val_batches(tmp_path / "empty", 8, 8)
    with pytest.raises(ShardError, match="no such file"):
        val_batches(tmp_path / "nope_val_000000.bin", 8, 8)
