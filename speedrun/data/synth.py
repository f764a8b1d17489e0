"""The synthetic language of the CPU track: a hidden-Markov source with an exactly known optimal loss.

The token stream is one hidden Markov model over a vocabulary of 2048 ids, where id 2047 is the
end-of-text token that starts every document (the tiny model's vocabulary, see ``config.sub3min_tiny``):

    document   eot, then n >= 1 content tokens; after every content token the document ends with
               probability ``end_prob`` (the same in every state), and the next one starts with eot
    topic      drawn once per document from ``topic_prior``; it never changes inside the document
    state      the first content token's state is drawn from ``start_probs``; afterwards the state
               follows ``transition`` (sticky: it mostly stays, else moves to one of a few successors)
    token      drawn from ``emission[topic, state]``: a mixture of the state's own words (a sparse,
               skewed distribution over a random subset of the content ids, overlapping other states')
               and the topic's words

A content id belongs to several states and most belong to some topic too, so one token says little:
a good predictor infers the state from the last few tokens and the topic from the whole document so
far, i.e. it needs context. Because the eot token reveals the hidden state (it resets everything),
documents are independent, and the exact Bayes-optimal loss p(token_t | all earlier tokens) is computed
by the forward algorithm, vectorised over documents (``stream_log_probs``).

``speedrun data synth`` writes ``synth_val_000000.bin``, ``synth_train_000001.bin``, ... and a manifest
holding the generator's parameters and ``val_optimal_loss``, the mean of -log p over the val targets
(tokens 1..val_tokens of the val shard), next to ``val_unigram_loss``, the entropy of those targets'
own unigram distribution (the best loss without any context).
"""

from __future__ import annotations

import fcntl
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speedrun.data.shards import (
    MANIFEST_NAME,
    ShardError,
    list_shards,
    manifest_entry,
    read_header,
    read_manifest,
    read_shard,
    write_manifest,
    write_shard,
)
from speedrun.errors import UserError

GENERATOR_NAME = "hmm-topics"
GENERATOR_VERSION = 2  # bump whenever the language or the sampling changes: ensure_synth then regenerates
VOCAB_SIZE = 2048
EOT_TOKEN = 2047
NUM_STATES = 32
NUM_TOPICS = 8
STATE_WORDS = 48  # content ids a state can emit (few: a small model learns the tables in a few hundred steps)
TOPIC_WORDS = 64  # content ids a topic adds
TOPIC_WEIGHT = 0.3  # share of a token's probability that comes from the topic's words
STAY_PROB = 0.9  # a state's chance of emitting the next token too
NUM_SUCCESSORS = 3  # states a state can move to
END_PROB = 1 / 400  # mean document: 400 content tokens
DEFAULT_TRAIN_TOKENS = 20_000_000
DEFAULT_VAL_TOKENS = 1_048_576
DEFAULT_SHARD_TOKENS = 10_000_000


@dataclass(frozen=True)
class SynthLanguage:
    """The parameters of the source. Any sizes work (the tests use tiny ones); tokens are 0..V-1."""

    topic_prior: np.ndarray  # (T,) probability of each document topic
    start_probs: np.ndarray  # (K,) state of a document's first content token
    transition: np.ndarray  # (K, K) next state given the current one, when the document goes on
    emission: np.ndarray  # (T, K, V) token given (topic, state); zero in the eot column
    end_prob: float  # after each content token the document ends with this probability
    eot_token: int

    def __post_init__(self):
        T, K, V = self.emission.shape
        if self.topic_prior.shape != (T,) or self.start_probs.shape != (K,) or self.transition.shape != (K, K):
            raise ValueError(f"inconsistent shapes: topic_prior {self.topic_prior.shape}, start_probs "
                             f"{self.start_probs.shape}, transition {self.transition.shape}, emission {(T, K, V)}")
        for name in ("topic_prior", "start_probs", "transition", "emission"):
            rows = getattr(self, name)
            if (rows < 0).any() or not np.allclose(rows.sum(-1), 1.0, atol=1e-9):
                raise ValueError(f"{name} must hold probability distributions along its last axis")
        if not 0 <= self.eot_token < V:
            raise ValueError(f"eot_token must be in [0, {V}), got {self.eot_token}")
        if (self.emission[..., self.eot_token] != 0).any():
            raise ValueError("emission must give the eot token probability 0 (only a document start emits it)")
        if not 0 < self.end_prob < 1:
            raise ValueError(f"end_prob must be in (0, 1), got {self.end_prob}")

    @property
    def vocab_size(self) -> int:
        return self.emission.shape[2]


def _skewed_weights(n: int, rng: np.random.Generator) -> np.ndarray:
    """n Zipf-like weights (1/(rank+2)) in random order, summing to 1."""
    weights = 1.0 / (np.arange(n) + 2.0)
    return rng.permutation(weights / weights.sum())


def make_language(seed: int) -> SynthLanguage:
    """The default language of ``seed`` (version ``GENERATOR_VERSION``)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    content_ids = VOCAB_SIZE - 1  # 0..2046; 2047 is eot
    state_words = np.zeros((NUM_STATES, VOCAB_SIZE))
    for k in range(NUM_STATES):
        words = rng.choice(content_ids, size=STATE_WORDS, replace=False)
        state_words[k, words] = _skewed_weights(STATE_WORDS, rng)
    topic_words = np.zeros((NUM_TOPICS, VOCAB_SIZE))
    for t in range(NUM_TOPICS):
        words = rng.choice(content_ids, size=TOPIC_WORDS, replace=False)
        topic_words[t, words] = _skewed_weights(TOPIC_WORDS, rng)
    emission = (1 - TOPIC_WEIGHT) * state_words[None, :, :] + TOPIC_WEIGHT * topic_words[:, None, :]
    transition = np.zeros((NUM_STATES, NUM_STATES))
    for k in range(NUM_STATES):
        successors = rng.choice(np.delete(np.arange(NUM_STATES), k), size=NUM_SUCCESSORS, replace=False)
        transition[k, successors] = (1 - STAY_PROB) * rng.dirichlet(np.ones(NUM_SUCCESSORS))
        transition[k, k] = STAY_PROB
    return SynthLanguage(topic_prior=np.full(NUM_TOPICS, 1 / NUM_TOPICS),
                         start_probs=np.full(NUM_STATES, 1 / NUM_STATES),
                         transition=transition, emission=emission, end_prob=END_PROB, eot_token=EOT_TOKEN)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


class _RowSampler:
    """Draws one column from each of many chosen rows of a table of distributions, in one vectorised call.

    Row r's cumulative distribution is stored shifted by 2r in one flat sorted array, so a single
    searchsorted of 2r + u (u uniform in [0, 1)) finds the column. From a row's last non-zero column on,
    the stored value is 2r + 1.5: above any query of row r (even one that rounds up to 2r + 1) and below
    row r+1, so a zero-probability column is never drawn.
    """

    def __init__(self, probs: np.ndarray):
        probs = np.asarray(probs, dtype=np.float64)
        self.num_cols = probs.shape[1]
        cdf = np.cumsum(probs, axis=1)
        cdf /= cdf[:, -1:]
        last_positive = self.num_cols - 1 - np.argmax(probs[:, ::-1] > 0, axis=1)
        cdf[np.arange(self.num_cols)[None, :] >= last_positive[:, None]] = 1.5
        self.flat_cdf = (cdf + 2.0 * np.arange(probs.shape[0])[:, None]).ravel()

    def sample(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        queries = 2.0 * rows + rng.random(rows.size)
        return np.searchsorted(self.flat_cdf, queries, side="right") - rows * self.num_cols


def _draw(probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n independent draws from one distribution."""
    return _RowSampler(probs[None, :]).sample(np.zeros(n, dtype=np.int64), rng)


def sample_stream(lang: SynthLanguage, num_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """The first ``num_tokens`` tokens (int64) of a stream of documents, starting with eot."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    # Document lengths first: since end_prob is the same in every state, a document's length is
    # independent of its content. Draw documents until they cover num_tokens, then cut the last one.
    mean_doc_tokens = 1 + 1 / lang.end_prob
    batches, covered = [], 0
    while covered < num_tokens:
        content = rng.geometric(lang.end_prob, size=int((num_tokens - covered) / mean_doc_tokens * 1.1) + 16)
        batches.append(content)
        covered += int((content + 1).sum())
    content_len = np.concatenate(batches)
    doc_end = np.cumsum(content_len + 1)
    num_docs = int(np.searchsorted(doc_end, num_tokens)) + 1
    content_len = content_len[:num_docs]
    doc_start = doc_end[:num_docs] - content_len - 1
    content_len[-1] = num_tokens - doc_start[-1] - 1  # the cut document (possibly just its eot)

    # Hidden states, advancing all documents one content token at a time: longest documents first,
    # so the documents still going at content index j are a prefix of that order.
    order = np.argsort(-content_len, kind="stable")
    first_content = doc_start[order] + 1
    still_going = np.searchsorted(-content_len[order], -np.arange(int(content_len.max())), side="left")
    K = lang.transition.shape[0]
    state_of_token = np.zeros(num_tokens, dtype=np.int64)
    transition_sampler = _RowSampler(lang.transition)
    states = _draw(lang.start_probs, int(still_going[0]) if still_going.size else 0, rng)
    for j, count in enumerate(still_going):
        if j > 0:
            states = transition_sampler.sample(states[:count], rng)
        state_of_token[first_content[:count] + j] = states

    # Topics, then every token from its (topic, state) row of the emission table.
    T = lang.topic_prior.shape[0]
    topic_of_doc = _draw(lang.topic_prior, num_docs, rng)
    doc_of_token = np.repeat(np.arange(num_docs), content_len + 1)
    rows = topic_of_doc[doc_of_token] * K + state_of_token  # at eot positions a throwaway draw, overwritten
    tokens = _RowSampler(lang.emission.reshape(T * K, -1)).sample(rows, rng)
    tokens[doc_start] = lang.eot_token
    return tokens


# ---------------------------------------------------------------------------------------------
# The exact optimal loss
# ---------------------------------------------------------------------------------------------


def stream_log_probs(lang: SynthLanguage, tokens) -> np.ndarray:
    """log p(tokens[t] | tokens[:t]) under ``lang`` for t = 1..len-1 (float64), by the forward algorithm.

    ``tokens[0]`` must be eot. An eot reveals the hidden state, so each document is an independent
    forward pass; all documents advance together one content token at a time.
    """
    tokens = np.asarray(tokens).astype(np.int64)
    if tokens.ndim != 1 or tokens.size < 1 or tokens[0] != lang.eot_token:
        raise ValueError("tokens must be a 1-D stream that starts with the eot token")
    if tokens.min() < 0 or tokens.max() >= lang.vocab_size:
        raise ValueError(f"token ids must be in [0, {lang.vocab_size})")
    T, K, V = lang.emission.shape
    log_probs = np.empty(tokens.size - 1)

    doc_start = np.flatnonzero(tokens == lang.eot_token)
    content_len = np.diff(np.append(doc_start, tokens.size)) - 1
    # An eot after a content token: the document ended (end_prob, whatever the state). An eot right
    # after an eot: an empty document, which the source never makes.
    with np.errstate(divide="ignore"):
        log_probs[doc_start[1:] - 1] = np.where(content_len[:-1] > 0, np.log(lang.end_prob), -np.inf)

    # Forward pass over (topic, state), normalised: belief[d] = P(topic, state | document d so far).
    emission_of_token = lang.emission.reshape(T * K, V).T.copy()  # (V, T*K): likelihood of each token
    first_belief = (lang.topic_prior[:, None] * lang.start_probs[None, :]).ravel()
    order = np.argsort(-content_len, kind="stable")
    first_content = doc_start[order] + 1
    still_going = np.searchsorted(-content_len[order], -np.arange(int(content_len.max())), side="left")
    log_continue = np.log1p(-lang.end_prob)
    belief = np.broadcast_to(first_belief, (len(order), T * K))
    for j, count in enumerate(still_going):
        if j == 0:
            prior = belief[:count]
        else:
            prior = (belief[:count].reshape(count, T, K) @ lang.transition).reshape(count, T * K)
        pos = first_content[:count] + j
        joint = prior * emission_of_token[tokens[pos]]
        prob = joint.sum(axis=1)
        with np.errstate(divide="ignore"):
            log_probs[pos - 1] = np.log(prob) + (log_continue if j > 0 else 0.0)
        belief = joint / np.where(prob > 0, prob, 1.0)[:, None]  # an impossible token leaves belief 0
    return log_probs


def unigram_entropy(tokens) -> float:
    """Entropy (nats) of the empirical unigram distribution of ``tokens``."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    freq = counts[counts > 0] / counts.sum()
    return float(-(freq * np.log(freq)).sum())


# ---------------------------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------------------------


def _generator_params(seed: int, train_tokens: int, val_tokens: int, shard_tokens: int) -> dict:
    return {"name": GENERATOR_NAME, "version": GENERATOR_VERSION, "seed": seed, "train_tokens": train_tokens,
            "val_tokens": val_tokens, "shard_tokens": shard_tokens, "num_states": NUM_STATES,
            "num_topics": NUM_TOPICS, "state_words": STATE_WORDS, "topic_words": TOPIC_WORDS,
            "topic_weight": TOPIC_WEIGHT, "stay_prob": STAY_PROB, "num_successors": NUM_SUCCESSORS,
            "end_prob": END_PROB}


def _check_sizes(seed, train_tokens, val_tokens, shard_tokens) -> None:
    for name, value in (("seed", seed), ("train_tokens", train_tokens), ("val_tokens", val_tokens),
                        ("shard_tokens", shard_tokens)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be {'>= 0' if name == 'seed' else '>= 1'}, got {value}")


def generate_synth(out_dir, seed: int = 0, train_tokens: int = DEFAULT_TRAIN_TOKENS,
                   val_tokens: int = DEFAULT_VAL_TOKENS, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict:
    """Write the synthetic dataset of ``seed`` into ``out_dir`` and return its manifest.

    The val shard holds val_tokens + 1 tokens (targets are shifted by one); the train stream is cut
    into shards of at most ``shard_tokens``, each an independent stream starting with eot. Earlier
    synth shards in the folder are removed, and the manifest is written last, so a folder with a
    manifest is always complete.
    """
    _check_sizes(seed, train_tokens, val_tokens, shard_tokens)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError("--out names a file; give a folder for the synthetic data", out)
    out.mkdir(parents=True, exist_ok=True)
    # Never mix with (or delete) other data: refuse a folder that holds any other shards.
    foreign = [p.name for p in out.glob("*.bin") if not p.name.startswith("synth_")]
    if foreign:
        raise UserError(f"the folder holds other shards ({', '.join(sorted(foreign)[:3])}, ...): choose another "
                        "folder for the synthetic data", out)
    try:
        kind = (read_manifest(out) or {}).get("kind", "synth")
    except ValueError:
        kind = "synth"  # a broken manifest next to synth shards only: it is replaced below
    if kind != "synth":
        raise UserError(f"the folder has a manifest of {kind!r} data: choose another folder for the synthetic data",
                        out)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for old in out.glob("synth_*.bin"):
        old.unlink()

    lang = make_language(seed)
    # One independent random stream per shard, so a shard does not depend on how many others there are.
    val_seed, *train_seeds = np.random.SeedSequence([seed, 1]).spawn(1 + -(-train_tokens // shard_tokens))
    val_path = out / "synth_val_000000.bin"
    val = sample_stream(lang, val_tokens + 1, np.random.default_rng(val_seed))
    write_shard(val_path, val)
    paths = [val_path]
    for i, shard_seed in enumerate(train_seeds):
        size = min(shard_tokens, train_tokens - i * shard_tokens)
        paths.append(out / f"synth_train_{i + 1:06d}.bin")
        write_shard(paths[-1], sample_stream(lang, size, np.random.default_rng(shard_seed)))

    val_log_probs = stream_log_probs(lang, val)
    # The optimal loss of the first n targets too, for runs that validate on a prefix of the val shard.
    prefixes = sorted({n for n in (2 ** k for k in range(16, 40)) if n < val_tokens} | {val_tokens})
    manifest = {
        "kind": "synth",
        "vocab_size": lang.vocab_size,
        "eot_token": lang.eot_token,
        "files": {p.name: manifest_entry(p) for p in paths},
        "generator": _generator_params(seed, train_tokens, val_tokens, shard_tokens),
        "val_optimal_loss": float(-val_log_probs.mean()),
        "val_optimal_loss_prefix": {str(n): float(-val_log_probs[:n].mean()) for n in prefixes},
        "val_unigram_loss": unigram_entropy(val[1:]),
    }
    write_manifest(out, manifest)
    return read_manifest(out)


def _is_complete(out: Path, manifest: dict | None, params: dict) -> bool:
    """Does ``manifest`` describe synth data of ``params`` whose files are all present with the right sizes?"""
    if manifest is None or manifest.get("kind") != "synth" or manifest.get("generator") != params:
        return False
    try:
        return all(read_header(out / name) == entry["tokens"] and (out / name).stat().st_size == entry["bytes"]
                   for name, entry in manifest["files"].items())
    except (ShardError, OSError, KeyError, TypeError):
        return False


def ensure_synth(out_dir, seed: int = 0, train_tokens: int = DEFAULT_TRAIN_TOKENS,
                 val_tokens: int = DEFAULT_VAL_TOKENS, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Path:
    """The folder of the synthetic dataset with these parameters: reused if complete, else generated.

    Safe to call from several processes at once: a file lock in the folder lets one of them generate
    while the others wait, then find the data complete.
    """
    _check_sizes(seed, train_tokens, val_tokens, shard_tokens)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError("--out names a file; give a folder for the synthetic data", out)
    out.mkdir(parents=True, exist_ok=True)
    params = _generator_params(seed, train_tokens, val_tokens, shard_tokens)
    with open(out / ".synth.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = read_manifest(out)
        except ValueError:
            manifest = None  # a broken manifest: regenerate
        if not _is_complete(out, manifest, params):
            generate_synth(out, seed, train_tokens, val_tokens, shard_tokens)
    return out


def synth_command(out_dir: str, seed: int, train_tokens: int, val_tokens: int) -> int:
    """``speedrun data synth``: generate, verify the written shards, print the losses."""
    start = time.perf_counter()
    manifest = generate_synth(out_dir, seed=seed, train_tokens=train_tokens, val_tokens=val_tokens)
    seconds = time.perf_counter() - start
    for path in list_shards(out_dir, "val") + list_shards(out_dir, "train"):
        read_shard(path, check_tokens=True, vocab_size=manifest["vocab_size"])
    print(f"wrote {len(manifest['files'])} shards to {out_dir} ({train_tokens:,} train + {val_tokens + 1:,} val "
          f"tokens) in {seconds:.1f}s")
    print(f"val optimal loss {manifest['val_optimal_loss']:.4f}  (unigram {manifest['val_unigram_loss']:.4f}; "
          f"vocab {manifest['vocab_size']}, eot {manifest['eot_token']})")
    return 0
