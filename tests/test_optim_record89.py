"""Record #89's optimizer (speedrun/optim/record89.py, normuon.py, adam.py).

- Against the record's own code (golden, fp32 with Polar Express in fp32 as the golden README prescribes):
  teacher-forced from the golden initial weights and gradients, the parameters after each of 3 steps.
- Where the golden data has no case (bf16 weights, Adam after its first update, the untie at step 921,
  several processes): against plain references written from the spec, or one process against two.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing

import pytest
import torch

import kernels
from speedrun import schedule
from speedrun.config import get_preset
from speedrun.optim import NorMuonAdam
from speedrun.optim.normuon import master_weights
from speedrun.optim.record89 import PARAM_TABLE

POLAR_EXPRESS = kernels.get("polar_express", "torch")


def fp32_config(cfg=None):
    cfg = cfg or get_preset("record89")
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, ns_dtype="float32"))


def golden_name(label: str) -> str:
    return label + ".weight" if label in ("embed", "lm_head", "smear_gate", "skip_gate", "bigram_embed") else label


# ---------------------------------------------------------------------------------------------
# The record's own optimizer, teacher-forced (golden)
# ---------------------------------------------------------------------------------------------


def test_three_steps_equal_the_records_optimizer(golden89):
    """From init.pt, with every .grad set to grads.pt's step s, step s of our optimizer gives steps.pt's
    after_{s+1}: step 0 (NorMuon only, Adam gradients kept), step 1 (NorMuon + the first Adam update on two
    steps' gradients, lm_head += embed^T, embed <- lm_head^T), step 2 (NorMuon; a fresh Adam accumulation).

    Tolerances: Adam parameters 1e-6 of their largest value (one fp32 update from identical inputs);
    NorMuon banks: the update (after - before) within 1e-3 of its largest entry. The golden README measured
    what reduction order alone does (2 threads instead of 1): 2.8e-6 after 3 steps, most of it in NorMuon,
    whose Polar Express multiplies small singular directions ~1000x. On the machine that made the files
    this test finds no difference at all."""
    cfg = fp32_config(golden89.run_config())
    params = {label: torch.nn.Parameter(golden89.tensor("init", golden_name(label)).clone()) for label in PARAM_TABLE}
    opt = NorMuonAdam(params, cfg, POLAR_EXPRESS)
    for step in range(3):
        before = {label: p.detach().clone() for label, p in params.items()}
        for label, p in params.items():
            p.grad = golden89.tensor("grads", f"step{step}/{golden_name(label)}", torch.zeros_like(p)).clone()
        opt.step(schedule.plan(cfg, step))
        for label, p in params.items():
            key = f"after_{step + 1}/{golden_name(label)}"
            want = golden89.tensor("steps", key, golden89.tensor("init", golden_name(label)))
            got = p.detach()
            if PARAM_TABLE[label].optim == "normuon":
                moved = want - before[label]
                assert (got - before[label] - moved).abs().max() <= 1e-3 * moved.abs().max(), (step, label)
            else:
                assert (got - want).abs().max() <= 1e-6 * want.abs().max().clamp_min(1e-30), (step, label)
        assert torch.equal(params["embed"].detach(), params["lm_head"].detach().T)  # tied


# ---------------------------------------------------------------------------------------------
# A small model's worth of parameters with the record's labels
# ---------------------------------------------------------------------------------------------

SHAPES = {"qk_bank": (5, 8, 24), "vo_bank": (4, 24, 24), "mlp_bank": (3, 2, 48, 24), "scalars": (24,),
          "smear_gate": (1, 12), "skip_gate": (1, 12), "attn_gate_bank": (4, 2, 12), "ve_gate_bank": (2, 2, 12),
          "lm_head": (24, 64), "bigram_embed": (32, 8), "post_lambdas": (11, 2), "x0_lambdas": (11,),
          "bigram_lambdas": (11,), "resid_lambdas": (11, 2), "xsa_alphas": (11, 2), "value_embeds": (5 * 64, 24),
          "embed": (64, 24), "mudd_w1": (2, 16, 24), "mudd_w2": (2, 14, 16), "mudd_b2": (2, 14)}


def small_params(dtype=torch.float32, seed=0) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = {label: torch.nn.Parameter((0.1 * torch.randn(shape, generator=g)).to(dtype))
              for label, shape in SHAPES.items()}
    params["embed"].data.copy_(params["lm_head"].data.T)
    return params


def random_grads(params, seed) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {label: torch.randn(p.shape, generator=g).to(p.dtype) for label, p in params.items()}


def set_grads(params, grads) -> None:
    """Accumulate like backward does: add to a kept gradient, or start one."""
    for label, p in params.items():
        p.grad = grads[label].clone() if p.grad is None else p.grad + grads[label]


def plans(cfg, steps):
    return [schedule.plan(cfg, s) for s in steps]


# ---------------------------------------------------------------------------------------------
# NorMuon: the bf16 weight + 16-bit mantissa master, against an fp32 weight
# ---------------------------------------------------------------------------------------------


def test_bf16_weights_carry_an_exact_fp32_master_truncated():
    """The same gradients on a bf16 and an fp32 copy of the banks: the bf16 weight's bits followed by its
    mantissa are exactly the fp32 weight after every step (the decay mask and the update see the master, so
    nothing else can differ), and the bf16 weight is that master truncated toward zero, not rounded."""
    cfg = fp32_config()
    fp32 = small_params(torch.float32, seed=1)
    bf16 = {label: torch.nn.Parameter(p.detach().bfloat16()) for label, p in fp32.items()}
    for p32, p16 in zip(fp32.values(), bf16.values(), strict=True):
        p32.data.copy_(p16.data.float())  # start both from bf16-representable values
    opt32, opt16 = NorMuonAdam(fp32, cfg, POLAR_EXPRESS), NorMuonAdam(bf16, cfg, POLAR_EXPRESS)
    rounded_differently = 0
    for plan in plans(cfg, range(0, 8, 2)):  # even steps: NorMuon only
        grads = {k: g.bfloat16() for k, g in random_grads(fp32, seed=plan.step).items()}  # the same values in both
        set_grads(fp32, {k: g.float() for k, g in grads.items()})
        set_grads(bf16, grads)
        opt32.step(plan)
        opt16.step(plan)
        for label in ("qk_bank", "vo_bank", "mlp_bank"):
            master32 = fp32[label].detach().view(-1, *fp32[label].shape[-2:])
            weight = bf16[label].detach().view(-1, *bf16[label].shape[-2:])
            master = master_weights(weight, opt16.state[label]["mantissa"])
            assert torch.equal(master, master32), (plan.step, label)
            w = weight.float()
            assert (w.abs() <= master32.abs()).all() and ((w == 0) | (w.sign() == master32.sign())).all()
            assert ((master32 - w).abs() < master32.abs() * 2.0**-7 + 1e-38).all()
            rounded_differently += (weight != master32.bfloat16()).sum().item()
    assert rounded_differently > 0  # truncation is not round-to-nearest


# ---------------------------------------------------------------------------------------------
# Plain references from the spec, in float64
# ---------------------------------------------------------------------------------------------


def polar_express_float64(G, coeffs):
    X = G.double() / (G.double().norm() * 1.02 + 1e-6)
    for a, b, c in coeffs:
        if X.size(0) > X.size(1):
            A = X.T @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
    return X


class ReferenceNorMuon:
    """Spec 3.2 for one matrix, float64, plain."""

    def __init__(self, W, lr_factor):
        self.W, self.lr_factor = W.double().clone(), lr_factor
        self.B, self.S = torch.zeros_like(self.W), None

    def step(self, G, lr_mul, mu, cfg):
        o = cfg.optim
        self.B = mu * self.B + (1 - mu) * G.double()
        U = (1 - mu) * G.double() + mu * self.B
        X = polar_express_float64(U, o.polar_express_coeffs)
        R, C = X.shape
        m = (X**2).mean(dim=1, keepdim=True) if R >= C else (X**2).mean(dim=0, keepdim=True)
        self.S = (1 - o.normuon_beta2) * m if self.S is None else o.normuon_beta2 * self.S + (1 - o.normuon_beta2) * m
        q = 1 / self.S.clamp_min(1e-10).sqrt()
        X = X * q * (X.norm() / (X * q).norm())
        eta = o.normuon_lr * lr_mul * math.sqrt(max(1.0, R / C)) * self.lr_factor
        lam = o.normuon_weight_decay * o.normuon_lr * lr_mul
        mask = (X * self.W >= 0).double()
        self.W = self.W - mask * self.W * lam * eta - X * eta


class ReferenceAdam:
    """Spec 3.3 for one tensor, float64 state, the weight rounded to its dtype after each update."""

    def __init__(self, P, dtype):
        self.P, self.dtype = P.double().clone(), dtype
        self.m, self.v, self.t = torch.zeros_like(self.P), torch.zeros_like(self.P), 0

    def step(self, g, lr, betas, eps, wd):
        b1, b2 = betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g.double()
        self.v = b2 * self.v + (1 - b2) * g.double() ** 2
        U = lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t) * self.m / (self.v.sqrt() + eps)
        U = U + (U * self.P > 0).double() * self.P * wd
        self.P = (self.P - U).to(self.dtype).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_run_across_the_untie_matches_the_spec_references(dtype):
    """Steps 917-926 of the record's plan (stage 2 -> 3 at 920: lr 0.91 -> 1.03; the untie after 921) on the
    small parameter set: NorMuon against the float64 spec reference (Polar Express in fp32 here; per-matrix
    x2 on MLP output projections), Adam against its float64 reference (six updates, so t = 1..3 on two-step
    sums; bf16 weights rounded to nearest), the tie and the untie's state copy, gradients cleared or kept."""
    cfg = fp32_config()
    params = small_params(dtype, seed=2)
    opt = NorMuonAdam(params, cfg, POLAR_EXPRESS)
    ref_normuon = {(label, i): ReferenceNorMuon(m, 2.0 if label == "mlp_bank" and i % 2 else 1.0)
                   for label in ("qk_bank", "vo_bank", "mlp_bank")
                   for i, m in enumerate(params[label].detach().view(-1, *params[label].shape[-2:]).float())}
    ref_adam = {label: ReferenceAdam(p.detach().float(), dtype) for label, p in params.items()
                if PARAM_TABLE[label].optim == "adam" and label != "embed"}
    kept: dict[str, torch.Tensor] = {}
    for plan in plans(cfg, range(917, 927)):
        grads = random_grads(params, seed=plan.step)
        set_grads(params, grads)
        for label, g in grads.items():
            kept[label] = kept.get(label, 0) + g.double()
        if plan.adam_step and plan.tied:
            kept["lm_head"] = kept["lm_head"] + kept["embed"].T
        opt.step(plan)
        for (label, i), ref in ref_normuon.items():
            ref.step(grads[label].view(-1, *grads[label].shape[-2:])[i].float(), plan.lr_mul, plan.momentum, cfg)
            got = params[label].detach().view(-1, *params[label].shape[-2:])[i].double()
            tol = 3e-2 if dtype == torch.bfloat16 else 1e-4  # bf16: the weight is the truncated master
            assert (got - ref.W).abs().max() <= tol * ref.W.abs().max(), (plan.step, label, i)
        for label, p in params.items():
            spec = PARAM_TABLE[label]
            if spec.optim == "normuon":
                assert p.grad is None
                continue
            if not plan.adam_step:
                assert p.grad is not None  # kept for the next step's sum
                continue
            assert p.grad is None
            if label == "embed" and plan.step <= 921:
                assert torch.equal(p.detach(), params["lm_head"].detach().T)
                continue
            lr = cfg.optim.adam_lr * plan.lr_mul * spec.lr_mul
            ref_adam[label].step(kept[label], lr, spec.betas, cfg.optim.adam_eps,
                                 lr * lr * cfg.optim.adam_weight_decay * spec.wd_mul)
            tol = 1e-5 if dtype == torch.float32 else 2**-7
            assert (p.detach().double() - ref_adam[label].P).abs().max() <= tol * ref_adam[label].P.abs().max(), (
                plan.step, label)
        if plan.adam_step:
            kept = {}
        if plan.untie:
            lm, em = opt.state["lm_head"], opt.state["embed"]
            assert em["step"] == lm["step"] == 3 and not opt.tied
            assert torch.equal(em["exp_avg"], lm["exp_avg"].T) and torch.equal(em["exp_avg_sq"], lm["exp_avg_sq"].T)
            ref_adam["embed"] = ReferenceAdam(params["embed"].detach().float(), dtype)
            ref_adam["embed"].m = lm["exp_avg"].T.double().clone()
            ref_adam["embed"].v = lm["exp_avg_sq"].T.double().clone()
            ref_adam["embed"].t = 3
    assert not torch.equal(params["embed"].detach(), params["lm_head"].detach().T)  # trained apart since 922


def test_even_steps_leave_adam_alone_and_reset_restores():
    cfg = fp32_config()
    params = small_params(seed=3)
    start = {label: p.detach().clone() for label, p in params.items()}
    opt = NorMuonAdam(params, cfg, POLAR_EXPRESS)
    saved = opt.state_dict()
    set_grads(params, random_grads(params, seed=1))
    opt.step(schedule.plan(cfg, 0))
    for label, p in params.items():
        if PARAM_TABLE[label].optim == "adam":
            assert torch.equal(p.detach(), start[label]) and p.grad is not None
        else:
            assert not torch.equal(p.detach(), start[label]) and p.grad is None
    set_grads(params, random_grads(params, seed=2))
    opt.step(schedule.plan(cfg, 1))
    assert opt.state["scalars"]["step"] == 1
    # the warm-up restore: weights from the saved model state, then the optimizer's saved state and reset
    for label, p in params.items():
        p.data.copy_(start[label])
        p.grad = None
    opt.load_state_dict(saved)
    opt.reset()
    assert opt.tied and opt.state["scalars"]["step"] == 0
    assert all(not s["momentum"].any() for label, s in opt.state.items() if PARAM_TABLE[label].optim == "normuon")
    fresh_params = small_params(seed=3)
    fresh = NorMuonAdam(fresh_params, cfg, POLAR_EXPRESS)
    for step in range(2):
        grads = random_grads(params, seed=10 + step)
        set_grads(params, grads)
        set_grads(fresh_params, grads)
        opt.step(schedule.plan(cfg, step))
        fresh.step(schedule.plan(cfg, step))
    for label in params:
        assert torch.equal(params[label].detach(), fresh_params[label].detach()), label


def test_wrong_labels_are_refused():
    params = small_params()
    params["extra"] = params.pop("mudd_b2")
    with pytest.raises(ValueError, match=r"missing \['mudd_b2'\], unknown \['extra'\]"):
        NorMuonAdam(params, fp32_config(), POLAR_EXPRESS)


# ---------------------------------------------------------------------------------------------
# Two processes compute what one process computes
# ---------------------------------------------------------------------------------------------

DIST_STEPS = (919, 920, 921, 922, 923)  # even, odd, the untie, then embed on its own


def _dyadic_grads(params, seed) -> dict[str, torch.Tensor]:
    """Multiples of 1/16 in [-0.5, 0.5]: every sum and mean below is exact in fp32, so any difference
    between one and two processes would be a difference in what they compute, not in rounding."""
    g = torch.Generator().manual_seed(seed)
    return {label: torch.randint(-8, 9, p.shape, generator=g) / 16.0 for label, p in params.items()}


def _run(params, world_size, rank):
    """DIST_STEPS on ``params``; each process gets its own gradients, whose mean over the processes is
    the single process's gradient: rank r's = mean + (r - (W - 1) / 2) * noise."""
    cfg = fp32_config()
    opt = NorMuonAdam(params, cfg, POLAR_EXPRESS)
    for step in DIST_STEPS:
        mean, noise = _dyadic_grads(params, seed=step), _dyadic_grads(params, seed=1000 + step)
        offset = rank - (world_size - 1) / 2
        set_grads(params, {k: mean[k] + offset * noise[k] for k in params})
        opt.step(schedule.plan(cfg, step))
    return {label: p.detach().clone() for label, p in params.items()}


def _worker(rank: int, world_size: int, workdir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{workdir}/init", rank=rank, world_size=world_size)
    try:
        torch.save(_run(small_params(seed=4), world_size, rank), f"{workdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    """Sharded banks (qk_bank's 5 matrices split 3 + 2, padded), sharded Adam tables, replicated small
    parameters, the tie and the untie: two gloo processes end with the single process's weights, exactly."""
    single = _run(small_params(seed=4), 1, 0)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path))) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=180)
        assert proc.exitcode == 0
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for label, want in single.items():
            assert torch.equal(got[label], want), (rank, label)
