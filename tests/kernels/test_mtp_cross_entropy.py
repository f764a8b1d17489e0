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


def test_fp8_matmuls_are_the_records():
    """fp8=True: logits = bf16(x_s w_s e4m3(x / x_s) e4m3(w / w_s)), and the backward's e5m2 gradient with
    grad_s = 0.75 / 448 x the incoming gradient (1/8 here, as with 8 micro-steps), against the spec's
    formulas with the FP8 roundings done on the formats' grids."""
    from test_fp8 import E4M3, E5M2, round_to

    def on(table, t):
        return torch.from_numpy(round_to(t.double().numpy(), table))

    g = torch.Generator().manual_seed(9)
    T, d, V = 12, 16, 64
    x = (torch.randn(T, d, generator=g) * 3).bfloat16().requires_grad_()
    w = (torch.randn(d, V, generator=g) * 0.05).bfloat16().requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)
    loss = mce.mtp_cross_entropy_torch(x, w, y, (1.0, 0.5), fp8=True)
    x8 = on(E4M3, (x.detach() / mce.X_SCALE).double())
    w8 = on(E4M3, (w.detach() / mce.W_SCALE).double())
    logits = (mce.XW_SCALE * (x8 @ w8)).to(torch.bfloat16)
    z, s = mce.softcap(logits, torch.bfloat16)
    lse = torch.logsumexp(z.double(), -1)
    want = torch.zeros(T, dtype=torch.float64)
    for k, wk in enumerate((1.0, 0.5)):
        want[:T - k] += wk * (lse[:T - k] - z.double()[torch.arange(T - k), y[k:]])
    assert (loss.double() - want).abs().max() < 1e-4
    loss.backward(torch.full((T,), 1 / 8))
    d_logits = 1.5 * torch.softmax(z.double(), -1)
    for k, wk in enumerate((1.0, 0.5)):
        d_logits[torch.arange(T - k), y[k:]] -= wk
    grad = (23 / 7.5) * s.double() * (1 - s.double()) * d_logits / 8
    grad_s = torch.tensor(mce.GRAD_SCALE) * torch.tensor(1 / 8)
    g8 = on(E5M2, (grad.float() / grad_s).double())
    want_dx = (grad_s.double() * mce.W_SCALE * (g8 @ w8.T)).to(torch.bfloat16)
    want_dw = (mce.X_SCALE * grad_s.double() * (x8.T @ g8)).to(torch.bfloat16)
    assert ((x.grad.double() - want_dx.double()).abs() <= 2**-7 * want_dx.double().abs().max()).all()
    assert ((w.grad.double() - want_dw.double()).abs() <= 2**-7 * want_dw.double().abs().max()).all()
