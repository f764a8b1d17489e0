"""Record #89's race on this process: the staged plan, the packed data, NorMuonAdam, and the warm-up rules.

The timed loop is the trainer's (speedrun/train.py: the clock, validation outside it, the run log); this
file is what it asks of a race (see train.Sub3MinRace) for a staged recipe (spec recipe-frontier.md 1, 3-5):

- a step: ``model.set_plan(plan)``, then per micro-step (A = 8 / W of them) the summed per-token loss
  times 1/A, backward; then NorMuonAdam.step(plan) (it reduces the gradients itself: NorMuon every step,
  Adam on odd steps) and ``model.after_optimizer_step(plan)`` (the FP8 weight requantisation).
- validation: ``model.set_plan(plan)`` (the final validation's plan carries the widened long window),
  eval mode, the mean per-token loss of every validation chunk of this rank, averaged over chunks and ranks.
- warm-up, untimed: the initial model and optimizer state are saved; the sampled steps (speedrun.schedule.
  warmup_steps: 0, 1 and two steps either side of every stage change) each run one validation forward and
  a full training step on a separate stream from the first shard; then the state is restored, the
  optimizer's NorMuon buffers and tie reset, ``model.reset_schedule_state()`` called (rotary tables and
  FP8 scales back to step 0), and the train stream starts again from the first shard.

The model of a staged recipe (issue [2/6] builds record #89's) provides:
    labeled_parameters() -> {label: parameter}      the labels of speedrun.optim.record89.PARAM_TABLE
    set_plan(plan)                                   the step's windows, rotary (YaRN), MTP weights
    forward(inputs, targets, cu_seqlens, bigram)     -> per-token losses (T,) fp32: the MTP-weighted
                                                        training loss, or in eval mode the cross-entropy
    after_optimizer_step(plan), reset_schedule_state(), flops_per_step(plan) -> float | None
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from speedrun import dist, schedule
from speedrun.config import RunConfig
from speedrun.data.packed import PackedTrainLoader, packed_val_chunks
from speedrun.data.shards import list_shards, the_val_shard
from speedrun.optim import NorMuonAdam
from speedrun.train import compile_model


def build_model(cfg: RunConfig, ops: dict):
    """The model of ``cfg``'s staged recipe: record #89's (speedrun/model89.py), in cfg.train.dtype."""
    from speedrun.model89 import GPT89

    return GPT89(cfg.model, ops, dtype=getattr(torch, cfg.train.dtype))


class Record89Race:
    """A staged recipe on this process (see the module docstring). ``model``: built by build_model unless given."""

    def __init__(self, cfg: RunConfig, env: dist.DistEnv, data_dir: Path, ops: dict, model=None):
        if cfg.data.batch_slots % env.world_size:
            raise ValueError(f"world size {env.world_size} must divide the {cfg.data.batch_slots} sequences of a step")
        self.cfg, self.env, self.plan = cfg, env, functools.partial(schedule.plan, cfg)
        self.raw_model = (model if model is not None else build_model(cfg, ops)).to(env.device)
        dist.broadcast_parameters(self.raw_model)
        if hasattr(self.raw_model, "quantize_fp8"):  # the FP8 copies of the broadcast weights, on this device
            self.raw_model.quantize_fp8(bootstrap=True)
        self.model = compile_model(self.raw_model, cfg)
        self.optimizer = NorMuonAdam(self.raw_model.labeled_parameters(), cfg, ops["polar_express"])
        self.train_paths = list_shards(data_dir, "train")
        self.val_path = the_val_shard(data_dir)
        try:  # the validation arguments are checked now, not after the warm-up
            self._val_chunks()
        except ValueError as e:
            raise SystemExit(f"preset {cfg.preset}: {e}") from None
        self.micro_steps = cfg.data.batch_slots // env.world_size
        self.train_loader = self._loader(self.plan, prefetch=True)

    def _loader(self, plan, prefetch: bool) -> PackedTrainLoader:
        c = self.cfg
        return PackedTrainLoader(self.train_paths, plan, c.data.batch_slots, self.env.world_size, self.env.rank,
                                 c.model.eot_token, c.model.bigram_vocab_size, self.env.device, prefetch,
                                 vocab_size=c.model.vocab_size)

    def _val_chunks(self):
        """This rank's validation chunks as device tensors (an iterator; the arguments are checked at once)."""
        c = self.cfg
        chunks = packed_val_chunks(self.val_path, c.data.val_tokens, c.schedule.val_batch_tokens, c.data.batch_slots,
                                   self.env.world_size, self.env.rank, c.model.eot_token, c.model.bigram_vocab_size,
                                   c.model.vocab_size)
        return ([torch.from_numpy(a).to(self.env.device) for a in chunk] for chunk in chunks)

    def _train_on(self, plan, micro_batches) -> torch.Tensor:
        self.raw_model.set_plan(plan)
        loss_sum = torch.zeros((), device=self.env.device)
        for inputs, targets, cu_seqlens, bigram in micro_batches:
            per_token = self.model(inputs, targets, cu_seqlens, bigram)
            (per_token.sum() / self.micro_steps).backward()
            loss_sum += per_token.detach().float().mean()
        self.optimizer.step(plan)
        self.raw_model.after_optimizer_step(plan)
        return loss_sum / self.micro_steps

    def train_step(self, step: int) -> torch.Tensor:
        return self._train_on(self.plan(step), self.train_loader.next_step())

    @torch.no_grad()
    def evaluate(self, step: int) -> float:
        self.raw_model.set_plan(self.plan(step))
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.env.device)
        count = 0
        for inputs, targets, cu_seqlens, bigram in self._val_chunks():
            total += self.model(inputs, targets, cu_seqlens, bigram).double().mean()
            count += 1
        self.model.train()
        # Every rank holds as many equal-length chunks, so the mean of means is the token mean.
        return dist.all_reduce_mean_(total / count).item()

    def step_flops(self, step: int) -> float | None:
        return self.raw_model.flops_per_step(self.plan(step))

    def warm_up(self) -> None:
        """The record's warm-up (module docstring): its sampled steps, untimed, then everything restored."""
        initial_model = copy.deepcopy(self.raw_model.state_dict())
        initial_optim = self.optimizer.state_dict()
        sampled = [s for s in schedule.warmup_steps(self.cfg) if s < self.cfg.train.num_steps]
        warm_loader = self._loader(lambda i: self.plan(sampled[i]), prefetch=False)
        for step in sampled:
            plan = self.plan(step)
            with torch.no_grad():
                self.raw_model.set_plan(plan)
                self.model.eval()
                inputs, targets, cu_seqlens, bigram = next(self._val_chunks())
                self.model(inputs, targets, cu_seqlens, bigram)
                self.model.train()
            self._train_on(plan, warm_loader.next_step())
        warm_loader.close()
        for p in self.raw_model.parameters():
            p.grad = None
        self.raw_model.load_state_dict(initial_model)
        self.optimizer.load_state_dict(initial_optim)
        self.optimizer.reset()
        self.raw_model.reset_schedule_state()
        self.train_loader.reset()

    def close(self) -> None:
        self.train_loader.close()
