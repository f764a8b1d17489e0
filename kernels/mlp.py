"""The MLP block: relu(x @ W_fc^T)^2 @ W_proj^T.

The op (every variant has this signature)::

    mlp(x, w_fc, w_proj) -> out

    x       (..., dim) float32 / float16 / bfloat16 activations
    w_fc    (hidden, dim) weight of the up-projection, any float dtype (cast to x's dtype when used)
    w_proj  (dim, hidden) weight of the down-projection, any float dtype (cast to x's dtype when used)
    out     (..., dim), dtype of x

Gradients flow to x, w_fc and w_proj (in the weights' own dtypes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_mlp_args(x, w_fc, w_proj):
    for name, t in (("x", x), ("w_fc", w_fc), ("w_proj", w_proj)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if w_fc.dim() != 2 or w_proj.dim() != 2:
        raise ValueError(f"w_fc and w_proj must be 2-D, got {tuple(w_fc.shape)} and {tuple(w_proj.shape)}")
    if x.dim() < 1 or x.shape[-1] != w_fc.shape[1]:
        raise ValueError(f"x's last dim ({x.shape[-1] if x.dim() else None}) must equal w_fc.shape[1] ({w_fc.shape[1]})")
    if w_proj.shape != (w_fc.shape[1], w_fc.shape[0]):
        raise ValueError(f"w_proj must have shape {(w_fc.shape[1], w_fc.shape[0])}, got {tuple(w_proj.shape)}")
    if w_fc.device != x.device or w_proj.device != x.device:
        raise ValueError(f"x, w_fc, w_proj must be on one device, got {x.device}, {w_fc.device}, {w_proj.device}")


def mlp_torch(x, w_fc, w_proj):
    """Reference: three plain PyTorch ops."""
    check_mlp_args(x, w_fc, w_proj)
    h = F.relu(F.linear(x, w_fc.type_as(x))).square()
    return F.linear(h, w_proj.type_as(x))


VARIANTS = {"torch": mlp_torch}
