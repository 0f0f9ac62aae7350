"""Tests of KV-cache batched generation: greedy = full-forward argmax, EOS stop and padding, reproducibility, filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from distill_jax import generation as G
from distill_jax.models import transformer as tf


VOCAB, PAD, EOS = 11, 0, 2
CONFIG = tf.TransformerConfig(vocab_size=VOCAB, dim=16, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=24, max_len=16)


@pytest.fixture(scope="module")
def params():
    return tf.init_params(CONFIG, jax.random.key(0))


def prompts_and_valid():
    prompts = jax.random.randint(jax.random.key(1), (4, 5), 3, VOCAB)
    valid = jnp.arange(5)[None, :] >= jnp.array([[0], [2], [1], [4]])  # left padding
    return jnp.where(valid, prompts, PAD), valid


def test_greedy_tokens_and_log_probs_match_the_full_forward_pass(params):
    prompts, valid = prompts_and_valid()
    sampling = G.SamplingConfig(max_new_tokens=6)
    out = G.generate(CONFIG, params, prompts, jax.random.key(0), sampling, valid)
    sequence = jnp.concatenate([prompts, out.tokens], axis=1)
    full_valid = jnp.concatenate([valid, jnp.ones_like(out.tokens, bool)], axis=1)
    logits = jax.jit(tf.Transformer(CONFIG).apply)({"params": params}, sequence, full_valid)[:, 4:-1]
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(jnp.argmax(logits, -1)))
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.log_probs), np.asarray(expected), atol=1e-5)


def test_sampling_stops_at_eos_pads_after_it_and_is_reproducible(params):
    prompts, valid = prompts_and_valid()
    # Few allowed tokens and a high temperature, so EOS comes at different steps.
    sampling = G.SamplingConfig(max_new_tokens=8, temperature=3.0, eos_id=EOS, pad_id=PAD, banned_ids=(0, 1, 3, 4, 5, 6, 7))
    outs = [G.generate(CONFIG, params, prompts, jax.random.key(seed), sampling, valid) for seed in (5, 5, 6)]
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    assert not np.array_equal(np.asarray(outs[0].tokens), np.asarray(outs[2].tokens))
    for out in outs:
        tokens = np.asarray(out.tokens)
        for row, length, finished, log_probs in zip(tokens, np.asarray(out.lengths), np.asarray(out.finished), np.asarray(out.log_probs)):
            eos_at = np.flatnonzero(row == EOS)
            assert finished == (eos_at.size > 0)
            end = eos_at[0] + 1 if finished else len(row)
            assert length == end
            assert np.all(row[end:] == PAD) and np.all(log_probs[end:] == 0.0)
            assert np.all(np.isin(row[:end], [2, 8, 9, 10]))
    assert np.asarray(outs[0].finished).any()


def test_only_eos_allowed_stops_every_row_after_one_token(params):
    prompts, valid = prompts_and_valid()
    banned = tuple(t for t in range(VOCAB) if t != EOS)
    out = G.generate(CONFIG, params, prompts, jax.random.key(0), G.SamplingConfig(max_new_tokens=5, eos_id=EOS, banned_ids=banned), valid)
    np.testing.assert_array_equal(np.asarray(out.tokens), [[EOS, 0, 0, 0, 0]] * 4)
    np.testing.assert_array_equal(np.asarray(out.lengths), [1] * 4)


@given(
    # No subnormals: XLA on CPU flushes them to zero, so 1e-45 ties with 0 there.
    logits=st.lists(st.floats(-5, 5, allow_subnormal=False), min_size=6, max_size=6),
    top_k=st.integers(1, 6),
    top_p=st.floats(0.05, 1.0),
)
def test_filters_keep_the_top_k_and_the_smallest_top_p_set(logits, top_k, top_p):
    logits = jnp.asarray([logits], jnp.float32)
    kept_k = np.isfinite(np.asarray(G.filter_logits(logits, G.SamplingConfig(temperature=1.0, top_k=top_k))))[0]
    assert kept_k.sum() >= top_k  # ties at the k-th value are kept
    assert np.all(np.asarray(logits)[0][kept_k].min() >= np.sort(np.asarray(logits)[0])[::-1][top_k - 1])
    kept_p = np.isfinite(np.asarray(G.filter_logits(logits, G.SamplingConfig(temperature=1.0, top_p=top_p))))[0]
    probs = np.asarray(jax.nn.softmax(logits))[0]
    assert kept_p.any()
    assert probs[kept_p].sum() >= min(top_p, 1.0) - 1e-5
    # Minimal: dropping the least likely kept token falls below top_p (unless it is a tie).
    smallest = probs[kept_p].min()
    assert probs[kept_p].sum() - smallest < top_p + 1e-5 or np.sum(probs[kept_p] == smallest) > 1


def test_top_k_of_one_is_greedy(params):
    prompts, valid = prompts_and_valid()
    greedy = G.generate(CONFIG, params, prompts, jax.random.key(0), G.SamplingConfig(max_new_tokens=4), valid)
    top1 = G.generate(CONFIG, params, prompts, jax.random.key(9), G.SamplingConfig(max_new_tokens=4, temperature=1.0, top_k=1), valid)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.asarray(top1.tokens))


def test_bad_arguments_are_value_errors(params):
    with pytest.raises(ValueError, match="temperature"):
        G.SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        G.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        G.SamplingConfig(top_p=1.5)
    # A prompt plus completion of exactly max_len fits.
    out = G.generate(CONFIG, params, jnp.ones((1, 8), jnp.int32), jax.random.key(0), G.SamplingConfig(max_new_tokens=8))
    assert out.tokens.shape == (1, 8)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        G.SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_k"):
        G.SamplingConfig(top_k=-1)
    assert G.SamplingConfig(max_new_tokens=1, top_k=0, top_p=1.0).max_new_tokens == 1
    with pytest.raises(ValueError, match="max_len"):
        G.generate(CONFIG, params, jnp.ones((1, 10), jnp.int32), jax.random.key(0), G.SamplingConfig(max_new_tokens=8))


def test_benchmark_reports_tokens_per_second(params):
    result = G.benchmark(CONFIG, params, batch_size=2, prompt_len=4, max_new_tokens=3, repeats=1)
    assert result["tokens_per_s"] > 0
    assert result["tokens_per_s"] == pytest.approx(2 * 3 / result["best_s"])
    assert (result["batch_size"], result["prompt_len"], result["max_new_tokens"]) == (2, 4, 3)


def test_without_an_end_token_every_row_runs_to_max_new_tokens(params):
    # eos_id=None never stops early, whichever token comes out (here only token 1 can).
    prompts, valid = prompts_and_valid()
    banned = tuple(t for t in range(VOCAB) if t != 1)
    out = G.generate(CONFIG, params, prompts, jax.random.key(0), G.SamplingConfig(max_new_tokens=5, banned_ids=banned), valid)
    np.testing.assert_array_equal(np.asarray(out.tokens), 1)
    np.testing.assert_array_equal(np.asarray(out.lengths), 5)
    assert not np.asarray(out.finished).any()


def test_benchmark_times_are_positive_and_bounded_by_the_call(params):
    import time

    t0 = time.perf_counter()
    result = G.benchmark(CONFIG, params, batch_size=2, prompt_len=4, max_new_tokens=2, repeats=2)
    wall = time.perf_counter() - t0
    assert 0 < result["best_s"] <= result["compile_and_first_run_s"] + wall
    assert 0 < result["compile_and_first_run_s"] < wall


def test_filters_work_on_any_leading_shape():
    logits = jax.random.normal(jax.random.key(3), (2, 3, VOCAB)) * 2
    for sampling in (G.SamplingConfig(temperature=0.7, top_k=4), G.SamplingConfig(temperature=1.3, top_p=0.6),
                     G.SamplingConfig(temperature=1.0, top_k=5, top_p=0.8, banned_ids=(0, 1))):
        batched = np.asarray(G.filter_logits(logits, sampling))
        rows = np.stack([np.asarray(G.filter_logits(row, sampling)) for row in logits.reshape(-1, VOCAB)])
        np.testing.assert_array_equal(batched.reshape(-1, VOCAB), rows)


def test_empty_prompts_are_refused(params):
    with pytest.raises(ValueError, match="length >= 1"):
        G.generate(CONFIG, params, jnp.zeros((2, 0), jnp.int32), jax.random.key(0), G.SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"\[batch, length >= 1\]"):
        G.generate(CONFIG, params, jnp.zeros((4,), jnp.int32), jax.random.key(0), G.SamplingConfig(max_new_tokens=2))


# ---------------------------------------------------------------- statistics of sampling
#
# With a fixed key and many draws, the empirical token frequencies must match
# softmax(logits / T) restricted to the top-k / top-p set (renormalized), a
# distribution computed here in numpy from the definitions. Each case is a
# chi-square goodness-of-fit test at false-alarm rate ALPHA: for a correct
# sampler a random key fails it with probability ALPHA, so the 12 cases below
# together fail by chance with probability < 12 * ALPHA = 1.2e-5; the keys
# are fixed, so the outcome is deterministic. Tokens outside the kept set
# must never be drawn (an exact count of zero).

from scipy import stats  # noqa: E402  (a dependency of jax)

ALPHA = 1e-6
DRAWS = 20_000
STAT_LOGITS = np.array([2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.4, -1.0, -2.0, -3.0], np.float32)


def np_sampling_distribution(logits, temperature, top_k=0, top_p=1.0):
    """The distribution sampling draws from, from the definitions (float64)."""
    z = np.asarray(logits, np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros(len(probs), bool)
    keep[order[: top_k or len(probs)]] = True
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    if top_p < 1.0:
        # The smallest most-likely prefix whose mass reaches top_p.
        mass = np.cumsum(probs[order])
        size = int(np.searchsorted(mass, top_p - 1e-12) + 1)
        prefix = np.zeros(len(probs), bool)
        prefix[order[:size]] = True
        probs = np.where(prefix, probs, 0.0)
        probs /= probs.sum()
    return probs


def _draw_counts(temperature, top_k, top_p, seed):
    sampling = G.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    logits = jnp.broadcast_to(jnp.asarray(STAT_LOGITS), (DRAWS, len(STAT_LOGITS)))
    tokens = G.sample_tokens(jax.random.key(seed), logits, sampling)
    return np.bincount(np.asarray(tokens), minlength=len(STAT_LOGITS))


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (4.0, 0, 1.0),
     (1.0, 3, 1.0), (2.0, 5, 1.0), (0.7, 2, 1.0),
     (1.0, 0, 0.9), (2.0, 0, 0.5), (0.5, 0, 0.95),
     (2.0, 6, 0.8), (1.5, 4, 0.7)],
)
def test_sampled_frequencies_match_the_filtered_tempered_softmax(temperature, top_k, top_p):
    counts = _draw_counts(temperature, top_k, top_p, seed=int(temperature * 100) + top_k + int(top_p * 1000))
    want = np_sampling_distribution(STAT_LOGITS, temperature, top_k, top_p)
    assert np.all(counts[want == 0] == 0), (counts, want)
    kept = want > 0
    assert kept.sum() >= 2
    _, p_value = stats.chisquare(counts[kept], DRAWS * want[kept])
    assert p_value > ALPHA, (p_value, counts, np.round(DRAWS * want, 1))


def test_the_chi_square_test_sees_a_wrong_temperature():
    # Its power: draws at T=2 are rejected as samples of T=1 (and of T=4),
    # so a sampler that multiplied by T instead of dividing would fail above.
    counts = _draw_counts(2.0, 0, 1.0, seed=7)
    for wrong in (1.0, 4.0):
        want = np_sampling_distribution(STAT_LOGITS, wrong)
        assert stats.chisquare(counts, DRAWS * want)[1] < ALPHA


def test_generate_samples_the_models_next_token_distribution_at_temperature(params):
    # The whole path: many copies of one prompt, one new token each; the
    # frequencies follow softmax(model logits / T) of the last position.
    prompt = jnp.asarray([[3, 7, 4, 9, 5]], jnp.int32)
    rows = 8000
    logits = tf.Transformer(CONFIG).apply({"params": params}, prompt, jnp.ones_like(prompt, bool))[0, -1]
    for temperature, seed in ((0.5, 1), (3.0, 2)):
        out = G.generate(CONFIG, params, jnp.repeat(prompt, rows, 0), jax.random.key(seed),
                         G.SamplingConfig(max_new_tokens=1, temperature=temperature))
        counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=VOCAB)
        want = np_sampling_distribution(np.asarray(logits), temperature)
        expected = rows * want
        # Pool the rare tokens into one cell so that every expected count is >= 5.
        rare = expected < 5
        observed = np.append(counts[~rare], counts[rare].sum())
        expected = np.append(expected[~rare], expected[rare].sum())
        if expected[-1] == 0:
            observed, expected = observed[:-1], expected[:-1]
        assert stats.chisquare(observed, expected)[1] > ALPHA, (temperature, counts, np.round(rows * want, 1))


@given(
    logits=st.lists(st.floats(-5, 5, allow_subnormal=False), min_size=6, max_size=6, unique=True),
    top_p=st.floats(0.05, 1.0),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_top_p_keeps_the_most_likely_tokens(logits, top_p, temperature):
    # Every kept token is at least as likely as every dropped one, and the
    # kept set is the one the definition gives at this temperature.
    logits = np.asarray(logits, np.float32)
    assume(len(np.unique(logits)) == len(logits))  # ties at the threshold are all kept, by design
    kept = np.isfinite(np.asarray(G.filter_logits(jnp.asarray([logits]), G.SamplingConfig(temperature=temperature, top_p=top_p))))[0]
    if (~kept).any():
        assert logits[kept].min() > logits[~kept].max()
    want = np_sampling_distribution(logits, temperature, top_p=top_p) > 0
    if not np.array_equal(kept, want):
        # Only a prefix mass within float32 rounding of top_p may differ.
        z = logits.astype(np.float64) / temperature
        probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        mass = np.sort(probs)[::-1].cumsum()
        assert np.min(np.abs(mass - top_p)) < 1e-5, (kept, want)


def test_too_long_prompts_are_refused_with_their_own_length(params):
    # Three prompts of 10 tokens: the message names the length (10), not the batch size (3).
    with pytest.raises(ValueError, match=r"prompt length 10 \+ max_new_tokens 8 = 18 exceeds the model's max_len=16"):
        G.generate(CONFIG, params, jnp.ones((3, 10), jnp.int32), jax.random.key(0), G.SamplingConfig(max_new_tokens=8))
