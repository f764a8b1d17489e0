"""Run configuration: plain frozen dataclasses and the named presets.

A preset is a function that returns one fully resolved ``RunConfig``. Command-line overrides are
applied with ``dataclasses.replace`` and the result is written, whole, into every run log, so a run
can be repeated from its log alone. This module imports nothing heavier than the standard library:
the command-line parser (and ``./run.sh --help``) use it before any environment exists.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    # "recipe": the Sub3Min GPT (speedrun/model.py); "nanogpt": the baseline of preset tiny-adamw;
    # "record89": record #89's GPT (its model is issue [2/6]; its data, optimizers and schedules are here)
    arch: str = "recipe"
    vocab_size: int = 50257  # rows of the token and value embeddings (GPT-2 vocabulary)
    padded_vocab_size: int = 50304  # rows of lm_head: vocab rounded up to a multiple of 128
    eot_token: int = 50256  # starts every document; document ids for the attention mask count it
    n_layer: int = 12
    dim: int = 768
    n_head: int = 6
    head_dim: int = 128
    mlp_hidden: int = 3072
    # Half-truncated rotary: pair i with i + head_dim/2; the first `rope_rotating_pairs` pairs rotate with
    # frequency rope_min_freq ** (i / (rope_rotating_pairs - 1)), the rest have frequency 0.
    rope_rotating_pairs: int = 32
    rope_min_freq: float = 1 / 1024
    attn_scale: float = 0.12
    attn_block_size: int = 128  # the attention window is counted in blocks of this many tokens
    no_attention_layers: tuple[int, ...] = (7,)
    n_value_embeds: int = 3  # layers 0..n-1 and the last n layers use value embeddings 0..n-1
    window_pattern: str = "LSSSLSSLSSSL"  # per layer: L = long window, S = short window (half of long)
    logit_cap: float = 30.0  # logits = logit_cap * sigmoid(z / logit_scale)
    logit_scale: float = 7.5
    # Sub3Min: the lm_head in FP8 where the GPU supports it (elsewhere the same math in bf16/fp32).
    # record89: the FP8 forward of the MLPs and the lm_head in training (emulated exactly off a GPU).
    fp8_lm_head: bool = True
    max_seq_len: int = 0  # nanogpt arch only: rows of the learned position table
    bigram_vocab_size: int = 0  # record89: rows of the hashed-bigram table (its data stream hashes into them)
    bigram_dim: int = 0  # record89: width of a bigram row (added to the first bigram_dim channels)

    def __post_init__(self):
        if self.arch not in ("recipe", "nanogpt", "record89"):
            raise ValueError(f"ModelConfig.arch must be 'recipe', 'nanogpt' or 'record89', got {self.arch!r}")
        if self.arch == "recipe" and len(self.window_pattern) != self.n_layer:
            raise ValueError(f"window_pattern has {len(self.window_pattern)} entries for {self.n_layer} layers")
        if self.n_head * self.head_dim != self.dim:
            raise ValueError(f"n_head * head_dim = {self.n_head * self.head_dim} must equal dim = {self.dim}")


@dataclass(frozen=True)
class OptimConfig:
    kind: str = "muon_adam"  # "muon_adam": the recipe; "adamw": the nanoGPT-style baseline
    # Muon: every >= 2-D matrix inside the blocks.
    muon_lr: float = 0.05
    muon_momentum_start: float = 0.85
    muon_momentum_end: float = 0.95
    muon_momentum_warmup_steps: int = 300
    muon_momentum_cooldown_steps: int = 0  # last steps of the run: momentum falls back linearly to the start value
    ns_steps: int = 5
    ns_coeffs: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    ns_dtype: str = "bfloat16"  # Newton-Schulz compute dtype (the CPU presets use float32: bf16 is slow there)
    # Adam: embeddings, lm_head, scalars.
    adam_betas: tuple[float, float] = (0.8, 0.95)
    adam_eps: float = 1e-10
    lm_head_lr: float = 0.008
    embed_lr: float = 0.6
    scalar_lr: float = 0.04
    # Learning-rate multiplier shared by every group: flat, then linear to final_lr_frac over the
    # last cooldown_frac of the run.
    cooldown_frac: float = 0.4
    final_lr_frac: float = 0.1
    # AdamW baseline (kind == "adamw"): linear warm-up then cosine to min_lr_frac.
    adamw_lr: float = 6e-4
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 0
    min_lr_frac: float = 0.1

    # NorMuon + Adam (kind == "normuon_adam", record #89, spec recipe-frontier.md section 3). Every parameter's
    # lr is its base lr times the schedule's multiplier times its own lr_mul (speedrun/optim/frontier.py);
    # Adam steps only on odd steps, with the gradients of two steps summed. Momentum: the muon_momentum_* fields.
    normuon_lr: float = 0.023
    normuon_weight_decay: float = 1.2  # cautious: only where update and weight agree in sign
    normuon_beta2: float = 0.9  # EMA of the per-row (or per-column) mean square of the update
    # Polar Express: one (a, b, c) per iteration (ns_dtype is its compute dtype)
    polar_express_coeffs: tuple[tuple[float, float, float], ...] = (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    )
    adam_lr: float = 0.008
    adam_weight_decay: float = 0.005  # cautious, scaled by lr**2 and each parameter's wd_mul

    def __post_init__(self):
        if self.kind not in ("muon_adam", "adamw", "normuon_adam"):
            raise ValueError(f"OptimConfig.kind must be 'muon_adam', 'adamw' or 'normuon_adam', got {self.kind!r}")


@dataclass(frozen=True)
class DataConfig:
    source: str = "fineweb"  # "fineweb" (downloaded or tokenized shards) or "synth" (generated here)
    data_dir: str = "data/fineweb10B"  # relative to the repository root unless absolute
    seq_len: int = 65536  # tokens in one micro-batch sequence (batch dimension 1)
    batch_slots: int = 8  # sequences per optimizer step; each of W processes runs batch_slots / W of them
    # Sequences per forward pass. The recipe runs one 64K-token sequence per forward (micro-step); on a
    # CPU a forward over several short sequences at once saves per-op overhead. The loss is a mean over
    # equal-length sequences either way, so the math does not change.
    seqs_per_forward: int = 1
    val_tokens: int = 10_485_760

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_slots


@dataclass(frozen=True)
class TrainConfig:
    num_steps: int = 1393
    val_every: int = 125  # also always at step 0 and at the last step
    warmup_steps: int = 10  # untimed steps before the clock starts; state is restored afterwards
    max_window_tokens: int = 1728  # window schedule reaches this many tokens at the last step
    seed: int = 0
    dtype: str = "bfloat16"  # activation dtype; weights are stored in fp32
    log_every: int = 1  # per-step log line cadence (the public format logs every step)
    kernels: str = "torch"  # implementation of the hot ops: "torch" (reference) or "triton"
    compile: bool = False  # torch.compile the model (the trainer turns it on by default on CUDA)


@dataclass(frozen=True)
class Stage:
    """One stage of a staged recipe (record #89, spec recipe-frontier.md section 4.2)."""

    duration: float | None  # share of the scheduled steps; None for the extension stage (always the last)
    batch_tokens: int  # tokens per optimizer step, all ranks together
    max_doc_len: int  # a document longer than this is cut to its first max_doc_len tokens
    windows: tuple[int, int]  # attention windows (short, long), in blocks of ModelConfig.attn_block_size
    lr_mul: float
    mtp_start: tuple[float, ...]  # multi-token-prediction weights at the stage's first step ...
    mtp_end: tuple[float, ...]  # ... moving linearly to these at its end

    def __post_init__(self):
        if len(self.mtp_start) != len(self.mtp_end) or not self.mtp_start:
            raise ValueError(f"Stage: mtp_start {self.mtp_start} and mtp_end {self.mtp_end} need one weight per "
                             "predicted token, as many at the start as at the end")
        if len(self.windows) != 2 or not 1 <= self.windows[0] <= self.windows[1]:
            raise ValueError(f"Stage: windows must be (short, long) blocks with 1 <= short <= long, got {self.windows}")
        if self.batch_tokens <= 0 or self.max_doc_len <= 0:
            raise ValueError(f"Stage: batch_tokens and max_doc_len must be positive, got {self.batch_tokens}, "
                             f"{self.max_doc_len}")


@dataclass(frozen=True)
class StagedSchedule:
    """A run in stages (record #89): the step plan is speedrun.schedule.plan(cfg, step).

    The scheduled steps are cut into stages by the rounded cumulative sums of the stages' durations; the
    last stage (duration None) is an extension of ``extension_steps`` steps after them.
    """

    stages: tuple[Stage, ...]
    scheduled_steps: int = 1380
    extension_steps: int = 10
    split_embed_stage: int = 2  # the embedding is untied from lm_head after the first odd step of this stage
    final_long_window: int = 20  # blocks: the final validation's long window (no YaRN update for it)
    val_batch_tokens: int = 2_097_152  # validation tokens per micro-step, all ranks together
    fp8_bootstrap_steps: int = 16  # the FP8 down-projection weights use current scaling after steps < this

    def __post_init__(self):
        if len(self.stages) < 2 or self.stages[-1].duration is not None:
            raise ValueError("StagedSchedule: at least one scheduled stage, then the extension stage (duration None)")
        if any(s.duration is None or s.duration <= 0 for s in self.stages[:-1]):
            raise ValueError("StagedSchedule: every stage but the last needs a positive duration")
        if abs(sum(s.duration for s in self.stages[:-1]) - 1) > 1e-9:
            raise ValueError("StagedSchedule: the scheduled stages' durations must add up to 1")
        if not 0 <= self.split_embed_stage < len(self.stages):
            raise ValueError(f"StagedSchedule: split_embed_stage {self.split_embed_stage} is not a stage index")

    @property
    def total_steps(self) -> int:
        return self.scheduled_steps + self.extension_steps


def _build(cls, values: dict):
    """A config dataclass from its dict (a run log's JSON): unknown fields are an error, lists become tuples."""
    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    if not isinstance(values, dict):
        raise ValueError(f"{cls.__name__} must be a JSON object, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**{k: tuples(v) for k, v in values.items()})


@dataclass(frozen=True)
class RunConfig:
    preset: str
    track: str
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: StagedSchedule | None = None  # a staged recipe (record #89); None: the step-count schedules below

    def __post_init__(self):
        if self.schedule is not None and self.train.num_steps > self.schedule.total_steps:
            raise ValueError(f"train.num_steps {self.train.num_steps} is past the staged schedule's "
                             f"{self.schedule.total_steps} steps")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> RunConfig:
        schedule = d.get("schedule")
        if schedule is not None:
            schedule = _build(StagedSchedule, {**schedule, "stages": [_build(Stage, s) for s in schedule["stages"]]})
        return RunConfig(
            preset=d["preset"],
            track=d["track"],
            model=_build(ModelConfig, d["model"]),
            optim=_build(OptimConfig, d["optim"]),
            data=_build(DataConfig, d["data"]),
            train=_build(TrainConfig, d["train"]),
            schedule=schedule,
        )


# ---------------------------------------------------------------------------------------------
# Schedules (pure functions of the step, shared by the trainer, the tests and the benchmarks)
# ---------------------------------------------------------------------------------------------


def lr_multiplier(step: int, cfg: RunConfig) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based), the same for every group."""
    o, n = cfg.optim, cfg.train.num_steps
    if o.kind == "adamw":
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, n - o.warmup_steps))
        return o.min_lr_frac + (1 - o.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))
    t = 1 - step / n
    w = min(t / o.cooldown_frac, 1.0)
    return w + o.final_lr_frac * (1 - w)


def muon_momentum(step: int, cfg: RunConfig) -> float:
    o = cfg.optim
    frac = min(step / o.muon_momentum_warmup_steps, 1.0) if o.muon_momentum_warmup_steps > 0 else 1.0
    return o.muon_momentum_start + (o.muon_momentum_end - o.muon_momentum_start) * frac


def window_blocks(step: int, cfg: RunConfig) -> tuple[int, int]:
    """(long, short) attention windows at ``step``, in blocks of ``attn_block_size`` tokens.

    window(step) = block * max(1, ceil(max_window_tokens * step / num_steps / block)); the long window is
    window / block and the short one half of it, rounded down (0 behaves as 1: the diagonal block only).
    The final validation (step == num_steps) uses the window of the last step's schedule position.
    """
    block = cfg.model.attn_block_size
    tokens = cfg.train.max_window_tokens * step / cfg.train.num_steps
    long_blocks = max(1, math.ceil(tokens / block))
    return long_blocks, long_blocks // 2


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def sub3min() -> RunConfig:
    """The public speedrun's "Sub3Min" record (2025-01-16), track 8xH100 -> 3.28."""
    return RunConfig(preset="sub3min", track="8xH100-3.28")


def record89() -> RunConfig:
    """The public speedrun's record #89, "MLP down projection in FP8" (2026-07-17), track 8xH100 -> 3.28.

    Spec: recipe-frontier.md. Three stages and an extension (1390 steps); NorMuon + Adam.
    """
    # Tokens per rank per micro-step are batch_tokens / 8 for every world size (8 = DataConfig.batch_slots).
    stages = (
        Stage(duration=1 / 3, batch_tokens=8 * 2048 * 8, max_doc_len=896, windows=(1, 3), lr_mul=1.0,
              mtp_start=(1.0, 0.5, 0.25), mtp_end=(1.0, 0.5, 0.0)),
        Stage(duration=1 / 3, batch_tokens=16 * 2048 * 8, max_doc_len=2048, windows=(3, 7), lr_mul=1.52,
              mtp_start=(1.0, 0.5), mtp_end=(1.0, 0.0)),
        Stage(duration=1 / 3, batch_tokens=24 * 2048 * 8, max_doc_len=2048, windows=(5, 11), lr_mul=1.73,
              mtp_start=(1.0,), mtp_end=(1.0,)),
        # the extension: its lr_mul is never used (the cooldown has reached final_lr_frac by then)
        Stage(duration=None, batch_tokens=24 * 2048 * 8, max_doc_len=2048, windows=(6, 13), lr_mul=1.0,
              mtp_start=(1.0,), mtp_end=(1.0,)),
    )
    schedule = StagedSchedule(stages=stages)
    return RunConfig(
        preset="record89",
        track="8xH100-3.28",
        model=ModelConfig(arch="record89", n_layer=11, window_pattern="", bigram_vocab_size=50304 * 15,
                          bigram_dim=192),
        optim=OptimConfig(kind="normuon_adam", cooldown_frac=0.6, final_lr_frac=0.15,
                          muon_momentum_cooldown_steps=50),
        data=DataConfig(batch_slots=8),  # seq_len is unused: the stages set the sequence lengths
        train=TrainConfig(num_steps=schedule.total_steps, val_every=250, warmup_steps=0),
        schedule=schedule,
    )


def sub3min_tiny() -> RunConfig:
    """The CPU track: the recipe's model code at a small size, on the generated synthetic language."""
    return RunConfig(
        preset="sub3min-tiny",
        track="tiny-cpu",
        # The synthetic language has its own small vocabulary (see speedrun/data/synth.py): a 50K-way
        # softmax would cost more than the rest of this model on a 2-core CPU.
        model=ModelConfig(
            vocab_size=2048,
            padded_vocab_size=2048,
            eot_token=2047,
            n_layer=4,
            dim=128,
            n_head=2,
            head_dim=64,
            mlp_hidden=512,
            rope_rotating_pairs=16,
            attn_block_size=64,
            no_attention_layers=(),
            n_value_embeds=1,
            window_pattern="LSSL",
        ),
        optim=OptimConfig(ns_dtype="float32"),
        data=DataConfig(source="synth", data_dir="data/synth", seq_len=512, batch_slots=8, val_tokens=131_072,
                        seqs_per_forward=8),
        train=TrainConfig(num_steps=300, val_every=50, warmup_steps=3, max_window_tokens=512, dtype="float32"),
    )


def record89_tiny() -> RunConfig:
    """Record #89's recipe at the CPU track's size: the same model and optimizer code, dim 128 (2 heads of 64),
    on the synthetic language; its three stages keep the record's ratios (batch 1 : 2 : 3, document cut
    224 / 512, windows in 64-token blocks) over 294 scheduled steps + 6, the tiny preset's 1.23M tokens."""
    base = record89()
    stages = tuple(dataclasses.replace(s, batch_tokens=s.batch_tokens // 64, max_doc_len=s.max_doc_len // 4)
                   for s in base.schedule.stages)
    schedule = dataclasses.replace(base.schedule, stages=stages, scheduled_steps=294, extension_steps=6,
                                   val_batch_tokens=8 * 2048)
    return dataclasses.replace(
        base,
        preset="record89-tiny",
        track="tiny-cpu",
        model=dataclasses.replace(base.model, vocab_size=2048, padded_vocab_size=2048, eot_token=2047, dim=128,
                                  n_head=2, head_dim=64, mlp_hidden=512, attn_block_size=64,
                                  bigram_vocab_size=2048 * 15, bigram_dim=32, fp8_lm_head=False),
        # momentum warm-up and cool-down at the record's share of the run (300 and 50 of its 1390 steps)
        optim=dataclasses.replace(base.optim, ns_dtype="float32", muon_momentum_warmup_steps=65,
                                  muon_momentum_cooldown_steps=11),
        data=DataConfig(source="synth", data_dir="data/synth", val_tokens=131_072),
        train=TrainConfig(num_steps=schedule.total_steps, val_every=50, warmup_steps=0, dtype="float32"),
        schedule=schedule,
    )


def tiny_adamw() -> RunConfig:
    """Baseline for the CPU track: same data and size, nanoGPT-style recipe (learned positions, GELU, AdamW)."""
    base = sub3min_tiny()
    return dataclasses.replace(
        base,
        preset="tiny-adamw",
        model=dataclasses.replace(base.model, arch="nanogpt", max_seq_len=base.data.seq_len),
        optim=OptimConfig(kind="adamw", adamw_lr=3e-3, weight_decay=0.1, warmup_steps=20, min_lr_frac=0.1),
    )


# Each preset is named after the record whose recipe it computes (at the record's size, or "-tiny": the CPU
# track's); the first is the default race on GPUs, sub3min-tiny the default on a CPU (the tiny-cpu record).
PRESETS = {"record89": record89, "record89-tiny": record89_tiny, "sub3min": sub3min, "sub3min-tiny": sub3min_tiny,
           "tiny-adamw": tiny_adamw}
# Earlier names, still accepted (committed run logs and records name them): each gives the renamed preset.
PRESET_ALIASES = {"gpt2-124m": "sub3min", "tiny": "sub3min-tiny"}
DEFAULT_GPU_PRESET, DEFAULT_CPU_PRESET = "record89", "sub3min-tiny"
# The public record whose math each preset computes (the run log names it).
FOLLOWS = {
    "sub3min": "modded-nanogpt record Sub3Min (2025-01-16, 179.5 s on 8xH100)",
    "record89": "modded-nanogpt record #89, MLP down projection in FP8 (2026-07-17, 79.7 s on 8xH100)",
    "record89-tiny": "modded-nanogpt record #89's recipe at the CPU track's size",
    "sub3min-tiny": "modded-nanogpt record Sub3Min's recipe at the CPU track's size",
    "tiny-adamw": "no record: the nanoGPT-style AdamW baseline of the CPU track",
}


def preset_names() -> list[str]:
    """Every name ``get_preset`` accepts (the presets, then their earlier names): the CLI's choices."""
    return [*PRESETS, *PRESET_ALIASES]


def get_preset(name: str) -> RunConfig:
    """The preset called ``name`` (or an earlier name of it, see PRESET_ALIASES)."""
    name = PRESET_ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} "
                         f"(earlier names: {', '.join(f'{a} = {b}' for a, b in PRESET_ALIASES.items())})")
    return PRESETS[name]()
