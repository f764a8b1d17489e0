"""The synthetic language: determinism, the shards, and the exact optimal loss checked independently.

The references here do not reuse the module's machinery: the loss is recomputed by a plain per-token
forward recursion over the whole stream as one HMM (an explicit end-of-text state), by brute-force
enumeration of hidden paths on a tiny language, and estimated by Monte Carlo from a loop-based sampler.
"""

import itertools
import math

import numpy as np
import pytest

from speedrun.data import synth
from speedrun.data.shards import list_shards, read_manifest, read_shard

SMALL = dict(train_tokens=30_000, val_tokens=8192, shard_tokens=12_000)


def full_hmm(lang):
    """The stream as one HMM: state 0 is the end-of-text state, state 1 + t*K + k is (topic t, state k)."""
    T, K, V = lang.emission.shape
    S = 1 + T * K
    move = np.zeros((S, S))
    move[0, 1:] = (lang.topic_prior[:, None] * lang.start_probs[None, :]).ravel()
    for t in range(T):
        block = slice(1 + t * K, 1 + (t + 1) * K)
        move[block, 0] = lang.end_prob
        move[block, block] = (1 - lang.end_prob) * lang.transition
    emit = np.zeros((S, V))
    emit[0, lang.eot_token] = 1.0
    emit[1:] = lang.emission.reshape(T * K, V)
    return move, emit


def reference_log_probs(lang, tokens):
    """log p(x_t | x_<t), t >= 1, by the textbook forward recursion, one token at a time."""
    move, emit = full_hmm(lang)
    belief = np.zeros(move.shape[0])
    belief[0] = 1.0  # the stream starts with end-of-text
    out = []
    for x in tokens[1:]:
        joint = (belief @ move) * emit[:, x]
        p = joint.sum()
        out.append(math.log(p))
        belief = joint / p
    return np.array(out)


def loop_sample(lang, num_tokens, rng):
    """A straightforward sampler: one document, one token at a time."""
    T, K, V = lang.emission.shape
    tokens = []
    while len(tokens) < num_tokens:
        tokens.append(lang.eot_token)
        topic = rng.choice(T, p=lang.topic_prior)
        state = rng.choice(K, p=lang.start_probs)
        while True:
            tokens.append(rng.choice(V, p=lang.emission[topic, state]))
            if rng.random() < lang.end_prob:
                break
            state = rng.choice(K, p=lang.transition[state])
    return np.array(tokens[:num_tokens])


def random_language(rng, T, K, V, end_prob):
    emission = rng.dirichlet(np.ones(V - 1), size=(T, K))
    emission = np.concatenate([emission, np.zeros((T, K, 1))], axis=2)  # eot = V - 1
    return synth.SynthLanguage(topic_prior=rng.dirichlet(np.ones(T)), start_probs=rng.dirichlet(np.ones(K)),
                               transition=rng.dirichlet(np.ones(K), size=K), emission=emission,
                               end_prob=end_prob, eot_token=V - 1)


def block_mean_se(values, blocks):
    means = np.array([b.mean() for b in np.array_split(values, blocks)])
    return means.mean(), means.std(ddof=1) / math.sqrt(blocks)


# ---------------------------------------------------------------------------------------------


def test_forward_matches_hand_computed_single_state():
    emission = np.array([[[0.5, 0.25, 0.25, 0.0]]])
    lang = synth.SynthLanguage(topic_prior=np.ones(1), start_probs=np.ones(1), transition=np.ones((1, 1)),
                               emission=emission, end_prob=0.1, eot_token=3)
    got = synth.stream_log_probs(lang, [3, 0, 1, 3, 2, 2])
    expected = np.log([0.5, 0.9 * 0.25, 0.1, 0.25, 0.9 * 0.25])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # an empty document has probability 0
    assert synth.stream_log_probs(lang, [3, 0, 3, 3, 1])[2] == -np.inf


def test_forward_matches_brute_force_enumeration():
    rng = np.random.default_rng(114)
    lang = random_language(rng, T=2, K=2, V=4, end_prob=0.3)
    tokens = [3, 0, 2, 1, 3, 1, 3, 2, 0, 0]
    content = [i for i, x in enumerate(tokens) if x != 3]
    move, emit = full_hmm(lang)

    def prefix_prob(n):  # P(x_1..x_{n-1} | x_0 = eot), summing over every hidden path
        positions = [i for i in content if i < n]
        total = 0.0
        for hidden in itertools.product(range(1, 5), repeat=len(positions)):
            path = [0] * n
            for i, h in zip(positions, hidden, strict=False):
                path[i] = h
            p = 1.0
            for i in range(1, n):
                p *= move[path[i - 1], path[i]] * emit[path[i], tokens[i]]
            total += p
        return total

    brute = [math.log(prefix_prob(n + 1) / prefix_prob(n)) for n in range(1, len(tokens))]
    np.testing.assert_allclose(synth.stream_log_probs(lang, tokens), brute, rtol=1e-10)


def test_forward_matches_reference_recursion_on_random_stream():
    rng = np.random.default_rng(115)
    lang = random_language(rng, T=3, K=4, V=9, end_prob=0.05)
    tokens = loop_sample(lang, 3000, rng)
    np.testing.assert_allclose(synth.stream_log_probs(lang, tokens), reference_log_probs(lang, tokens), rtol=1e-9)


def test_row_sampler_frequencies_and_zero_columns():
    rng = np.random.default_rng(116)
    probs = rng.dirichlet(np.ones(6), size=3)
    probs[:, [0, 3, 5]] = 0.0  # zeros first, in the middle and last
    probs /= probs.sum(axis=1, keepdims=True)
    rows = rng.integers(0, 3, size=300_000)
    cols = synth._RowSampler(probs).sample(rows, rng)
    assert probs[rows, cols].min() > 0
    for r in range(3):
        n = (rows == r).sum()
        freq = np.bincount(cols[rows == r], minlength=6) / n
        se = np.sqrt(probs[r] * (1 - probs[r]) / n)
        assert np.all(np.abs(freq - probs[r]) <= 5 * se + 1e-12), (freq, probs[r])


def chi_square_p_value(counts, probs):
    from scipy.stats import chi2

    expected = probs.ravel() * counts.sum()
    assert expected.min() > 5
    return chi2.sf(((counts.ravel() - expected) ** 2 / expected).sum(), df=expected.size - 1)


def test_sampler_matches_exact_document_statistics():
    """Documents are iid, so statistics of whole documents are multinomial: their counts in a sampled
    stream must fit the probabilities computed from the parameters (topics that persist within a
    document and are independent across documents, sticky states, the start distributions)."""
    emission = np.array([[[0.7, 0.2, 0.1, 0], [0.2, 0.6, 0.2, 0]],
                         [[0.1, 0.2, 0.7, 0], [0.2, 0.1, 0.7, 0]]])
    lang = synth.SynthLanguage(topic_prior=np.array([0.7, 0.3]), start_probs=np.array([0.6, 0.4]),
                               transition=np.array([[0.8, 0.2], [0.3, 0.7]]), emission=emission,
                               end_prob=0.25, eot_token=3)
    tokens = synth.sample_stream(lang, 300_000, np.random.default_rng(117))
    starts = np.flatnonzero(tokens == 3)
    docs = [tokens[a + 1:b] for a, b in zip(starts[:-1], starts[1:], strict=False)]  # the last one may be cut: dropped
    B = emission[:, :, :3]  # (topic, state, token)
    A = lang.transition
    first = np.einsum("t,s,tsa->a", lang.topic_prior, lang.start_probs, B)

    def pair_probs(steps):  # P(x_1 = a, x_{1+steps} = b) within a document long enough
        move = np.linalg.matrix_power(A, steps)
        return np.einsum("t,s,tsa,su,tub->ab", lang.topic_prior, lang.start_probs, B, move, B)

    for steps in (1, 3):
        counts = np.zeros((3, 3))
        for doc in docs:
            if len(doc) > steps:
                counts[doc[0], doc[steps]] += 1
        assert chi_square_p_value(counts, pair_probs(steps)) > 1e-5
    across = np.zeros((3, 3))  # first tokens of documents 2i and 2i+1: independent
    for d in range(0, len(docs) - 1, 2):
        across[docs[d][0], docs[d + 1][0]] += 1
    assert chi_square_p_value(across, np.outer(first, first)) > 1e-5
    lengths = np.array([len(doc) for doc in docs])
    assert chi_square_p_value(np.bincount(np.minimum(lengths, 8) - 1, minlength=8),
                              np.append(0.75 ** np.arange(7) * 0.25, 0.75 ** 7)) > 1e-5


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synth.generate_synth(tmp_path / "a", seed=3, **SMALL)
    b = synth.generate_synth(tmp_path / "b", seed=3, **SMALL)
    c = synth.generate_synth(tmp_path / "c", seed=4, **SMALL)
    assert a == b
    names = sorted(a["files"])
    assert names == ["synth_train_000001.bin", "synth_train_000002.bin", "synth_train_000003.bin",
                     "synth_val_000000.bin"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert a["val_optimal_loss"] != c["val_optimal_loss"]


def test_shards_verify_and_documents_start_with_eot(tmp_path):
    manifest = synth.generate_synth(tmp_path, seed=1, **SMALL)
    assert manifest["kind"] == "synth" and manifest["vocab_size"] == 2048 and manifest["eot_token"] == 2047
    val = list_shards(tmp_path, "val")
    train = list_shards(tmp_path, "train")
    assert [p.name for p in val] == ["synth_val_000000.bin"] and len(train) == 3
    sizes = {p.name: read_shard(p, check_tokens=True, vocab_size=2048).size for p in val + train}
    assert sizes == {"synth_val_000000.bin": 8193, "synth_train_000001.bin": 12_000,
                     "synth_train_000002.bin": 12_000, "synth_train_000003.bin": 6_000}
    assert {n: e["tokens"] for n, e in manifest["files"].items()} == sizes
    lengths = []
    for p in val + train:
        tokens = read_shard(p).astype(np.int64)
        assert tokens[0] == 2047  # every shard starts a document
        starts = np.flatnonzero(tokens == 2047)
        assert np.all(np.diff(starts) > 1)  # no empty documents
        lengths.append(np.diff(starts))  # whole documents, eot included
    lengths = np.concatenate(lengths)
    # a document is eot + Geometric(end_prob) content tokens
    mean, se = lengths.mean(), lengths.std() / math.sqrt(lengths.size)
    assert abs(mean - (1 + 1 / synth.END_PROB)) < 5 * se


def test_optimal_loss_is_exact_on_the_val_shard(tmp_path):
    manifest = synth.generate_synth(tmp_path, seed=2, train_tokens=1000, val_tokens=4096)
    val = read_shard(tmp_path / "synth_val_000000.bin").astype(np.int64)
    assert val.size == 4097
    ref = reference_log_probs(synth.make_language(2), val)
    assert manifest["val_optimal_loss"] == pytest.approx(-ref.mean(), rel=1e-10)
    assert manifest["val_optimal_loss_prefix"]["4096"] == manifest["val_optimal_loss"]
    counts = np.bincount(val[1:])
    freq = counts[counts > 0] / 4096
    assert manifest["val_unigram_loss"] == pytest.approx(-(freq * np.log(freq)).sum(), rel=1e-12)


def test_optimal_loss_agrees_with_monte_carlo_and_is_far_below_unigram(tmp_path):
    """The generator samples the distribution the optimal loss assumes: a fresh loop-sampled stream's
    reference loss agrees with val_optimal_loss within a few standard errors."""
    rng = np.random.default_rng(118)
    seed = int(rng.integers(1000))
    manifest = synth.generate_synth(tmp_path, seed=seed, train_tokens=1000, val_tokens=131_072)
    val = read_shard(tmp_path / "synth_val_000000.bin").astype(np.int64)
    val_losses = -synth.stream_log_probs(synth.make_language(seed), val)
    val_mean, val_se = block_mean_se(val_losses, 32)
    assert val_mean == pytest.approx(manifest["val_optimal_loss"], rel=1e-12)

    lang = synth.make_language(seed)
    # One stream, like the val shard (which also starts with a document), scored in contiguous blocks.
    mc_mean, mc_se = block_mean_se(-reference_log_probs(lang, loop_sample(lang, 20_000, rng)), 16)
    tolerance = 5 * math.hypot(val_se, mc_se)  # block standard errors are rough: leave room
    assert abs(mc_mean - val_mean) < tolerance, (mc_mean, val_mean, tolerance)

    # The check has power: a source whose states are less sticky (same moves otherwise), scored by the
    # same predictor, is far off.
    moves = lang.transition * (1 - np.eye(len(lang.transition)))
    loose_transition = 0.3 * np.eye(len(moves)) + 0.7 * moves / moves.sum(axis=1, keepdims=True)
    loose = synth.SynthLanguage(lang.topic_prior, lang.start_probs, loose_transition,
                                lang.emission, lang.end_prob, lang.eot_token)
    off = -reference_log_probs(lang, loop_sample(loose, 4000, rng)).mean()
    assert off - val_mean > 2 * tolerance, (off, val_mean, tolerance)
    print(f"val {val_mean:.4f} +- {val_se:.4f}, monte carlo {mc_mean:.4f} +- {mc_se:.4f}, looser source {off:.4f}")

    # Context matters: the floor is far below the best context-free loss.
    assert manifest["val_optimal_loss"] < manifest["val_unigram_loss"] - 1.0


def test_ensure_synth_reuses_and_regenerates(tmp_path, monkeypatch):
    calls = []
    real_generate = synth.generate_synth
    monkeypatch.setattr(synth, "generate_synth", lambda *a, **k: calls.append(a) or real_generate(*a, **k))
    out = tmp_path / "synth"
    assert synth.ensure_synth(out, seed=5, **SMALL) == out and len(calls) == 1
    first = read_manifest(out)
    synth.ensure_synth(out, seed=5, **SMALL)
    assert len(calls) == 1  # complete: reused
    (out / "synth_train_000002.bin").write_bytes(b"broken")
    synth.ensure_synth(out, seed=5, **SMALL)
    assert len(calls) == 2 and read_manifest(out) == first  # a damaged shard: regenerated, identically
    synth.ensure_synth(out, seed=5, train_tokens=10_000, val_tokens=8192, shard_tokens=12_000)
    assert len(calls) == 3  # other parameters: regenerated, and the stale shards are gone
    assert [p.name for p in sorted(out.glob("*.bin"))] == ["synth_train_000001.bin", "synth_val_000000.bin"]


def test_misuse_errors(tmp_path):
    with pytest.raises(ValueError, match="train_tokens"):
        synth.generate_synth(tmp_path, train_tokens=0)
    with pytest.raises(TypeError, match="seed"):
        synth.generate_synth(tmp_path, seed="0")
    (tmp_path / "fineweb_val_000000.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="other shards"):
        synth.ensure_synth(tmp_path, seed=0, **SMALL)
    with pytest.raises(ValueError, match="eot"):
        synth.stream_log_probs(synth.make_language(0), [5, 2047, 3])


def test_synth_command_prints_losses(tmp_path, capsys):
    assert synth.synth_command(str(tmp_path), seed=0, train_tokens=2000, val_tokens=1024) == 0
    out = capsys.readouterr().out
    manifest = read_manifest(tmp_path)
    assert f"{manifest['val_optimal_loss']:.4f}" in out and f"{manifest['val_unigram_loss']:.4f}" in out
