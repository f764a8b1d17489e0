"""Tests of speedrun/model.py against the spec (docs/../recipe-sub3min.md section 2), with references
written here independently of the model code."""

from __future__ import annotations

import cmath
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from speedrun.config import ModelConfig, get_preset
from speedrun.model import (
    GPT,
    FP8Linear,
    apply_rotary,
    flops_per_token,
    fp8_grad_scale,
    mean_attended_keys,
    rotary_cos_sin,
    rotary_frequencies,
    value_embed_layers,
)

OPS = kernels.resolve("torch")

# A small recipe model that still exercises everything: a padded vocabulary, an odd no-attention
# layer, two value-embedding tables, a 3+3 U-net, rotary with frozen pairs, 16-token blocks.
SMALL = ModelConfig(
    vocab_size=64, padded_vocab_size=128, eot_token=63, n_layer=6, dim=32, n_head=2, head_dim=16,
    mlp_hidden=128, rope_rotating_pairs=4, attn_block_size=16, no_attention_layers=(3,),
    n_value_embeds=2, window_pattern="LSLSSL",
)
SMALL_BASELINE = dataclasses.replace(SMALL, arch="nanogpt", max_seq_len=128)


def make_tokens(cfg: ModelConfig, shape, seed: int, eot_every: int = 37) -> torch.Tensor:
    """Random non-EOT tokens with an EOT every ``eot_every`` positions (several documents per row)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.eot_token, shape, generator=g)
    tokens[..., 5::eot_every] = cfg.eot_token
    return tokens


def randomize(model: GPT, seed: int) -> None:
    """Give every parameter a random non-trivial value, so zero-initialised paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.size(-1)))


def small_model(cfg: ModelConfig = SMALL, seed: int = 0, dtype=torch.float32) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg, OPS, dtype)


# ---------------------------------------------------------------------------------------------
# Parameter count of the real preset
# ---------------------------------------------------------------------------------------------


def test_sub3min_parameter_count_on_meta_device():
    cfg = get_preset("sub3min").model
    with torch.device("meta"):
        model = GPT(cfg, OPS)
    d, V, Vp, L = cfg.dim, cfg.vocab_size, cfg.padded_vocab_size, cfg.n_layer
    n_attn = L - len(cfg.no_attention_layers)
    expected = {
        "token embedding": V * d,
        "value embeddings": cfg.n_value_embeds * V * d,
        "lm_head": Vp * d,
        "attention": n_attn * 4 * d * d,  # q, k, v, o
        "mlp": L * 2 * d * cfg.mlp_hidden,
        "scalars": L * 2 + n_attn * 2 + L // 2,  # x0 lambdas, value lambdas, U-net skip weights
    }
    got = dict.fromkeys(expected, 0)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            got["scalars"] += p.numel()
        elif name.startswith("embed."):
            got["token embedding"] += p.numel()
        elif name.startswith("value_embeds."):
            got["value embeddings"] += p.numel()
        elif name == "lm_head_weight":
            got["lm_head"] += p.numel()
        elif ".attn." in name:
            got["attention"] += p.numel()
        elif ".mlp." in name:
            got["mlp"] += p.numel()
        else:
            raise AssertionError(f"unexpected parameter {name}")
    assert got == expected
    # The spec's rounded figures (section 2).
    assert [round(expected[k] / 1e5) / 10 for k in ("token embedding", "value embeddings", "lm_head",
                                                   "attention", "mlp")] == [38.6, 115.8, 38.6, 26.0, 56.6]
    assert expected["scalars"] == 52
    assert model.num_params() == sum(expected.values()) == 275_598_388
    assert model.blocks[7].attn is None and all(b.attn is not None for i, b in enumerate(model.blocks) if i != 7)


def test_storage_dtypes_bf16_activations():
    model = small_model(dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        is_table = name.startswith("embed.") or name.startswith("value_embeds.")
        assert p.dtype == (torch.bfloat16 if is_table else torch.float32), name
    tokens = make_tokens(SMALL, (2, 48), seed=1)
    loss = model(tokens, tokens.roll(-1, dims=1).long())
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# The real preset at a reduced sequence length
# ---------------------------------------------------------------------------------------------


def test_sub3min_forward_backward_reduced_seq_len():
    """lm_head is zero-initialised, so every logit starts at cap * sigmoid(0) = 15: the softmax over the
    50304 (padded) classes is uniform and the loss is exactly ln(50304). Then, with every weight made
    non-zero, one backward must reach every parameter -- except lambda_1 of the attention layers that
    have no value embedding, which multiplies nothing."""
    cfg = get_preset("sub3min").model
    torch.manual_seed(0)
    model = GPT(cfg, OPS, torch.float32)
    tokens = make_tokens(cfg, (1, 256), seed=2, eot_every=97)
    targets = make_tokens(cfg, (1, 256), seed=3).long()
    with torch.no_grad():
        loss = model(tokens, targets, window=(2, 1))
    assert loss.item() == pytest.approx(math.log(cfg.padded_vocab_size), abs=1e-5)

    with torch.no_grad():
        for p in (model.lm_head_weight, *(b.mlp.proj_w for b in model.blocks),
                  *(b.attn.out_w for b in model.blocks if b.attn is not None)):
            p.normal_(0, 0.02)
    loss = model(tokens, targets, window=(2, 1))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() != pytest.approx(math.log(cfg.padded_vocab_size), abs=1e-3)
    uses_ve = value_embed_layers(cfg)
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if name.endswith("attn.lambdas") and uses_ve[layer] is None:
            assert p.grad[1] == 0 and p.grad[0] != 0, name
        else:
            assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def test_zero_init_outputs_and_gradients():
    model = small_model()
    tokens = make_tokens(SMALL, (2, 64), seed=4)
    sublayer_outputs = []
    for block in model.blocks:
        for module in (block.attn, block.mlp):
            if module is not None:
                module.register_forward_hook(lambda m, args, out: sublayer_outputs.append(out))
    logits = model(tokens)
    assert logits.shape == (2, 64, SMALL.padded_vocab_size) and logits.dtype == torch.float32
    assert torch.equal(logits, torch.full_like(logits, SMALL.logit_cap / 2))
    assert len(sublayer_outputs) == 11 and all(torch.equal(o, torch.zeros_like(o)) for o in sublayer_outputs)
    loss = model(tokens, make_tokens(SMALL, (2, 64), seed=5).long())
    assert loss.item() == pytest.approx(math.log(SMALL.padded_vocab_size), abs=1e-6)
    loss.backward()
    # dL/dx = dL/dz @ W_head = 0, so only lm_head learns on the first step.
    for name, p in model.named_parameters():
        assert (p.grad.abs().sum() > 0) == (name == "lm_head_weight"), name


def test_initial_values_follow_the_spec():
    cfg = get_preset("sub3min").model
    small = dataclasses.replace(SMALL, dim=768, n_head=6, head_dim=128, mlp_hidden=3072, n_layer=2,
                                window_pattern="LS", no_attention_layers=(), n_value_embeds=1)
    model = small_model(small)
    bound = math.sqrt(3) * 0.5 / math.sqrt(768)
    assert bound == pytest.approx(1 / 32)
    for block in model.blocks:
        for w in (block.attn.qkv_w, block.mlp.fc_w):
            assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # uniform's std
        assert block.attn.qkv_w.shape == (3, 768, 768)
        assert torch.equal(block.lambdas, torch.tensor([1.0, 0.0]))
        assert torch.equal(block.attn.lambdas, torch.tensor([0.5, 0.5]))
        assert not block.attn.out_w.any() and not block.mlp.proj_w.any()
    assert torch.equal(model.skip_weights, torch.ones(1))
    assert model.embed.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert value_embed_layers(cfg) == [0, 1, 2, None, None, None, None, None, None, 0, 1, 2]
    assert value_embed_layers(get_preset("sub3min-tiny").model) == [0, None, None, 0]


# ---------------------------------------------------------------------------------------------
# Rotary
# ---------------------------------------------------------------------------------------------


def reference_rotary(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Pair (x_i, x_{i+D/2}) as the complex number x_i + j x_{i+D/2} and multiply by exp(-j p w_i)."""
    T, half = x.shape[1], cfg.head_dim // 2
    P = cfg.rope_rotating_pairs
    freqs = [cfg.rope_min_freq ** (i / (P - 1)) if i < P else 0.0 for i in range(half)]
    out = torch.empty_like(x, dtype=torch.float64)
    xd = x.double()
    for p in range(T):
        for i in range(half):
            z = torch.complex(xd[:, p, :, i], xd[:, p, :, i + half]) * cmath.exp(-1j * p * freqs[i])
            out[:, p, :, i], out[:, p, :, i + half] = z.real, z.imag
    return out


def test_rotary_frequencies_of_the_recipe():
    freqs = rotary_frequencies(get_preset("sub3min").model)
    assert freqs.shape == (64,)
    assert freqs[0] == 1.0 and freqs[31].item() == pytest.approx(1 / 1024, rel=1e-6)
    assert freqs[5].item() == pytest.approx(1024 ** (-5 / 31), rel=1e-6)
    assert not freqs[32:].any() and (freqs[:31] > freqs[1:32]).all()


def test_rotary_matches_independent_complex_implementation():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 40, 3, SMALL.head_dim, generator=g)
    cos, sin = rotary_cos_sin(SMALL, 40)
    y = apply_rotary(x, cos, sin)
    assert y.dtype == x.dtype
    torch.testing.assert_close(y.double(), reference_rotary(x, SMALL), atol=2e-5, rtol=1e-5)
    # The frozen half passes through untouched.
    frozen = list(range(SMALL.rope_rotating_pairs, SMALL.head_dim // 2))
    frozen += [i + SMALL.head_dim // 2 for i in frozen]
    assert torch.equal(y[..., frozen], x[..., frozen])


def test_rotary_scores_depend_only_on_relative_position():
    cfg = get_preset("sub3min").model
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, 1, 1, 128, generator=g), torch.randn(1, 1, 1, 128, generator=g)
    cos, sin = rotary_cos_sin(cfg, 600)

    def score(m, n):
        qm = apply_rotary(q, cos[m:m + 1], sin[m:m + 1])
        kn = apply_rotary(k, cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum().item()

    assert score(10, 3) == pytest.approx(score(507, 500), abs=1e-3)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Wiring: block, U-net, value embeddings, masking
# ---------------------------------------------------------------------------------------------


def reference_block(cfg, block, x, x0, value_embed, doc_ids, window_blocks):
    """The spec's block for one sequence (T, dim), in float64, with loops for the mask."""
    def rms(t):
        return t / t.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt()

    T, H, D, bs = x.shape[0], cfg.n_head, cfg.head_dim, cfg.attn_block_size
    a, b = block.lambdas.double()
    x = a * x + b * x0
    attn = block.attn
    h = rms(x)
    W = attn.qkv_w.double()
    q, k, v = ((h @ W[i].T).view(T, H, D) for i in range(3))
    l0, l1 = attn.lambdas.double()
    v = l0 * v + (l1 * value_embed.view(T, H, D) if value_embed is not None else 0)
    q, k = reference_rotary(rms(q)[None].float(), cfg)[0], reference_rotary(rms(k)[None].float(), cfg)[0]
    w = max(window_blocks, 1)
    allowed = torch.tensor([[j <= i and doc_ids[i] == doc_ids[j] and j // bs >= i // bs - w + 1
                             for j in range(T)] for i in range(T)])
    scores = torch.einsum("qhd,khd->hqk", q, k) * cfg.attn_scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    y = torch.einsum("hqk,khd->qhd", probs, v).reshape(T, cfg.dim)
    x = x + y @ attn.out_w.double().T
    h = rms(x)
    return x + F.relu(h @ block.mlp.fc_w.double().T).square() @ block.mlp.proj_w.double().T


def test_block_matches_spec_reference():
    model = small_model()
    randomize(model, seed=8)
    T = 80
    tokens = make_tokens(SMALL, (1, T), seed=9, eot_every=29)
    doc_ids = torch.cumsum(tokens == SMALL.eot_token, dim=1, dtype=torch.int32)
    g = torch.Generator().manual_seed(10)
    x, x0, ve = (torch.randn(1, T, SMALL.dim, generator=g) for _ in range(3))
    cos, sin = rotary_cos_sin(SMALL, T)
    for window_blocks in (0, 2, 5):
        got = model.blocks[1](x, x0, ve, doc_ids, window_blocks, cos, sin)[0]
        want = reference_block(SMALL, model.blocks[1], x[0].double(), x0[0].double(), ve[0].double(),
                               doc_ids[0].tolist(), window_blocks)
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_unet_skips_connect_encoder_to_decoder_in_reverse():
    model = small_model()
    randomize(model, seed=11)
    inputs, outputs = [], []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: inputs.append((args[0], args[1])))
        block.register_forward_hook(lambda m, args, out: outputs.append(out))
    tokens = make_tokens(SMALL, (2, 64), seed=12)
    model(tokens, window=(3, 1))
    x0 = F.rms_norm(model.embed(tokens), (SMALL.dim,))
    torch.testing.assert_close(inputs[0][0], x0)
    for i in range(6):
        assert inputs[i][1] is inputs[0][0]  # every block mixes in the same x0
    s = model.skip_weights
    for i in (1, 2):  # encoder: plain chaining
        assert torch.equal(inputs[i][0], outputs[i - 1])
    for j, i in enumerate((3, 4, 5)):  # decoder: layer 3 + j gets s_j * output of layer 2 - j
        torch.testing.assert_close(inputs[i][0], outputs[i - 1] + s[j] * outputs[2 - j], atol=0, rtol=0)


def test_value_embeddings_reused_by_the_last_layers():
    assert value_embed_layers(SMALL) == [0, 1, None, None, 0, 1]
    tokens = make_tokens(SMALL, (2, 48), seed=13)
    targets = make_tokens(SMALL, (2, 48), seed=14).long()

    def value_embed_grads(silenced_layers):
        model = small_model()
        randomize(model, seed=15)
        with torch.no_grad():
            for i in silenced_layers:
                model.blocks[i].attn.lambdas[1] = 0.0
        model(tokens, targets, window=(2, 1)).backward()
        return [t.weight.grad.abs().sum().item() for t in model.value_embeds]

    assert all(g > 0 for g in value_embed_grads([]))
    assert value_embed_grads([0])[0] > 0  # still used by layer 4
    assert value_embed_grads([4])[0] > 0  # still used by layer 0
    ve0, ve1 = value_embed_grads([0, 4])
    assert ve0 == 0 and ve1 > 0


@pytest.mark.parametrize("cfg", [SMALL, SMALL_BASELINE], ids=["recipe", "nanogpt"])
def test_causal_and_document_masked(cfg):
    model = small_model(cfg)
    randomize(model, seed=16)
    tokens = make_tokens(cfg, (1, 96), seed=17, eot_every=200)  # one EOT, at position 5
    tokens[0, 60] = cfg.eot_token  # a second document starts at 60
    base = model(tokens, window=(4, 2))
    changed = tokens.clone()
    changed[0, 30] = (tokens[0, 30] + 1) % cfg.eot_token
    out = model(changed, window=(4, 2))
    assert torch.equal(out[0, :30], base[0, :30])  # causal
    assert not torch.allclose(out[0, 30:60], base[0, 30:60])  # same document: affected
    assert torch.equal(out[0, 60:], base[0, 60:])  # next document: untouched


def test_window_limits_what_a_token_sees():
    model = small_model()
    randomize(model, seed=18)
    tokens = make_tokens(SMALL, (1, 96), seed=19, eot_every=500)  # one document from position 5 on
    changed = tokens.clone()
    changed[0, 10] = (tokens[0, 10] + 1) % SMALL.eot_token  # block 0
    # With window 1 every token sees only its own block, so a change in block 0 stays in block 0;
    # with window 2 block 1 sees block 0.
    out1, base1 = model(changed, window=(1, 1)), model(tokens, window=(1, 1))
    assert torch.equal(out1[0, 16:], base1[0, 16:])
    out2, base2 = model(changed, window=(2, 2)), model(tokens, window=(2, 2))
    assert not torch.allclose(out2[0, 16:32], base2[0, 16:32])


def test_window_as_tensor_equals_window_as_int():
    model = small_model()
    randomize(model, seed=20)
    tokens = make_tokens(SMALL, (2, 64), seed=21)
    targets = make_tokens(SMALL, (2, 64), seed=22).long()
    as_int = model(tokens, targets, window=(3, 1))
    as_tensor = model(tokens, targets, window=(torch.tensor(3, dtype=torch.int32), torch.tensor(1, dtype=torch.int32)))
    assert torch.equal(as_int, as_tensor)
    one_dim = model(tokens[0], targets[0], window=(3, 1))
    torch.testing.assert_close(one_dim, model(tokens[:1], targets[:1], window=(3, 1)))


# ---------------------------------------------------------------------------------------------
# Baseline arch
# ---------------------------------------------------------------------------------------------


def test_nanogpt_arch_runs():
    cfg = get_preset("tiny-adamw").model
    model = small_model(cfg)
    assert model.lm_head_weight is model.embed.weight  # tied
    assert model.pos_embed.weight.shape == (cfg.max_seq_len, cfg.dim)
    tokens = make_tokens(cfg, (2, 128), seed=23)
    targets = make_tokens(cfg, (2, 128), seed=24).long()
    loss = model(tokens, targets)
    # Small GPT-2 init: logits near 0, loss near ln(V).
    assert loss.item() == pytest.approx(math.log(cfg.padded_vocab_size), abs=0.1)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    proj = model.blocks[0].mlp_proj.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.05)
    reference = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, reference)  # no softcap in the baseline
    with pytest.raises(ValueError, match="position table"):
        model(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Misuse
# ---------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    model = small_model()
    tokens = make_tokens(SMALL, (2, 32), seed=25)
    with pytest.raises(TypeError, match="inputs"):
        model(tokens.float())
    with pytest.raises(TypeError, match="targets"):
        model(tokens, tokens.int())
    with pytest.raises(ValueError, match="targets shape"):
        model(tokens, tokens[:, :16].long())
    with pytest.raises(TypeError, match="window"):
        model(tokens, window=3)
    with pytest.raises(TypeError, match="window"):
        model(tokens, window=(2.0, 1))
    with pytest.raises(ValueError, match="dtype"):
        GPT(SMALL, OPS, torch.float16)
    with pytest.raises(ValueError, match="cross_entropy"):
        GPT(SMALL, {k: v for k, v in OPS.items() if k != "cross_entropy"})
    with pytest.raises(TypeError, match="cfg"):
        GPT(get_preset("sub3min-tiny"), OPS)
    with pytest.raises(ValueError, match="n_value_embeds"):
        GPT(dataclasses.replace(SMALL, n_value_embeds=4), OPS, torch.float32)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len,window,block", [(96, 2, 16), (100, 3, 16), (64, 1, 16), (50, 9, 8)])
def test_mean_attended_keys_matches_the_mask(seq_len, window, block):
    from kernels.attention import attention_mask

    doc_ids = torch.zeros(1, seq_len, dtype=torch.int32)
    area = attention_mask(doc_ids, window, block).sum().item()
    assert mean_attended_keys(seq_len, window, block) == pytest.approx(area / seq_len)


def test_flops_per_token():
    cfg = get_preset("sub3min").model
    d, T = cfg.dim, 65536
    matmul = cfg.padded_vocab_size * d + 11 * 4 * d * d + 12 * 2 * d * cfg.mlp_hidden
    full = 6 * matmul + 11 * 12 * d * (T + 1) / 2
    assert flops_per_token(cfg, T) == pytest.approx(full)
    assert flops_per_token(get_preset("sub3min"), T) == pytest.approx(full)  # RunConfig accepted
    # Window of w = 14 blocks: long layers 0, 4, 11 (7 is attention-free), short (7 blocks) the other 8.
    # A token at offset r of its block sees (w-1)*128 + r + 1 keys, except in the first w-1 blocks,
    # which lose (w-1)w/2 blocks of 128x128 pairs in total.
    def keys(w):
        return (w - 1) * 128 + 64.5 - (w - 1) * w / 2 * 128 * 128 / T

    windowed = 6 * matmul + 12 * d * (3 * keys(14) + 8 * keys(7))
    assert flops_per_token(cfg, T, window_tokens=1792) == pytest.approx(windowed, rel=1e-12)
    base = get_preset("tiny-adamw").model
    base_matmul = base.padded_vocab_size * base.dim + base.n_layer * (4 * base.dim**2 + 2 * base.dim * base.mlp_hidden)
    assert flops_per_token(base, 1024) == pytest.approx(6 * base_matmul + base.n_layer * 12 * base.dim * 1025 / 2)
    with pytest.raises(ValueError, match="window_tokens"):
        flops_per_token(cfg, T, window_tokens=0)


# ---------------------------------------------------------------------------------------------
# FP8 lm_head
# ---------------------------------------------------------------------------------------------


def check_fp8_linear(device):
    """FP8Linear vs an fp32 matmul: forward, dx and dW within e4m3/e5m2 precision (2-3 mantissa bits)."""
    n_tokens = 256
    g = torch.Generator(device=device).manual_seed(26)
    x = F.rms_norm(torch.randn(n_tokens, 128, generator=g, device=device), (128,)).bfloat16().requires_grad_()
    w = (torch.randn(512, 128, generator=g, device=device) * 0.05).requires_grad_()
    out = FP8Linear.apply(x, w, fp8_grad_scale(n_tokens))
    # Realistic logit gradients: those of a mean cross-entropy over the n_tokens rows.
    targets = torch.randint(0, 512, (n_tokens,), generator=g, device=device)
    z = out.detach().float().requires_grad_()
    F.cross_entropy(z, targets).backward()
    grad = z.grad.bfloat16()
    out.backward(grad)
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    xf, wf, gf = x.detach().float(), w.detach(), grad.float()

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert rel(out, xf @ wf.T) < 0.1
    assert rel(x.grad, gf @ wf) < 0.1
    assert rel(w.grad, gf.T @ xf) < 0.1


def test_fp8_grad_scale():
    assert fp8_grad_scale(65536) == 2.0**29  # the recipe's value at its micro-batch
    assert fp8_grad_scale(65536 * 8) == 2.0**32 and fp8_grad_scale(256) == 2.0**21
    assert fp8_grad_scale(300) == 2.0**21  # the power of two at or below


def test_fp8_linear_on_cpu():
    zeros = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(zeros, zeros.T, scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        pytest.skip("this PyTorch build has no CPU torch._scaled_mm")
    check_fp8_linear("cpu")


def test_fp8_head_is_off_on_cpu_and_in_eval():
    model = small_model(dtype=torch.bfloat16)
    with torch.no_grad():
        model.lm_head_weight.normal_()
    x = torch.randn(1, 32, SMALL.dim).bfloat16()
    torch.testing.assert_close(model._lm_head(x), F.linear(x, model.lm_head_weight.bfloat16()), atol=0, rtol=0)


@pytest.mark.gpu
def test_fp8_lm_head_on_gpu():
    from kernels.common import supports_fp8

    if not supports_fp8():
        pytest.skip("GPU without FP8 support")
    check_fp8_linear("cuda")
    # Through the model: the training (FP8) loss and head gradient vs the eval-path bf16 matmul.
    cfg = dataclasses.replace(get_preset("sub3min-tiny").model, fp8_lm_head=True)
    torch.manual_seed(27)
    model = GPT(cfg, OPS, torch.bfloat16).cuda()
    with torch.no_grad():
        model.lm_head_weight.normal_(0, 0.05)
    tokens = make_tokens(cfg, (2, 128), seed=28).cuda()
    targets = make_tokens(cfg, (2, 128), seed=29).long().cuda()
    grads = {}
    for training in (True, False):
        model.train(training)
        model.zero_grad()
        loss = model(tokens, targets, window=(2, 1))
        loss.backward()
        grads[training] = (loss.item(), model.lm_head_weight.grad.clone())
    assert grads[True][0] == pytest.approx(grads[False][0], rel=0.02)
    g8, g16 = grads[True][1], grads[False][1]
    assert ((g8 - g16).norm() / g16.norm()).item() < 0.1
