"""The model gives the same results whichever kernel set runs its hot ops (CPU: Triton's interpreter)."""

import dataclasses
import json

import pytest
import torch

import kernels
import speedrun.train as train_mod
from speedrun import dist
from speedrun.cli import build_parser
from speedrun.config import tiny
from speedrun.data.synth import generate_synth
from speedrun.model import GPT

pytestmark = pytest.mark.skipif("triton" not in kernels.variants("attention"), reason="triton is not installed")


def small_config():
    cfg = tiny().model
    # Random weights everywhere (the recipe zero-initialises lm_head and the output projections, which
    # would hide most of the gradient path); a window of 2 blocks of 16 tokens crosses tiles.
    return dataclasses.replace(cfg, attn_block_size=16)


def randomise(model: GPT, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.05 + p.float().mean())


def test_triton_kernels_match_torch_in_the_model():
    cfg = small_config()
    g = torch.Generator().manual_seed(0)
    T = 96
    tokens = torch.randint(0, cfg.vocab_size - 1, (2, T + 1), generator=g)
    tokens[0, [0, 17, 40, 41]] = cfg.eot_token  # documents of several lengths, one of a single token
    tokens[1, [0, 70]] = cfg.eot_token
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    results = {}
    for variant in ("torch", "triton"):
        torch.manual_seed(1)
        model = GPT(cfg, kernels.resolve(variant), dtype=torch.float32)
        randomise(model, seed=2)
        loss = model(inputs, targets, window=(2, 1))
        loss.backward()
        results[variant] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (loss_ref, grads_ref), (loss_tri, grads_tri) = results["torch"], results["triton"]
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads_ref.keys() == grads_tri.keys() and len(grads_ref) > 10
    for name in grads_ref:
        scale = grads_ref[name].abs().max().clamp_min(1e-12)
        err = (grads_tri[name] - grads_ref[name]).abs().max() / scale
        assert err < 1e-4, f"{name}: max error {err:.2e} relative to the gradient's scale"


@pytest.mark.slow
def test_twenty_tiny_steps_same_losses_with_triton(tmp_path):
    data = tmp_path / "synth"
    generate_synth(data, seed=3, train_tokens=200_000, val_tokens=2048)
    losses = {}
    for variant in ("torch", "triton"):
        args = build_parser().parse_args(["train", "--preset", "tiny", "--data", str(data), "--seq-len", "128",
                                          "--val-tokens", "2048", "--steps", "20", "--val-every", "10",
                                          "--kernels", variant])
        cfg = train_mod.resolve_config(args, cuda=False)
        env = dist.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
        cfg, data_dir, manifest = train_mod.prepare_data(cfg, env)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, warmup_steps=0))
        result = train_mod.train(cfg, env, data_dir, None, None, log_dir=tmp_path / variant, echo=False)
        facts = json.loads(result.json_path.read_text())
        losses[variant] = facts["train_losses"] + [p["val_loss"] for p in facts["val_curve"]]
    assert len(losses["torch"]) == 23
    # fp32 everywhere; the kernels sum in another order, and 20 optimizer steps amplify that a little.
    for a, b in zip(losses["torch"], losses["triton"]):
        assert a == pytest.approx(b, rel=2e-4), (losses["torch"], losses["triton"])
