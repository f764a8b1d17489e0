"""mtp_cross_entropy (record #89's fused lm_head + softcap + multi-token loss): every variant against
plain float64 formulas from the spec (recipe-frontier.md 2.11): the loss, and the record's gradient,
which uses the full weight sum S in the last K - 1 rows (not autograd's)."""

import pytest
import torch

import kernels
from kernels import mtp_cross_entropy as mce

VARIANTS = kernels.variants("mtp_cross_entropy")


def reference(x, w, y, weights):
    """(loss (T,), d loss_sum / d logits (T, V)) in float64, row by row."""
    z = 23 * torch.sigmoid((x.double() @ w.double() + 5) / 7.5)
    T, V = z.shape
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    s = z / 23
    loss = torch.zeros(T, dtype=torch.float64)
    dz = torch.zeros(T, V, dtype=torch.float64)
    for t in range(T):
        dz[t] = sum(weights) * p[t]
        for k, wk in enumerate(weights):
            if t + k < T:
                loss[t] += wk * (lse[t] - z[t, y[t + k]])
                dz[t, y[t + k]] -= wk
    return loss, dz * (23 / 7.5) * s * (1 - s)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("weights", [(1.0,), (1.0, 0.5), (1.0, 0.5, 0.25)])
def test_loss_and_the_records_gradient(variant, weights, monkeypatch):
    monkeypatch.setattr(mce, "ROW_CHUNK", 5)  # several row chunks
    g = torch.Generator().manual_seed(len(weights))
    T, d, V = 13, 8, 40
    x = torch.randn(T, d, generator=g, requires_grad=True)
    w = torch.randn(d, V, generator=g, requires_grad=True)
    y = torch.randint(0, V, (T,), generator=g)
    y[3] = y[4]  # two targets of one row on the same column
    loss = kernels.get("mtp_cross_entropy", variant)(x, w, y, weights)
    want, dz = reference(x, w, y, weights)
    assert loss.dtype == torch.float32 and (loss.double() - want).abs().max() < 1e-5
    grad_out = torch.rand(T, generator=g)
    loss.backward(grad_out)
    dz = dz * grad_out.double()[:, None]
    assert (x.grad.double() - dz @ w.double().T).abs().max() < 1e-5
    assert (w.grad.double() - x.double().T @ dz).abs().max() < 1e-5


def test_one_weight_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(6, 4, generator=g), torch.randn(4, 9, generator=g)
    y = torch.randint(0, 9, (6,), generator=g)
    z = 23 * torch.sigmoid((x @ w + 5) / 7.5)
    assert torch.allclose(mce.mtp_cross_entropy_torch(x, w, y, (1.0,)),
                          torch.nn.functional.cross_entropy(z, y, reduction="none"), atol=1e-5)


def test_bad_arguments():
    x, w, y = torch.randn(4, 3), torch.randn(3, 7), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x must be \(T, d\)"):
        mce.mtp_cross_entropy_torch(x, torch.randn(4, 7), y, (1.0,))
    with pytest.raises(ValueError, match="targets"):
        mce.mtp_cross_entropy_torch(x, w, y.int(), (1.0,))
    with pytest.raises(ValueError, match="at least one"):
        mce.mtp_cross_entropy_torch(x, w, y, ())
