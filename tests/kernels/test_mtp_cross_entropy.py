"""mtp_cross_entropy (record #89's fused lm_head + softcap + multi-token loss): every variant against
plain float64 formulas from the spec (recipe-frontier.md 2.11): the loss, and the record's gradient,
which uses the full weight sum S in the last K - 1 rows (not autograd's)."""

import pytest
import torch
from kernel_testing import DEVICE, assert_close_where_roundings_may_flip, needs_triton, on_device

import kernels
from kernels import mtp_cross_entropy as mce

VARIANTS = kernels.variants("mtp_cross_entropy")


def reference(x, w, y, weights):
    """(loss (T,), d loss_sum / d logits (T, V)) in float64, row by row."""
    x, w, y = x.detach().cpu(), w.detach().cpu(), y.cpu()
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


def inputs(T, d, V, seed, dtype=torch.float32, x_scale=1.0, w_scale=1.0):
    """(x, w, targets) on DEVICE from a seeded CPU generator; row 3's first two targets on one column."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, d, generator=g) * x_scale).to(dtype)
    w = (torch.randn(d, V, generator=g) * w_scale).to(dtype)
    y = torch.randint(0, V, (T,), generator=g)
    y[3] = y[4]
    x, w, y = on_device(x, w, y)
    return x.requires_grad_(), w.requires_grad_(), y


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("weights", [(1.0,), (1.0, 0.5), (1.0, 0.5, 0.25)])
@pytest.mark.parametrize("shape", [(13, 8, 40), (70, 16, 300)])  # the second: several row and column tiles
def test_loss_and_the_records_gradient(variant, weights, shape, monkeypatch):
    monkeypatch.setattr(mce, "ROW_CHUNK", 5)  # several row chunks
    x, w, y = inputs(*shape, seed=len(weights))
    loss = kernels.get("mtp_cross_entropy", variant)(x, w, y, weights)
    want, dz = reference(x, w, y, weights)
    assert loss.dtype == torch.float32 and (loss.double().cpu() - want).abs().max() < 1e-5
    grad_out = torch.rand(shape[0], generator=torch.Generator().manual_seed(7))
    loss.backward(grad_out.to(DEVICE))
    dz = dz * grad_out.double()[:, None]
    x64, w64 = x.detach().double().cpu(), w.detach().double().cpu()
    assert (x.grad.double().cpu() - dz @ w64.T).abs().max() < 1e-5
    assert (w.grad.double().cpu() - x64.T @ dz).abs().max() < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_as_a_device_tensor_equal_the_floats(variant):
    """The schedule's weights change every step: a device tensor is read by the kernel (no recompile)."""
    op = kernels.get("mtp_cross_entropy", variant)
    x, w, y = inputs(21, 8, 50, seed=3)
    floats = op(x, w, y, (1.0, 0.375, 0.125))
    tensor = op(x, w, y, torch.tensor([1.0, 0.375, 0.125], device=DEVICE))
    assert torch.equal(floats, tensor)


def _loss_and_grads(variant, x, w, y, weights, fp8, grad_out):
    xv, wv = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = kernels.get("mtp_cross_entropy", variant)(xv, wv, y, weights, fp8=fp8)
    loss.backward(grad_out)
    return [t.detach().double().cpu() for t in (loss, xv.grad, wv.grad)]


@needs_triton
def test_triton_bf16_within_twice_the_references_error():
    """bf16: the Triton variant keeps G in bf16 (the reference in fp32); its loss, dx and dw may err at most
    2x the reference's error against the same formula in fp32."""
    x, w, y = inputs(64, 32, 500, seed=11, dtype=torch.bfloat16, x_scale=2.0, w_scale=0.3)
    grad_out = torch.full((64,), 0.125, device=DEVICE)  # grad_scale = 1/8 on every row, as with 8 micro-steps
    ref = _loss_and_grads("torch", x, w, y, (1.0, 0.5, 0.25), False, grad_out)
    tri = _loss_and_grads("triton", x, w, y, (1.0, 0.5, 0.25), False, grad_out)
    truth = _loss_and_grads("torch", x.float(), w.float(), y, (1.0, 0.5, 0.25), False, grad_out)
    for name, r, t, want in zip(("loss", "dx", "dw"), ref, tri, truth, strict=True):
        ref_err, tri_err = (r - want).abs().max(), (t - want).abs().max()
        assert tri_err <= 2 * ref_err + 1e-6 * want.abs().max(), (name, float(tri_err), float(ref_err))


@needs_triton
def test_triton_fp8_equals_the_reference_for_a_uniform_grad_out():
    """The same FP8 logits and the same e5m2 gradient (stored in the forward as e5m2(G / (0.75/448)), which
    a uniform grad_out maps to itself): equal up to fp32 summation order (the LSE's and the matmuls'). On a
    GPU the logits come from torch._scaled_mm with fast accumulation (as the record's), which sums in its own
    order and with fewer bits, so a bf16 logit and then an e5m2 gradient entry may round the other way: the
    loss within a bf16 step, the gradients within 2^-5."""
    x, w, y = inputs(64, 32, 512, seed=13, dtype=torch.bfloat16, x_scale=2.0, w_scale=0.3)
    grad_out = torch.full((64,), 0.125, device=DEVICE)
    ref = _loss_and_grads("torch", x, w, y, (1.0, 0.5, 0.25), True, grad_out)
    tri = _loss_and_grads("triton", x, w, y, (1.0, 0.5, 0.25), True, grad_out)
    for name, r, t in zip(("loss", "dx", "dw"), ref, tri, strict=True):
        if DEVICE.type == "cuda" and name != "loss":
            assert_close_where_roundings_may_flip(t, r, 2**-5, name)
        else:
            tolerance = 2**-8 if DEVICE.type == "cuda" else 1e-5
            assert (r - t).abs().max() <= tolerance * r.abs().max(), name


@needs_triton
def test_triton_fp8_with_a_non_uniform_grad_out_within_twice_the_references_error(monkeypatch):
    """grad_out varying by row: the Triton variant requantises its stored e5m2 gradient (two roundings, the
    reference one). Yardstick: the reference with the gradient left unquantised; the Triton variant's dx and
    dw may err at most 2x the reference's distance from it."""
    x, w, y = inputs(32, 32, 128, seed=12, dtype=torch.bfloat16, x_scale=2.0, w_scale=0.3)
    grad_out = (torch.rand(32, generator=torch.Generator().manual_seed(2)) + 0.5).to(DEVICE)
    ref = _loss_and_grads("torch", x, w, y, (1.0, 0.5), True, grad_out)
    tri = _loss_and_grads("triton", x, w, y, (1.0, 0.5), True, grad_out)
    monkeypatch.setattr(mce, "to_e5m2", lambda t: t)  # the reference's backward without the e5m2 rounding
    truth = _loss_and_grads("torch", x, w, y, (1.0, 0.5), True, grad_out)
    for r, t, want in zip(ref[1:], tri[1:], truth[1:], strict=True):
        assert (t - want).abs().max() <= 2 * (r - want).abs().max()


@needs_triton
def test_triton_target_outside_the_vocabulary_poisons_its_rows_only():
    """No host sync to raise: the rows that predict the bad target (t = 5 and t = 4 with K = 2) get NaN."""
    x, w, y = inputs(9, 8, 30, seed=4)
    y[5] = 30
    loss = kernels.get("mtp_cross_entropy", "triton")(x, w, y, (1.0, 0.5))
    bad = loss.isnan().cpu()
    assert bad.tolist() == [t in (4, 5) for t in range(9)]
    loss[~bad.to(DEVICE)].sum().backward()
    assert x.grad[[4, 5]].isnan().any() and not x.grad[[0, 1, 2, 3, 6, 7, 8]].isnan().any()


@needs_triton
def test_triton_misuse_and_empty():
    op = kernels.get("mtp_cross_entropy", "triton")
    x, w, y = inputs(6, 4, 20, seed=5)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        op(x.detach().half(), w.detach().half(), y, (1.0,))
    with pytest.raises(ValueError, match="1 to 3 weights"):
        op(x, w, y, (1.0, 0.5, 0.25, 0.1))
    with pytest.raises(ValueError, match="1-D fp32"):
        op(x, w, y, torch.ones(2, dtype=torch.float64, device=DEVICE))
    empty = op(x[:0], w, y[:0], (1.0, 0.5))
    assert empty.shape == (0,) and empty.dtype == torch.float32


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
