"""Document-causal, block-windowed attention for packed sequences.

The op (every variant has this signature)::

    attention(q, k, v, doc_ids, window_blocks, scale, block_size=128) -> out

    q, k, v        (B, T, H, D) float32 / float16 / bfloat16, same dtype and device
    doc_ids        (B, T) int32, non-decreasing along T: the document each token belongs to
                   (the running count of <|endoftext|> tokens up to and including the token)
    window_blocks  int, or a 0-dim integer tensor (so a growing window never forces a recompile):
                   the window in blocks of ``block_size`` tokens; 0 behaves as 1
    scale          softmax scale (the recipe uses 0.12)
    out            (B, T, H, D), dtype of q

The mask: query token i may attend key token j iff

    j <= i  and  doc(j) == doc(i)  and  j // block_size >= i // block_size - max(window_blocks, 1) + 1

This is exactly the recipe's block-sparse rule (spec: "Mask"), derived as follows. For a query block Q
the recipe keeps the nearest min(n_full, w-1) "full" key blocks (K < Q, K and Q inside one document) and
the nearest min(n_partial, max(1, w - n_full)) "partial" ones (every other block overlapping Q's
documents, the diagonal included). Because documents are contiguous, the full blocks form a contiguous
run just before Q and the partial ones are Q itself plus, for a single-document Q, the one block where
that document starts; for a multi-document Q every candidate is partial. In every case the kept blocks
are the contiguous range [max(first candidate, Q - w + 1), Q], and the token rule inside kept blocks
then makes the first-candidate bound redundant. So the rule above is the recipe's mask, token for token.
"""

from __future__ import annotations

import torch


def check_attention_args(q, k, v, doc_ids, window_blocks, block_size):
    """Validate the op's inputs; raises ValueError/TypeError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, T, H, D), got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device or doc_ids.device != q.device:
        raise ValueError(f"q, k, v, doc_ids must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}, {doc_ids.device}")
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("doc_ids must be an int32 or int64 tensor")
    if doc_ids.shape != q.shape[:2]:
        raise ValueError(f"doc_ids must have shape (B, T) = {tuple(q.shape[:2])}, got {tuple(doc_ids.shape)}")
    if isinstance(window_blocks, torch.Tensor):
        if window_blocks.numel() != 1 or window_blocks.dtype.is_floating_point:
            raise TypeError("window_blocks tensor must be a single integer element")
    elif not isinstance(window_blocks, int) or isinstance(window_blocks, bool):
        raise TypeError(f"window_blocks must be an int or an integer tensor, got {type(window_blocks).__name__}")
    elif window_blocks < 0:
        raise ValueError(f"window_blocks must be >= 0, got {window_blocks}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def attention_mask(doc_ids: torch.Tensor, window_blocks, block_size: int, q_start: int = 0,
                   q_end: int | None = None, k_start: int = 0, k_end: int | None = None) -> torch.Tensor:
    """Boolean mask (B, q_end - q_start, k_end - k_start) of the rule in the module docstring."""
    T = doc_ids.shape[1]
    q_end = T if q_end is None else q_end
    k_end = T if k_end is None else k_end
    w = max(int(window_blocks), 1)
    qi = torch.arange(q_start, q_end, device=doc_ids.device)[:, None]
    kj = torch.arange(k_start, k_end, device=doc_ids.device)[None, :]
    allowed = (kj <= qi) & (kj // block_size >= qi // block_size - w + 1)
    same_doc = doc_ids[:, q_start:q_end, None] == doc_ids[:, None, k_start:k_end]
    return allowed[None] & same_doc


def attention_torch(q, k, v, doc_ids, window_blocks, scale, block_size=128, query_chunk=2048):
    """Reference: fp32 math on a materialised mask, in query chunks so memory is O(T * window).

    Only the keys a chunk can see (its window, block-granular) are materialised, so this also runs the
    real preset's 64K-token sequences. Reads ``window_blocks`` on the host (a sync): a reference, not a
    kernel.
    """
    check_attention_args(q, k, v, doc_ids, window_blocks, block_size)
    B, T, H, D = q.shape
    w = max(int(window_blocks), 1)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    outs = []
    for q0 in range(0, T, query_chunk):
        q1 = min(T, q0 + query_chunk)
        k0 = max(0, (q0 // block_size - w + 1) * block_size)
        mask = attention_mask(doc_ids, w, block_size, q0, q1, k0, q1)  # (B, q, k)
        s = torch.matmul(qf[:, :, q0:q1], kf[:, :, k0:q1].transpose(-1, -2)) * scale
        s = s.masked_fill(~mask[:, None], float("-inf"))
        outs.append(torch.matmul(torch.softmax(s, dim=-1), vf[:, :, k0:q1]))
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)


VARIANTS = {"torch": attention_torch}
