"""The optimizers of the Sub3Min recipe (Muon + Adam) and of the baseline (AdamW), and their schedules."""

from __future__ import annotations

import torch

from speedrun import config
from speedrun.config import RunConfig
from speedrun.optim.muon import Muon

# ---------------------------------------------------------------------------------------------
# Building the optimizers of a run
# ---------------------------------------------------------------------------------------------


def build_optimizers(model, cfg: RunConfig, ops: dict) -> list[torch.optim.Optimizer]:
    """The optimizers for ``model`` (a speedrun.model.GPT) under ``cfg.optim``, in the order to step them.

    "muon_adam" (recipe, arch "recipe" only): [Adam, Muon]. Adam groups: lm_head (lm_head_lr), the token
    and value embeddings (embed_lr), every < 2-D parameter (scalar_lr); Muon gets every >= 2-D parameter
    inside the blocks. "adamw" (baseline, any arch): [AdamW] with weight decay on >= 2-D parameters only.
    Every group carries a "name" and its base lr as "initial_lr" (set_schedules scales from it).
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg must be a RunConfig, got {type(cfg).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a speedrun.model.GPT, got {type(model).__name__}")
    if cfg.optim.kind == "muon_adam":
        optimizers = _build_muon_adam(model, cfg, ops)
    else:
        optimizers = [_build_adamw(model, cfg)]
    _check_every_param_once(model, optimizers)
    return optimizers


def _build_muon_adam(model, cfg: RunConfig, ops: dict) -> list[torch.optim.Optimizer]:
    o = cfg.optim
    if model.cfg.arch != "recipe":
        raise ValueError(f"optim kind 'muon_adam' needs model arch 'recipe', got {model.cfg.arch!r}")
    if not isinstance(ops, dict) or not callable(ops.get("newton_schulz")):
        raise ValueError("ops must hold ops['newton_schulz']; build it with kernels.resolve(variant)")
    adam_groups = [
        dict(name="lm_head", params=[model.lm_head_weight], lr=o.lm_head_lr),
        dict(name="embed", params=[model.embed.weight] + [t.weight for t in model.value_embeds], lr=o.embed_lr),
        dict(name="scalar", params=[p for p in model.parameters() if p.dim() < 2], lr=o.scalar_lr),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    adam = torch.optim.Adam(adam_groups, betas=o.adam_betas, eps=o.adam_eps, weight_decay=0.0,
                            fused=_fused_supported(model))
    matrices = [p for p in model.blocks.parameters() if p.dim() >= 2]
    muon = Muon(matrices, ops["newton_schulz"], lr=o.muon_lr, momentum=config.muon_momentum(0, cfg),
                ns_steps=o.ns_steps, ns_coeffs=o.ns_coeffs, ns_dtype=getattr(torch, o.ns_dtype))
    for group in muon.param_groups:
        group["name"] = "muon"
    optimizers = [adam, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def _build_adamw(model, cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    params = list(model.parameters())
    groups = [
        dict(name="decay", params=[p for p in params if p.dim() >= 2], weight_decay=o.weight_decay),
        dict(name="no_decay", params=[p for p in params if p.dim() < 2], weight_decay=0.0),
    ]
    groups = [g for g in groups if g["params"]]
    adamw = torch.optim.AdamW(groups, lr=o.adamw_lr, betas=o.adamw_betas, fused=_fused_supported(model))
    for group in adamw.param_groups:
        group["initial_lr"] = group["lr"]
    return adamw


def _fused_supported(model) -> bool:
    """PyTorch's fused Adam/AdamW kernels exist for CUDA and CPU tensors (not, e.g., meta)."""
    return all(p.device.type in ("cuda", "cpu") for p in model.parameters())


def _check_every_param_once(model, optimizers: list[torch.optim.Optimizer]):
    names = {id(p): name for name, p in model.named_parameters()}
    seen: dict[int, str] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError(f"parameter {names.get(id(p), '?')} is in groups {seen[id(p)]!r} "
                                     f"and {group.get('name')!r}")
                if id(p) not in names:
                    raise ValueError(f"group {group.get('name')!r} holds a tensor that is not a model parameter")
                seen[id(p)] = group.get("name")
    missing = [name for pid, name in names.items() if pid not in seen]
    if missing:
        raise ValueError(f"parameters in no optimizer group: {missing}")


def set_schedules(optimizers: list[torch.optim.Optimizer], step: int, cfg: RunConfig) -> None:
    """Set every group's lr (initial_lr * lr_multiplier(step)) and Muon's momentum for ``step``."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    multiplier = config.lr_multiplier(step, cfg)
    momentum = config.muon_momentum(step, cfg)
    for opt in optimizers:
        for group in opt.param_groups:
            if "initial_lr" not in group:
                raise ValueError(f"optimizer group {group.get('name')!r} has no 'initial_lr'; "
                                 "build the optimizers with build_optimizers")
            group["lr"] = group["initial_lr"] * multiplier
            if isinstance(opt, Muon):
                group["momentum"] = momentum
