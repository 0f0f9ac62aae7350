"""Tests of KV-cache batched generation: greedy = full-forward argmax, EOS stop and padding, reproducibility, filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_jax import generation as G
from distill_jax.models import transformer as tf

settings.register_profile("distill", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("distill")

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
    with pytest.raises(ValueError, match="max_len"):
        G.generate(CONFIG, params, jnp.ones((1, 10), jnp.int32), jax.random.key(0), G.SamplingConfig(max_new_tokens=8))


def test_benchmark_reports_tokens_per_second(params):
    result = G.benchmark(CONFIG, params, batch_size=2, prompt_len=4, max_new_tokens=4, repeats=1)
    assert result["tokens_per_s"] > 0
