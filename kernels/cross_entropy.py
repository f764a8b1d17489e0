"""Cross-entropy of softcapped logits.

The op (every variant has this signature)::

    cross_entropy(z, targets, cap=30.0, scale=7.5, ignore_index=-100, reduction="mean") -> loss

    z          (N, V) raw logits (the lm_head output), float32 / float16 / bfloat16
    targets    (N,) int64 class ids in [0, V), or ignore_index
    logits     cap * sigmoid(z / scale)   (= cap/2 * (tanh(z / (2*scale)) + 1)), computed in fp32
    loss       fp32 scalar: the mean (or sum) over non-ignored targets; "none" gives (N,) with 0 at ignored

With reduction "mean" and every target ignored the loss is NaN, as in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def check_cross_entropy_args(z, targets, cap, scale, reduction):
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D (N, V) tensor, got {getattr(z, 'shape', type(z).__name__)}")
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"z must be float32, float16 or bfloat16, got {z.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        raise TypeError(f"targets must be an int64 tensor, got {getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != z.shape[:1]:
        raise ValueError(f"targets must have shape (N,) = {tuple(z.shape[:1])}, got {tuple(targets.shape)}")
    if targets.device != z.device:
        raise ValueError(f"z and targets must be on one device, got {z.device} and {targets.device}")
    if not cap > 0 or not scale > 0:
        raise ValueError(f"cap and scale must be positive, got cap={cap}, scale={scale}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def softcap(z: torch.Tensor, cap: float, scale: float) -> torch.Tensor:
    return cap * torch.sigmoid(z.float() / scale)


def cross_entropy_torch(z, targets, cap=30.0, scale=7.5, ignore_index=-100, reduction="mean"):
    """Reference: materialise the fp32 softcapped logits, then PyTorch's cross-entropy."""
    check_cross_entropy_args(z, targets, cap, scale, reduction)
    return F.cross_entropy(softcap(z, cap, scale), targets, ignore_index=ignore_index, reduction=reduction)


VARIANTS = {"torch": cross_entropy_torch}
