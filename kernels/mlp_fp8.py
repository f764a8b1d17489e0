"""Record #89's ReLU^2 MLP with an FP8 forward and a bf16 backward (spec recipe-frontier.md 2.10, 6 rows 6-10).

The op (every variant has this signature)::

    mlp_fp8(x, w_fc, w_proj, up8, up_scale, down8, down_scale, act_scale) -> (out, post_amax)

    x           (T, d) bf16: the normed activations
    w_fc        (hidden, d) bf16, used as x w_fc^T;  w_proj (hidden, d) bf16, used as h w_proj (in x out)
    up8, up_scale       w_fc quantised by ``quantize_up`` (e4m3 (hidden, d), fp32 scalar)
    down8, down_scale   w_proj quantised by ``quantize_down`` (e4m3 (hidden, d), fp32 scalar)
    act_scale   fp32 scalar: the delayed scale of the down-projection's input (``activation_scale`` of an
                earlier call's post_amax)
    out         (T, d) in x's dtype;  post_amax: fp32 scalar, max(post) of this call

Forward (FP8, current scaling up, delayed scaling down):
    a = max(max|x|, 1e-12);  x8 = e4m3(x * (448 / a));  dq = up_scale * a / 448
    pre = bf16(dq * x8 up8^T);  post = bf16(relu(pre)^2)
    post8 = e4m3(min(post * (1 / act_scale), 448));  out = bf16(act_scale * down_scale * post8 down8)
Backward (bf16, the FP8 values are a detached side computation; gradients of the bf16 function at pre, post):
    dw_proj = post^T g;  u = bf16(g w_proj^T);  dpre = bf16(2 u relu(pre));  dw_fc = dpre^T x;  dx = dpre w_fc

Variants: ``torch`` (the reference: FP8 products emulated exactly, fp32 sums: kernels/fp8.py).
The quantisation of the weights (after every optimizer step) and of the activation scale (after every
training forward) are here too: ``quantize_up``, ``quantize_down``, ``activation_scale``.
"""

from __future__ import annotations

import torch

from kernels.fp8 import E4M3_MAX, scaled_mm, to_e4m3

WEIGHT_HEADROOM = 1.12  # the down weights' delayed scale: 1.12 x the previous weights' amax / 448
ACTIVATION_HEADROOM = 1.8  # the down-projection input's delayed scale: 1.8 x the last amax / 448


def quantize_up(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Current scaling of up-projection weights w (..., hidden, d), per matrix: in w's dtype (bf16),
    s = max(max|w|, 1e-12) / 448 and w8 = e4m3(w / s); returns (w8, fp32 s of shape w.shape[:-2])."""
    scale = w.abs().amax(dim=(-2, -1)).clamp(min=1e-12) / E4M3_MAX
    return to_e4m3(w / scale[..., None, None]), scale.float()


def quantize_down(w: torch.Tensor, next_scale: torch.Tensor, bootstrap: bool):
    """Delayed scaling of down-projection weights w (..., hidden, d). The scale used now is ``next_scale``
    (fp32, shape w.shape[:-2], left by the previous call), or with ``bootstrap`` the current
    max|w| / 448 (computed in w's dtype); returns (w8 = e4m3(clamp(w / used, +-448)), used, the next call's
    scale = 1.12 max(max|w|, 1e-12) / 448 in fp32)."""
    amax = w.abs().amax(dim=(-2, -1))
    used = (amax.clamp(min=1e-12) / E4M3_MAX).float() if bootstrap else next_scale
    w8 = to_e4m3(w.float() / used[..., None, None])
    return w8, used, activation_scale(amax.float(), WEIGHT_HEADROOM)


def activation_scale(amax: torch.Tensor, headroom: float = ACTIVATION_HEADROOM) -> torch.Tensor:
    """A delayed scale from an observed amax: max(amax, 1e-12) * headroom / 448, fp32."""
    return amax.float().clamp(min=1e-12) * (headroom / E4M3_MAX)


class _MLPFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_fc, w_proj, up8, up_scale, down8, down_scale, act_scale):
        a = x.detach().abs().amax().clamp(min=1e-12).float()
        x8 = to_e4m3(x.detach().float() * (E4M3_MAX / a))
        pre = scaled_mm(x8, up8.T, up_scale * a / E4M3_MAX, x.dtype)
        post = torch.relu(pre.float()).square().to(x.dtype)
        post8 = to_e4m3(torch.clamp(post.float() * (1 / act_scale), max=E4M3_MAX))
        out = scaled_mm(post8, down8, act_scale * down_scale, x.dtype)
        ctx.save_for_backward(x, w_fc, w_proj, pre, post)
        post_amax = post.float().amax()
        ctx.mark_non_differentiable(post_amax)
        return out, post_amax

    @staticmethod
    def backward(ctx, g, _):
        x, w_fc, w_proj, pre, post = ctx.saved_tensors
        g32 = g.float()
        dw_proj = (post.float().T @ g32).to(w_proj.dtype)
        u = (g32 @ w_proj.float().T).to(x.dtype)
        dpre = (2 * u.float() * torch.relu(pre.float())).to(x.dtype)
        dw_fc = (dpre.float().T @ x.float()).to(w_fc.dtype)
        dx = (dpre.float() @ w_fc.float()).to(x.dtype)
        return dx, dw_fc, dw_proj, None, None, None, None, None


def mlp_fp8_torch(x, w_fc, w_proj, up8, up_scale, down8, down_scale, act_scale):
    """Reference (see the module docstring)."""
    if x.dim() != 2 or w_fc.shape != w_proj.shape or x.size(1) != w_fc.size(1):
        raise ValueError(f"x must be (T, d) and w_fc, w_proj (hidden, d); got {tuple(x.shape)}, "
                         f"{tuple(w_fc.shape)}, {tuple(w_proj.shape)}")
    if up8.dtype != torch.float8_e4m3fn or down8.dtype != torch.float8_e4m3fn:
        raise TypeError("up8 and down8 must be float8_e4m3fn (quantize_up / quantize_down)")
    return _MLPFp8.apply(x, w_fc, w_proj, up8, up_scale, down8, down_scale, act_scale)


VARIANTS = {"torch": mlp_fp8_torch}
