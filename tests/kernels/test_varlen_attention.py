"""varlen_attention (record #89's document-masked sliding-window attention): every variant against a dense
float64 attention whose mask is built element by element from the spec (recipe-frontier.md 6, row 1)."""

import pytest
import torch

import kernels
from kernels.varlen_attention import varlen_attention_torch

VARIANTS = kernels.variants("varlen_attention")


def reference(q, k, v, cu, window, scale):
    """Dense float64: query t sees key j iff both lie in one segment [c_d, c_{d+1}) and t - window <= j <= t."""
    T = q.size(0)
    bounds = cu.tolist()
    segment = [next(d for d in range(len(bounds) - 1) if bounds[d] <= t < bounds[d + 1]) for t in range(T)]
    mask = torch.tensor([[segment[t] == segment[j] and t - window <= j <= t for j in range(T)] for t in range(T)])
    scores = scale * torch.einsum("thd,jhd->htj", q.double(), k.double())
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("htj,jhd->thd", p, v.double())


def case(T, H, D, cu, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, H, D, generator=g, requires_grad=True) for _ in range(3))
    return q, k, v, torch.tensor(cu, dtype=torch.int32)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("window", [0, 3, 17, 1000])
def test_forward_and_gradients_match_the_dense_reference(variant, window):
    """Documents of 1, 7, 30 and 40 tokens, empty segments (repeated boundaries, the recipe's padding),
    windows from the diagonal alone to wider than any document."""
    q, k, v, cu = case(78, 2, 8, [0, 1, 8, 8, 38, 78, 78, 78], seed=window)
    out = kernels.get("varlen_attention", variant)(q, k, v, cu, window, 0.3)
    want = reference(q, k, v, cu, window, 0.3)
    assert out.dtype == torch.float32 and (out.double() - want).abs().max() < 1e-5
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want.backward(g.double())
    for got, t in zip(grads, (q, k, v), strict=True):
        assert (got.double() - t.grad).abs().max() < 1e-5


def test_small_query_blocks_give_the_same_result():
    q, k, v, cu = case(50, 1, 4, [0, 50], seed=3)
    whole = varlen_attention_torch(q, k, v, cu, 9, 0.5)
    blocked = varlen_attention_torch(q, k, v, cu, 9, 0.5, query_block=7)
    assert torch.allclose(whole, blocked, atol=1e-6)


def test_bad_arguments():
    q, k, v, cu = case(8, 1, 4, [0, 8], seed=0)
    with pytest.raises(ValueError, match="end at T = 8"):
        varlen_attention_torch(q, k, v, torch.tensor([0, 5], dtype=torch.int32), 2, 1.0)
    with pytest.raises(ValueError, match="never decrease"):
        varlen_attention_torch(q, k, v, torch.tensor([0, 6, 4, 8], dtype=torch.int32), 2, 1.0)
    with pytest.raises(TypeError, match="int32"):
        varlen_attention_torch(q, k, v, cu.long(), 2, 1.0)
    with pytest.raises(ValueError, match="window"):
        varlen_attention_torch(q, k, v, cu, -1, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        varlen_attention_torch(q, k[:4], v, cu, 2, 1.0)
