"""The GPT of the "Sub3Min" speedrun record, and the nanoGPT-style baseline, in one file.

Read top to bottom: small helpers (norm, rotary), the FP8 lm_head, the recipe's modules (attention,
MLP, block), the baseline's modules, the GPT that assembles either, and the FLOP count for MFU.

The model calls its hot ops only through ``ops``, the dict returned by ``kernels.resolve(variant)``:
``ops["attention"]``, ``ops["mlp"]``, ``ops["cross_entropy"]`` (``ops["newton_schulz"]`` is Muon's, in
speedrun/optim/muon.py). Their signatures are documented in kernels/<op>.py; swapping the torch references for
Triton kernels changes nothing here.

Precision (spec section 2): every matrix and scalar is stored in fp32, the embedding tables in bf16 when
the activations are bf16. There is no autocast: each weight is cast to the activation dtype where it is
used. Rotary runs in fp32, the softcap and the cross-entropy in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.common import supports_fp8
from speedrun.config import ModelConfig, RunConfig

REQUIRED_OPS = ("attention", "mlp", "cross_entropy")
TRAINING_OPS = (*REQUIRED_OPS, "newton_schulz")  # with Muon's


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim without a gain (the recipe's only norm)."""
    return F.rms_norm(x, (x.size(-1),))


# ---------------------------------------------------------------------------------------------
# Rotary position embedding: half-truncated, split-halves layout
# ---------------------------------------------------------------------------------------------


def rotary_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Angular frequency of each of the head_dim/2 rotation pairs (fp32).

    Pair i is dims (i, i + head_dim/2). The first rope_rotating_pairs pairs rotate with
    rope_min_freq ** (i / (rope_rotating_pairs - 1)), from 1 down to rope_min_freq; the rest have
    frequency 0, so half of each head carries no position at all ("half-truncated").
    """
    pairs = cfg.rope_rotating_pairs
    i = torch.arange(pairs, dtype=torch.float32, device=device)
    rotating = cfg.rope_min_freq ** (i / (pairs - 1))
    still = torch.zeros(cfg.head_dim // 2 - pairs, dtype=torch.float32, device=device)
    return torch.cat([rotating, still])


def rotary_cos_sin(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles position * frequency, each (seq_len, head_dim/2) fp32.

    Positions are absolute within the sequence (0 .. seq_len-1); they are not reset at documents.
    """
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, rotary_frequencies(cfg, device))
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x1, x2) = (x[..., i], x[..., i + D/2]) of x (B, T, H, D) by -angle, in fp32.

    y1 = x1 cos + x2 sin,  y2 = -x1 sin + x2 cos  (spec: RoPE). Returns x's dtype.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    y = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
    return y.type_as(x)


def value_embed_layers(cfg: ModelConfig) -> list[int | None]:
    """For each layer, the index of the value-embedding table it uses, or None.

    Layers 0..n-1 use tables 0..n-1 and the last n layers reuse them in the same order; the middle
    layers use none. For the recipe (n = 3, 12 layers): [0, 1, 2, None x 6, 0, 1, 2].
    """
    n, L = cfg.n_value_embeds, cfg.n_layer
    index: list[int | None] = [None] * L
    for j in range(n):
        index[j] = j
        index[L - n + j] = j
    return index


# ---------------------------------------------------------------------------------------------
# FP8 lm_head (spec: lm_head). Fixed power-of-two scales, no amax tracking.
# ---------------------------------------------------------------------------------------------


# FP8Linear's scales: module constants, since dynamo (torch 2.11) cannot read a class attribute of an
# autograd.Function inside its traced forward (a graph break on the GPU suite's H100, 2026-11-27)
FP8_X_SCALE, FP8_W_SCALE = 2.0, 32.0


class FP8Linear(torch.autograd.Function):
    """out = x @ w^T with x (N, K) bf16 and w (M, K) fp32, computed in FP8 on the tensor cores.

    Forward: e4m3(2x) @ e4m3(32w)^T, unscaled by 1/2 and 1/32, output bf16, fast accumulation.
    Backward: g8 = e5m2(s g); dx = g8 @ w8 / (s * 32) in bf16; dW = g8^T @ x8 / (s * 2) in fp32, both
    without fast accumulation, with s = ``grad_scale`` (2^29 in the recipe, see fp8_grad_scale). The
    scales fit the recipe's ranges: rms-normed x has |x| <= sqrt(K) and e4m3 tops out at 448.

    torch._scaled_mm wants its first operand row-major and its second column-major; the .T/.contiguous
    dance below produces exactly those layouts. Needs N, K, M multiples of 16 (the caller checks).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, grad_scale: float) -> torch.Tensor:
        x8 = (x * FP8_X_SCALE).to(torch.float8_e4m3fn).contiguous()  # row-major (no-op normally)
        w8 = (w * FP8_W_SCALE).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(
            x8, w8.T,
            scale_a=_fp32_scalar(1 / FP8_X_SCALE, x.device),
            scale_b=_fp32_scalar(1 / FP8_W_SCALE, x.device),
            out_dtype=torch.bfloat16, use_fast_accum=True,
        )
        ctx.save_for_backward(x8, w8)
        ctx.grad_scale = grad_scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, w8 = ctx.saved_tensors
        inv_grad_scale = _fp32_scalar(1 / ctx.grad_scale, grad.device)
        g8 = (grad * ctx.grad_scale).to(torch.float8_e5m2).contiguous()
        dx = torch._scaled_mm(
            g8, w8.T.contiguous().T,
            scale_a=inv_grad_scale, scale_b=_fp32_scalar(1 / FP8_W_SCALE, grad.device),
            out_dtype=torch.bfloat16, use_fast_accum=False,
        )
        dw = torch._scaled_mm(
            g8.T.contiguous(), x8.T.contiguous().T,
            scale_a=inv_grad_scale, scale_b=_fp32_scalar(1 / FP8_X_SCALE, grad.device),
            out_dtype=torch.float32, use_fast_accum=False,
        )
        return dx, dw, None


def fp8_grad_scale(n_tokens: int) -> float:
    """The e5m2 scale of the logit gradients when the loss is the mean over ``n_tokens`` tokens.

    The recipe uses 2^29 at its 65,536 tokens per micro-batch. Mean-loss logit gradients shrink as
    1/n_tokens (the largest is about 1/n_tokens, at the target), so the scale follows the power of two
    at or below n_tokens: exactly 2^29 for the recipe, and no e5m2 overflow (max 57,344) at other sizes.
    """
    return 2.0 ** (29 - 16 + n_tokens.bit_length() - 1)


def _fp32_scalar(value: float, device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------
# The recipe's modules
# ---------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """QK-normed, rotary, value-mixed attention with a stacked q/k/v weight (spec: Attention)."""

    def __init__(self, cfg: ModelConfig, ops: dict):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        bound = math.sqrt(3) * 0.5 * cfg.dim**-0.5  # = 1/32 at dim 768
        # One (3, dim, dim) parameter so Muon orthogonalises q, k and v as three separate matrices.
        self.qkv_w = nn.Parameter(torch.empty(3, cfg.dim, cfg.dim).uniform_(-bound, bound))
        self.out_w = nn.Parameter(torch.zeros(cfg.dim, cfg.dim))  # zero-init: the block starts as identity
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # v <- l0 * v + l1 * value_embedding

    def forward(self, x, value_embed, doc_ids, window_blocks, cos, sin):
        B, T, _ = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        qkv = F.linear(x, self.qkv_w.flatten(end_dim=1).type_as(x))
        q, k, v = qkv.view(B, T, 3, H, D).unbind(dim=2)
        lambdas = self.lambdas.type_as(x)
        v = lambdas[0] * v
        if value_embed is not None:
            v = v + lambdas[1] * value_embed.view(B, T, H, D)
        q, k = norm(q), norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = self.ops["attention"](q, k, v, doc_ids, window_blocks, self.cfg.attn_scale, self.cfg.attn_block_size)
        return F.linear(y.reshape(B, T, self.cfg.dim), self.out_w.type_as(y))


class MLP(nn.Module):
    """relu(x W_fc^T)^2 W_proj^T through ops["mlp"]."""

    def __init__(self, cfg: ModelConfig, ops: dict):
        super().__init__()
        self.ops = ops
        bound = math.sqrt(3) * 0.5 / math.sqrt(cfg.dim)
        self.fc_w = nn.Parameter(torch.empty(cfg.mlp_hidden, cfg.dim).uniform_(-bound, bound))
        self.proj_w = nn.Parameter(torch.zeros(cfg.dim, cfg.mlp_hidden))  # zero-init, as out_w

    def forward(self, x):
        return self.ops["mlp"](x, self.fc_w, self.proj_w)


class Block(nn.Module):
    """x <- a x + b x0; x += attn(norm(x)) (unless this layer has none); x += mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, ops: dict, has_attention: bool):
        super().__init__()
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # (a, b): start as the plain residual stream
        self.attn = CausalSelfAttention(cfg, ops) if has_attention else None
        self.mlp = MLP(cfg, ops)

    def forward(self, x, x0, value_embed, doc_ids, window_blocks, cos, sin):
        a, b = self.lambdas.type_as(x).unbind()
        x = a * x + b * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), value_embed, doc_ids, window_blocks, cos, sin)
        return x + self.mlp(norm(x))


# ---------------------------------------------------------------------------------------------
# The baseline's modules (arch "nanogpt"): LayerNorm with gain, GELU MLP, 1/sqrt(d) attention
# ---------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm with a gain and no bias; the fp32 gain is cast to the activation dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.layer_norm(x, (x.size(-1),), self.weight.type_as(x))


class CastedLinear(nn.Linear):
    """Bias-free linear layer storing fp32 weights, cast to the input's dtype; GPT-2 init N(0, std)."""

    def __init__(self, in_features: int, out_features: int, std: float):
        super().__init__(in_features, out_features, bias=False)
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, x):
        return F.linear(x, self.weight.type_as(x))


class BaselineBlock(nn.Module):
    """Pre-LN GPT-2 block. Residual projections get std 0.02 / sqrt(2 n_layer), as in GPT-2."""

    def __init__(self, cfg: ModelConfig, ops: dict):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.ln_1 = LayerNorm(cfg.dim)
        self.qkv = CastedLinear(cfg.dim, 3 * cfg.dim, std=0.02)
        self.attn_proj = CastedLinear(cfg.dim, cfg.dim, std=residual_std)
        self.ln_2 = LayerNorm(cfg.dim)
        self.fc = CastedLinear(cfg.dim, cfg.mlp_hidden, std=0.02)
        self.mlp_proj = CastedLinear(cfg.mlp_hidden, cfg.dim, std=residual_std)

    def forward(self, x, doc_ids):
        B, T, _ = x.shape
        H, D, block = self.cfg.n_head, self.cfg.head_dim, self.cfg.attn_block_size
        q, k, v = self.qkv(self.ln_1(x)).view(B, T, 3, H, D).unbind(dim=2)
        whole_sequence = -(-T // block)  # a window of every block: plain document-causal attention
        y = self.ops["attention"](q, k, v, doc_ids, whole_sequence, 1 / math.sqrt(D), block)
        x = x + self.attn_proj(y.reshape(B, T, self.cfg.dim))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class GPT(nn.Module):
    """The speedrun GPT (cfg.arch == "recipe") or the nanoGPT-style baseline (cfg.arch == "nanogpt").

    ``dtype`` is the activation dtype: bfloat16 (GPU) or float32 (the CPU presets).

    Attributes the optimizer builder relies on: ``embed`` (token embedding), ``value_embeds``
    (recipe), ``blocks``, ``skip_weights`` (recipe), ``lm_head_weight``. In the baseline the head is
    tied to the token embedding (``lm_head_weight is embed.weight``), as in GPT-2; both are stored in
    fp32 there because the table is also the output matrix.
    """

    def __init__(self, cfg: ModelConfig, ops: dict, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        _check_model_args(cfg, ops, dtype)
        self.cfg, self.ops, self.dtype = cfg, ops, dtype
        if cfg.arch == "recipe":
            self._build_recipe(cfg, ops, dtype)
        else:
            self._build_baseline(cfg, ops)

    def _build_recipe(self, cfg: ModelConfig, ops: dict, dtype: torch.dtype):
        table_dtype = torch.bfloat16 if dtype == torch.bfloat16 else dtype
        # nn.Embedding initialises N(0, 1), the recipe's init for all four tables.
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, dtype=table_dtype)
        self.value_embeds = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, cfg.dim, dtype=table_dtype) for _ in range(cfg.n_value_embeds)
        )
        self.value_embed_of_layer = value_embed_layers(cfg)
        self.blocks = nn.ModuleList(
            Block(cfg, ops, has_attention=i not in cfg.no_attention_layers) for i in range(cfg.n_layer)
        )
        # U-net: the first half of the blocks is the encoder; decoder layer n_encoder + j adds
        # skip_weights[j] times the output of encoder layer n_encoder - 1 - j.
        self.n_encoder = cfg.n_layer // 2
        self.skip_weights = nn.Parameter(torch.ones(self.n_encoder))
        # Zero-init head: every logit starts at cap/2, so the initial loss is exactly ln(padded_vocab).
        self.lm_head_weight = nn.Parameter(torch.zeros(cfg.padded_vocab_size, cfg.dim))
        # FP8 is decided per machine here and per call (CUDA tensor, training mode) in _lm_head.
        self.fp8_head_available = cfg.fp8_lm_head and supports_fp8()

    def _build_baseline(self, cfg: ModelConfig, ops: dict):
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        for table in (self.embed, self.pos_embed):
            nn.init.normal_(table.weight, mean=0.0, std=0.02)
        self.blocks = nn.ModuleList(BaselineBlock(cfg, ops) for _ in range(cfg.n_layer))
        self.final_norm = LayerNorm(cfg.dim)
        self.lm_head_weight = self.embed.weight  # tied
        self.fp8_head_available = False

    def num_params(self) -> int:
        """Number of parameters (a tied table counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None, window=None):
        """Mean cross-entropy over all targets, or the logits when ``targets`` is None.

        inputs   (T,) or (B, T) integer token ids
        targets  int64, the shape of inputs: the next token of every position
        window   (long_blocks, short_blocks): each an int or a 0-dim integer tensor, handed unchanged to
                 ops["attention"] so a growing window never recompiles. None means a window covering
                 the whole sequence. The baseline ignores it (it always attends to the whole document).
        Returns  with targets: the fp32 scalar mean loss. Without: the fp32 logits (B, T, padded_vocab)
                 after the softcap (the baseline has none), for sampling; B = 1 for 1-D inputs. The
                 padding rows of the vocabulary are included; mask them before sampling.
        """
        inputs, targets = _check_forward_args(self.cfg, inputs, targets)
        if self.cfg.arch == "recipe":
            window = _check_window(window, inputs.size(1), self.cfg.attn_block_size)
            x = self._recipe_hidden(inputs, window)
        else:
            x = self._baseline_hidden(inputs)
        z = self._lm_head(x)
        if targets is None:
            z = z.float()
            if self.cfg.arch == "recipe":
                z = self.cfg.logit_cap * torch.sigmoid(z / self.cfg.logit_scale)
            return z
        z, targets = z.flatten(end_dim=1), targets.flatten()
        if self.cfg.arch == "recipe":
            return self.ops["cross_entropy"](z, targets, self.cfg.logit_cap, self.cfg.logit_scale)
        return F.cross_entropy(z.float(), targets)  # the op always applies a softcap; the baseline has none

    def _recipe_hidden(self, inputs: torch.Tensor, window) -> torch.Tensor:
        """Embeddings through the U-net of blocks to the final norm: (B, T, dim) activations."""
        cfg = self.cfg
        long_window, short_window = window
        # An <|endoftext|> token starts, and belongs to, the next document.
        doc_ids = torch.cumsum(inputs == cfg.eot_token, dim=1, dtype=torch.int32)
        cos, sin = rotary_cos_sin(cfg, inputs.size(1), inputs.device)
        x = x0 = norm(self.embed(inputs).to(self.dtype))
        value_embeds = [table(inputs).to(self.dtype) for table in self.value_embeds]
        encoder_outputs = []
        for i, block in enumerate(self.blocks):
            j = i - self.n_encoder
            if 0 <= j < self.n_encoder:
                x = x + self.skip_weights[j].type_as(x) * encoder_outputs.pop()
            table = self.value_embed_of_layer[i]
            value_embed = value_embeds[table] if table is not None else None
            window_blocks = long_window if cfg.window_pattern[i] == "L" else short_window
            x = block(x, x0, value_embed, doc_ids, window_blocks, cos, sin)
            if i < self.n_encoder:
                encoder_outputs.append(x)
        return norm(x)

    def _baseline_hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        doc_ids = torch.cumsum(inputs == self.cfg.eot_token, dim=1, dtype=torch.int32)
        positions = torch.arange(inputs.size(1), device=inputs.device)
        x = (self.embed(inputs) + self.pos_embed(positions)).to(self.dtype)
        for block in self.blocks:
            x = block(x, doc_ids)
        return self.final_norm(x)

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits z (B, T, padded_vocab): FP8 when training on an FP8 GPU, else in x's dtype."""
        B, T, K = x.shape
        M = self.lm_head_weight.size(0)
        use_fp8 = (self.fp8_head_available and self.training and x.is_cuda and x.dtype == torch.bfloat16
                   and (B * T) % 16 == 0 and K % 16 == 0 and M % 16 == 0)
        if use_fp8:
            z = FP8Linear.apply(x.reshape(B * T, K), self.lm_head_weight, fp8_grad_scale(B * T))
            return z.view(B, T, M)
        return F.linear(x, self.lm_head_weight.type_as(x))


def _check_model_args(cfg, ops, dtype):
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    if not isinstance(ops, dict):
        raise TypeError(f"ops must be the dict returned by kernels.resolve(), got {type(ops).__name__}")
    missing = [op for op in REQUIRED_OPS if not callable(ops.get(op))]
    if missing:
        raise ValueError(f"ops lacks callables for {missing}; build it with kernels.resolve(variant)")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype (the activation dtype) must be torch.bfloat16 or torch.float32, got {dtype}")
    if cfg.arch == "recipe":
        if not 2 <= cfg.rope_rotating_pairs <= cfg.head_dim // 2:
            raise ValueError(f"rope_rotating_pairs must be in [2, head_dim/2 = {cfg.head_dim // 2}], "
                             f"got {cfg.rope_rotating_pairs}")
        if 2 * cfg.n_value_embeds > cfg.n_layer:
            raise ValueError(f"n_value_embeds = {cfg.n_value_embeds} needs at least {2 * cfg.n_value_embeds} "
                             f"layers, got n_layer = {cfg.n_layer}")
        if set(cfg.window_pattern) - {"L", "S"}:
            raise ValueError(f"window_pattern may contain only 'L' and 'S', got {cfg.window_pattern!r}")
        if any(not 0 <= i < cfg.n_layer for i in cfg.no_attention_layers):
            raise ValueError(f"no_attention_layers {cfg.no_attention_layers} must lie in [0, {cfg.n_layer})")
    elif cfg.max_seq_len <= 0:
        raise ValueError("the nanogpt arch needs ModelConfig.max_seq_len > 0 (rows of the position table)")


def _check_forward_args(cfg: ModelConfig, inputs, targets):
    """Validate and bring inputs (and targets) to (B, T)."""
    if not isinstance(inputs, torch.Tensor) or inputs.dtype.is_floating_point or inputs.dtype == torch.bool:
        raise TypeError(f"inputs must be an integer tensor of token ids, got {getattr(inputs, 'dtype', type(inputs))}")
    if inputs.dim() not in (1, 2) or inputs.size(-1) == 0:
        raise ValueError(f"inputs must have shape (T,) or (B, T) with T > 0, got {tuple(inputs.shape)}")
    if cfg.arch == "nanogpt" and inputs.size(-1) > cfg.max_seq_len:
        raise ValueError(f"inputs has {inputs.size(-1)} positions; the position table has {cfg.max_seq_len}")
    if targets is not None:
        if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
            raise TypeError(f"targets must be an int64 tensor, got {getattr(targets, 'dtype', type(targets))}")
        if targets.shape != inputs.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal inputs shape {tuple(inputs.shape)}")
    if inputs.dim() == 1:
        inputs = inputs[None]
        targets = None if targets is None else targets[None]
    return inputs, targets


def _check_window(window, seq_len: int, block_size: int):
    if window is None:
        whole_sequence = -(-seq_len // block_size)
        return whole_sequence, whole_sequence
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a pair (long_blocks, short_blocks), got {window!r}")
    for w in window:
        is_int = isinstance(w, int) and not isinstance(w, bool)
        is_int_tensor = isinstance(w, torch.Tensor) and w.numel() == 1 and not w.dtype.is_floating_point
        if not (is_int or is_int_tensor):
            raise TypeError(f"window entries must be ints or 0-dim integer tensors, got {window!r}")
    return tuple(window)


# ---------------------------------------------------------------------------------------------
# FLOPs for MFU
# ---------------------------------------------------------------------------------------------


def flops_per_token(cfg: ModelConfig | RunConfig, seq_len: int, window_tokens: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token: 6 * matmul params + the attention term.

    Matmul params: q/k/v/o and the MLP in every layer that has them, plus lm_head (its padding rows are
    computed too); embedding lookups cost nothing. Attention: QK^T and PV cost 2 * dim FLOPs each per
    attended (query, key) pair forward, times 3 with the backward: 12 * dim * (mean attended keys).
    The attended area is the mask's causal, block-windowed area (document boundaries, which depend on
    the data, are not subtracted). ``window_tokens`` is the long window in tokens (recipe only; short
    layers get half of it in blocks); None means the whole sequence. The baseline always uses that.
    """
    if isinstance(cfg, RunConfig):
        cfg = cfg.model
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig or RunConfig, got {type(cfg).__name__}")
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if window_tokens is not None and (not isinstance(window_tokens, int) or window_tokens <= 0):
        raise ValueError(f"window_tokens must be a positive int or None, got {window_tokens!r}")
    block = cfg.attn_block_size
    whole_sequence = -(-seq_len // block)
    long_blocks = whole_sequence if window_tokens is None else -(-window_tokens // block)
    short_blocks = whole_sequence if window_tokens is None else max(1, long_blocks // 2)
    matmul_params = cfg.padded_vocab_size * cfg.dim + cfg.n_layer * 2 * cfg.dim * cfg.mlp_hidden
    attention_flops = 0.0
    for i in range(cfg.n_layer):
        if cfg.arch == "recipe" and i in cfg.no_attention_layers:
            continue
        matmul_params += 4 * cfg.dim * cfg.dim
        if cfg.arch == "recipe":
            w = long_blocks if cfg.window_pattern[i] == "L" else short_blocks
        else:
            w = whole_sequence
        attention_flops += 12 * cfg.dim * mean_attended_keys(seq_len, w, block)
    return 6.0 * matmul_params + attention_flops


def mean_attended_keys(seq_len: int, window_blocks: int, block_size: int) -> float:
    """Mean over query positions of the keys the causal block-window mask lets a query see.

    Query i in block Q sees keys from block max(0, Q - w + 1) up to i itself: for the n tokens of block
    Q that is min(Q, w - 1) * block_size + r + 1 keys for the token at offset r.
    """
    w = max(window_blocks, 1)
    total = 0
    for q_block in range(-(-seq_len // block_size)):
        n = min(block_size, seq_len - q_block * block_size)
        total += n * min(q_block, w - 1) * block_size + n * (n + 1) // 2
    return total / seq_len
