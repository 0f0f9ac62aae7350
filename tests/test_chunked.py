"""distill_jax.chunked: chunked (memory-bounded) token losses against the unchunked computation.

Golden values are always the plain computation: full ``[B, T, V]`` logits
``hidden @ head``, the same loss from :mod:`distill_jax.losses` (or optax's
cross-entropy), and the masked mean ``sum(loss * mask) / sum(mask)``; its
gradients come from ``jax.grad`` of that. The memory test compiles both
versions and reads XLA's buffer assignment (``memory_analysis``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import checks, chunked, losses

RTOL, ATOL = 1e-5, 1e-6


def _data(b=3, t=13, ds=8, dt=12, v=37, seed=0):
    rng = np.random.RandomState(seed)
    hs = rng.normal(size=(b, t, ds)).astype(np.float32)
    ws = (rng.normal(size=(ds, v)) / np.sqrt(ds) * 2).astype(np.float32)
    ht = rng.normal(size=(b, t, dt)).astype(np.float32)
    wt = (rng.normal(size=(dt, v)) / np.sqrt(dt) * 3).astype(np.float32)
    # Float weights, a fully masked row, and unscored positions in the others.
    mask = rng.uniform(0.5, 2.0, size=(b, t)).astype(np.float32)
    mask[0] = 0.0
    mask[1, rng.rand(t) < 0.4] = 0.0
    return tuple(map(jnp.asarray, (hs, ws, ht, wt, mask)))


def _masked_mean(per_token, mask):
    return jnp.sum(per_token * mask) / jnp.sum(mask)


def _assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------
# Soft-target losses: value and gradients equal the unchunked ones.

LOSSES = {
    "forward_kl": (losses.forward_kl, {}),
    "hinton_kd_T2": (losses.hinton_kd, {"temperature": 2.0}),
    "generalized_jsd": (losses.generalized_jsd, {"beta": 0.3, "temperature": 1.5}),
    "reverse_kl": (losses.reverse_kl, {}),
}
# (loss, seq length, chunk size): every loss with a chunk that divides T and
# one that does not; forward_kl also with one chunk, chunk 1 and chunk > T.
CASES = [(name, t, c) for name in LOSSES for t, c in [(12, 4), (13, 4)]] + [
    ("forward_kl", 13, 13), ("forward_kl", 7, 1), ("forward_kl", 5, 64)
]


def _value_and_grads(fn, *args):
    """Jitted value_and_grad w.r.t. the first two arguments (one compile, not op-by-op)."""
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(*args)


def _kd_pair(loss, kwargs, chunk_size, ht, wt, mask):
    def chunked_mean(hs, ws):
        total, count = chunked.chunked_token_loss(hs, ws, ht, wt, mask, loss=loss, chunk_size=chunk_size, **kwargs)
        return total / count

    def reference(hs, ws):
        return _masked_mean(loss(hs @ ws, ht @ wt, **kwargs), mask)

    return chunked_mean, reference


@pytest.mark.parametrize("name,t,chunk_size", CASES)
def test_token_loss_matches_unchunked(name, t, chunk_size):
    loss, kwargs = LOSSES[name]
    hs, ws, ht, wt, mask = _data(t=t, seed=t + chunk_size)
    chunked_mean, reference = _kd_pair(loss, kwargs, chunk_size, ht, wt, mask)
    value, grads = _value_and_grads(chunked_mean, hs, ws)
    ref_value, ref_grads = _value_and_grads(reference, hs, ws)
    assert value.dtype == jnp.float32 and value.shape == ()
    assert float(ref_value) > 1e-3  # a non-trivial comparison
    _assert_close(value, ref_value)
    for g, rg in zip(grads, ref_grads):
        assert float(jnp.max(jnp.abs(rg))) > 1e-4
        _assert_close(g, rg)
    # Unscored positions (the fully masked row 0) get gradient exactly 0.
    assert not np.any(np.asarray(grads[0][0]))


def test_total_and_count_are_sums():
    hs, ws, ht, wt, mask = _data()
    total, count = chunked.chunked_token_loss(hs, ws, ht, wt, mask, chunk_size=4)
    per = losses.forward_kl(hs @ ws, ht @ wt)
    _assert_close(total, jnp.sum(per * mask))
    _assert_close(count, jnp.sum(mask))
    assert total.dtype == count.dtype == jnp.float32


def test_vocabulary_mask_where():
    """A [V] class mask (padded vocabulary entries) is applied in every chunk."""
    hs, ws, ht, wt, mask = _data(t=13)
    vocab_ok = jnp.arange(ws.shape[1]) < 30
    chunked_mean, reference = _kd_pair(losses.hinton_kd, {"temperature": 2.0, "where": vocab_ok}, 4, ht, wt, mask)
    value, grads = _value_and_grads(chunked_mean, hs, ws)
    ref_value, ref_grads = _value_and_grads(reference, hs, ws)
    _assert_close(value, ref_value)
    for g, rg in zip(grads, ref_grads):
        _assert_close(g, rg)
    assert not np.any(np.asarray(grads[1][:, 30:]))  # masked classes get no gradient
    # ... and the mask changed the value (the test can tell).
    plain, _ = _kd_pair(losses.hinton_kd, {"temperature": 2.0}, 4, ht, wt, mask)
    assert abs(float(plain(hs, ws)) - float(value)) > 1e-3


def test_traced_temperature_under_jit():
    hs, ws, ht, wt, mask = _data(t=9)

    @jax.jit
    def run(hs, ws, temperature):
        total, count = chunked.chunked_token_loss(
            hs, ws, ht, wt, mask, loss=losses.hinton_kd, temperature=temperature, chunk_size=4
        )
        return total / count

    ref = _masked_mean(losses.hinton_kd(hs @ ws, ht @ wt, temperature=3.0), mask)
    _assert_close(run(hs, ws, jnp.float32(3.0)), ref)
    reference = jax.jit(jax.grad(lambda h: _masked_mean(losses.hinton_kd(h @ ws, ht @ wt, temperature=3.0), mask)))
    _assert_close(jax.jit(jax.grad(run))(hs, ws, jnp.float32(3.0)), reference(hs))


def test_teacher_gets_no_gradient():
    hs, ws, ht, wt, mask = _data(t=9)

    def f(ht, wt):
        total, count = chunked.chunked_token_loss(hs, ws, ht, wt, mask, chunk_size=4)
        return total / count

    g_h, g_w = jax.grad(f, argnums=(0, 1))(ht, wt)
    assert not np.any(np.asarray(g_h)) and not np.any(np.asarray(g_w))
    # Without the stop-gradient the teacher would get one (the check can fail).
    g_ref = jax.grad(lambda w: _masked_mean(losses.forward_kl(hs @ ws, ht @ w), mask))(wt)
    assert float(jnp.max(jnp.abs(g_ref))) > 1e-4


def test_unscored_nan_is_dropped_scored_nan_poisons():
    hs, ws, ht, wt, mask = _data(t=9)
    bad_h = hs.at[0, 3].set(jnp.nan)  # row 0 is fully masked
    bad_t = ht.at[1].set(jnp.where(mask[1][:, None] == 0, jnp.nan, ht[1]))

    def f(hs, ws, ht):
        total, count = chunked.chunked_token_loss(hs, ws, ht, wt, mask, chunk_size=4)
        return total / count

    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(bad_h, ws, bad_t)
    f = jax.jit(f)
    _assert_close(value, f(hs, ws, ht))
    assert np.all(np.isfinite(np.asarray(grads[0]))) and np.all(np.isfinite(np.asarray(grads[1])))
    scored = int(np.argwhere(np.asarray(mask[2]) != 0)[0, 0])
    assert np.isnan(float(f(hs.at[2, scored].set(jnp.nan), ws, ht)))
    assert np.isnan(float(f(hs, ws, ht.at[2, scored].set(jnp.nan))))


def test_bfloat16_hidden_gives_float32():
    hs, ws, ht, wt, mask = _data(t=8)
    total, count = chunked.chunked_token_loss(
        hs.astype(jnp.bfloat16), ws.astype(jnp.bfloat16), ht.astype(jnp.bfloat16), wt, mask, chunk_size=3
    )
    assert total.dtype == jnp.float32
    ref = _masked_mean(losses.forward_kl(hs @ ws, ht @ wt), mask)
    _assert_close(total / count, ref, rtol=5e-2, atol=5e-3)


# --------------------------------------------------------------------------
# Cross-entropy and the cached top-k teacher.


@pytest.mark.parametrize("t,chunk_size", [(12, 4), (13, 4)])
def test_cross_entropy_matches_optax(t, chunk_size):
    hs, ws, _, _, mask = _data(t=t, seed=1)
    rng = np.random.RandomState(2)
    labels = rng.randint(0, ws.shape[1], size=mask.shape)
    labels[np.asarray(mask) == 0] = -100  # unscored positions may hold anything
    labels = jnp.asarray(labels)

    def chunked_mean(h, w):
        total, count = chunked.chunked_cross_entropy(h, w, labels, mask, chunk_size=chunk_size)
        return total / count

    def reference(h, w):
        ce = optax.losses.softmax_cross_entropy_with_integer_labels(h @ w, jnp.maximum(labels, 0))
        return _masked_mean(ce, mask)

    value, grads = _value_and_grads(chunked_mean, hs, ws)
    ref_value, ref_grads = _value_and_grads(reference, hs, ws)
    _assert_close(value, ref_value)
    for g, rg in zip(grads, ref_grads):
        _assert_close(g, rg)


def test_cross_entropy_bad_labels():
    hs, ws, _, _, mask = _data(t=6)
    labels = jnp.zeros(mask.shape, jnp.int32).at[2, 0].set(ws.shape[1])
    with pytest.raises(ValueError, match=r"labels .*must lie in \[0, 37\)"):
        chunked.chunked_cross_entropy(hs, ws, labels, mask)
    with checks.traced_checks(False):
        total, _ = jax.jit(lambda y: chunked.chunked_cross_entropy(hs, ws, y, mask, chunk_size=4))(labels)
    assert np.isnan(float(total))
    # The same label at an unscored position is ignored.
    total, _ = chunked.chunked_cross_entropy(hs, ws, labels, mask.at[2, 0].set(0.0))
    assert np.isfinite(float(total))


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("t,chunk_size", [(12, 4), (13, 4)])
def test_top_k_matches_unchunked(tail, t, chunk_size):
    hs, ws, ht, wt, mask = _data(t=t, seed=3)
    temperature = 2.0
    values, indices = losses.top_k_log_probs(ht @ wt, k=5, temperature=temperature)
    values = values.at[2, :, -1].set(-jnp.inf)  # cache padding entries

    def chunked_mean(h, w):
        total, count = chunked.chunked_top_k_kd(
            h, w, values, indices, mask, tail=tail, temperature=temperature, chunk_size=chunk_size
        )
        return total / count

    def reference(h, w):
        return _masked_mean(losses.top_k_kd(h @ w, values, indices, temperature, tail), mask)

    value, grads = _value_and_grads(chunked_mean, hs, ws)
    ref_value, ref_grads = _value_and_grads(reference, hs, ws)
    assert float(ref_value) > 1e-3
    _assert_close(value, ref_value)
    for g, rg in zip(grads, ref_grads):
        _assert_close(g, rg)


def test_top_k_bad_indices():
    hs, ws, ht, wt, mask = _data(t=6)
    values, indices = losses.top_k_log_probs(ht @ wt, k=3)
    bad = indices.at[2, 0, 0].set(-1)
    with pytest.raises(ValueError, match=r"teacher_top_indices .*must lie in \[0, 37\)"):
        chunked.chunked_top_k_kd(hs, ws, values, bad, mask)
    with checks.traced_checks(False):
        total, _ = jax.jit(lambda i: chunked.chunked_top_k_kd(hs, ws, values, i, mask, chunk_size=4))(bad)
    assert np.isnan(float(total))
    with pytest.raises(ValueError, match="same shape"):
        chunked.chunked_top_k_kd(hs, ws, values[..., :2], indices, mask)
    with pytest.raises(ValueError, match="tail"):
        chunked.chunked_top_k_kd(hs, ws, values, indices, mask, tail="drop")


# --------------------------------------------------------------------------
# Shape validation.


def test_shape_errors_name_the_shapes():
    hs, ws, ht, wt, mask = _data(t=6)
    f = chunked.chunked_token_loss
    with pytest.raises(ValueError, match=r"different vocabularies.*\(37 vs 36\)"):
        f(hs, ws, ht, wt[:, :36], mask)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        f(hs, ws, ht, wt, mask, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a Python int"):
        f(hs, ws, ht, wt, mask, chunk_size=4.0)
    with pytest.raises(ValueError, match=r"embedding\.T"):
        f(hs, ws.T, ht, wt, mask)
    with pytest.raises(ValueError, match=r"teacher_hidden has width 12 .* teacher_head has 8"):
        f(hs, ws, ht, wt[:8], mask)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 5\)"):
        f(hs, ws, ht, wt, mask[:, :5])
    with pytest.raises(ValueError, match=r"different \[batch, seq\]"):
        f(hs, ws, ht[:, :5], wt, mask)
    with pytest.raises(ValueError, match=r"student_hidden must be \[batch, seq, dim\]"):
        f(hs[0], ws, ht, wt, mask)
    with pytest.raises(ValueError, match="Per-token weights belong in mask"):
        f(hs, ws, ht, wt, mask, where=jnp.ones(hs.shape[:2] + (37,), bool))
    with pytest.raises(ValueError, match="axis"):
        f(hs, ws, ht, wt, mask, axis=-1)
    with pytest.raises(ValueError, match=r"labels have shape \(3, 5\)"):
        chunked.chunked_cross_entropy(hs, ws, jnp.zeros((3, 5), jnp.int32), mask)


# --------------------------------------------------------------------------
# Gradient accumulation: summed (total, count) over micro-batches = one big batch.


def _student(params, x):
    return jnp.tanh(x @ params["proj"])


def test_micro_batch_accumulation_equals_big_batch():
    rng = np.random.RandomState(4)
    b, t, din, ds, dt, v, micro = 8, 11, 6, 8, 10, 29, 4
    x = jnp.asarray(rng.normal(size=(b, t, din)), jnp.float32)
    ht = jnp.asarray(rng.normal(size=(b, t, dt)), jnp.float32)
    wt = jnp.asarray(rng.normal(size=(dt, v)), jnp.float32)
    params = {"proj": jnp.asarray(rng.normal(size=(din, ds)), jnp.float32),
              "head": jnp.asarray(rng.normal(size=(ds, v)) / 2, jnp.float32)}
    # Very different token counts per micro-batch, so a mean of means differs.
    lengths = np.array([11, 10, 1, 2, 11, 3, 6, 5])
    mask = jnp.asarray(np.arange(t)[None, :] < lengths[:, None], jnp.float32)
    kd = functools.partial(losses.hinton_kd, temperature=2.0)

    def big_batch_loss(p):  # golden: unchunked masked mean over all 8 sequences
        return _masked_mean(kd(_student(p, x) @ p["head"], ht @ wt), mask)

    @jax.jit
    @functools.partial(jax.value_and_grad, has_aux=True)
    def micro_step(p, x_mb, ht_mb, mask_mb):  # gradient of the micro-batch's *sum*, and its count
        return chunked.chunked_token_loss(_student(p, x_mb), p["head"], ht_mb, wt, mask_mb,
                                          loss=losses.hinton_kd, temperature=2.0, chunk_size=4)

    total = count = 0.0
    grads = jax.tree.map(jnp.zeros_like, params)
    means = []
    for i in range(micro):
        sl = slice(i * b // micro, (i + 1) * b // micro)
        (tot, cnt), g = micro_step(params, x[sl], ht[sl], mask[sl])
        total, count = total + tot, count + cnt
        means.append(float(tot / cnt))
        grads = jax.tree.map(jnp.add, grads, g)
    grads = jax.tree.map(lambda g: g / count, grads)

    ref_value, ref_grads = jax.jit(jax.value_and_grad(big_batch_loss))(params)
    _assert_close(total / count, ref_value)
    assert abs(np.mean(means) - float(ref_value)) > 1e-2  # a mean of means would not pass
    for name in params:
        _assert_close(grads[name], ref_grads[name])

    for tx in (optax.sgd(0.1), optax.adamw(1e-2, eps=1e-6, weight_decay=1e-2)):
        state = tx.init(params)
        updates, _ = tx.update(grads, state, params)
        ref_updates, _ = tx.update(ref_grads, state, params)
        new, ref_new = optax.apply_updates(params, updates), optax.apply_updates(params, ref_updates)
        for name in params:
            _assert_close(new[name], ref_new[name], rtol=1e-6, atol=1e-6)
            assert float(jnp.max(jnp.abs(new[name] - params[name]))) > 1e-4  # the step moved


# --------------------------------------------------------------------------
# Memory: XLA's temp buffers of value_and_grad, chunked vs unchunked.


def _temp_bytes(fn, *args) -> int:
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    stats = compiled.memory_analysis()
    assert stats is not None, "memory_analysis() unavailable on this backend"
    return int(stats.temp_size_in_bytes)


def test_memory_is_bounded_by_the_chunk():
    """Chunked temp memory: << one [B, T, V] array, and flat in T; unchunked: several such arrays."""
    b, d, v, chunk_size = 2, 16, 32768, 4
    sds = jax.ShapeDtypeStruct

    def sizes(t):
        hs, ht, mask = sds((b, t, d), jnp.float32), sds((b, t, d), jnp.float32), sds((b, t), jnp.float32)
        ws = wt = sds((d, v), jnp.float32)

        def chunked_fn(hs, ws, ht, wt, mask):
            total, count = chunked.chunked_token_loss(hs, ws, ht, wt, mask, chunk_size=chunk_size)
            return total / count

        def full_fn(hs, ws, ht, wt, mask):
            return _masked_mean(losses.forward_kl(hs @ ws, ht @ wt), mask)

        args = (hs, ws, ht, wt, mask)
        return _temp_bytes(chunked_fn, *args), _temp_bytes(full_fn, *args)

    one_logits = b * 256 * v * 4  # one float32 [B, T, V] array at T = 256: 64 MiB
    chunked_256, full_256 = sizes(256)
    chunked_512, full_512 = sizes(512)
    assert full_256 > one_logits  # the unchunked step holds [B, T, V] arrays
    assert chunked_256 < one_logits / 4
    # Doubling T doubles the unchunked temp memory but leaves the chunked one (nearly) unchanged.
    assert full_512 > 1.8 * full_256
    assert chunked_512 < 1.2 * chunked_256 + 2 * b * 256 * d * 4
