"""The train stream and the validation batches, sliced exactly as the recipe slices them.

Train stream (recipe section 1). A step reads a global batch of B = seq_len * batch_slots tokens:

    at the start of each step, while pos + B + 1 >= N (tokens in the current shard): go to the next
    shard, pos = 0 (the rest of the old shard is never read; the shards are used once, in order)
    slot s = 0..batch_slots-1 reads the seq_len + 1 tokens at pos + s * seq_len:
        inputs = the first seq_len (int32), targets = the last seq_len (int64, shifted by one)
    pos += B

With W processes each runs A = batch_slots / W micro-steps per step, and process r at micro-step m
takes slot s = r * A + m, so every world size sees the same tokens, grouped the same way.

``align_to_bos`` (off in the recipe): every slot starts instead at the first eot token in
[nominal start, nominal start + seq_len), or at the nominal start if that range holds none (a document
longer than a sequence). A slot may then read up to seq_len tokens past the step's B, so the
shard-switch test reserves them: pos + B + seq_len + 1 >= N.

Validation: the first val_tokens + 1 tokens of the val shard, cut into val_tokens / seq_len sequences
(sequence i reads tokens i*seq_len .. (i+1)*seq_len); process r takes sequences r, r + W, r + 2W, ...
"""

from __future__ import annotations

import functools
import queue
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from speedrun.data.shards import check_token_range, data_vocab, list_shards, read_header, read_shard, the_val_shard
from speedrun.errors import UserError


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_world(world_size, rank) -> tuple[int, int]:
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size = {world_size}, got {rank}")
    return world_size, rank


def stream_position(state: dict, keys: tuple[str, ...], n_shards: int) -> tuple[int, ...]:
    """The integers ``keys`` of a train stream's state (its state_dict()), checked; keys[1] is the shard index."""
    values = tuple(_check_int(f"state[{key!r}]", state[key], 0) for key in keys)
    if not 0 <= values[1] < n_shards:
        raise ValueError(f"shard_index {values[1]} is outside the {n_shards} train shards")
    return values


def _to_device(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A CPU tensor, or on CUDA a copy sent from pinned memory without blocking the host."""
    tensor = torch.from_numpy(array).to(dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def load_checked(path: Path, vocab_size: int | None) -> np.ndarray:
    """A shard's tokens, every one checked to be < ``vocab_size`` (the model's) when given: a larger id is an
    error naming the file and the position, not an index error deep in the model."""
    return read_shard(path, check_tokens=vocab_size is not None, vocab_size=vocab_size or 0)


def _step_fits(pos: int, shard_tokens: int, step_tokens: int) -> bool:
    """Whether a step of ``step_tokens`` (+1 for the last target) starting at ``pos`` fits in the shard."""
    return pos + step_tokens + 1 < shard_tokens


def steps_in_shards(shard_tokens: list[int], seq_len: int, batch_slots: int, align_to_bos: bool = False) -> int:
    """How many steps the Sub3Min stream takes from shards of these token counts (its rule, no tokens read)."""
    stride = seq_len * batch_slots  # steps start at 0, stride, 2 stride, ... while _step_fits
    room = [n - stride - (seq_len if align_to_bos else 0) - 1 for n in shard_tokens]  # starts must be < room
    return sum((r - 1) // stride + 1 for r in room if r > 0)


class _TrainStream:
    """The stream position and the slicing rule, in numpy; no threads, no devices."""

    def __init__(self, paths: list[Path], seq_len: int, batch_slots: int, slots: range,
                 align_to_bos: bool, eot_token: int | None, vocab_size: int | None):
        self.paths, self.seq_len, self.batch_slots, self.slots = paths, seq_len, batch_slots, slots
        self.align_to_bos, self.eot_token, self.vocab_size = align_to_bos, eot_token, vocab_size
        self.seek({"step": 0, "shard_index": 0, "pos": 0})

    def seek(self, state: dict) -> None:
        self.step, self.shard_index, self.pos = stream_position(state, ("step", "shard_index", "pos"), len(self.paths))
        self.tokens = load_checked(self.paths[self.shard_index], self.vocab_size)

    def state(self) -> dict:
        return {"step": self.step, "shard_index": self.shard_index, "pos": self.pos}

    def next_step(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """This rank's (inputs, targets) pairs for the next optimizer step; advances the stream."""
        global_batch = self.seq_len * self.batch_slots
        reserve = self.seq_len if self.align_to_bos else 0
        while not _step_fits(self.pos, len(self.tokens), global_batch + reserve):
            if self.shard_index + 1 == len(self.paths):
                raise UserError(
                    f"the train data ran out after {self.step} steps ({self.step * global_batch:,} tokens): "
                    f"{len(self.paths)} shard(s) ending with {self.paths[-1].name}; a step needs "
                    f"{global_batch + reserve + 2:,} tokens left in a shard. Add train shards or run fewer steps")
            self.shard_index += 1
            self.tokens = load_checked(self.paths[self.shard_index], self.vocab_size)
            self.pos = 0
        pairs = []
        for slot in self.slots:
            start = self.pos + slot * self.seq_len
            if self.align_to_bos:
                eots = np.flatnonzero(self.tokens[start:start + self.seq_len] == self.eot_token)
                start += int(eots[0]) if eots.size else 0
            chunk = np.array(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)
            pairs.append((chunk[:-1].astype(np.int32), chunk[1:]))
        self.pos += global_batch
        self.step += 1
        return pairs


def _as_tensors(items, pin: bool) -> list[tuple[torch.Tensor, ...]]:
    """Tuples of numpy arrays (already in their final dtypes) -> tuples of CPU tensors, pinned for a
    non-blocking copy to CUDA."""
    out = []
    for arrays in items:
        # Convert with numpy, not torch: a torch op on another thread starts a second OpenMP pool, and
        # two spinning pools on a small CPU slow every op of the training thread down ~10x (measured).
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        out.append(tuple(t.pin_memory() for t in tensors) if pin else tensors)
    return out


def _produce(stream: _TrainStream, to_tensors, out: queue.Queue, stop: threading.Event) -> None:
    """Background thread: fill ``out`` with (tensors, state after the step), or with the exception."""
    while not stop.is_set():
        try:
            item = ("ok", to_tensors(stream.next_step()), stream.state())
        except BaseException as error:  # handed to the consumer, which re-raises it
            item = ("error", error, None)
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if item[0] == "error":
            return


def _stop_thread(thread: threading.Thread, stop: threading.Event, out: queue.Queue) -> None:
    stop.set()
    while True:  # unblock a producer waiting on a full queue
        try:
            out.get_nowait()
        except queue.Empty:
            break
    thread.join(timeout=10)


class PrefetchingLoader:
    """The background-thread machinery shared by the train loaders: ``next_step()`` returns what the stream's
    ``next_step()`` made for the next optimizer step (a list of tuples of tensors, one tuple per micro-step),
    on ``device``.

    ``stream`` has ``next_step()`` (a list of tuples of numpy arrays), ``state()`` and ``seek(state)``. With
    ``prefetch`` a background thread prepares the next steps (queue of depth 2; pinned memory on CUDA,
    copied with non_blocking=True); the output is the same either way. ``reset()`` /
    ``load_state_dict()`` restart the stream, e.g. at step 0 after untimed warm-up steps.
    """

    thread_name = "TrainLoader"

    def __init__(self, stream, device, prefetch: bool, state_keys: tuple[str, ...]):
        self.device = torch.device(device)
        self.prefetch = bool(prefetch)
        self._stream, self._state_keys = stream, state_keys
        self._initial_state = stream.state()
        self._state = stream.state()  # after the last step handed out
        self._error: BaseException | None = None
        self._thread, self._closed = None, False
        self._start()

    def _start(self) -> None:
        if not self.prefetch:
            return
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        # The thread holds the stream, never the loader, so the loader can be garbage-collected;
        # the finalizer then stops the thread.
        to_tensors = functools.partial(_as_tensors, pin=self.device.type == "cuda")
        self._thread = threading.Thread(target=_produce, args=(self._stream, to_tensors, self._queue, self._stop),
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop_thread, self._thread, self._stop, self._queue)

    def next_step(self) -> list[tuple[torch.Tensor, ...]]:
        if self._closed:
            raise RuntimeError(f"next_step() on a closed {type(self).__name__}")
        if self._error is not None:
            raise self._error  # the stream failed: every later call fails the same way
        if self._thread is None:
            items = _as_tensors(self._stream.next_step(), pin=self.device.type == "cuda")
            state = self._stream.state()
        else:
            while True:
                try:
                    kind, items, state = self._queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise RuntimeError(f"the {self.thread_name} thread stopped without a result") from None
            if kind == "error":
                self._error = items
                raise items
        self._state = state
        non_blocking = self.device.type == "cuda"
        return [tuple(t.to(self.device, non_blocking=non_blocking) for t in item) for item in items]

    def __iter__(self):
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        """Where the stream stands after the steps handed out so far."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a ``state_dict()``): steps prefetched beyond the old position are dropped."""
        if not isinstance(state, dict) or not set(self._state_keys) <= state.keys():
            raise ValueError(f"state must be a {type(self).__name__}.state_dict() (keys "
                             f"{', '.join(self._state_keys)}), got {state!r}")
        self._stop_prefetch()
        self._stream.seek(state)
        self._state, self._error, self._closed = self._stream.state(), None, False
        self._start()

    def reset(self) -> None:
        """Back to step 0: the next step is the stream's first again."""
        self.load_state_dict(self._initial_state)

    def _stop_prefetch(self) -> None:
        if self._thread is not None:
            self._finalizer()
            self._thread = None

    def close(self) -> None:
        """Stop the background thread (also done on garbage collection). Idempotent; after it, next_step()
        fails until load_state_dict() or reset()."""
        self._stop_prefetch()
        self._closed = True


def train_shard_paths(shards) -> list[Path]:
    """A folder (its ``*_train_*.bin`` in sorted-name order) or a list of shard paths (in the order given),
    each header checked now: a missing or malformed shard fails here, not steps later."""
    if isinstance(shards, (str, Path)):
        if not Path(shards).is_dir():
            raise ValueError(f"shards: {shards} is not a folder (give a folder or a list of shard paths)")
        paths = list_shards(shards, "train")
        if not paths:
            raise ValueError(f"shards: no train shards (*_train_*.bin) in {shards}")
    else:
        paths = [Path(p) for p in shards]
        if not paths:
            raise ValueError("shards: the list of train shards is empty")
    for path in paths:
        read_header(path)
    return paths


class TrainLoader(PrefetchingLoader):
    """The Sub3Min train stream of one process: ``next_step()`` returns its A = batch_slots / world_size
    (inputs, targets) pairs for the next optimizer step, each of shape (seq_len,), on ``device``.

    ``shards``: a folder or a list of shard paths (``train_shard_paths``). Prefetching, ``reset()`` and
    ``state_dict()`` ({"step", "shard_index", "pos"}): see ``PrefetchingLoader``.
    """

    def __init__(self, shards, seq_len: int, batch_slots: int, world_size: int = 1, rank: int = 0,
                 device="cpu", prefetch: bool = True, align_to_bos: bool = False, eot_token: int | None = None,
                 vocab_size: int | None = None):
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.batch_slots = _check_int("batch_slots", batch_slots, 1)
        self.world_size, self.rank = _check_world(world_size, rank)
        if self.batch_slots % self.world_size:
            raise ValueError(f"world_size {self.world_size} must divide batch_slots {self.batch_slots}")
        self.micro_steps = self.batch_slots // self.world_size
        paths = train_shard_paths(shards)
        if align_to_bos and eot_token is None:
            eot_token = data_vocab(paths[0].parent)[1]
        first_slot = self.rank * self.micro_steps
        stream = _TrainStream(paths, self.seq_len, self.batch_slots, range(first_slot, first_slot + self.micro_steps),
                              bool(align_to_bos), eot_token, vocab_size)
        super().__init__(stream, device, prefetch, ("step", "shard_index", "pos"))


class ValLoader:
    """This process's validation sequences: iterate for (inputs, targets) pairs of shape (seq_len,)."""

    def __init__(self, val_shard, val_tokens: int, seq_len: int, world_size: int = 1, rank: int = 0,
                 device="cpu", vocab_size: int | None = None):
        self.val_tokens = _check_int("val_tokens", val_tokens, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.world_size, self.rank = _check_world(world_size, rank)
        if self.val_tokens % (self.seq_len * self.world_size):
            raise UserError(f"val_tokens {self.val_tokens:,} must be a multiple of seq_len * world_size = "
                             f"{self.seq_len} * {self.world_size}, so every process gets whole, equal sequences")
        path = Path(val_shard)
        if path.is_dir():
            path = the_val_shard(path)
        check_val_prefix(path, self.val_tokens, vocab_size)
        self.path, self.device = path, torch.device(device)
        self.sequences = range(self.rank, self.val_tokens // self.seq_len, self.world_size)

    def __len__(self) -> int:
        return len(self.sequences)

    def __iter__(self):
        tokens = read_shard(self.path)
        for i in self.sequences:
            chunk = np.array(tokens[i * self.seq_len:(i + 1) * self.seq_len + 1], dtype=np.int64)
            yield _to_device(chunk[:-1], torch.int32, self.device), _to_device(chunk[1:], torch.int64, self.device)


def check_val_prefix(path: Path, val_tokens: int, vocab_size: int | None) -> None:
    """The val shard holds the val_tokens + 1 tokens validation reads, each < ``vocab_size`` when given."""
    available = read_header(path)
    if available < val_tokens + 1:
        raise UserError(f"the val shard holds {available:,} tokens; val_tokens {val_tokens:,} needs "
                        f"{val_tokens + 1:,} (the targets are shifted by one)", path)
    if vocab_size is not None:
        check_token_range(path, read_shard(path)[:val_tokens + 1], vocab_size)


def val_batches(val_shard, val_tokens: int, seq_len: int, world_size: int = 1, rank: int = 0,
                device="cpu", vocab_size: int | None = None) -> ValLoader:
    """This process's validation (inputs, targets) pairs (see ``ValLoader``); arguments checked now."""
    return ValLoader(val_shard, val_tokens, seq_len, world_size, rank, device, vocab_size)
