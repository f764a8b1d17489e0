"""Record #89's GPT (spec recipe-frontier.md section 2), read top to bottom: constants of the layer table,
RMSNorm, the rotary tables with YaRN, the initialisation in the record's RNG order, then the forward pass:
input stage, the 11 layers (attention with paired heads, XSA and gates; MUDD at layer 10; the ReLU^2 MLP),
the post-loop MUDD, and the loss.

Parameters are named by the record's labels (its module names without ".weight": ``embed``, ``lm_head``,
``qk_bank``, ...); ``labeled_parameters()`` hands them to speedrun.optim.NorMuonAdam. The record's state
dict names map to ours by dropping ".weight" (embed, lm_head, smear_gate, skip_gate, bigram_embed); the
banks are not padded to a multiple of the world size (the optimizer pads its own buffers).

Precision: the embeddings, banks, gates and MUDD weights are stored in ``dtype`` (bf16 on a GPU, as in the
record; fp32 for the CPU and the golden tests) holding bf16-representable values; the per-layer lambdas
and scalars are fp32 and cast to ``dtype`` where used (spec 0.3, 2.2). The hot ops come from ``ops``:
``varlen_attention``, ``mlp``, ``mlp_fp8``, ``quantize_down`` and ``mtp_cross_entropy`` (kernels/). With
``cfg.fp8_lm_head`` training uses the record's FP8 forward for the MLPs (current scaling up, delayed scaling
down, spec 2.10) and for the lm_head (2.11); evaluation is never FP8. The FP8 weight copies are refreshed
after every optimizer step (``after_optimizer_step``), the activation scales after every training forward.

The paired-head layers follow the record's code exactly: q and k are rotated as (T, H/2, 2 D) head pairs
and then viewed as a 2T-long sequence of H/2 heads, which puts head h of token t at position
2t + h // (H/2), head slot h % (H/2). (The spec's prose, "position 2t + e holds head 2p + e", describes
this only for H = 4; for the record's H = 6 the slots pair heads (0, 3), (1, 4) and (2, 5).)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.mlp_fp8 import activation_scale, quantize_up
from kernels.quantize_down import quantize_down_torch
from speedrun.config import ModelConfig

N_LAYERS = 11
NO_ATTENTION = 6  # layer 6 has an MLP only; attention slot a = i - (i > 6)
PAIRED = (0, 2, 5, 9)
XSA = (1, 3, 4, 7, 8, 10)
LONG_WINDOW = (3, 10)  # the layers with the long window (and the key offset); the others have the short one
VALUE_EMBED = {1: 0, 2: 1, 8: 2, 9: 3, 10: 4}  # layer -> value-embedding table (layer 10's is MUDD-gated)
CACHED = (3, 7)  # x after these layers is kept for the skip at layer 6 and for MUDD
GATE_IN = 12  # the smear, skip and output gates read the first 12 channels
MUDD_DIM, MUDD_SCALE = 64, 0.1
SIGN_ROWS = 8192
ATTN_SCALE_START = 0.1
REQUIRED_OPS = ("varlen_attention", "mlp", "mlp_fp8", "quantize_down", "mtp_cross_entropy")
TRAINING_OPS = (*REQUIRED_OPS, "polar_express")  # with NorMuon's
NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's eps for the fp32 compute the record does (spec 0.3)


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, no gain, computed in fp32, returned in x's dtype."""
    return F.rms_norm(x.float(), (x.size(-1),), eps=NORM_EPS).type_as(x)


# ---------------------------------------------------------------------------------------------
# Rotary: half-truncated, interleaved pairs (2j, 2j + 1), YaRN (spec 2.8)
# ---------------------------------------------------------------------------------------------


def base_frequencies(head_dim: int) -> torch.Tensor:
    """(head_dim,) fp32: 1024^(-j / (head_dim/4 - 1)) for pairs j < head_dim/4, each twice, then zeros."""
    freq = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
    return torch.cat([freq.repeat_interleave(2), freq.new_zeros(head_dim // 2)])


def yarn_update(freq: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Frequencies after the long window grows from ``old`` to ``new`` tokens: pairs that turn fewer than once
    over the old window are scaled by old/new, those turning 32 times or more are kept, linear in between."""
    rotations = old * freq / (2 * torch.pi)
    keep = old / new
    return freq * (keep + torch.clamp((rotations - 1) / (32 - 1), 0, 1) * (1 - keep))


def rotary_tables(freq: torch.Tensor, T: int, paired: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) tables of T positions in ``dtype``, (T, D) or for head pairs (T, 2D): a pair's first
    head is rotated at position 2n, its second at 2n + 1. The sin's odd entries are negated."""
    t = torch.arange(T, dtype=torch.float32, device=freq.device)
    if paired:
        even, odd = torch.outer(2 * t, freq), torch.outer(2 * t + 1, freq)
        cos, sin = torch.cat((even.cos(), odd.cos()), -1), torch.cat((even.sin(), odd.sin()), -1)
    else:
        theta = torch.outer(t, freq)
        cos, sin = theta.cos(), theta.sin()
    cos, sin = cos.to(dtype), sin.to(dtype)
    sin[..., 1::2] *= -1
    return cos, sin


def key_offset(k: torch.Tensor) -> torch.Tensor:
    """k (1, T, H, D) with the second half of every key replaced by the previous token's (token 0 keeps its
    own): the record's in-place slice copy as torch.compile runs it, a one-step shift (spec 2.7 3b, 7.9)."""
    half = k.size(-1) // 2
    return torch.cat([k[..., :half], torch.cat([k[:, :1, :, half:], k[:, :-1, :, half:]], dim=1)], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (1, T, heads, D) -> x cos + swap_pairs(x) sin: u'[2j] = c u[2j] + s u[2j+1], u'[2j+1] = c u[2j+1] - s u[2j]."""
    flipped = x.view(*x.shape[:-1], x.size(-1) // 2, 2).flip(-1).view(x.shape)
    return cos[None, :, None, :] * x + sin[None, :, None, :] * flipped


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class GPT89(nn.Module):
    """Record #89's model (see the module docstring). ``forward(inputs, targets, cu_seqlens, bigram)`` with
    one rank's (T,) int32 inputs, (T,) int64 targets, int32 cu_seqlens and (T,) int32 bigram rows returns
    the (T,) fp32 per-token losses: MTP-weighted in training, plain cross-entropy in eval mode. The step's
    windows, MTP weights and rotary state come from ``set_plan(plan)``."""

    def __init__(self, cfg: ModelConfig, ops: dict, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if cfg.n_layer != N_LAYERS or cfg.n_head % 2 or cfg.dim < GATE_IN or cfg.bigram_dim > cfg.dim:
            raise ValueError(f"record #89's model has {N_LAYERS} layers, an even number of heads, dim >= {GATE_IN} "
                             f"and bigram_dim <= dim; got {cfg.n_layer}, {cfg.n_head}, {cfg.dim}, {cfg.bigram_dim}")
        missing = [op for op in REQUIRED_OPS if op not in ops]
        if missing:
            raise ValueError(f"ops lacks {missing}; build it with kernels.resolve(variant)")
        self.cfg, self.ops, self.dtype = cfg, ops, dtype
        self._init_parameters(cfg, dtype)
        # The schedule's state as the forward reads it: device tensors that set_plan updates in place, so a new
        # window, attention scale, rotary frequency or MTP weight is neither a recompile under torch.compile
        # nor a host sync for a kernel that reads it from memory. The host keeps what set_plan checks.
        self.register_buffer("yarn_freq", base_frequencies(cfg.head_dim), persistent=False)
        self.register_buffer("_attn_scale_value", torch.tensor(ATTN_SCALE_START), persistent=False)  # fp32
        self.register_buffer("_window_values", torch.full((2,), cfg.attn_block_size, dtype=torch.int32),
                             persistent=False)  # (short, long) in tokens
        self.register_buffer("_mtp_weight_values", torch.tensor([1.0, 0.0, 0.0]), persistent=False)
        # only the number of MTP weights is a Python value (dynamo specialises on it: a new model version at a
        # stage change); their values, new every step, would be one too, and dynamo would recompile every step
        self.attn_scale, self._yarn_window, self.n_mtp = ATTN_SCALE_START, None, 1
        self.fp8 = cfg.fp8_lm_head
        # FP8 state (spec 2.3), per MLP slot: the delayed scales (saved, restored by the warm-up reset) and
        # the quantised weights (rebuilt from the weights: quantize_fp8)
        for name in ("_mlp_down_act_scales", "_mlp_down_proj_scales", "_mlp_down_proj_next_scales"):
            self.register_buffer(name, torch.ones(N_LAYERS + 1))
        # at build, by the reference (the weights are on the CPU, where a GPU kernel set cannot run; the trainer
        # quantises again once the model is on its device)
        self.quantize_fp8(bootstrap=True, quantize_down=quantize_down_torch)

    @torch.no_grad()
    def quantize_fp8(self, bootstrap: bool, quantize_down=None) -> None:
        """Refresh the FP8 copies of the MLP weights (after every optimizer step; ``bootstrap``: the down
        weights with current scaling, as after the record's first 16 steps, at build and at the reset),
        the down weights by ``quantize_down`` (default: the ops' quantize_down)."""
        if not self.fp8:
            return
        self._up8, self._up_scales = quantize_up(self.mlp_bank[:, 0])
        quantize_down = quantize_down or self.ops["quantize_down"]
        self._down8, used, nxt = quantize_down(self.mlp_bank[:, 1], self._mlp_down_proj_next_scales, bootstrap)
        self._mlp_down_proj_scales.copy_(used)
        self._mlp_down_proj_next_scales.copy_(nxt)

    def _init_parameters(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        """The record's initialisation (spec 2.2-2.4), drawing from the default CPU generator in the record's
        order (discarded draws included), so a seed gives the record's values; then its bf16 rounding."""
        V, d, H, hd, hidden = cfg.padded_vocab_size, cfg.dim, cfg.n_head, cfg.head_dim, cfg.mlp_hidden
        n_attn = N_LAYERS - 1
        bound = 3**0.5 * 0.5 * d**-0.5
        lm_head = nn.init.normal_(torch.empty(d, V, dtype=torch.bfloat16), std=0.005)
        nn.init.normal_(torch.empty(V, d))  # the record's nn.Embedding draw, then overwritten by lm_head^T
        value_embeds = 0.01 * torch.randn(5 * V, d, dtype=torch.bfloat16)
        qk_bank = torch.empty(n_attn * H, 2 * hd, d).uniform_(-bound, bound)  # per layer: Q pairs, then K pairs
        vo_bank = torch.empty(2 * n_attn, H * hd, d).uniform_(-bound, bound)  # per layer: W_v, W_o
        mlp_bank = torch.empty(N_LAYERS + 1, 2, hidden, d)  # [layer, 0] c_fc (out x in), [layer, 1] c_proj (in x out)
        mlp_bank[:, 0].uniform_(-bound, bound)
        mlp_bank[:, 1].zero_()
        for _ in ("smear_gate", "skip_gate"):  # nn.Linear(12, 1) draws, then zeroed
            nn.init.kaiming_uniform_(torch.empty(1, GATE_IN), a=math.sqrt(5))
        nn.init.normal_(torch.empty(cfg.bigram_vocab_size, cfg.bigram_dim))  # nn.Embedding's draw, then zeroed
        sign_table = torch.randn(SIGN_ROWS, cfg.bigram_dim).sign()
        mudd_w1 = torch.empty(2, MUDD_DIM, d)
        for block in mudd_w1:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        mudd_b2 = torch.zeros(2, 14)
        # block 0 (layer 10): VE gates 2.0, the layer's dynamic lambdas at their per-layer defaults;
        # block 1 (post-loop): -0.5 on h7. In the pre-scale domain (x 1 / MUDD_SCALE).
        for index, value in {6: 2.0, 7: 2.0, 8: 1.1**0.5, 9: 1.0, 11: 0.05, 12: 1.1**0.5, 13: 1.0}.items():
            mudd_b2[0, index] = value / MUDD_SCALE
        mudd_b2[1, 1] = -0.5 / MUDD_SCALE

        def weight(t):  # the record stores these in bf16: round, then hold in this model's dtype
            return nn.Parameter(t.to(torch.bfloat16).to(dtype))

        self.lm_head, self.embed = weight(lm_head), weight(lm_head.T.contiguous())
        self.value_embeds = weight(value_embeds)
        self.attn_gate_bank = weight(torch.zeros(n_attn, H, GATE_IN))
        self.ve_gate_bank = weight(torch.zeros(5, H, GATE_IN))
        self.qk_bank, self.vo_bank, self.mlp_bank = weight(qk_bank), weight(vo_bank), weight(mlp_bank)
        self.smear_gate, self.skip_gate = weight(torch.zeros(1, GATE_IN)), weight(torch.zeros(1, GATE_IN))
        self.bigram_embed = weight(torch.zeros(cfg.bigram_vocab_size, cfg.bigram_dim))
        self.register_buffer("bigram_sign_table", sign_table.to(torch.bfloat16).to(dtype))
        self.post_lambdas = nn.Parameter(torch.ones(N_LAYERS, 2))  # [i, 0] attention output, [i, 1] MLP output
        self.x0_lambdas = nn.Parameter(torch.zeros(N_LAYERS))
        self.bigram_lambdas = nn.Parameter(0.05 * torch.ones(N_LAYERS))
        self.resid_lambdas = nn.Parameter(torch.full((N_LAYERS, 2), 1.1**0.5))  # before attention / MLP
        self.xsa_alphas = nn.Parameter(torch.zeros(N_LAYERS, H))
        # [2i] lambda_qkv and [2i + 1] lambda_o of layer i; [22] smear lambda; [23] skip lambda
        self.scalars = nn.Parameter(torch.cat([torch.tensor([0.5, 1.0]).repeat(N_LAYERS), torch.tensor([0.0, -1.5])]))
        self.mudd_w1, self.mudd_w2 = weight(mudd_w1), weight(torch.zeros(2, 14, MUDD_DIM))
        self.mudd_b2 = weight(mudd_b2)

    def labeled_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    # ---- the schedule's state: windows, MTP weights, YaRN (spec 2.8, 4) ----

    @torch.no_grad()
    def set_plan(self, plan) -> None:
        """Take the windows and MTP weights of ``plan`` (a speedrun.schedule.StepPlan); rescale the rotary
        when a training step's long window differs from the last one (the final validation's wider window
        gets no YaRN update). Plans must come in step order from step 0 on (or after reset_schedule_state)."""
        if not 1 <= len(plan.mtp_weights) <= len(self._mtp_weight_values):
            raise ValueError(f"step {plan.step}: {len(plan.mtp_weights)} MTP weights; the model takes 1 to 3")
        self.n_mtp = len(plan.mtp_weights)
        self._mtp_weight_values[:len(plan.mtp_weights)] = torch.tensor(plan.mtp_weights, dtype=torch.float32)
        self._window_values.copy_(torch.tensor(plan.window_tokens, dtype=torch.int32))
        long = plan.window_tokens[1]
        if plan.training and self._yarn_window is not None and long != self._yarn_window:
            self.yarn_freq.copy_(yarn_update(self.yarn_freq, self._yarn_window, long))
            self.attn_scale *= 0.2 * math.log(long / self._yarn_window) + 1
            self._attn_scale_value.fill_(self.attn_scale)
        if plan.training:
            self._yarn_window = long
        if self.attn_scale != plan.attn_scale:
            raise RuntimeError(f"step {plan.step}: the model's attention scale {self.attn_scale} is not the plan's "
                               f"{plan.attn_scale}: set_plan missed a stage change (plans must come in order)")

    @torch.no_grad()
    def reset_schedule_state(self) -> None:
        """Back to step 0's rotary and FP8 weight copies (the warm-up restore, spec 3.7; the restored state dict
        brought the delayed scales back)."""
        self.yarn_freq.copy_(base_frequencies(self.cfg.head_dim))
        self.attn_scale, self._yarn_window = ATTN_SCALE_START, None
        self._attn_scale_value.fill_(ATTN_SCALE_START)
        self.quantize_fp8(bootstrap=True)

    def after_optimizer_step(self, plan) -> None:
        """The FP8 copies of the new weights (current scaling of the down weights while plan.fp8_bootstrap)."""
        self.quantize_fp8(bootstrap=plan.fp8_bootstrap)

    def flops_per_step(self, plan) -> float:
        """Training FLOPs of a step: 6 x the matmul weights per token (attention Q, K, V, O, the MLPs, lm_head;
        embeddings cost nothing) plus 12 d per attended (query, key) pair, each query taken to see
        min(window + 1, max_doc_len / 2) keys (documents cut the windows; this is an estimate)."""
        c = self.cfg
        matmul = (N_LAYERS - 1) * 4 * c.dim * c.dim + N_LAYERS * 2 * c.dim * c.mlp_hidden + c.dim * c.padded_vocab_size
        short, long = plan.window_tokens
        keys = sum(min(w + 1, (plan.max_doc_len or w + 1) / 2) for w in [short] * 8 + [long] * 2)
        return plan.batch_tokens * (6.0 * matmul + 12.0 * c.dim * keys)

    # ---- the forward pass (spec 2.5-2.12) ----

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor,
                bigram: torch.Tensor) -> torch.Tensor:
        x = self.final_hidden(inputs, cu_seqlens, bigram)
        if self.training:  # the lm_head, softcap and MTP loss (2.11)
            weights = self._mtp_weight_values[:self.n_mtp]
            return self.ops["mtp_cross_entropy"](x, self.lm_head, targets, weights, fp8=self.fp8)
        return F.cross_entropy(self.logits(x), targets, reduction="none")  # eval (2.12)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The softcapped logits (T, padded_vocab_size) fp32 that evaluation scores (2.12), of final_hidden's x."""
        logits = x @ self.lm_head.type_as(x)
        return (23 * torch.sigmoid((logits.float() + 5) / 7.5)).to(logits.dtype).float()

    def final_hidden(self, inputs: torch.Tensor, cu_seqlens: torch.Tensor, bigram: torch.Tensor) -> torch.Tensor:
        """The normed hidden state (T, dim) the lm_head reads: every layer, then the post-loop MUDD."""
        c, dt = self.cfg, self.dtype
        T, bd = inputs.size(0), c.bigram_dim
        lam = self.scalars
        resid, post = self.resid_lambdas.to(dt), self.post_lambdas.to(dt)
        x0_lambdas, bigram_lambdas = self.x0_lambdas.to(dt), self.bigram_lambdas.to(dt)

        # input stage (2.5): embedding, the signed hashed bigram, value embeddings, smear, x0
        x = self.embed[inputs]
        sign_rows = torch.zeros_like(inputs)
        sign_rows[1:] = (inputs[:-1] ^ inputs[1:]) % SIGN_ROWS
        bigram_vec = (self.bigram_embed[bigram] * self.bigram_sign_table[sign_rows])[None]  # (1, T, bd)
        ve = self.value_embeds.view(5, c.padded_vocab_size, -1)[:, inputs]  # (5, T, d)
        smear = lam[22] * torch.sigmoid(F.linear(x[1:, :GATE_IN], self.smear_gate))
        x = torch.cat([x[:1], x[1:] + smear * x[:-1]])
        x0 = norm(x[None])
        # The record adds layer 0's bigram term to x0 in place, so x0 (every x0 injection, the skip gate,
        # MUDD's h0) includes it (spec 7.8). Out of place here, same values.
        x0 = torch.cat([x0[..., :bd] + bigram_vec * bigram_lambdas[0], x0[..., bd:]], dim=-1)
        skip = torch.sigmoid(lam[23]) * 2 * torch.sigmoid(F.linear(x0[..., :GATE_IN], self.skip_gate))
        x, cache = x0, {0: x0}
        # the rotary tables from the current frequencies, each forward (cheap next to a layer; no cache to
        # invalidate when YaRN changes the frequencies in place)
        rotary = {paired: rotary_tables(self.yarn_freq, T, paired, dt) for paired in (False, True)}
        post_amax = []  # FP8 training: each MLP's max(post), for the next forward's activation scales

        for i in range(N_LAYERS):
            mu = None
            if i == NO_ATTENTION:
                x = x + skip * cache[3]
            else:
                attn_in = norm(cache.get(7, x))  # layers 8-10 attend from layer 7's output
                if i == N_LAYERS - 1:  # MUDD block 0 (2.9)
                    cache[9] = x
                    mu = self._mudd(x, 0, 14)
                    v_mudd = mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * x
                    x = (1 + mu[5]) * x + mu[3] * cache[0] + mu[4] * cache[7]
                    gate = torch.cat([mu[6], mu[7]], dim=-1).repeat_interleave(c.n_head // 2, dim=-1)[..., None]
                    aux_v = (gate * ve[VALUE_EMBED[i]].view(1, T, c.n_head, -1)).view(1, T, -1) + v_mudd
                elif i in VALUE_EMBED:
                    table = ve[VALUE_EMBED[i]][None]
                    gate = 2 * torch.sigmoid(F.linear(torch.cat([attn_in[..., :6], table[..., :6]], -1),
                                                      self.ve_gate_bank[VALUE_EMBED[i]]))
                    aux_v = (gate[..., None] * table.view(1, T, c.n_head, -1)).view(1, T, -1)
                else:
                    aux_v = None
                out = self._attention(i, attn_in, aux_v, cu_seqlens, rotary)
                if mu is not None:
                    x = mu[8] * x + mu[9] * out + mu[10] * cache[0]
                    x = self._add_bigram(x, mu[11] * bigram_vec)
                else:
                    x = resid[i, 0] * x + post[i, 0] * out + x0 * x0_lambdas[i]
                    if i > 0:
                        x = self._add_bigram(x, bigram_vec * bigram_lambdas[i])
            mlp_out = self._mlp(i, norm(x), post_amax)
            x = mu[12] * x + mu[13] * mlp_out if mu is not None else resid[i, 1] * x + post[i, 1] * mlp_out
            if i in CACHED:
                cache[i] = x

        if post_amax:  # the delayed activation scales for the next training forward (2.10 step 9)
            with torch.no_grad():
                self._mlp_down_act_scales[:N_LAYERS] = activation_scale(torch.stack(post_amax))
        mu = self._mudd(x, 1, 5)  # post-loop MUDD (2.9)
        x = x + mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * cache[9] + mu[3] * ve[0][None] + mu[4] * cache[3]
        return norm(x)[0]

    def _mlp(self, i: int, normed: torch.Tensor, post_amax: list) -> torch.Tensor:
        """MLP(normed) = relu(normed W1^T)^2 W2 of layer i; FP8 in training (spec 2.10)."""
        w_fc, w_proj = self.mlp_bank[i, 0], self.mlp_bank[i, 1]
        if not (self.fp8 and self.training):
            return self.ops["mlp"](normed, w_fc, w_proj.T)
        out, amax = self.ops["mlp_fp8"](normed[0], w_fc, w_proj, self._up8[i], self._up_scales[i], self._down8[i],
                                        self._mlp_down_proj_scales[i], self._mlp_down_act_scales[i])
        post_amax.append(amax)
        return out[None]

    def _add_bigram(self, x: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        bd = self.cfg.bigram_dim
        return torch.cat([x[..., :bd] + term, x[..., bd:]], dim=-1)

    def _mudd(self, x: torch.Tensor, block: int, n: int) -> list[torch.Tensor]:
        """n per-token coefficients (each (1, T, 1)): 0.1 (gelu(x W1^T) W2^T + b2) of MUDD block ``block``."""
        h = F.gelu(F.linear(x, self.mudd_w1[block]))
        return ((F.linear(h, self.mudd_w2[block, :n]) + self.mudd_b2[block, :n]) * MUDD_SCALE).split(1, dim=-1)

    def _attention(self, i: int, xa: torch.Tensor, aux_v: torch.Tensor | None, cu_seqlens: torch.Tensor,
                   rotary: dict) -> torch.Tensor:
        """Layer i's attention sublayer (2.7) on its normed input xa (1, T, d), with rotary[paired] the (cos,
        sin) tables; returns (1, T, d)."""
        c = self.cfg
        T, H, hd, d = xa.size(1), c.n_head, c.head_dim, c.dim
        a = i - (i > NO_ATTENTION)
        w_qk = self.qk_bank[a * H:(a + 1) * H].reshape(2 * d, d)  # Q rows (head pairs), then K rows
        w_v, w_o = self.vo_bank[2 * a], self.vo_bank[2 * a + 1]
        lam_qkv, lam_o = self.scalars[2 * i], self.scalars[2 * i + 1]
        qkv = F.linear(xa, lam_qkv * torch.cat([w_qk, w_v]).type_as(xa))
        q, k, v = qkv.view(1, T, 3 * H, hd).chunk(3, dim=-2)
        q, k = norm(q), norm(k)
        window, scale = self._window_values[int(i in LONG_WINDOW)], self._attn_scale_value
        if i in PAIRED:  # head pairs, interleaved into a 2T sequence (see the module docstring)
            cos, sin = rotary[True]
            q = rotate(q.reshape(1, T, H // 2, 2 * hd), cos, sin).view(1, 2 * T, H // 2, hd)
            k = rotate(k.reshape(1, T, H // 2, 2 * hd), cos, sin).view(1, 2 * T, H // 2, hd)
            v = v.reshape(1, 2 * T, H // 2, hd)
            if aux_v is not None:
                v = v + aux_v.view_as(v)
            y = self.ops["varlen_attention"](q[0], k[0], v[0], 2 * cu_seqlens, window, scale)
            y = y.reshape(1, T, H, hd)
        else:
            cos, sin = rotary[False]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            if i in LONG_WINDOW:  # the keys' second halves come from the previous token
                k = key_offset(k)
            if aux_v is not None:
                v = v + aux_v.view_as(v)
            y = self.ops["varlen_attention"](q[0], k[0], v[0], cu_seqlens, window, scale)[None]
            if i in XSA:  # remove tanh(alpha) of y's component along the token's own value (2.7 step 5)
                vn = F.normalize(v, dim=-1, eps=1e-4)
                alpha = torch.tanh(self.xsa_alphas[i]).type_as(y).view(1, 1, H, 1)
                y = y - alpha * (y * vn).sum(-1, keepdim=True) * vn
        y = y * torch.sigmoid(F.linear(xa[..., :GATE_IN], self.attn_gate_bank[a])).view(1, T, H, 1)
        return F.linear(y.reshape(1, T, d), lam_o * w_o.type_as(y))
