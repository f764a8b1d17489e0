"""Tests of speedrun/optim/muon.py and build.py against the spec (recipe-sub3min.md sections 3 and 4)."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing

import pytest
import torch

import kernels
from speedrun.config import get_preset
from speedrun.model import GPT
from speedrun.optim import Muon, build_optimizers, set_schedules

OPS = kernels.resolve("torch")
NS = OPS["newton_schulz"]


def random_matrices(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def make_params(shapes, seed):
    return [torch.nn.Parameter(t) for t in random_matrices(shapes, seed)]


def ill_conditioned(rows, cols, condition, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g))
    return u @ torch.diag(torch.logspace(0, -math.log10(condition), cols)) @ v.T


# ---------------------------------------------------------------------------------------------
# Muon's math
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random_wide", "random_tall", "condition_100"])
def test_muon_update_is_nearly_orthogonal(kind):
    """From W = 0 with lr 1, -W after one step is NS5(U): singular values in ~[0.5, 1.5]."""
    if kind == "random_wide":
        grad = random_matrices([(96, 384)], seed=1)[0]
    elif kind == "random_tall":
        grad = random_matrices([(384, 96)], seed=2)[0]
    else:
        grad = ill_conditioned(384, 96, condition=100.0, seed=3)
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad
    shape_factor = math.sqrt(max(1.0, grad.size(0) / grad.size(1)))
    Muon([p], NS, lr=1.0, momentum=0.9).step()
    s = torch.linalg.svdvals(-p.detach() / shape_factor)
    assert s.min() > 0.5 and s.max() < 1.5
    # Orthogonalisation keeps the singular vectors: the update is aligned with the gradient.
    cosine = (-p.detach() * grad).sum() / (p.detach().norm() * grad.norm())
    assert cosine > 0.1


def test_shape_factor_is_two_for_tall_w_fc():
    d = 64
    fc, proj = torch.nn.Parameter(torch.zeros(4 * d, d)), torch.nn.Parameter(torch.zeros(d, 4 * d))
    fc.grad, proj.grad = random_matrices([(4 * d, d), (d, 4 * d)], seed=4)
    lr, mu = 0.05, 0.95
    Muon([fc, proj], NS, lr=lr, momentum=mu).step()
    # First step: M = (1 - mu) G, U = (1 - mu) G + mu M = (1 - mu^2) G; NS normalises the scale away
    # (up to bf16 rounding of the scaled input, which NS amplifies to ~1.5%).
    for p, factor in ((fc, 2.0), (proj, 1.0)):
        want = -lr * factor * NS((1 - mu**2) * p.grad).float()
        assert ((p.detach() - want).norm() / want.norm()).item() < 0.05  # factor 1 vs 2 would be 0.5
    assert torch.linalg.svdvals(-fc.detach() / lr).mean().item() == pytest.approx(2.0, rel=0.25)


def reference_muon(weights, grads_per_step, momenta, lr, ns_steps=5, coeffs=(3.4445, -4.7750, 2.0315)):
    """Plain loop: one matrix at a time, 3-D weights as separate matrices, fp32 momentum."""
    weights = [w.clone() for w in weights]
    buffers = [torch.zeros_like(w) for w in weights]
    for grads, mu in zip(grads_per_step, momenta, strict=True):
        for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
            buffers[i] = mu * buffers[i] + (1 - mu) * g
            u = (1 - mu) * g + mu * buffers[i]
            matrices = u.unbind(0) if u.dim() == 3 else [u]
            x = torch.stack([NS(m, ns_steps, coeffs) for m in matrices]).view_as(u)
            rows, cols = w.shape[-2:]
            weights[i] = w - lr * math.sqrt(max(1, rows / cols)) * x.float()
    return weights


def test_muon_matches_plain_loop_reference_over_two_steps():
    d = 48
    shapes = [(3, d, d), (d, d), (4 * d, d), (d, 4 * d), (4 * d, d)]
    start = random_matrices(shapes, seed=5)
    grads = [random_matrices(shapes, seed=6), random_matrices(shapes, seed=7)]
    momenta = [0.85, 0.9]
    params = [torch.nn.Parameter(w.clone()) for w in start]
    muon = Muon(params, NS, lr=0.03, momentum=0.5, ns_steps=5)
    for step_grads, mu in zip(grads, momenta, strict=True):
        for group in muon.param_groups:
            group["momentum"] = mu
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        muon.step()
    want = reference_muon(start, grads, momenta, lr=0.03)
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.detach(), w, atol=2e-6, rtol=1e-6)
    # Grouped by element count, in order of first appearance.
    assert [len(g["params"]) for g in muon.param_groups] == [1, 1, 3]


def test_muon_rejects_misuse():
    with pytest.raises(ValueError, match="params"):
        Muon([torch.nn.Parameter(torch.ones(4))], NS)
    with pytest.raises(TypeError, match="newton_schulz"):
        Muon(make_params([(4, 4)], seed=8), "ns")
    with pytest.raises(TypeError, match="params"):
        Muon([{"params": make_params([(4, 4)], seed=8)}], NS)
    with pytest.raises(ValueError, match="momentum"):
        Muon(make_params([(4, 4)], seed=8), NS, momentum=1.0)
    muon = Muon(make_params([(4, 4)], seed=8), NS)
    with pytest.raises(RuntimeError, match="no gradient"):
        muon.step()


# ---------------------------------------------------------------------------------------------
# Work split across ranks: two Gloo processes compute exactly what one process does
# ---------------------------------------------------------------------------------------------

DIST_SHAPES = [(32, 32), (16, 64), (64, 16), (3, 32, 32), (32, 32)]  # 1024-element group of 4: partial chunk


def _muon_two_steps(params):
    muon = Muon(params, NS, lr=0.02, momentum=0.8)
    for step in range(2):
        for p, g in zip(params, random_matrices([p.shape for p in params], seed=10 + step), strict=True):
            p.grad = g
        muon.step()
    return [p.detach().clone() for p in params]


def _distributed_worker(rank: int, world_size: int, workdir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{workdir}/init", rank=rank, world_size=world_size)
    try:
        torch.save(_muon_two_steps(make_params(DIST_SHAPES, seed=9)), f"{workdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_muon_two_processes_equal_one(tmp_path):
    single = _muon_two_steps(make_params(DIST_SHAPES, seed=9))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_distributed_worker, args=(r, 2, str(tmp_path))) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(got) == len(single)
        for g, want in zip(got, single, strict=True):
            assert torch.equal(g, want)


# ---------------------------------------------------------------------------------------------
# build_optimizers and set_schedules
# ---------------------------------------------------------------------------------------------


def groups_by_name(optimizers):
    out = {}
    for opt in optimizers:
        for group in opt.param_groups:
            out.setdefault(group["name"], []).append(group)
    return out


def test_recipe_grouping_on_tiny():
    cfg = get_preset("sub3min-tiny")
    model = GPT(cfg.model, OPS, torch.float32)
    adam, muon = build_optimizers(model, cfg, OPS)
    assert type(adam) is torch.optim.Adam and isinstance(muon, Muon)
    assert adam.defaults["fused"] and adam.defaults["betas"] == (0.8, 0.95) and adam.defaults["eps"] == 1e-10
    seen = [id(p) for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    named = groups_by_name([adam, muon])
    o = cfg.optim
    expected_lr = {"lm_head": o.lm_head_lr, "embed": o.embed_lr, "scalar": o.scalar_lr, "muon": o.muon_lr}
    for name, groups in named.items():
        for group in groups:
            assert group["lr"] == group["initial_lr"] == expected_lr[name]
            assert group.get("weight_decay", 0.0) == 0.0
    assert named["lm_head"][0]["params"] == [model.lm_head_weight]
    assert {id(p) for p in named["embed"][0]["params"]} == {id(model.embed.weight), id(model.value_embeds[0].weight)}
    assert all(p.dim() < 2 for p in named["scalar"][0]["params"])
    muon_params = [p for g in named["muon"] for p in g["params"]]
    assert {id(p) for p in muon_params} == {id(p) for p in model.blocks.parameters() if p.dim() >= 2}
    assert muon.param_groups[0]["momentum"] == pytest.approx(0.85)


def test_recipe_grouping_on_sub3min_meta():
    cfg = get_preset("sub3min")
    with torch.device("meta"):
        model = GPT(cfg.model, OPS)
    adam, muon = build_optimizers(model, cfg, OPS)
    named = groups_by_name([adam, muon])
    assert len(named["embed"][0]["params"]) == 4
    assert sum(p.numel() for p in named["scalar"][0]["params"]) == 52
    # Muon: 11 qkv (1,769,472 elements), 11 W_o (589,824), 12 W_fc + 12 W_proj (2,359,296).
    sizes = {g["params"][0].numel(): len(g["params"]) for g in muon.param_groups}
    assert sizes == {3 * 768 * 768: 11, 768 * 768: 11, 3072 * 768: 24}


def test_every_parameter_must_be_in_a_group():
    cfg = get_preset("sub3min-tiny")
    model = GPT(cfg.model, OPS, torch.float32)
    model.stray = torch.nn.Parameter(torch.ones(3, 3))  # >= 2-D but outside the blocks: nobody's
    with pytest.raises(ValueError, match="stray"):
        build_optimizers(model, cfg, OPS)
    with pytest.raises(ValueError, match="recipe"):
        build_optimizers(GPT(get_preset("tiny-adamw").model, OPS, torch.float32), cfg, OPS)


def test_adamw_baseline_grouping():
    cfg = get_preset("tiny-adamw")
    model = GPT(cfg.model, OPS, torch.float32)
    (adamw,) = build_optimizers(model, cfg, OPS)
    assert type(adamw) is torch.optim.AdamW
    named = groups_by_name([adamw])
    assert named["decay"][0]["weight_decay"] == cfg.optim.weight_decay
    assert named["no_decay"][0]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in named["decay"][0]["params"])
    assert all(p.dim() < 2 for p in named["no_decay"][0]["params"])
    assert all(g["initial_lr"] == cfg.optim.adamw_lr for g in adamw.param_groups)
    set_schedules([adamw], 0, cfg)  # warm-up: (0 + 1) / 20
    assert all(g["lr"] == pytest.approx(cfg.optim.adamw_lr / 20) for g in adamw.param_groups)


@pytest.mark.parametrize("step,multiplier,momentum", [
    (0, 1.0, 0.85),
    (150, 1.0, 0.90),
    (835, 1.0, 0.95),
    (836, None, 0.95),
    (1392, None, 0.95),
])
def test_set_schedules_on_sub3min(step, multiplier, momentum):
    cfg = get_preset("sub3min")
    with torch.device("meta"):
        model = GPT(cfg.model, OPS)
    optimizers = build_optimizers(model, cfg, OPS)
    if multiplier is None:  # cooldown: w = (1 - s/1393) / 0.4, multiplier = w + 0.1 (1 - w)
        w = (1 - step / 1393) / 0.4
        multiplier = w + 0.1 * (1 - w)
    set_schedules(optimizers, step, cfg)
    named = groups_by_name(optimizers)
    base = {"lm_head": 0.008, "embed": 0.6, "scalar": 0.04, "muon": 0.05}
    for name, groups in named.items():
        for group in groups:
            assert group["lr"] == pytest.approx(base[name] * multiplier, rel=1e-12)
    assert all(g["momentum"] == pytest.approx(momentum) for g in named["muon"])
    if step == 836:
        assert multiplier == pytest.approx(0.99968, abs=1e-5)
    if step == 1392:
        assert multiplier == pytest.approx(0.1016, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------------


def train_steps(cfg, n_steps: int, seq_len: int = 128):
    torch.manual_seed(0)
    model = GPT(cfg.model, OPS, torch.float32)
    optimizers = build_optimizers(model, cfg, OPS)
    g = torch.Generator().manual_seed(30)
    tokens = torch.randint(0, cfg.model.vocab_size - 1, (2, seq_len + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].long()
    losses, snapshots = [], []
    for step in range(n_steps + 1):
        snapshots.append([p.detach().clone() for p in model.parameters()])
        loss = model(inputs, targets, window=(2, 1))
        losses.append(loss.item())
        if step == n_steps:
            break
        loss.backward()
        set_schedules(optimizers, step, cfg)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return losses, snapshots


def test_training_steps_decrease_the_loss_on_tiny():
    cfg = get_preset("sub3min-tiny")
    losses, snapshots = train_steps(cfg, n_steps=3)
    assert losses[0] == pytest.approx(math.log(cfg.model.padded_vocab_size), abs=1e-5)
    assert losses[1] < losses[0] and losses[3] < losses[1]
    # Step 1 moves only lm_head (every other gradient is 0 at init); by step 3 every parameter moved.
    assert all(not torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[3], strict=True))


def test_training_steps_decrease_the_loss_on_tiny_adamw():
    cfg = get_preset("tiny-adamw")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, warmup_steps=1))
    losses, _ = train_steps(cfg, n_steps=2)
    assert losses[2] < losses[1] < losses[0]


def test_set_schedules_rejects_unbuilt_optimizers():
    p = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="initial_lr"):
        set_schedules([torch.optim.SGD([p], lr=0.1)], 0, get_preset("sub3min-tiny"))
    with pytest.raises(ValueError, match="step"):
        set_schedules([], -1, get_preset("sub3min-tiny"))
