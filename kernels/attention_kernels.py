"""Triton kernels of the document-causal, block-windowed flash attention (launchers: kernels/attention.py).

Layouts (all kernels; b, h from ``program_id(1) = b * H + h``; strides in elements, last dim stride 1):

    Q, K, V, O, dO      (B, T, H, D) float32 / float16 / bfloat16, any (b, t, h) strides
    dQ, dK, dV          (B, T, H, D), dtype of Q, contiguous
    LSE, DELTA          (B, H, T) float32 contiguous: natural-log log-sum-exp of each query's scaled scores;
                        rowsum(dO * O)
    DOC_START, DOC_END  (B, T) int32 contiguous: index of the first token of each token's document, and one
                        past its last (from the non-decreasing doc_ids; "same document" is
                        DOC_START[i] == DOC_START[j])
    WINDOW              0-dim integer tensor: the window in blocks of ``block_size`` tokens; < 1 behaves as 1.
                        Loaded from memory, so a new window value is neither a recompile nor a host sync.
    SCALE               0-dim fp32 tensor: the softmax scale, loaded from memory likewise

Mask: query i sees key j iff j <= i, same document, and j // block_size >= i // block_size - w + 1.

Tile skipping. A query tile [m0, m0 + BLOCK_M) only visits key tiles from the first key its first row can
see (max of its window start and its document start, rounded down to BLOCK_N) up to its diagonal, so the
cost is O(T * window), not O(T^2). Inside that range the key tiles that every row of the tile sees
completely (causal, same document, inside the window of the tile's *last* row) form one contiguous run;
they run the inner loop with MASKED=False (no index arithmetic, no doc loads); the ragged ends run it
with MASKED=True. The dK/dV kernel does the same from the key side (query range [key tile, last query
whose window and document still contain the tile)).
"""

from __future__ import annotations

import triton
import triton.language as tl

# The kernels work in base 2: exp(x) = exp2(x * log2(e)), log2(e) = 1.4426950408889634.


@triton.jit
def _key_range(DS, m0, T, w, block_size, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles of query tile [m0, m0+BLOCK_M): (lo, full_lo, full_hi, hi). Tiles starting in
    [full_lo, full_hi) need no mask; [lo, min(full_lo, hi)) and [max(full_lo, full_hi), hi) do."""
    m_last = tl.minimum(m0 + BLOCK_M, T) - 1
    lo = tl.maximum(tl.maximum((m0 // block_size - w + 1) * block_size, 0), tl.load(DS + m0))
    lo = lo // BLOCK_N * BLOCK_N
    full_lo = tl.maximum((m_last // block_size - w + 1) * block_size, tl.load(DS + m_last))
    full_lo = (full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_hi = (m0 + 1) // BLOCK_N * BLOCK_N  # tiles ending at or before the first query row
    return lo, full_lo, full_hi, m_last + 1


@triton.jit
def _query_range(DE, n0, T, w, block_size, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles that see key tile [n0, n0+BLOCK_N): (lo, full_lo, full_hi, hi), as in _key_range."""
    n_last = tl.minimum(n0 + BLOCK_N, T) - 1
    lo = n0 // BLOCK_M * BLOCK_M
    hi = tl.minimum(tl.minimum((n_last // block_size + w) * block_size, T), tl.load(DE + n_last))
    full_lo = (n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # first query row >= the last key
    full_hi = tl.minimum((n0 // block_size + w) * block_size, tl.load(DE + n0)) // BLOCK_M * BLOCK_M
    return lo, full_lo, full_hi, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, q_doc, q_blk_lo, offs_m, K, V, stride_kt, stride_vt, DS, T, qk_scale,
               block_size, start, end, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key tiles [start, end): acc (BLOCK_M, D) fp32, l_i/m_i (BLOCK_M,) fp32 (base 2)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            n_ok = offs_n < T
            kT = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=n_ok[None, :], other=0.0)
            v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        else:
            kT = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None])
            v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :])
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            k_doc = tl.load(DS + offs_n, mask=n_ok, other=-1)
            ok = (offs_n[None, :] <= offs_m[:, None]) & (k_doc[None, :] == q_doc[:, None])
            ok = ok & ((offs_n // block_size)[None, :] >= q_blk_lo[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i starts finite, so a fully masked row never gives NaN
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(Q, K, V, O, LSE, DS, WINDOW, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
                    sob, sot, soh, T, H, SCALE, block_size, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (cdiv(T, BLOCK_M), B * H). Writes O and LSE for one query tile of one (b, h)."""
    m0 = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    b64 = b.to(tl.int64)
    Q += b64 * sqb + h * sqh
    K += b64 * skb + h * skh
    V += b64 * svb + h * svh
    O += b64 * sob + h * soh
    DS += b64 * T
    LSE += (b64 * H + h) * T
    w = tl.maximum(tl.load(WINDOW).to(tl.int32), 1)
    qk_scale = tl.load(SCALE) * 1.4426950408889634

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    q_doc = tl.load(DS + offs_m, mask=m_ok, other=-2)
    q_blk_lo = offs_m // block_size - w + 1

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    lo, full_lo, full_hi, hi = _key_range(DS, m0, T, w, block_size, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_doc, q_blk_lo, offs_m, K, V, skt, svt, DS, T, qk_scale,
                               block_size, lo, tl.minimum(full_lo, hi), HEAD_DIM, BLOCK_N, True, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_doc, q_blk_lo, offs_m, K, V, skt, svt, DS, T, qk_scale,
                               block_size, full_lo, full_hi, HEAD_DIM, BLOCK_N, False, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_doc, q_blk_lo, offs_m, K, V, skt, svt, DS, T, qk_scale,
                               block_size, tl.maximum(full_lo, full_hi), hi, HEAD_DIM, BLOCK_N, True, DOT_PREC)

    l_i = tl.where(l_i > 0, l_i, 1.0)  # only rows past T (never stored) can have l_i == 0
    tl.store(O + offs_m[:, None] * sot + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=m_ok[:, None])
    tl.store(LSE + offs_m, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=m_ok)


@triton.jit
def attn_bwd_preprocess_kernel(O, DO, DELTA, sob, sot, soh, sdb, sdt, sdh, T, H,
                               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (cdiv(T, BLOCK_M), B * H): DELTA = rowsum(O * dO) in fp32."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = (tl.program_id(1) // H).to(tl.int64)
    h = tl.program_id(1) % H
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < T
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=m_ok[:, None],
                 other=0.0)
    tl.store(DELTA + (b * H + h) * T + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=m_ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, k_doc, k_blk_hi, offs_n, Q, DO, LSE, DELTA, DS, stride_qt, stride_dot, T,
                qk_scale, block_size, start, end, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK (unscaled) and dV (BLOCK_N, D) fp32 over query tiles [start, end), recomputing P^T."""
    offs_d = tl.arange(0, HEAD_DIM)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if MASKED:
            m_ok = offs_m < T
            qT = tl.load(Q + offs_m[None, :] * stride_qt + offs_d[:, None], mask=m_ok[None, :], other=0.0)
            do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=m_ok[:, None], other=0.0)
            lse2 = tl.load(LSE + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        else:
            qT = tl.load(Q + offs_m[None, :] * stride_qt + offs_d[:, None])
            do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :])
            lse2 = tl.load(LSE + offs_m) * 1.4426950408889634
            delta = tl.load(DELTA + offs_m)
        pT = tl.math.exp2(tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale - lse2[None, :])  # (BLOCK_N, BLOCK_M)
        if MASKED:
            q_doc = tl.load(DS + offs_m, mask=m_ok, other=-2)
            ok = (offs_m[None, :] >= offs_n[:, None]) & (q_doc[None, :] == k_doc[:, None])
            ok = ok & ((offs_m // block_size)[None, :] <= k_blk_hi[:, None])
            pT = tl.where(ok, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, DS, DE, WINDOW, sqb, sqt, sqh, skb, skt, skh,
                         svb, svt, svh, sdb, sdt, sdh, sgb, sgt, sgh, T, H, SCALE, block_size,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    """Grid (cdiv(T, BLOCK_N), B * H). Writes dK, dV (strides sg*) for one key tile of one (b, h)."""
    n0 = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    b64 = b.to(tl.int64)
    Q += b64 * sqb + h * sqh
    K += b64 * skb + h * skh
    V += b64 * svb + h * svh
    DO += b64 * sdb + h * sdh
    DK += b64 * sgb + h * sgh
    DV += b64 * sgb + h * sgh
    DS += b64 * T
    DE += b64 * T
    LSE += (b64 * H + h) * T
    DELTA += (b64 * H + h) * T
    w = tl.maximum(tl.load(WINDOW).to(tl.int32), 1)
    scale = tl.load(SCALE)
    qk_scale = scale * 1.4426950408889634

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < T
    k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    k_doc = tl.load(DS + offs_n, mask=n_ok, other=-1)
    k_blk_hi = offs_n // block_size + w - 1  # last query block whose window holds the key

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_range(DE, n0, T, w, block_size, BLOCK_M, BLOCK_N)
    dk, dv = _dkdv_inner(dk, dv, k, v, k_doc, k_blk_hi, offs_n, Q, DO, LSE, DELTA, DS, sqt, sdt, T, qk_scale,
                         block_size, lo, tl.minimum(full_lo, hi), HEAD_DIM, BLOCK_M, True, DOT_PREC)
    dk, dv = _dkdv_inner(dk, dv, k, v, k_doc, k_blk_hi, offs_n, Q, DO, LSE, DELTA, DS, sqt, sdt, T, qk_scale,
                         block_size, full_lo, full_hi, HEAD_DIM, BLOCK_M, False, DOT_PREC)
    dk, dv = _dkdv_inner(dk, dv, k, v, k_doc, k_blk_hi, offs_n, Q, DO, LSE, DELTA, DS, sqt, sdt, T, qk_scale,
                         block_size, tl.maximum(full_lo, full_hi), hi, HEAD_DIM, BLOCK_M, True, DOT_PREC)

    out = offs_n[:, None] * sgt + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, q_doc, q_blk_lo, offs_m, K, V, stride_kt, stride_vt, DS, T, qk_scale,
              block_size, start, end, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dQ (unscaled, BLOCK_M x D fp32) over key tiles [start, end), recomputing P."""
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            n_ok = offs_n < T
            kT = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=n_ok[None, :], other=0.0)
            vT = tl.load(V + offs_n[None, :] * stride_vt + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        else:
            kT = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None])
            vT = tl.load(V + offs_n[None, :] * stride_vt + offs_d[:, None])
        p = tl.math.exp2(tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale - lse2[:, None])
        if MASKED:
            k_doc = tl.load(DS + offs_n, mask=n_ok, other=-1)
            ok = (offs_n[None, :] <= offs_m[:, None]) & (k_doc[None, :] == q_doc[:, None])
            ok = ok & ((offs_n // block_size)[None, :] >= q_blk_lo[:, None])
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, DS, WINDOW, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
                       sdb, sdt, sdh, sgb, sgt, sgh, T, H, SCALE, block_size,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """Grid (cdiv(T, BLOCK_M), B * H). Writes dQ (strides sg*) for one query tile of one (b, h)."""
    m0 = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    b64 = b.to(tl.int64)
    Q += b64 * sqb + h * sqh
    K += b64 * skb + h * skh
    V += b64 * svb + h * svh
    DO += b64 * sdb + h * sdh
    DQ += b64 * sgb + h * sgh
    DS += b64 * T
    LSE += (b64 * H + h) * T
    DELTA += (b64 * H + h) * T
    w = tl.maximum(tl.load(WINDOW).to(tl.int32), 1)
    scale = tl.load(SCALE)
    qk_scale = scale * 1.4426950408889634

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
    q_doc = tl.load(DS + offs_m, mask=m_ok, other=-2)
    q_blk_lo = offs_m // block_size - w + 1

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(DS, m0, T, w, block_size, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, q_doc, q_blk_lo, offs_m, K, V, skt, svt, DS, T, qk_scale,
                   block_size, lo, tl.minimum(full_lo, hi), HEAD_DIM, BLOCK_N, True, DOT_PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, q_doc, q_blk_lo, offs_m, K, V, skt, svt, DS, T, qk_scale,
                   block_size, full_lo, full_hi, HEAD_DIM, BLOCK_N, False, DOT_PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, q_doc, q_blk_lo, offs_m, K, V, skt, svt, DS, T, qk_scale,
                   block_size, tl.maximum(full_lo, full_hi), hi, HEAD_DIM, BLOCK_N, True, DOT_PREC)
    tl.store(DQ + offs_m[:, None] * sgt + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None])
