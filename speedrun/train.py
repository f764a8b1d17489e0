"""The race: untimed compile and warm-up, then the timed loop, validation, and the run log.

The rules, enforced by construction here:
- Compilation and warm-up run before the clock starts; the warm-up steps touch every shape the run
  will see (a training step and a validation forward), then the model and optimizer states are
  restored to their initial values and the data stream is rewound. The clock starts after a device
  synchronise.
- The clock stops for every validation pass (step 0, every ``val_every`` steps, and the last step) and
  restarts after it. The record time is the train time at the last step.
- Validation is the exact mean cross-entropy over ``val_tokens`` tokens, averaged over ranks.
- A run ends ``success`` (target reached), ``not_converged``, ``completed`` (no target for this data),
  ``diverged`` (non-finite loss; the step is named), ``aborted`` (SIGINT/SIGTERM: the current step
  finishes, the log is written, the exit code is non-zero) or ``failed`` (an error: its message is in the
  log, which is complete all the same). Only the final validation can say success.
- The result comes first: the paths the run writes are checked, and the data is checked to hold the
  planned steps, before anything is loaded or compiled; the log is finalised before any optional work
  (the checkpoint), so a failure there cannot lose a finished run.
- The step never waits on the host: the loss of step s is checked for NaN/inf (and the stop request
  is shared between ranks) one step later, when reading it no longer stalls the device.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import resource
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

import kernels
import kernels.common
from speedrun import REPO_ROOT, dist, schedule
from speedrun.config import DEFAULT_CPU_PRESET, DEFAULT_GPU_PRESET, FOLLOWS, RunConfig, get_preset, window_blocks
from speedrun.data.loader import TrainLoader, steps_in_shards, val_batches
from speedrun.data.shards import data_vocab, list_shards, read_header, read_manifest, the_val_shard, val_shard_sha256
from speedrun.errors import UserError, describe_os_error
from speedrun.model import GPT, TRAINING_OPS, flops_per_token
from speedrun.optim import build_optimizers, set_schedules
from speedrun.records.runlog import train_line, val_line
from speedrun.runlog import RunLog, code_snapshot, environment, relative_to_repo, repo_or_absolute_path
from speedrun.tracks import get_track

# Dense bf16 tensor-core peak (TFLOP/s) by GPU name substring, for the MFU estimate.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4,
                    "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "4090": 165.2}


@dataclass
class RunResult:
    run_id: str
    status: str
    final_val_loss: float | None
    train_time_ms: float
    log_path: Path
    json_path: Path


def peak_tflops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in gpu_name:
            return value
    return None


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the current step and writes an `aborted` log."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stacked_val_batches(cfg: RunConfig, env: dist.DistEnv, val_path: Path):
    """This rank's validation sequences, ``seqs_per_forward`` at a time: (inputs, targets) of shape (n, T)."""
    pairs = list(val_batches(val_path, cfg.data.val_tokens, cfg.data.seq_len, env.world_size, env.rank, env.device,
                             cfg.model.vocab_size))
    for i in range(0, len(pairs), cfg.data.seqs_per_forward):
        batch = pairs[i:i + cfg.data.seqs_per_forward]
        yield torch.stack([x for x, _ in batch]), torch.stack([y for _, y in batch])


@torch.no_grad()
def evaluate(model, cfg: RunConfig, env: dist.DistEnv, val_path: Path, window) -> float:
    """Mean cross-entropy over the first val_tokens tokens of the val shard, exactly averaged over ranks."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=env.device)
    count = 0
    for inputs, targets in stacked_val_batches(cfg, env, val_path):
        total += model(inputs, targets, window=window).double() * len(inputs)
        count += len(inputs)
    model.train()
    # Every rank holds the same number of equal-length sequences, so the mean of means is the token mean.
    return dist.all_reduce_mean_(total / count).item()


def optimizer_step(model, raw_model, optimizers, cfg: RunConfig, pairs, per_forward: int, window,
                   step: int) -> torch.Tensor:
    """One optimizer step on this rank's ``pairs`` (a list of (inputs, targets), each (T,)), ``per_forward``
    sequences per forward pass; returns the mean loss (a device tensor: no sync). ``model`` may be the
    compiled ``raw_model``; the gradients of ``raw_model`` are averaged over ranks."""
    micro_steps = len(pairs) // per_forward
    loss_sum = torch.zeros((), device=pairs[0][0].device)
    for i in range(0, len(pairs), per_forward):
        inputs = torch.stack([x for x, _ in pairs[i:i + per_forward]])
        targets = torch.stack([y for _, y in pairs[i:i + per_forward]])
        loss = model(inputs, targets, window=window)
        # Average over micro-steps (and, below, over ranks): the math is the same for any world size.
        (loss / micro_steps).backward()
        loss_sum += loss.detach().float()
    dist.all_reduce_grads_(raw_model.parameters())
    set_schedules(optimizers, step, cfg)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return loss_sum / micro_steps


class Sub3MinRace:
    """The Sub3Min recipe (and the baselines) on this process: model, optimizers, data, and what the timed
    loop asks of a race: ``warm_up()`` (untimed; leaves the initial state), ``train_step(step)`` (returns
    the step's mean training loss as a device tensor: no host sync), ``evaluate(step)``,
    ``step_flops(step)`` (None: not known), ``raw_model`` (for the checkpoint) and ``close()``."""

    def __init__(self, cfg: RunConfig, env: dist.DistEnv, data_dir: Path, ops: dict):
        self.cfg, self.env = cfg, env
        device = env.device
        self.raw_model = GPT(cfg.model, ops, dtype=getattr(torch, cfg.train.dtype)).to(device)
        dist.broadcast_parameters(self.raw_model)
        self.optimizers = build_optimizers(self.raw_model, cfg, ops)
        self.model = compile_model(self.raw_model, cfg)
        self.train_loader = TrainLoader(list_shards(data_dir, "train"), seq_len=cfg.data.seq_len,
                                        batch_slots=cfg.data.batch_slots, world_size=env.world_size,
                                        rank=env.rank, device=device, prefetch=True, vocab_size=cfg.model.vocab_size)
        self.val_path = the_val_shard(data_dir)
        slots_per_rank = cfg.data.batch_slots // env.world_size
        self.per_forward = max(1, min(cfg.data.seqs_per_forward, slots_per_rank))
        if slots_per_rank % self.per_forward:
            raise UserError(f"seqs_per_forward {self.per_forward} must divide the {slots_per_rank} sequences "
                             "per process")
        self.long_w = torch.ones((), dtype=torch.int32, device=device)
        self.short_w = torch.ones((), dtype=torch.int32, device=device)

    def window(self, step: int):
        """The window tensors (long, short blocks) of ``step``, refilled in place (no recompile, no sync)."""
        long_blocks, short_blocks = window_blocks(step, self.cfg)
        self.long_w.fill_(long_blocks)
        self.short_w.fill_(short_blocks)
        return self.long_w, self.short_w

    def train_step(self, step: int) -> torch.Tensor:
        return optimizer_step(self.model, self.raw_model, self.optimizers, self.cfg, self.train_loader.next_step(),
                              self.per_forward, self.window(step), step)

    def evaluate(self, step: int) -> float:
        return evaluate(self.model, self.cfg, self.env, self.val_path, self.window(step))

    def step_flops(self, step: int) -> float:
        return self.cfg.data.tokens_per_step * flops_per_token(
            self.cfg.model, self.cfg.data.seq_len, window_blocks(step, self.cfg)[0] * self.cfg.model.attn_block_size)

    def warm_up(self) -> None:
        """Compile and warm up on every shape the run will see (cfg.train.warmup_steps training steps and
        every validation batch shape), then restore the model, the optimizers and the data stream."""
        cfg = self.cfg
        initial_model = copy.deepcopy(self.raw_model.state_dict())
        initial_optim = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        for step in range(cfg.train.warmup_steps):
            self.train_step(step)
        if cfg.train.warmup_steps:  # every validation batch shape, without the clock
            with torch.no_grad():
                self.model.eval()
                shapes = {tuple(x.shape): (x, y) for x, y in stacked_val_batches(cfg, self.env, self.val_path)}
                for inputs, targets in shapes.values():
                    self.model(inputs, targets, window=self.window(cfg.train.num_steps))
                self.model.train()
        self.raw_model.load_state_dict(initial_model)
        for opt, state in zip(self.optimizers, initial_optim, strict=True):
            opt.load_state_dict(state)
        self.train_loader.reset()

    def close(self) -> None:
        self.train_loader.close()


def compile_model(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """``model`` under torch.compile when cfg.train.compile. Every kernel set but ``torch`` compiles with
    fullgraph=True: one graph for the whole step, or an error at the first step naming what broke it (the
    Triton kernel sets are checked to trace whole: tests/test_compile_graph.py). The torch set's reference
    ops read the attention window on the host, which splits the graph by design. Each batch shape and sequence
    layout of the plan compiles once (compile_static raises dynamo's limit of versions above their number)."""
    if not cfg.train.compile:
        return model
    return kernels.common.compile_static(model, fullgraph=cfg.train.kernels != "torch")


def recipe_ops(cfg: RunConfig) -> tuple[str, ...]:
    """The hot ops ``cfg``'s model and optimizers call (each needs the run's kernel variant)."""
    if cfg.model.arch == "record89":
        from speedrun import model89
        return model89.TRAINING_OPS
    return TRAINING_OPS


def make_race(cfg: RunConfig, env: dist.DistEnv, data_dir: Path):
    """The race object for ``cfg``'s recipe (see Sub3MinRace for what one provides)."""
    if cfg.train.kernels == "triton" and env.device.type == "cpu" and kernels.common.interpreting():
        # Triton's CPU interpreter: large tiles (its cost is per program) and one thread (see kernels.common).
        kernels.common.use_large_interpreter_tiles()
        kernels.common.limit_interpreter_threads()
    ops = kernels.resolve(cfg.train.kernels, recipe_ops(cfg))
    if cfg.schedule is not None:
        from speedrun.train89 import Record89Race
        return Record89Race(cfg, env, data_dir, ops)
    return Sub3MinRace(cfg, env, data_dir, ops)


def train(cfg: RunConfig, env: dist.DistEnv, data_dir: Path, target: float | None, track: str | None,
          log_dir="logs", run_id: str | None = None, clock=time.perf_counter, quiet: bool = False,
          save_checkpoint: str | None = None, echo: bool = True, race=None) -> RunResult:
    """Train ``cfg`` on the shards in ``data_dir``; returns what the run log says.

    ``clock`` is injectable so tests can check the timing rules with a fake clock; ``race`` (default:
    ``make_race``) is the recipe's model, optimizers and data on this process. ``log_dir`` and
    ``save_checkpoint``, when relative, are taken from the repository root.
    """
    run_id = run_id or str(uuid.uuid4())
    device = env.device
    log_dir = Path(log_dir) if Path(log_dir).is_absolute() else REPO_ROOT / log_dir
    checkpoint = None if save_checkpoint is None else Path(save_checkpoint)
    if checkpoint is not None and not checkpoint.is_absolute():
        checkpoint = REPO_ROOT / checkpoint
    # ---- before anything is loaded or compiled: where the run writes, and enough data ----
    if env.is_main:
        check_writable_outputs(log_dir, checkpoint)
    val_path = the_val_shard(data_dir)
    check_train_data(cfg, env.world_size, data_dir)
    torch.manual_seed(cfg.train.seed)
    race = race or make_race(cfg, env, data_dir)

    # ---- untimed: compile and warm up on every shape the run will see, then restore ----
    race.warm_up()

    # ---- the run log: written only by rank 0, after everything the run uses has been imported ----
    env_facts = environment(env.world_size, device.type)
    config = cfg.to_dict()
    config["data"]["data_dir"] = repo_or_absolute_path(data_dir)
    log = RunLog(log_dir, run_id, config, env_facts, code_snapshot(), target, track=track,
                 enabled=env.is_main, echo=echo, quiet=quiet)
    log.line(f"preset {cfg.preset}: {FOLLOWS.get(cfg.preset, 'a preset of this harness')}", important=False)
    manifest = read_manifest(data_dir) or {}
    log.facts["data"] = {"dir": relative_to_repo(data_dir), "val_shard": val_path.name,
                         "kind": manifest.get("kind"), "val_optimal_loss": data_floor(manifest, cfg.data.val_tokens),
                         "val_shard_sha256": val_shard_sha256(val_path, manifest) if env.is_main else None}
    log.facts["schedule_changes"] = []
    progress = Progress()
    try:
        status, final_val, diverged_at = timed_loop(cfg, race, device, log, clock, target, progress)
    except BaseException as error:  # the run ends with a complete log that says why; then the error goes on
        race.close()
        message = " ".join(f"{type(error).__name__}: {error}".split())[:2000]
        try:
            finish_log(log, progress, env, "failed", None, None, message)
        except OSError as log_error:  # e.g. the log folder went away: say so, and report the run's own error
            print(f"speedrun: the run's log could not be finished ({describe_os_error(log_error)})", file=sys.stderr)
        raise

    # ---- after the clock: the result first, then the optional work ----
    race.close()
    result = finish_log(log, progress, env, status, final_val, diverged_at)
    if checkpoint is not None and env.is_main and status != "diverged":
        try:
            path = save_model_checkpoint(checkpoint, race.raw_model, cfg, run_id, progress.step)
        except OSError as e:
            raise UserError(f"the run's log is complete ({repo_or_absolute_path(log.txt_path)}), but saving the "
                            f"checkpoint failed: {e.strerror or e}", checkpoint) from e
        if echo:
            print(f"checkpoint: {repo_or_absolute_path(path)}")
    return result


@dataclass
class Progress:
    """How far the timed loop got (read by the failure path too)."""
    step: int = 0
    tokens: int = 0
    flops: float | None = 0.0
    train_time: float = 0.0


def timed_loop(cfg: RunConfig, race, device: torch.device, log: RunLog, clock, target: float | None,
               progress: Progress):
    """The timed steps and validations (module docstring); returns (status, final val loss, diverged at: the
    step as the log numbers it)."""
    n = cfg.train.num_steps
    status, final_val, diverged_at = None, None, None
    previous_plan = None
    with StopRequest() as stop:
        device_sync(device)
        t0 = clock()
        pending = None  # (step, tensor[loss, stop]) of the previous step, read one step late
        while True:
            step = progress.step
            if pending is not None:
                done_step, flags = pending
                loss_value, stop_votes = flags.tolist()
                log.facts["train_losses"].append(loss_value)
                if not math.isfinite(loss_value):  # the log calls the step after training step s "step:s+1"
                    status, diverged_at = "diverged", done_step + 1
                elif stop_votes > 0:
                    status = "aborted"
                pending = None
            last = step == n
            plan = schedule.plan(cfg, step)
            changed = schedule.changes(previous_plan, plan) if status is None else []
            if changed:  # no sync: the plan is host data
                log.facts["schedule_changes"].append({"step": step, "changes": changed})
                log.line(f"schedule at step {step}: {', '.join(changed)}", important=False)
            previous_plan = plan
            if status is None and plan.validate:
                device_sync(device)
                progress.train_time += clock() - t0
                final_val = race.evaluate(step)
                train_time = progress.train_time
                log.line(val_line(step, n, final_val, train_time))
                log.facts["val_curve"].append({"step": step, "val_loss": final_val,
                                               "train_time_ms": round(1000 * train_time, 3)})
                log.write_json()
                if not math.isfinite(final_val):
                    status, diverged_at = "diverged", step
                device_sync(device)
                t0 = clock()
            if status is not None or last:
                break
            loss = race.train_step(step)
            flags = torch.stack([loss.float(), torch.tensor(float(stop.signal is not None), device=device)])
            pending = (step, dist.all_reduce_mean_(flags))
            progress.tokens += plan.batch_tokens
            step_flops = race.step_flops(step)
            progress.flops = None if progress.flops is None or step_flops is None else progress.flops + step_flops
            progress.step = step = step + 1
            elapsed = progress.train_time + clock() - t0  # host time, no sync: the public format's per-step line
            if step % cfg.train.log_every == 0:
                log.line(train_line(step, n, elapsed), important=False)
        if status is None:
            status = "completed" if target is None else ("success" if final_val <= target else "not_converged")
        if status in ("aborted", "diverged"):
            device_sync(device)
            progress.train_time += clock() - t0
    return status, final_val, diverged_at


def finish_log(log: RunLog, progress: Progress, env: dist.DistEnv, status: str, final_val: float | None,
               diverged_at: int | None, message: str | None = None) -> RunResult:
    """The run's last facts, its summary lines and the final JSON (atomically); the run's result."""
    device = env.device
    peak = peak_tflops(log.facts["env"]["gpu_name"])
    train_time, flops = progress.train_time, progress.flops
    tokens_per_s = progress.tokens / train_time if train_time > 0 else None
    mfu = (flops / train_time / (peak * 1e12 * env.world_size)) if (peak and flops and train_time > 0) else None
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**20
        mem_line = (f"peak memory allocated: {peak_mem:.0f} MiB "
                    f"reserved: {torch.cuda.max_memory_reserved(device) / 2**20:.0f} MiB")
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        mem_line = f"peak memory (process RSS): {peak_mem:.0f} MiB"
    # Only a run that validated at its last step has a final val loss; an aborted one keeps its val curve.
    log.facts.update(status=status, final_val_loss=final_val if status not in ("diverged", "aborted") else None,
                     train_time_ms=round(1000 * train_time, 3), steps_done=progress.step,
                     tokens_seen=progress.tokens, tokens_per_second=tokens_per_s, mfu=mfu,
                     peak_memory_mib=round(peak_mem, 1), diverged_at_step=diverged_at, message=message)
    log.finish(summary_lines(log.facts, mem_line))
    return RunResult(log.run_id, status, log.facts["final_val_loss"], 1000 * train_time, log.txt_path,
                     log.json_path)


def summary_lines(facts: dict, mem_line: str) -> list[str]:
    lines = [mem_line]
    status, target, val = facts["status"], facts["target_val_loss"], facts["final_val_loss"]
    if status == "diverged":
        lines.append(f"DIVERGED: non-finite loss at step {facts['diverged_at_step']}")
    elif status in ("aborted", "failed"):
        last = facts["val_curve"][-1] if facts["val_curve"] else None
        seen = f"; last validation at step {last['step']}: val_loss {last['val_loss']:.4f}" if last else ""
        why = "by signal" if status == "aborted" else f"({facts['message']})"
        lines.append(f"{status.upper()} {why} after step {facts['steps_done']}{seen}")
    if val is not None:
        against = f" (target {target:.4f})" if target is not None else " (no target for this data)"
        lines.append(f"final val_loss {val:.4f} at step {facts['steps_done']}{against}: {status}")
    t = facts["train_time_ms"] / 1000
    tps = facts["tokens_per_second"]
    if facts["mfu"] is not None:
        mfu = f"MFU {100 * facts['mfu']:.1f}%"
    elif facts["env"]["device"] == "cpu":
        mfu = "MFU not computed on CPU"
    else:
        mfu = "MFU not computed (no known peak for this GPU)"
    lines.append(f"train_time {t:.1f} s ({t / 60:.2f} min), {facts['tokens_seen']:,} tokens, "
                 f"{tps:,.0f} tokens/s, {mfu}" if tps else f"train_time {t:.1f} s, {mfu}")
    return lines


def save_model_checkpoint(path, model, cfg: RunConfig, run_id: str, step: int) -> Path:
    """Save the weights and config atomically (temp file + rename; nothing is left on failure); loadable with
    weights_only=True."""
    path = Path(path)
    if not path.is_absolute():
        path = REPO_ROOT / path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    try:
        torch.save({"config": cfg.to_dict(), "model": state, "run_id": run_id, "step": step}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_train_data(cfg: RunConfig, world_size: int, data_dir: Path) -> None:
    """The train shards hold the run's planned steps (from their headers, before anything is loaded); UserError
    saying how many tokens the run needs and how many there are otherwise. Sub3Min's stream is counted by
    its own rule; record #89's packing cuts and skips document tails, so for it this is a lower bound (a
    shortfall found later fails the run with a complete log)."""
    listed = ((read_manifest(data_dir) or {}).get("files") or {})
    missing = sorted(name for name in listed if not (data_dir / name).exists())
    if missing:
        raise UserError(f"{len(missing)} shard(s) listed in the manifest are missing ({', '.join(missing[:3])}): "
                        "the data is incomplete (an interrupted download?)", data_dir)
    counts = [read_header(p) for p in list_shards(data_dir, "train")]
    n, have = cfg.train.num_steps, sum(counts)
    if cfg.schedule is None:
        step_tokens = cfg.data.seq_len * cfg.data.batch_slots
        steps = steps_in_shards(counts, cfg.data.seq_len, cfg.data.batch_slots)
        if steps < n:
            raise UserError(f"the train shards hold {steps} of the run's {n} steps: it needs {n * step_tokens:,} "
                            f"tokens ({step_tokens:,} per step, each step from one shard), the {len(counts)} "
                            f"shard(s) hold {have:,}; add train shards or run fewer steps", data_dir)
        return
    need = sum(cfg.data.batch_slots * (schedule.plan(cfg, s).tokens_per_rank + 1) for s in range(n))
    if have < need:
        raise UserError(f"the train shards hold {have:,} tokens in {len(counts)} shard(s); the run's {n} steps "
                        f"need at least {need:,}; add train shards or run fewer steps", data_dir)


def check_writable_outputs(log_dir: Path, checkpoint: Path | None) -> None:
    """The run's log folder and checkpoint path can be written (created and probed now, before anything is
    loaded or compiled); UserError naming the path otherwise."""
    targets = [(log_dir, "the log folder")]
    if checkpoint is not None:
        if checkpoint.is_dir():
            raise UserError("--save-checkpoint names a folder; give the checkpoint file's path", checkpoint)
        targets.append((checkpoint.parent, "the checkpoint's folder"))
    for folder, what in targets:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".speedrun-probe-"):
                pass
        except OSError as e:
            raise UserError(f"{what} cannot be written: {e.strerror or e}", e.filename or folder) from None


# ---------------------------------------------------------------------------------------------
# The `speedrun train` command
# ---------------------------------------------------------------------------------------------


def resolve_config(args, cuda: bool) -> RunConfig:
    """The preset with the command line's overrides applied."""
    cfg = get_preset(args.preset or (DEFAULT_GPU_PRESET if cuda else DEFAULT_CPU_PRESET))
    # command-line option -> (config section, field); options left unset keep the preset's value
    overrides = {"steps": ("train", "num_steps"), "val_every": ("train", "val_every"), "seed": ("train", "seed"),
                 "warmup_steps": ("train", "warmup_steps"), "val_tokens": ("data", "val_tokens"),
                 "seq_len": ("data", "seq_len"), "seqs_per_forward": ("data", "seqs_per_forward"),
                 "data": ("data", "data_dir")}
    if cfg.schedule is not None:
        for option in ("seq_len", "seqs_per_forward"):
            if getattr(args, option) is not None:
                raise SystemExit(f"--{option.replace('_', '-')} does not apply to preset {cfg.preset}: its stages "
                                 f"set the sequence lengths (see `speedrun schedule --preset {cfg.preset}`)")
    train_over, data_over = {}, {}
    for option, (section, field) in overrides.items():
        if getattr(args, option) is not None:
            (train_over if section == "train" else data_over)[field] = getattr(args, option)
    without_triton = [op for op in recipe_ops(cfg) if "triton" not in kernels.variants(op)]
    if args.kernels == "triton" and without_triton:
        raise SystemExit(f"--kernels triton: preset {cfg.preset} needs {', '.join(without_triton)}, which have no "
                         "Triton variant here (Triton missing, or not written yet); use --kernels torch")
    train_over["kernels"] = args.kernels or ("triton" if cuda and not without_triton else "torch")
    if cuda and args.kernels is None and without_triton:
        print(f"speedrun: kernels torch: preset {cfg.preset}'s {', '.join(without_triton)} have no Triton variant "
              "yet, so its plain-PyTorch references run (exact, slow); `--preset sub3min` races on Triton kernels")
    train_over["compile"] = cuda if args.compile is None else args.compile
    try:
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_over),
                                   data=dataclasses.replace(cfg.data, **data_over))
    except ValueError as e:  # e.g. --steps past a staged schedule's end
        raise SystemExit(f"preset {cfg.preset}: {e}") from None


def prepare_data(cfg: RunConfig, env: dist.DistEnv) -> tuple[RunConfig, Path, dict]:
    """Find (or, for synthetic data, generate) the shards; fit the model's vocabulary to them."""
    data_dir = Path(cfg.data.data_dir)
    if not data_dir.is_absolute():
        data_dir = REPO_ROOT / data_dir  # a preset's folder (train_command makes --data absolute)
    if cfg.data.source == "synth" and cfg.data.data_dir == get_preset(cfg.preset).data.data_dir:
        if env.is_main:
            from speedrun.data.synth import ensure_synth
            ensure_synth(data_dir)
        dist.barrier()
    get_data = ("get the FineWeb shards with `speedrun data download`, make shards from text with `speedrun data "
                "tokenize`, or run `./run.sh --preset sub3min-tiny` (synthetic data, no download)")
    if not data_dir.is_dir():
        raise UserError(f"no such data folder: {get_data}" if not data_dir.exists() else
                        "the data path is not a folder", data_dir)
    if missing := [split for split in ("train", "val") if not list_shards(data_dir, split)]:
        where = repo_or_absolute_path(data_dir)
        only = {"train": "only its val shard: a run needs both (`speedrun data tokenize` puts the first "
                         "--shard-tokens tokens in the val shard: a short text fills it alone)",
                "val": "only train shards: a run needs both"}
        raise SystemExit(f"no train/val shards in {where}: {get_data}" if len(missing) == 2 else
                         f"no {missing[0]} shard in {where}, {only[missing[0]]}")
    manifest = read_manifest(data_dir) or {}
    vocab_size, eot = data_vocab(data_dir)
    if (vocab_size, eot) != (cfg.model.vocab_size, cfg.model.eot_token):
        padded = vocab_size if vocab_size % 128 == 0 or vocab_size <= 4096 else 128 * math.ceil(vocab_size / 128)
        if env.is_main:
            print(f"note: the data's vocabulary ({vocab_size} tokens, end-of-text {eot}) differs from the "
                  f"preset's; the model uses the data's ({padded} output rows)")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, vocab_size=vocab_size, eot_token=eot, padded_vocab_size=padded))
    return cfg, data_dir, manifest


def track_of_run(cfg: RunConfig, data_dir: Path, manifest: dict):
    """(the preset's track, whether this run is on it, its target). On the track: the track's kind of data
    with the track's own val shard (by sha256, when the track names it) and the track's target. Other
    synthetic data with a known floor still gets a target over its own floor (for experiments), off the
    track; any other data none."""
    track = get_track(cfg.track)
    same_kind = (track.data == "synth") == (manifest.get("kind") == "synth")
    sha = val_shard_sha256(the_val_shard(data_dir), manifest) if track.val_data_sha256 is not None else None
    if same_kind and sha == track.val_data_sha256 and cfg.data.val_tokens == track.val_tokens:
        return track, True, track.target()
    floor = data_floor(manifest, cfg.data.val_tokens)
    own_target = track.target(floor) if same_kind and (track.target_val_loss is not None or floor is not None) \
        else None
    return track, False, own_target


def data_floor(manifest: dict, val_tokens: int) -> float | None:
    """The exact optimal loss of the first ``val_tokens`` val targets, where the data's generator knows it."""
    prefixes = manifest.get("val_optimal_loss_prefix") or {}  # the synthetic generator writes these
    return float(prefixes[str(val_tokens)]) if str(val_tokens) in prefixes else None


def train_command(args) -> int:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cuda = torch.cuda.is_available() if args.device != "cpu" else False
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    # paths the user typed are taken from the current folder
    if args.data is not None:
        args.data = str(Path(args.data).absolute())
    log_dir = Path(args.log_dir).absolute() if args.log_dir is not None else REPO_ROOT / "logs"
    checkpoint = Path(args.save_checkpoint).absolute() if args.save_checkpoint is not None else None
    if checkpoint is not None and checkpoint.is_dir():
        raise UserError("--save-checkpoint names a folder; give the checkpoint file's path", checkpoint)
    cfg = resolve_config(args, cuda)
    env = dist.init_distributed("cuda" if cuda else "cpu")
    try:
        if cfg.data.batch_slots % env.world_size:
            raise SystemExit(f"world size {env.world_size} must divide the {cfg.data.batch_slots} sequences "
                             "of a step (use 1, 2, 4 or 8 processes)")
        if env.is_main:  # before the data is prepared (synthetic data takes a while)
            check_writable_outputs(log_dir, checkpoint)
        cfg, data_dir, manifest = prepare_data(cfg, env)
        track, on_track, target = track_of_run(cfg, data_dir, manifest)
        if env.is_main:
            print(f"speedrun: preset {cfg.preset}, track {track.name if on_track else 'none (off-track data)'}, "
                  f"target {target if target is not None else 'none'}, kernels {cfg.train.kernels}, "
                  f"compile {cfg.train.compile}, {env.world_size} process(es) on {env.device.type}, "
                  f"data {repo_or_absolute_path(data_dir)}")
        result = train(cfg, env, data_dir, target, track.name if on_track else None, log_dir=log_dir,
                       quiet=args.quiet, save_checkpoint=checkpoint)
    finally:
        dist.shutdown()
    if env.is_main:
        log, facts = (repo_or_absolute_path(p) for p in (result.log_path, result.json_path))
        print(f"log: {log}  (machine-readable: {facts})")
    if result.status == "aborted":
        return 130
    return 0 if result.status in ("success", "completed") else 1
