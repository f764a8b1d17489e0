"""The plan of a run: every step-indexed value of a recipe, from one function of the step.

``plan(cfg, step)`` returns a ``StepPlan`` for step 0 .. cfg.train.num_steps; the last one is the final
validation (no training). The trainer, the data loader, the optimizers and ``speedrun schedule`` all read
the same plan, so what a reader sees in the table is what the run does.

Staged recipes (record #89, spec recipe-frontier.md section 4), from ``cfg.schedule``:

- stages: the scheduled steps are cut at the rounded cumulative sums of the stage durations (1380 steps:
  0 / 460 / 920 / 1380), then the extension stage to 1390. At step s in [start, end) the stage fraction is
  t = (s - start) / (end - start); past the end, the extension with t = 1.
- batch, document length, windows, lr_mul: the stage's. MTP weights: start + (end - start) * t.
- lr multiplier: the stage's lr_mul, and from cd = floor(scheduled * (1 - cooldown_frac)) on, linearly
  (t' = min(1, (s - cd) / (scheduled - cd))) towards final_lr_frac: lr_mul * (1 - t') + final * t'.
- momentum: start -> end over the first warmup steps, end until the last cooldown steps, then back down.
- Adam: odd steps only. The embedding is tied to lm_head until the update of the split step (the first
  odd step of split_embed_stage: 920 | 1 = 921) and untied after it.
- YaRN: whenever a stage's long window differs from the previous one, the rotary frequencies are
  rescaled and attn_scale *= 1 + 0.2 ln(new / old) (windows in tokens; 0.1 at step 0). The final
  validation widens the long window to final_long_window blocks with no YaRN update.
- FP8: the down-projection weights are requantised with current scaling after steps < fp8_bootstrap_steps.
- validation at step 0, every val_every steps and at the end.

Step-count recipes (Sub3Min and the baselines): the plan holds the values of speedrun.config's schedule
functions (one stage, windows growing with the step, Adam every step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from itertools import accumulate

from speedrun import config
from speedrun.config import RunConfig

# Upstream's fixed cu_seqlens sizes for the recipe's per-rank token counts; other counts get
# max(128, ceil((T // 300) / 128) * 128) slots (896 for the 262,144-token validation chunks).
CU_SLOTS = {16384: 64, 32768: 96, 49152: 128}
YARN_ATTN_SCALE_START = 0.1


def cu_seqlens_slots(tokens_per_rank: int) -> int:
    """Entries of the cu_seqlens array for a rank's sequence of ``tokens_per_rank`` tokens (spec 1.2)."""
    if tokens_per_rank in CU_SLOTS:
        return CU_SLOTS[tokens_per_rank]
    return max(1, -(-(tokens_per_rank // 300) // 128)) * 128


@dataclass(frozen=True)
class StepPlan:
    step: int
    training: bool  # False only at the last step: the final validation
    validate: bool  # validate before this step's training (its windows and attn_scale)
    stage: int  # index into cfg.schedule.stages (the last is the extension); 0 for step-count recipes
    stage_frac: float  # how far through its stage this step is, in [0, 1]
    lr_mul: float  # multiplies every parameter's base lr
    momentum: float  # Muon / NorMuon momentum
    adam_step: bool  # the Adam parameters are updated after this step (staged: odd steps only)
    tied: bool  # embed is lm_head^T in this step's forward
    untie: bool  # embed is untied from lm_head after this step's update
    batch_tokens: int  # tokens per optimizer step, all ranks
    tokens_per_rank: int  # tokens per rank and micro-step (batch_tokens / batch_slots), for any world size
    max_doc_len: int | None  # staged: documents are cut to this many tokens
    cu_slots: int | None  # staged: entries of each rank's cu_seqlens
    window_blocks: tuple[int, int]  # attention windows (short, long) in blocks
    window_tokens: tuple[int, int]
    mtp_weights: tuple[float, ...]  # weight of predicting token t+1, t+2, ...
    attn_scale: float  # softmax scale (staged: YaRN-adjusted)
    yarn: tuple[int, int] | None  # (old, new) long window in tokens when this step rescales the rotary
    fp8_bootstrap: bool  # staged: the FP8 down weights requantised after this step use current scaling

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def stage_bounds(cfg: RunConfig) -> list[tuple[int, int]]:
    """[start, end) of every stage of a staged recipe (the last one is the extension)."""
    s = cfg.schedule
    ends = [round(c * s.scheduled_steps) for c in accumulate(st.duration for st in s.stages[:-1])]
    ends = [0, *ends, s.total_steps]
    if ends[-2] != s.scheduled_steps:
        raise ValueError(f"the stage durations end at step {ends[-2]}, not at the {s.scheduled_steps} scheduled steps")
    return list(zip(ends[:-1], ends[1:], strict=True))


def split_step(cfg: RunConfig) -> int:
    """The step after whose update embed and lm_head are untied: the first odd step of split_embed_stage."""
    return stage_bounds(cfg)[cfg.schedule.split_embed_stage][0] | 1


def warmup_steps(cfg: RunConfig) -> list[int]:
    """The steps a staged recipe runs untimed before the clock (then restores the initial state): 0, 1 and
    the two steps on each side of every stage transition, so that every shape and schedule switch is seen."""
    transitions = [start for start, _ in stage_bounds(cfg)[1:]]
    return sorted({0, 1} | {t + d for t in transitions for d in (-2, -1, 0, 1) if t + d >= 2})


def _stage_at(cfg: RunConfig, step: int) -> tuple[int, float]:
    for i, (start, end) in enumerate(stage_bounds(cfg)):
        if step < end:
            return i, (step - start) / (end - start)
    return len(cfg.schedule.stages) - 1, 1.0


def _momentum(cfg: RunConfig, step: int) -> float:
    o = cfg.optim
    cooldown_start = cfg.train.num_steps if cfg.schedule is None else cfg.schedule.total_steps
    cooldown_start -= o.muon_momentum_cooldown_steps
    if step < o.muon_momentum_warmup_steps:
        frac = step / o.muon_momentum_warmup_steps
        return o.muon_momentum_start + frac * (o.muon_momentum_end - o.muon_momentum_start)
    if o.muon_momentum_cooldown_steps and step > cooldown_start:
        frac = (step - cooldown_start) / o.muon_momentum_cooldown_steps
        return o.muon_momentum_end - frac * (o.muon_momentum_end - o.muon_momentum_start)
    return o.muon_momentum_end


def _yarn_history(cfg: RunConfig, step: int) -> tuple[float, tuple[int, int] | None]:
    """attn_scale at ``step`` and the (old, new) long window in tokens if ``step`` changes it."""
    block = cfg.model.attn_block_size
    scale, change = YARN_ATTN_SCALE_START, None
    long_window = cfg.schedule.stages[0].windows[1] * block
    for (start, _), stage in zip(stage_bounds(cfg), cfg.schedule.stages, strict=True):
        if start > min(step, cfg.schedule.total_steps - 1):
            break
        new = stage.windows[1] * block
        if new != long_window:
            scale *= 0.2 * math.log(new / long_window) + 1
            change = (long_window, new) if start == step else None
            long_window = new
    return scale, change


def _staged_plan(cfg: RunConfig, step: int) -> StepPlan:
    s, o = cfg.schedule, cfg.optim
    index, frac = _stage_at(cfg, step)
    stage = s.stages[index]
    lr = stage.lr_mul
    cooldown_start = int(s.scheduled_steps * (1 - o.cooldown_frac))
    if step >= cooldown_start:
        t = min(1.0, (step - cooldown_start) / (s.scheduled_steps - cooldown_start))
        lr = lr * (1 - t) + o.final_lr_frac * t
    training = step < cfg.train.num_steps
    short, long = stage.windows
    if step == s.total_steps:
        long = s.final_long_window
    tokens_per_rank = stage.batch_tokens // cfg.data.batch_slots
    attn_scale, yarn = _yarn_history(cfg, step)
    block = cfg.model.attn_block_size
    split = split_step(cfg)
    return StepPlan(
        step=step, training=training,
        validate=step == cfg.train.num_steps or step % cfg.train.val_every == 0,
        stage=index, stage_frac=frac, lr_mul=lr, momentum=_momentum(cfg, step),
        adam_step=training and step % 2 == 1, tied=step <= split, untie=training and step == split,
        batch_tokens=stage.batch_tokens, tokens_per_rank=tokens_per_rank, max_doc_len=stage.max_doc_len,
        cu_slots=cu_seqlens_slots(tokens_per_rank), window_blocks=(short, long),
        window_tokens=(short * block, long * block),
        mtp_weights=tuple(a + (b - a) * frac for a, b in zip(stage.mtp_start, stage.mtp_end, strict=True)),
        attn_scale=attn_scale, yarn=yarn if training else None,
        fp8_bootstrap=training and step < s.fp8_bootstrap_steps,
    )


def _step_count_plan(cfg: RunConfig, step: int) -> StepPlan:
    n = cfg.train.num_steps
    long_blocks, short_blocks = config.window_blocks(step, cfg) if cfg.model.arch == "recipe" else (1, 1)
    block = cfg.model.attn_block_size
    return StepPlan(
        step=step, training=step < n, validate=step == n or step % cfg.train.val_every == 0,
        stage=0, stage_frac=step / n, lr_mul=config.lr_multiplier(step, cfg), momentum=_momentum(cfg, step),
        adam_step=step < n, tied=False, untie=False,
        batch_tokens=cfg.data.tokens_per_step, tokens_per_rank=cfg.data.seq_len, max_doc_len=None, cu_slots=None,
        window_blocks=(short_blocks, long_blocks), window_tokens=(short_blocks * block, long_blocks * block),
        mtp_weights=(1.0,), attn_scale=cfg.model.attn_scale, yarn=None, fp8_bootstrap=False,
    )


def plan(cfg: RunConfig, step: int) -> StepPlan:
    """Every step-indexed value of ``cfg``'s run at ``step`` (0 .. cfg.train.num_steps)."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= cfg.train.num_steps:
        raise ValueError(f"step must be an int in [0, {cfg.train.num_steps}], got {step!r}")
    return _staged_plan(cfg, step) if cfg.schedule is not None else _step_count_plan(cfg, step)


def full_plan(cfg: RunConfig) -> list[StepPlan]:
    return [plan(cfg, step) for step in range(cfg.train.num_steps + 1)]


# ---------------------------------------------------------------------------------------------
# What changes from one step to the next (the run log and `speedrun schedule` list these)
# ---------------------------------------------------------------------------------------------

# Fields that stay constant for long stretches; a change in any of them is an event worth a line.
DISCRETE_FIELDS = ("stage", "batch_tokens", "max_doc_len", "cu_slots", "window_blocks", "attn_scale", "tied")


def changes(previous: StepPlan | None, current: StepPlan) -> list[str]:
    """Human-readable schedule changes at ``current`` (everything, at the first step)."""
    out = []
    for name in DISCRETE_FIELDS:
        new = getattr(current, name)
        if previous is None or getattr(previous, name) != new:
            out.append(f"{name}={_short(new)}")
    if len(current.mtp_weights) != (len(previous.mtp_weights) if previous else 0):
        out.append(f"mtp_predictions={len(current.mtp_weights)}")
    if current.yarn:
        out.append(f"yarn={current.yarn[0]}->{current.yarn[1]}")
    if current.untie:
        out.append("untie_after_update")
    if previous is not None and previous.fp8_bootstrap and not current.fp8_bootstrap and current.training:
        out.append("fp8_delayed_weight_scaling")
    return out


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "/".join(_short(v) for v in value)
    return str(value)


def milestones(cfg: RunConfig) -> dict[int, str]:
    """Steps where a smoothly varying value changes course (the table gives them a row)."""
    o, n = cfg.optim, cfg.train.num_steps
    out = {}
    if 0 < o.muon_momentum_warmup_steps <= n:
        out[o.muon_momentum_warmup_steps] = "momentum_warmup_done"
    if cfg.schedule is not None:
        total = cfg.schedule.total_steps
        cooldown = int(cfg.schedule.scheduled_steps * (1 - o.cooldown_frac))
        out[cooldown] = "lr_cooldown_starts"
        out[cfg.schedule.scheduled_steps] = "lr_cooldown_done"
        if o.muon_momentum_cooldown_steps:
            out[total - o.muon_momentum_cooldown_steps + 1] = "momentum_cooldown_starts"
    return {step: label for step, label in out.items() if step <= n}


def format_table(cfg: RunConfig, every: int | None = None) -> str:
    """The run's plan as a text table: a row at step 0, at every step where something changes, at every
    validation and at the end, or (``every``) every ``every`` steps plus those."""
    plans = full_plan(cfg)
    head = (f"{'step':>5} {'stage':>5} {'lr_mul':>8} {'momentum':>8} {'adam':>4} {'batch':>7} {'doc_len':>7} "
            f"{'window':>9} {'attn_scale':>10} {'mtp_weights':<22} events")
    lines = [head, "-" * len(head)]
    previous = None
    course = milestones(cfg)
    for p in plans:
        events = changes(previous, p) + ([course[p.step]] if p.step in course else [])
        marks = (["validate"] if p.validate else []) + ([] if p.training else ["final validation"])
        interesting = events or marks or (every and p.step % every == 0)
        if interesting:
            tail = ", ".join(events + marks) if previous is not None else ", ".join(marks)
            adam = "yes" if p.adam_step else "-"
            lines.append(f"{p.step:>5} {p.stage:>5} {p.lr_mul:>8.5f} {p.momentum:>8.5f} {adam:>4} "
                         f"{p.batch_tokens:>7} {p.max_doc_len if p.max_doc_len else '-':>7} "
                         f"{_short(p.window_tokens):>9} {p.attn_scale:>10.6f} {_short(p.mtp_weights):<22} {tail}")
        previous = p
    return "\n".join(lines)


def summary(cfg: RunConfig) -> str:
    """A few lines on the run as a whole, above the table."""
    n = cfg.train.num_steps
    lines = [f"preset {cfg.preset}: {n} training steps, then the final validation (step {n})"]
    if cfg.schedule is not None:
        bounds = stage_bounds(cfg)
        spans = ", ".join(f"{i}: steps {a}-{b - 1}" for i, (a, b) in enumerate(bounds))
        tokens = sum((min(b, n) - a) * st.batch_tokens for (a, b), st in zip(bounds, cfg.schedule.stages, strict=True)
                     if a < n)
        lines += [f"stages ({len(bounds) - 1} scheduled + extension) {spans}",
                  f"Adam steps: odd steps only; embed tied to lm_head until the update of step {split_step(cfg)}",
                  f"untimed warm-up steps: {warmup_steps(cfg)}",
                  f"input tokens trained on: {tokens:,}"]
    else:
        lines.append(f"input tokens trained on: {n * cfg.data.tokens_per_step:,}")
    return "\n".join(lines)


def model_lines(cfg: RunConfig) -> list[str]:
    """The preset's model at its real size, built on the meta device (no memory): parameter count, shapes."""
    import torch

    import kernels

    with torch.device("meta"):
        if cfg.model.arch == "record89":
            from speedrun.model89 import GPT89
            model = GPT89(cfg.model, kernels.resolve("torch"))
        else:
            from speedrun.model import GPT
            model = GPT(cfg.model, kernels.resolve("torch"))
    params = list(model.named_parameters())
    lines = [f"model: {sum(p.numel() for _, p in params):,} parameters"]
    lines += [f"  {name:<28} {' x '.join(map(str, p.shape)):<22} {str(p.dtype).replace('torch.', '')}"
              for name, p in params]
    return lines


def schedule_command(preset: str, every: int | None = None, as_json: bool = False) -> int:
    """`speedrun schedule`: the preset's plan (and model size) on stdout."""
    cfg = config.get_preset(preset)
    if as_json:
        for p in full_plan(cfg):
            sys.stdout.write(json.dumps(p.to_dict()) + "\n")
        return 0
    print(summary(cfg))
    print("\n".join(model_lines(cfg)))
    print()
    print(format_table(cfg, every))
    return 0
