"""What the kernel benchmark runs: for each op, its shapes (the recipe's, and a sweep over the main size),
its inputs, and its counted FLOPs and minimum bytes.

Shapes come from a preset's config, never typed in: ``sub3min`` on a GPU, ``sub3min-tiny`` on a CPU (where the
Triton interpreter runs: times mean nothing there, only the pipeline and the correctness checks do).

    op              main size (x axis)   recipe shape (sub3min)                        sweep
    attention       seq_len T            B=1, T=seq_len, H=6, D=128, final long window  T / 8, T / 4, T / 2, T
    mlp             tokens M             M=seq_len, dim 768, hidden 3072               M / 8, M / 4, M / 2, M
    cross_entropy   tokens N             N=seq_len, V=50304 (padded vocab)              N / 8, N / 4, N / 2, N
    newton_schulz   elements             every Muon matrix shape of the model           squares n x n (GPU)
    polar_express   elements             record #89's banks, one 8-GPU rank's share:    -
                                         Q/K (8, 256, 768), V/O (3, 768, 768), MLP (3, 3072, 768)
    varlen_attention  tokens T           record #89: T=49152, H=6, D=128, window 1664    T / 8, T / 4, T / 2, T
    mtp_cross_entropy tokens N           record #89: N=49152, d=768, V=50304, 3 weights  N / 8, N / 4, N / 2, N
    mlp_fp8         tokens M             record #89: M=49152, dim 768, hidden 3072       M / 8, M / 4, M / 2, M
    quantize_down   elements             record #89's down weights (12, 3072, 768), a     -
                                         strided view of the MLP bank, delayed scaling

Counting conventions:
- attention FLOPs count only the (query, key) pairs the mask keeps (counted exactly from the doc ids and
  the window): forward 4 D per pair per head (QK^T and PV), backward 2.5x the forward (five matmuls, the
  recomputed QK^T included, as FlashAttention's benchmarks count).
- mlp: forward 4 M dim hidden, backward twice that. newton_schulz: per step 4 m^2 n + 2 m^3 for the wide
  orientation (X X^T in full, A A, B X); polar_express the same per iteration. cross_entropy: no FLOPs
  (memory-bound); GB/s only.
- minimum bytes: every input read once and every output written once, nothing else (a perfectly fused
  kernel); forward and backward counted separately, fwd+bwd their sum.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

import kernels
from speedrun import schedule
from speedrun.config import RunConfig, get_preset, window_blocks
from speedrun.model89 import N_LAYERS

MODES = ("fwd", "bwd", "fwd+bwd")
MEAN_DOC_TOKENS = 1024  # synthetic documents for attention: exponential lengths with this mean


@dataclass(frozen=True)
class Case:
    """One benchmark shape of one op. ``params`` holds what ``problem`` needs to build the inputs."""

    op: str
    label: str  # e.g. "T=65536"
    size: int  # the main size (the plot's x axis)
    size_name: str
    recipe: bool  # the shape the preset's training actually runs
    params: dict = field(default_factory=dict)


@dataclass
class Problem:
    """The inputs of one case: ``fn(*args, **kwargs)`` is the op; ``args[:n_leaves]`` are differentiated."""

    args: tuple
    kwargs: dict
    n_leaves: int
    grad_out: torch.Tensor | None
    flops: dict  # mode -> counted FLOPs, or None
    min_bytes: dict  # mode -> bytes


def op_modes(op: str) -> tuple[str, ...]:
    """Newton-Schulz and Polar Express run inside the optimizers, never differentiated: forward only."""
    return ("fwd",) if op in ("newton_schulz", "polar_express") else MODES


def bench_config(device: torch.device) -> RunConfig:
    return get_preset("sub3min" if device.type == "cuda" else "sub3min-tiny")


def muon_shapes(cfg: RunConfig) -> list[tuple[int, ...]]:
    """The distinct shapes of the matrices Muon orthogonalises (each one Newton-Schulz call per step)."""
    from speedrun.model import GPT

    with torch.device("meta"):
        model = GPT(cfg.model, kernels.resolve("torch"))
    shapes = []
    for p in model.blocks.parameters():
        if p.dim() >= 2 and tuple(p.shape) not in shapes:
            shapes.append(tuple(p.shape))
    return shapes


def normuon_shapes(cfg: RunConfig, on_gpu: bool) -> list[tuple[int, int, int]]:
    """Record #89's NorMuon banks as one rank orthogonalises them: on a GPU, one of 8 ranks' share of the
    record's banks (60 Q/K, 20 V/O, 24 MLP matrices); on a CPU, 1 or 2 matrices at ``cfg``'s small sizes."""
    m = get_preset("record89").model if on_gpu else cfg.model
    counts = (8, 3, 3) if on_gpu else (2, 1, 1)
    return [(counts[0], 2 * m.head_dim, m.dim), (counts[1], m.dim, m.dim), (counts[2], m.mlp_hidden, m.dim)]


def record89_cases(op: str, quick: bool, on_gpu: bool) -> list[Case]:
    """Record #89's ops at its last stage (``record89``; ``record89-tiny`` on a CPU), plus the sweep."""
    r = get_preset("record89" if on_gpu else "record89-tiny")
    m, last = r.model, schedule.plan(r, r.train.num_steps - 1)
    T = last.tokens_per_rank if on_gpu else last.tokens_per_rank // 2
    sweep = sorted({t for t in ([T] if quick else [T // 8, T // 4, T // 2, T]) if t >= 64})
    if op == "varlen_attention":
        return [Case(op, f"T={t}", t, "seq_len", t == T, dict(T=t, H=m.n_head, D=m.head_dim,
                                                              window=last.window_tokens[1])) for t in sweep]
    if op == "mlp_fp8":
        return [Case(op, f"M={t}", t, "tokens", t == T, dict(M=t, dim=m.dim, hidden=m.mlp_hidden)) for t in sweep]
    if op == "quantize_down":
        shape = (N_LAYERS + 1, m.mlp_hidden, m.dim)
        return [Case(op, "x".join(map(str, shape)), _numel(shape), "elements", True, dict(shape=shape))]
    return [Case(op, f"N={t},V={m.padded_vocab_size}", t, "tokens", t == T,
                 dict(N=t, d=m.dim, V=m.padded_vocab_size, weights=(1.0, 0.5, 0.25))) for t in sweep]


def cases(op: str, cfg: RunConfig, quick: bool, on_gpu: bool) -> list[Case]:
    """The shapes of ``op`` for the preset ``cfg``: the recipe's, plus (unless ``quick``) the sweep."""
    if op in ("varlen_attention", "mtp_cross_entropy", "mlp_fp8", "quantize_down"):
        return record89_cases(op, quick, on_gpu)
    m, T = cfg.model, cfg.data.seq_len
    if not on_gpu:  # the interpreter is slow: the tiny preset's shapes at half its sequence and below
        T = T // 2
    sweep = [T] if quick else [T // 8, T // 4, T // 2, T]
    sweep = sorted({s for s in sweep if s >= 64})
    if op == "attention":
        long_blocks, _ = window_blocks(cfg.train.num_steps, cfg)
        return [Case(op, f"T={t}", t, "seq_len", t == T,
                     dict(B=1, T=t, H=m.n_head, D=m.head_dim, block=m.attn_block_size, window=long_blocks))
                for t in sweep]
    if op == "mlp":
        return [Case(op, f"M={t}", t, "tokens", t == T, dict(M=t, dim=m.dim, hidden=m.mlp_hidden)) for t in sweep]
    if op == "cross_entropy":
        return [Case(op, f"N={t},V={m.padded_vocab_size}", t, "tokens", t == T,
                     dict(N=t, V=m.padded_vocab_size, cap=m.logit_cap, scale=m.logit_scale))
                for t in sweep]
    if op == "newton_schulz":
        shapes = [(s, True) for s in muon_shapes(cfg)]
        if not quick and on_gpu:
            shapes += [((n, n), False) for n in (1024, 2048, 4096)]
        return [Case(op, "x".join(map(str, s)), _numel(s), "elements", recipe,
                     dict(shape=s, steps=cfg.optim.ns_steps, dtype=cfg.optim.ns_dtype)) for s, recipe in shapes]
    if op == "polar_express":
        coeffs = get_preset("record89").optim.polar_express_coeffs
        return [Case(op, "x".join(map(str, s)), _numel(s), "elements", True,
                     dict(shape=s, coeffs=coeffs, dtype=cfg.optim.ns_dtype)) for s in normuon_shapes(cfg, on_gpu)]
    raise ValueError(f"unknown op {op!r}; ops: {', '.join(kernels.OP_MODULES)}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _with_bwd_sum(fwd, bwd):
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": None if fwd is None else fwd + bwd}


def problem(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """Fresh random inputs (never zeros) for ``case`` in ``dtype`` on ``device``, with FLOPs and bytes."""
    g = torch.Generator().manual_seed(seed)
    p = case.params
    esize = torch.empty((), dtype=dtype).element_size()

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).to(device).requires_grad_()

    if case.op == "attention":
        B, T, H, D = p["B"], p["T"], p["H"], p["D"]
        q, k, v = (randn(B, T, H, D) for _ in range(3))
        doc_ids = synthetic_doc_ids(B, T, g).to(device)
        pairs = kept_pairs(doc_ids, p["window"], p["block"])
        fwd = 4.0 * D * H * pairs
        io = B * T * H * D * esize
        return Problem((q, k, v, doc_ids, p["window"], 0.12, p["block"]), {}, 3, randn(B, T, H, D),
                       _with_bwd_sum(fwd, 2.5 * fwd), _with_bwd_sum(4 * io, 8 * io))
    if case.op == "mlp":
        M, dim, hidden = p["M"], p["dim"], p["hidden"]
        x = randn(M, dim)
        w_fc, w_proj = randn(hidden, dim, scale=dim**-0.5), randn(dim, hidden, scale=hidden**-0.5)
        fwd = 4.0 * M * dim * hidden
        act, weights = M * dim * esize, 2 * dim * hidden * esize
        return Problem((x, w_fc, w_proj), {}, 3, randn(M, dim), _with_bwd_sum(fwd, 2 * fwd),
                       _with_bwd_sum(2 * act + weights, 2 * act + 2 * weights + act + weights))
    if case.op == "cross_entropy":
        N, V = p["N"], p["V"]
        z = randn(N, V, scale=5.0)
        targets = torch.randint(0, V, (N,), generator=g).to(device)
        logits = N * V * esize
        return Problem((z, targets, p["cap"], p["scale"]), {}, 1, torch.ones((), device=device),
                       _with_bwd_sum(None, None), _with_bwd_sum(logits + 8 * N, 2 * logits))
    if case.op == "newton_schulz":
        shape, steps = p["shape"], p["steps"]
        G = torch.randn(*shape, generator=g).to(device)  # Muon orthogonalises fp32 momentum buffers
        m, n = sorted(shape[-2:])
        batch = _numel(shape[:-2])
        ns_dtype = getattr(torch, p["dtype"]) if dtype == torch.float32 else dtype
        flops = steps * batch * (4.0 * m * m * n + 2.0 * m**3)
        out_bytes = _numel(shape) * torch.empty((), dtype=ns_dtype).element_size()
        return Problem((G,), dict(steps=steps, dtype=ns_dtype), 0, None, {"fwd": flops},
                       {"fwd": 4 * _numel(shape) + out_bytes})
    if case.op == "varlen_attention":
        T, H, D = p["T"], p["H"], p["D"]
        q, k, v = (randn(T, H, D) for _ in range(3))
        ends = torch.cumsum(synthetic_doc_ids(1, T, g)[0].bincount(), 0).to(torch.int32)
        cu = torch.cat([ends.new_zeros(1), ends]).to(device)
        lengths = (cu[1:] - cu[:-1]).tolist()
        pairs = sum(min(n, i + 1, p["window"] + 1) for n in lengths for i in range(n))  # keys per query, summed
        fwd = 4.0 * D * H * pairs
        io = T * H * D * esize
        return Problem((q, k, v, cu, p["window"], 0.1), {}, 3, randn(T, H, D),
                       _with_bwd_sum(fwd, 2.5 * fwd), _with_bwd_sum(4 * io, 8 * io))
    if case.op == "mlp_fp8":
        from kernels.mlp_fp8 import activation_scale, mlp_fp8_torch, quantize_up
        from kernels.quantize_down import quantize_down_torch as quantize_down

        M, dim, hidden = p["M"], p["dim"], p["hidden"]
        x = randn(M, dim)
        w_fc, w_proj = randn(hidden, dim, scale=dim**-0.5), randn(hidden, dim, scale=hidden**-0.5)
        up8, up_scale = quantize_up(w_fc.detach().bfloat16())
        down8, down_scale, _ = quantize_down(w_proj.detach().bfloat16(), None, bootstrap=True)
        one = torch.ones((), device=device)
        with torch.no_grad():  # the delayed activation scale a previous forward would have left
            act_scale = activation_scale(mlp_fp8_torch(x.bfloat16(), w_fc.bfloat16(), w_proj.bfloat16(), up8,
                                                       up_scale, down8, down_scale, one)[1])
        fwd = 4.0 * M * dim * hidden
        act, w8 = M * dim * esize, 2 * dim * hidden  # the FP8 weights: 1 byte per entry
        return Problem((x, w_fc, w_proj, up8, up_scale, down8, down_scale, act_scale), {}, 3, randn(M, dim),
                       _with_bwd_sum(fwd, 2 * fwd), _with_bwd_sum(2 * act + w8, 4 * act + 2 * w8 * esize))
    if case.op == "quantize_down":  # steady state: delayed scaling (the scales a previous call left)
        L, hidden, dim = p["shape"]
        w = randn(L, 2, hidden, dim, scale=hidden**-0.5).detach()[:, 1]  # slot 1 of the MLP bank
        next_scale = w.float().abs().amax(dim=(-2, -1)) * (1.12 / 448)
        return Problem((w, next_scale, False), {}, 0, None, {"fwd": None}, {"fwd": w.numel() * (esize + 1)})
    if case.op == "mtp_cross_entropy":
        N, d, V = p["N"], p["d"], p["V"]
        x, w = randn(N, d), randn(d, V, scale=0.05)
        targets = torch.randint(0, V, (N,), generator=g).to(device)
        fwd = 2.0 * N * d * V
        return Problem((x, w, targets, p["weights"]), {}, 2, torch.ones(N, device=device),
                       _with_bwd_sum(fwd, 3 * fwd), _with_bwd_sum((N + V) * d * esize + 8 * N, 2 * (N + V) * d * esize))
    if case.op == "polar_express":
        shape, coeffs = p["shape"], p["coeffs"]
        G = torch.randn(*shape, generator=g).to(device)  # NorMuon's fp32 momentum-corrected gradient
        m, n = sorted(shape[-2:])
        px_dtype = getattr(torch, p["dtype"]) if dtype == torch.float32 else dtype  # the record: bf16
        flops = len(coeffs) * _numel(shape[:-2]) * (4.0 * m * m * n + 2.0 * m**3)
        out_bytes = _numel(shape) * torch.empty((), dtype=px_dtype).element_size()
        return Problem((G,), dict(coeffs=coeffs, dtype=px_dtype), 0, None, {"fwd": flops},
                       {"fwd": 4 * _numel(shape) + out_bytes})
    raise ValueError(f"unknown op {case.op!r}")


def synthetic_doc_ids(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """(B, T) int32 non-decreasing doc ids: documents of exponential length (mean MEAN_DOC_TOKENS)."""
    rows = []
    for _ in range(B):
        lengths = torch.empty(T // 16 + 2).exponential_(1.0 / MEAN_DOC_TOKENS, generator=g).long() + 1
        ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:T]
        rows.append(torch.cat([ids, ids.new_full((T - len(ids),), len(lengths))]))
    return torch.stack(rows).to(torch.int32)


def kept_pairs(doc_ids: torch.Tensor, window, block_size: int) -> int:
    """Number of (query, key) pairs the attention mask keeps (kernels/attention.py's rule), summed over B."""
    B, T = doc_ids.shape
    w = max(int(window), 1)
    i = torch.arange(T, device=doc_ids.device)
    first_of_doc = torch.cat([torch.ones_like(doc_ids[:, :1], dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], 1)
    doc_start = torch.where(first_of_doc, i, 0).cummax(1).values
    window_start = ((i // block_size - w + 1) * block_size).clamp(min=0)
    lo = torch.maximum(doc_start, window_start)
    return int((i - lo + 1).sum())


def as_reference(prob: Problem) -> Problem:
    """The same problem in fp32 (floating inputs upcast, Newton-Schulz computed in fp32): the reference
    that every variant's result is checked against."""
    args = tuple(a.detach().float().requires_grad_(a.requires_grad)  # FP8 inputs (1 byte) stay as they are
                 if isinstance(a, torch.Tensor) and a.dtype.is_floating_point and a.element_size() > 1 else a
                 for a in prob.args)
    kwargs = dict(prob.kwargs)
    if "dtype" in kwargs:
        kwargs["dtype"] = torch.float32
    grad_out = None if prob.grad_out is None else prob.grad_out.detach().float()
    return dataclasses.replace(prob, args=args, kwargs=kwargs, grad_out=grad_out)
