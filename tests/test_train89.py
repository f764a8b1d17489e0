"""The trainer on a staged recipe (speedrun/train89.py + the timed loop in speedrun/train.py): the record's
warm-up and restore, the timing rules, validation at the plan's steps, the log of schedule changes.

Record #89's model is issue [2/6]; these tests drive the race with a small stand-in model that keeps the
model contract of speedrun/train89.py (every label of the optimizer's table, set_plan, per-token losses)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
import speedrun.train as train_mod
from speedrun import dist, schedule
from speedrun.config import Stage, get_preset
from speedrun.data.shards import write_shard
from speedrun.optim.record89 import PARAM_TABLE
from speedrun.train89 import Record89Race

VOCAB, BOS, DIM, HIDDEN = 64, 63, 16, 32


class StandInModel(torch.nn.Module):
    """A one-block model with record #89's parameter labels: embedding (+ hashed bigram), an attention-free
    MLP and a value projection from the banks, the lm_head, and MTP-weighted cross-entropy. Labels it does
    not use still get (zero) gradients, as the real model's unused entries do."""

    def __init__(self, bigram_rows: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        shapes = {"qk_bank": (2, 8, DIM), "vo_bank": (2, DIM, DIM), "mlp_bank": (1, 2, HIDDEN, DIM),
                  "scalars": (4,), "smear_gate": (1, 12), "skip_gate": (1, 12), "attn_gate_bank": (1, 2, 12),
                  "ve_gate_bank": (1, 2, 12), "lm_head": (DIM, VOCAB), "bigram_embed": (bigram_rows, DIM),
                  "post_lambdas": (1, 2), "x0_lambdas": (1,), "bigram_lambdas": (1,), "resid_lambdas": (1, 2),
                  "xsa_alphas": (1, 2), "value_embeds": (VOCAB, DIM), "embed": (VOCAB, DIM),
                  "mudd_w1": (1, 4, DIM), "mudd_w2": (1, 2, 4), "mudd_b2": (1, 2)}
        self.weights = torch.nn.ParameterDict({k: torch.nn.Parameter(0.1 * torch.randn(s, generator=g))
                                               for k, s in shapes.items()})
        self.weights["embed"].data.copy_(self.weights["lm_head"].data.T)
        self.plans, self.after_steps, self.resets = [], [], 0
        self.mtp = (1.0,)

    def labeled_parameters(self):
        return dict(self.weights)

    def set_plan(self, plan):
        self.plans.append(plan)
        self.mtp = plan.mtp_weights

    def after_optimizer_step(self, plan):
        self.after_steps.append(plan.step)

    def reset_schedule_state(self):
        self.resets += 1

    def flops_per_step(self, plan):
        return None

    def forward(self, inputs, targets, cu_seqlens, bigram):
        w = self.weights
        h = w["embed"][inputs] + w["bigram_embed"][bigram]
        fc, proj = w["mlp_bank"][0, 0], w["mlp_bank"][0, 1]
        h = h + F.relu(h @ fc.T).square() @ proj + h @ w["vo_bank"][0].T
        logits = F.rms_norm(h, (DIM,)) @ w["lm_head"]
        unused = sum(p.sum() for k, p in w.items() if k not in ("embed", "bigram_embed", "mlp_bank", "vo_bank",
                                                                 "lm_head"))
        if not self.training:
            return F.cross_entropy(logits, targets, reduction="none") + 0 * unused
        T = len(targets)
        loss = torch.zeros(T)
        for k, weight in enumerate(self.mtp):
            loss[:T - k] += weight * F.cross_entropy(logits[:T - k], targets[k:], reduction="none")
        return loss + 0 * unused


def staged_config(data_dir):
    """record89's structure at toy sizes: stages of 2 steps, T = 32 / 64 / 96, 1 validation batch of 1024."""
    cfg = get_preset("record89")
    stages = (
        Stage(1 / 3, 8 * 32, 24, (1, 3), 1.0, (1.0, 0.5, 0.25), (1.0, 0.5, 0.0)),
        Stage(1 / 3, 8 * 64, 48, (3, 7), 1.52, (1.0, 0.5), (1.0, 0.0)),
        Stage(1 / 3, 8 * 96, 48, (5, 11), 1.73, (1.0,), (1.0,)),
        Stage(None, 8 * 96, 48, (6, 13), 1.0, (1.0,), (1.0,)),
    )
    sched = dataclasses.replace(cfg.schedule, stages=stages, scheduled_steps=6, extension_steps=2,
                                val_batch_tokens=1024)
    return dataclasses.replace(
        cfg, schedule=sched,
        model=dataclasses.replace(cfg.model, vocab_size=VOCAB, padded_vocab_size=VOCAB, eot_token=BOS,
                                  bigram_vocab_size=128, attn_block_size=8),
        optim=dataclasses.replace(cfg.optim, ns_dtype="float32"),
        data=dataclasses.replace(cfg.data, data_dir=str(data_dir), val_tokens=2048),
        train=dataclasses.replace(cfg.train, num_steps=8, val_every=3, compile=False))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("staged")
    rng = np.random.default_rng(0)
    for name, n in (("t_val_000000.bin", 5000), ("t_train_000001.bin", 40_000)):
        docs, total = [], 0
        while total < n:
            length = int(rng.integers(4, 80))
            docs.append(np.concatenate([[BOS], rng.integers(0, BOS, length - 1) % 7 * 9 % BOS]))
            total += length
        write_shard(out / name, np.concatenate(docs)[:n].astype(np.uint16))
    return out


ENV = dist.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def race_for(cfg, data_dir, seed=0):
    return Record89Race(cfg, ENV, data_dir, kernels.resolve("torch"), model=StandInModel(128, seed))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_timed_run_follows_the_plan(data_dir, tmp_path):
    cfg = staged_config(data_dir)
    clock = FakeClock()
    race = race_for(cfg, data_dir)
    real_train, real_eval = race.train_step, race.evaluate

    def train_step(step):  # 1 s per timed step
        clock.now += 1.0
        return real_train(step)

    def evaluate(step):  # validation costs 100 s, never counted
        clock.now += 100.0
        return real_eval(step)

    race.train_step, race.evaluate = train_step, evaluate
    result = train_mod.train(cfg, ENV, data_dir, None, None, log_dir=tmp_path, clock=clock, echo=False, race=race)
    facts = json.loads(result.json_path.read_text())
    assert facts["status"] == "completed" and facts["steps_done"] == 8
    assert [p["step"] for p in facts["val_curve"]] == [0, 3, 6, 8]
    assert [p["train_time_ms"] for p in facts["val_curve"]] == [0, 3000, 6000, 8000]
    assert facts["tokens_seen"] == sum(schedule.plan(cfg, s).batch_tokens for s in range(8))
    changes = {c["step"]: c["changes"] for c in facts["schedule_changes"]}
    # stages start at 2, 4 and 6 (the extension); the untie is after step 5's update (5 | 1), the final
    # validation widens the long window
    assert set(changes) == {0, 2, 4, 5, 6, 8}
    assert "yarn=24->56" in changes[2] and "yarn=56->88" in changes[4] and "yarn=88->104" in changes[6]
    assert changes[5] == ["untie_after_update"] and "tied=False" in changes[6]
    assert changes[8] == ["window_blocks=6/20"]
    text = result.log_path.read_text()
    assert "schedule at step 2: stage=1" in text and "step:8/8 val_loss:" in text
    model = race.raw_model
    # The warm-up ran the sampled steps (0, 1 and 2 either side of the stage changes), then reset.
    assert model.resets == 1
    assert model.after_steps[:len(schedule.warmup_steps(cfg))] == [s for s in schedule.warmup_steps(cfg) if s < 8]
    assert model.after_steps[-8:] == list(range(8))
    final = model.plans[-1]
    assert final.step == 8 and not final.training and final.window_blocks == (6, 20)


def test_warm_up_restores_the_initial_state(data_dir, tmp_path, monkeypatch):
    """A run after the record's warm-up trains exactly as a run without one (losses bit for bit)."""
    cfg = staged_config(data_dir)
    runs = []
    for warm in (True, False):
        if not warm:
            monkeypatch.setattr(schedule, "warmup_steps", lambda c: [])
        result = train_mod.train(cfg, ENV, data_dir, None, None, log_dir=tmp_path, echo=False,
                                 race=race_for(cfg, data_dir))
        facts = json.loads(result.json_path.read_text())
        runs.append((facts["train_losses"], [p["val_loss"] for p in facts["val_curve"]]))
    assert runs[0] == runs[1]
    assert len(runs[0][0]) == 8


def test_the_race_uses_the_packed_stream_and_the_optimizer(data_dir):
    """One training step by hand: every micro-batch of the step's plan, 1/A-scaled summed loss, NorMuon on
    the banks every step, Adam only on odd steps."""
    cfg = staged_config(data_dir)
    race = race_for(cfg, data_dir)
    w = race.raw_model.weights
    before = {k: p.detach().clone() for k, p in w.items()}
    race.train_step(0)
    assert not torch.equal(w["mlp_bank"], before["mlp_bank"]) and torch.equal(w["embed"], before["embed"])
    assert w["embed"].grad is not None and w["mlp_bank"].grad is None
    race.train_step(1)
    assert not torch.equal(w["embed"], before["embed"]) and w["embed"].grad is None
    assert torch.equal(w["embed"], w["lm_head"].T)
    assert set(race.optimizer.params) == set(PARAM_TABLE)
    race.close()


def test_record89_tiny_trains_end_to_end_on_the_cpu(tmp_path):
    """The real model: preset record89-tiny on a small synthetic language, 2 steps (warm-up included),
    validation, run log naming the record it follows."""
    from speedrun.cli import build_parser
    from speedrun.data.synth import generate_synth

    generate_synth(tmp_path / "synth", seed=2, train_tokens=60_000, val_tokens=16_384)
    args = build_parser().parse_args(["train", "--preset", "record89-tiny", "--data", str(tmp_path / "synth"),
                                      "--steps", "2", "--val-every", "1", "--val-tokens", "16384"])
    cfg = train_mod.resolve_config(args, cuda=False)
    cfg, data_dir, _ = train_mod.prepare_data(cfg, ENV)
    result = train_mod.train(cfg, ENV, data_dir, None, None, log_dir=tmp_path / "logs", echo=False)
    facts = json.loads(result.json_path.read_text())
    assert facts["status"] == "completed" and facts["steps_done"] == 2
    losses = [p["val_loss"] for p in facts["val_curve"]]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert "preset record89-tiny: modded-nanogpt record #89's recipe" in result.log_path.read_text()
    assert facts["tokens_seen"] == 2 * 2048


def test_bad_validation_settings_stop_before_the_warm_up(data_dir):
    cfg = staged_config(data_dir)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_tokens=1000))
    with pytest.raises(SystemExit, match="val_tokens 1,000 must be a multiple of the validation batch 1,024"):
        race_for(cfg, data_dir)
