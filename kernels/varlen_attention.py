"""Causal sliding-window attention over packed documents given by cu_seqlens (record #89's FlashAttention-3
varlen call, spec recipe-frontier.md 2.7 and 6).

The op (every variant has this signature)::

    varlen_attention(q, k, v, cu_seqlens, window, scale) -> out

    q, k, v      (T, H, D) float32 / float16 / bfloat16, same dtype and device
    cu_seqlens   (S,) int32: 0 = c_0 <= c_1 <= ... <= c_{S-1} = T, the document boundaries (repeated
                 entries are empty documents: the recipe pads the array with T)
    window       int >= 0, in tokens: query t sees the keys j of its own document with t - window <= j <= t
                 (window + 1 keys at most; FlashAttention's window_size=(window, 0) with causal=True);
                 or a 0-dim integer tensor on q's device
    scale        the softmax scale (YaRN-adjusted in the recipe): a float, or a 0-dim float tensor on q's device
                 (the Triton variant reads tensors from device memory: a new window or scale is neither a
                 recompile under torch.compile nor a host sync; the reference reads the window on the host)
    out          (T, H, D) in q's dtype; softmax in fp32

Variants: ``torch`` (the reference: per document and block of queries, an fp32 score matrix over the keys
the window allows, masked softmax, autograd for the backward). It reads cu_seqlens on the host (a sync);
its memory is O(query_block * (query_block + window)) per head, so it runs at the record's sizes too, slowly.

``sdpa`` and (with CUDA) ``flex``: PyTorch's, through kernels/attention.py's variants re-indexed as below.
``triton`` (when Triton imports): the Sub3Min attention's flash kernels (kernels/attention.py), re-indexed,
not a second kernel. That kernel's rule "key j is in the window of query i iff j // b >= i // b - w + 1"
with blocks of b = 1 token and w = window + 1 is this op's t - window <= j; its documents come from the
segment of each position, torch.searchsorted(cu_seqlens, t, right=True) - 1, on the device (no host sync;
so cu_seqlens is not checked: it must start at 0, end at T and never decrease, as the reference demands).
Tile skipping keeps the cost O(T * window). The record's paired-head layers call the op on their
interleaved 2T sequence with doubled boundaries (speedrun/model89.py): the same kernel again. Head dims 64
and 128; fp32, fp16 and bf16 on a GPU (bf16 not under the CPU interpreter, whose bf16 dot is wrong).
"""

from __future__ import annotations

import torch

from kernels import attention as _attention


def check_varlen_attention_args(q, k, v, cu_seqlens, window, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be (T, H, D) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must share one dtype and one device")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise TypeError("cu_seqlens must be a 1-D int32 tensor")
    if isinstance(window, torch.Tensor):
        integer = not window.dtype.is_floating_point and window.dtype != torch.bool
        if window.dim() != 0 or not integer or window.device != q.device:
            raise ValueError(f"window as a tensor must be a 0-dim integer tensor on {q.device}, got {window.dtype} "
                             f"{tuple(window.shape)} on {window.device}")
    elif isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (tokens), got {window!r}")
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or not scale.dtype.is_floating_point or scale.device != q.device:
            raise ValueError(f"scale as a tensor must be a 0-dim float tensor on {q.device}, got {scale.dtype} "
                             f"{tuple(scale.shape)} on {scale.device}")
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or a 0-dim float tensor, got {type(scale).__name__}")


def document_bounds(cu_seqlens: torch.Tensor, T: int) -> list[tuple[int, int]]:
    """[(start, end), ...] of the non-empty documents (host values); checks the array's rules."""
    cu = cu_seqlens.tolist()
    if not cu or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"cu_seqlens must start at 0, end at T = {T} and never decrease, got {cu[:8]}...")
    return [(a, b) for a, b in zip(cu, cu[1:], strict=False) if b > a]


@torch.compiler.disable  # reads cu_seqlens on the host: left out of a compiled model's graph
def varlen_attention_torch(q, k, v, cu_seqlens, window, scale, query_block: int = 1024):
    """Reference: plain fp32 attention, document by document, ``query_block`` queries at a time."""
    check_varlen_attention_args(q, k, v, cu_seqlens, window, scale)
    window = int(window)  # a host read: the reference is not a kernel
    if window < 0:
        raise ValueError(f"window must be >= 0 (tokens), got {window}")
    T = q.size(0)
    outs = []
    for start, end in document_bounds(cu_seqlens, T):
        for q0 in range(start, end, query_block):
            q1 = min(end, q0 + query_block)
            k0 = max(start, q0 - window)
            qs, ks, vs = (t.float().transpose(0, 1) for t in (q[q0:q1], k[k0:q1], v[k0:q1]))  # (H, L, D)
            scores = scale * (qs @ ks.mT)
            t = torch.arange(q0, q1, device=q.device)[:, None]
            j = torch.arange(k0, q1, device=q.device)[None, :]
            scores = scores.masked_fill(~((j <= t) & (t - j <= window)), float("-inf"))
            outs.append((scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(outs)


def _reindexed(attention_variant, scale_on_host: bool = False):
    """This op through a variant of kernels/attention.py's op (B = 1, blocks of 1 token, w = window + 1,
    segments as document ids; see the module docstring). ``scale_on_host``: the variant takes a Python float."""

    def varlen(q, k, v, cu_seqlens, window, scale):
        check_varlen_attention_args(q, k, v, cu_seqlens, window, scale)
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens must be on q's device ({q.device}), got {cu_seqlens.device}")
        if scale_on_host and isinstance(scale, torch.Tensor):
            scale = float(scale)
        positions = torch.arange(q.size(0), dtype=torch.int32, device=q.device)
        segment = torch.searchsorted(cu_seqlens, positions, right=True) - 1  # (T,) non-decreasing
        return attention_variant(q[None], k[None], v[None], segment[None], window + 1, scale, block_size=1)[0]

    varlen.__doc__ = f"This op through kernels.attention's {attention_variant.__name__} (see _reindexed)."
    return varlen


VARIANTS = {"torch": varlen_attention_torch}
# The natural competitors, for `speedrun bench kernels`: PyTorch's SDPA on the dense (T, T) mask (O(T^2)
# memory), flex_attention where CUDA is; then our Triton kernels.
VARIANTS["sdpa"] = _reindexed(_attention.attention_sdpa, scale_on_host=True)
if "flex" in _attention.VARIANTS:
    VARIANTS["flex"] = _reindexed(_attention.attention_flex, scale_on_host=True)
if "triton" in _attention.VARIANTS:
    VARIANTS["triton"] = _reindexed(_attention.attention_triton)
