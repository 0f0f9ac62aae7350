"""Property and golden tests for distill_jax.losses.

Every loss is checked against an independent float64 numpy implementation of
its formula (written here from the papers, not from the library code).
"""

from functools import partial

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from distill_jax import chunked
from distill_jax import losses as L
from distill_jax.proj.reasoning import sequence



# ---------------------------------------------------------------- numpy refs


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0.0)
    return terms.sum(-1)


def np_forward_kl(s, t, T=1.0):
    return np_kl(np_softmax(np.asarray(t) / T), np_softmax(np.asarray(s) / T))


def np_reverse_kl(s, t, T=1.0):
    return np_kl(np_softmax(np.asarray(s) / T), np_softmax(np.asarray(t) / T))


def np_gjsd(s, t, beta, T=1.0):
    p = np_softmax(np.asarray(t) / T)
    q = np_softmax(np.asarray(s) / T)
    m = beta * p + (1 - beta) * q
    return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)


def np_logit_mse(s, t, zero_mean=False):
    s = np.asarray(s, np.float64)
    t = np.asarray(t, np.float64)
    if zero_mean:
        s = s - s.mean(-1, keepdims=True)
        t = t - t.mean(-1, keepdims=True)
    return 0.5 * np.mean((s - t) ** 2, -1)


def np_dkd(s, t, labels, alpha, beta, T):
    out = []
    for si, ti, y in zip(np.asarray(s), np.asarray(t), np.asarray(labels)):
        p = np_softmax(ti / T)
        q = np_softmax(si / T)
        bp = np.array([p[y], 1 - p[y]])
        bq = np.array([q[y], 1 - q[y]])
        rest = np.arange(len(p)) != y
        pn = p[rest] / p[rest].sum()
        qn = q[rest] / q[rest].sum()
        out.append(T**2 * (alpha * np_kl(bp, bq) + beta * np_kl(pn, qn)))
    return np.array(out)


def np_top_k(s, t, k, T, tail):
    out = []
    for si, ti in zip(np.asarray(s, np.float64), np.asarray(t, np.float64)):
        p = np_softmax(ti / T)
        q = np_softmax(si / T)
        idx = np.argsort(-p, kind="stable")[:k]
        rest = np.ones(len(p), bool)
        rest[idx] = False
        pk, qk = p[idx], q[idx]
        if tail == "renormalize":
            out.append(np_kl(pk / pk.sum(), qk / qk.sum()))
        else:
            # The tail is the mass outside the top k (exactly 0 when k = vocabulary).
            out.append(np_kl(np.append(pk, p[rest].sum()), np.append(qk, q[rest].sum())))
    return np.array(out)


def np_attention(a, p):
    q = (np.abs(np.asarray(a, np.float64)) ** p).mean(-1).reshape(a.shape[0], -1)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


# ---------------------------------------------------------------- strategies


def logit_pairs(min_classes=2, max_classes=12, scale=20.0):
    @st.composite
    def draw(draw_fn):
        # A few fixed shapes: eager JAX compiles each primitive once per shape.
        batch = draw_fn(st.sampled_from([1, 3]))
        classes = draw_fn(st.sampled_from([c for c in (3, 4, 10) if min_classes <= c <= max_classes]))
        elems = st.floats(-scale, scale, allow_nan=False, width=32)
        s = draw_fn(hnp.arrays(np.float32, (batch, classes), elements=elems))
        t = draw_fn(hnp.arrays(np.float32, (batch, classes), elements=elems))
        return s, t

    return draw()


temperatures = st.sampled_from([0.5, 1.0, 2.0, 4.0, 20.0])

# Each entry: name -> loss(s, t) for a fixed setting; used for the shared
# properties (non-negative, zero at equality, shift invariance, finiteness).
PAIR_LOSSES = {
    "forward_kl": partial(L.forward_kl, temperature=2.0),
    "reverse_kl": partial(L.reverse_kl, temperature=2.0),
    "hinton_kd": partial(L.hinton_kd, temperature=4.0),
    "gjsd_0.3": partial(L.generalized_jsd, beta=0.3, temperature=1.5),
    "gjsd_0": partial(L.generalized_jsd, beta=0.0),
    "gjsd_1": partial(L.generalized_jsd, beta=1.0),
    "logit_mse_zero_mean": partial(L.logit_mse, zero_mean=True),
    "decoupled_kd": lambda s, t, **kw: L.decoupled_kd(
        s, t, jnp.zeros(jnp.shape(s)[:-1], jnp.int32), temperature=2.0, **kw
    ),
    "top_k_renorm": lambda s, t, **kw: L.top_k_kd(
        s, *L.top_k_log_probs(t, 3, 2.0), temperature=2.0, tail="renormalize", **kw
    ),
    "top_k_bucket": lambda s, t, **kw: L.top_k_kd(
        s, *L.top_k_log_probs(t, 3, 2.0), temperature=2.0, tail="bucket", **kw
    ),
}


@pytest.fixture(params=sorted(PAIR_LOSSES))
def pair_loss(request):
    return PAIR_LOSSES[request.param]


# ---------------------------------------------------------------- shared properties


@given(logit_pairs())
def test_non_negative(pair):
    s, t = pair
    for name, fn in PAIR_LOSSES.items():
        value = np.asarray(fn(s, t))
        assert value.shape == s.shape[:-1], name
        assert np.all(value >= -1e-5), (name, value)


@given(logit_pairs())
def test_zero_when_student_equals_teacher(pair):
    s, _ = pair
    for name, fn in PAIR_LOSSES.items():
        np.testing.assert_allclose(np.asarray(fn(s, s)), 0.0, atol=2e-5, err_msg=name)


@given(logit_pairs(), st.floats(-50, 50), st.floats(-50, 50))
def test_invariant_to_constant_shift(pair, shift_s, shift_t):
    s, t = pair
    for name, fn in PAIR_LOSSES.items():
        base = np.asarray(fn(s, t))
        shifted = np.asarray(fn(s + np.float32(shift_s), t + np.float32(shift_t)))
        np.testing.assert_allclose(shifted, base, rtol=2e-3, atol=2e-3, err_msg=name)


# ---------------------------------------------------------------- golden values


@given(logit_pairs(), temperatures)
def test_forward_reverse_hinton_match_numpy(pair, T):
    s, t = pair
    np.testing.assert_allclose(L.forward_kl(s, t, T), np_forward_kl(s, t, T), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(L.reverse_kl(s, t, T), np_reverse_kl(s, t, T), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        L.hinton_kd(s, t, T), T**2 * np_forward_kl(s, t, T), rtol=1e-4, atol=1e-4 * T**2
    )


@given(logit_pairs(), st.floats(0.01, 0.99), temperatures)
def test_generalized_jsd_matches_numpy(pair, beta, T):
    s, t = pair
    np.testing.assert_allclose(
        L.generalized_jsd(s, t, beta=beta, temperature=T), np_gjsd(s, t, beta, T), rtol=1e-3, atol=1e-5
    )


@given(logit_pairs(), temperatures)
def test_generalized_jsd_endpoints_are_forward_and_reverse_kl(pair, T):
    s, t = pair
    np.testing.assert_array_equal(L.generalized_jsd(s, t, 0.0, T), L.forward_kl(s, t, T))
    np.testing.assert_array_equal(L.generalized_jsd(s, t, 1.0, T), L.reverse_kl(s, t, T))
    # Also with beta traced under jit (a scheduled beta): same values.
    jitted = jax.jit(L.generalized_jsd)
    np.testing.assert_allclose(jitted(s, t, 0.0, T), L.forward_kl(s, t, T), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jitted(s, t, 1.0, T), L.reverse_kl(s, t, T), rtol=1e-6, atol=1e-7)


def test_generalized_jsd_is_symmetric_at_half():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(L.generalized_jsd(s, t, 0.5), L.generalized_jsd(t, s, 0.5), rtol=1e-5)
    # JSD_0.5 is bounded by log 2.
    assert np.all(np.asarray(L.generalized_jsd(10 * s, 10 * t, 0.5)) <= np.log(2) + 1e-6)


@given(logit_pairs(), st.booleans())
def test_logit_mse_matches_numpy(pair, zero_mean):
    s, t = pair
    np.testing.assert_allclose(
        L.logit_mse(s, t, zero_mean=zero_mean), np_logit_mse(s, t, zero_mean), rtol=1e-5, atol=1e-4
    )


@given(logit_pairs(min_classes=3), st.floats(0.0, 2.0), st.floats(0.0, 10.0), temperatures, st.data())
def test_decoupled_kd_matches_numpy(pair, alpha, beta, T, data):
    s, t = pair
    labels = np.array(
        data.draw(st.lists(st.integers(0, s.shape[1] - 1), min_size=s.shape[0], max_size=s.shape[0]))
    )
    got = L.decoupled_kd(s, t, labels, alpha=alpha, beta=beta, temperature=T)
    want = np_dkd(s, t, labels, alpha, beta, T)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3 * T**2)


def test_decoupled_kd_equals_hinton_kd_decomposition():
    # With alpha = 1 and beta = 1 - p_t(target) per example, DKD is exactly
    # KD (Zhao et al., eq. 4): KD = TCKD + (1 - p^t_y) NCKD.
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 6, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, size=6)
    T = 2.0
    p_target = np_softmax(t / T)[np.arange(6), labels]
    tckd = L.decoupled_kd(s, t, labels, alpha=1.0, beta=0.0, temperature=T)
    nckd = L.decoupled_kd(s, t, labels, alpha=0.0, beta=1.0, temperature=T)
    np.testing.assert_allclose(tckd + (1 - p_target) * nckd, L.hinton_kd(s, t, T), rtol=1e-4)


@given(logit_pairs(min_classes=4), st.integers(1, 4), temperatures, st.sampled_from(["renormalize", "bucket"]))
def test_top_k_kd_matches_numpy(pair, k, T, tail):
    s, t = pair
    k = min(k, s.shape[1])
    if tail == "renormalize":
        k = max(k, 2)  # k=1 is refused (test_top_1_with_renormalize_is_refused_because_it_cannot_train)
    # Ties make "the" top-k ambiguous; nudge the teacher to distinct values.
    t = t + np.arange(t.shape[1], dtype=np.float32) * 1e-3
    values, indices = L.top_k_log_probs(t, k, T)
    got = L.top_k_kd(s, values, indices, temperature=T, tail=tail)
    np.testing.assert_allclose(got, np_top_k(s, t, k, T, tail), rtol=2e-3, atol=2e-4)


@given(logit_pairs(), temperatures)
def test_top_k_kd_with_full_vocabulary_is_forward_kl(pair, T):
    s, t = pair
    values, indices = L.top_k_log_probs(t, s.shape[1], T)
    for tail in ("renormalize", "bucket"):
        np.testing.assert_allclose(
            L.top_k_kd(s, values, indices, T, tail=tail), L.forward_kl(s, t, T), rtol=1e-3, atol=1e-5
        )


def test_hint_loss_matches_numpy():
    rng = np.random.default_rng(2)
    u, v = rng.normal(size=(2, 3, 4, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(
        L.hint_loss(u, v, "mse", axis=(1, 2, 3)), ((u - v) ** 2).reshape(3, -1).mean(-1), rtol=1e-5
    )
    uf, vf = u.reshape(3, -1).astype(np.float64), v.reshape(3, -1).astype(np.float64)
    cos = (uf * vf).sum(-1) / np.linalg.norm(uf, axis=-1) / np.linalg.norm(vf, axis=-1)
    np.testing.assert_allclose(L.hint_loss(u, v, "cosine", axis=(1, 2, 3)), 1 - cos, rtol=1e-4, atol=1e-6)
    # Cosine is scale-invariant; both are zero at equality.
    np.testing.assert_allclose(
        L.hint_loss(3 * u, v, "cosine", axis=(1, 2, 3)), L.hint_loss(u, v, "cosine", axis=(1, 2, 3)), rtol=1e-4
    )
    np.testing.assert_allclose(L.hint_loss(u, u, "mse", axis=(1, 2, 3)), 0.0, atol=1e-7)
    np.testing.assert_allclose(L.hint_loss(u, u, "cosine", axis=(1, 2, 3)), 0.0, atol=1e-6)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_attention_transfer_matches_numpy(p):
    rng = np.random.default_rng(3)
    s = rng.normal(size=(3, 6, 6, 4)).astype(np.float32)
    t = rng.normal(size=(3, 6, 6, 9)).astype(np.float32)  # channel counts may differ
    want = ((np_attention(s, p) - np_attention(t, p)) ** 2).mean(-1)
    np.testing.assert_allclose(L.attention_transfer(s, t, p), want, rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(L.attention_transfer(s, t, p)) >= 0)
    # The maps are normalized: a positively scaled copy transfers perfectly.
    np.testing.assert_allclose(L.attention_transfer(2.5 * s, s, p), 0.0, atol=1e-7)
    # NCHW input through channel_axis gives the same.
    np.testing.assert_allclose(
        L.attention_transfer(np.moveaxis(s, -1, 1), np.moveaxis(t, -1, 1), p, channel_axis=1), want, rtol=1e-4
    )


# ---------------------------------------------------------------- Hinton's gradients


@given(logit_pairs(), temperatures)
def test_hinton_kd_gradient_is_T_times_q_minus_p(pair, T):
    s, t = pair
    grad = jax.grad(lambda x: jnp.sum(L.hinton_kd(x, t, T)))(s)
    q = np_softmax(s / T)
    p = np_softmax(t / T)
    np.testing.assert_allclose(grad, T * (q - p), rtol=1e-3, atol=1e-4 * T)


@given(logit_pairs(scale=3.0))
def test_hinton_kd_gradient_tends_to_logit_matching_at_high_T(pair):
    s, t = pair
    s = s - s.mean(-1, keepdims=True)
    t = t - t.mean(-1, keepdims=True)
    n = s.shape[-1]
    want = (s - t) / n
    grad_mse = jax.grad(lambda x: jnp.sum(L.logit_mse(x, t)))(s)
    np.testing.assert_allclose(grad_mse, want, rtol=1e-5, atol=1e-6)
    errors = []
    for T in (10.0, 100.0, 1000.0):
        grad = np.asarray(jax.grad(lambda x: jnp.sum(L.hinton_kd(x, t, T)))(s))
        errors.append(np.abs(grad - want).max())
    # The error shrinks as 1/T (Hinton eq. 3 is a first-order expansion).
    assert errors[-1] <= 1e-3 * max(1.0, np.abs(want).max()) + 1e-5, errors
    if errors[0] > 1e-3:
        assert errors[-1] < errors[0] / 10, errors


# ---------------------------------------------------------------- numerics


ALL_LOSSES_WITH_WHERE = {
    **PAIR_LOSSES,
    "logit_mse": L.logit_mse,
}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES_WITH_WHERE))
def test_finite_for_huge_logits(name):
    fn = ALL_LOSSES_WITH_WHERE[name]
    s = jnp.array([[1e4, -1e4, 0.0, 5e3], [-1e4, 1e4, 1e4, -1e4]], jnp.float32)
    t = jnp.array([[-1e4, 1e4, 0.0, -5e3], [1e4, -1e4, -1e4, 1e4]], jnp.float32)
    value, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, t)))(s)
    assert np.isfinite(value), name
    assert np.all(np.isfinite(grad)), name


def test_huge_logits_give_the_exact_large_kl():
    s = jnp.array([[1e4, -1e4]])
    t = jnp.array([[-1e4, 1e4]])
    # Teacher puts all mass on class 1, where the student has log q = -2e4.
    np.testing.assert_allclose(L.forward_kl(s, t), [2e4], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES_WITH_WHERE))
def test_neg_inf_entries_are_masked_vocabulary(name):
    fn = ALL_LOSSES_WITH_WHERE[name]
    rng = np.random.default_rng(4)
    s = rng.normal(size=(3, 6)).astype(np.float32)
    t = rng.normal(size=(3, 6)).astype(np.float32)
    s_masked = s.copy()
    t_masked = t.copy()
    s_masked[:, 4:] = -np.inf
    t_masked[:, 4:] = -np.inf
    value, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, t_masked)))(s_masked)
    assert np.isfinite(value), name
    assert np.all(np.isfinite(grad)), name
    np.testing.assert_array_equal(np.asarray(grad)[:, 4:], 0.0)
    # Same as dropping those classes altogether.
    if not name.startswith("top_k"):
        np.testing.assert_allclose(fn(s_masked, t_masked), fn(s[:, :4], t[:, :4]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES_WITH_WHERE))
def test_fully_masked_rows_give_zero_loss_and_zero_grad(name):
    fn = ALL_LOSSES_WITH_WHERE[name]
    rng = np.random.default_rng(5)
    s = rng.normal(size=(3, 5)).astype(np.float32)
    t = rng.normal(size=(3, 5)).astype(np.float32)
    if name.startswith("top_k"):
        where = np.array([True, False, True])[:, None] * np.ones((3, 3), bool)
    else:
        where = np.array([True, False, True])[:, None] * np.ones((3, 5), bool)
    value, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, t, where=where)))(s)
    per_example = np.asarray(fn(s, t, where=where))
    assert np.isfinite(value)
    assert per_example[1] == 0.0
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[1], 0.0)
    # Rows that are kept are unaffected by the mask.
    np.testing.assert_allclose(per_example[[0, 2]], np.asarray(fn(s, t))[[0, 2]], rtol=1e-6)


def test_fully_neg_inf_rows_are_zero_and_finite():
    s = jnp.full((2, 4), -jnp.inf).at[0].set(jnp.arange(4.0))
    t = jnp.full((2, 4), -jnp.inf).at[0].set(jnp.arange(4.0)[::-1])
    for name, fn in ALL_LOSSES_WITH_WHERE.items():
        value, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, t)))(s)
        assert np.isfinite(value), name
        assert np.all(np.isfinite(grad)), name
        assert float(fn(s, t)[1]) == 0.0, name


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_top_k_with_neg_inf_padding(tail):
    # A cache for a 3-class teacher stored with k=5: two padded slots.
    t = jnp.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    s = jnp.array([[0.3, 0.2, 0.1], [1.0, -1.0, 0.0]])
    values, indices = L.top_k_log_probs(t, 5)
    assert np.all(np.isneginf(np.asarray(values)[:, 3:]))
    value, grad = jax.value_and_grad(lambda x: jnp.sum(L.top_k_kd(x, values, indices, tail=tail)))(s)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(L.top_k_kd(s, values, indices, tail=tail), L.forward_kl(s, t), rtol=1e-4, atol=1e-6)
    # All-padding rows: loss 0, gradient 0.
    pad_values = jnp.full((2, 4), -jnp.inf)
    pad_indices = jnp.zeros((2, 4), jnp.int32)
    value, grad = jax.value_and_grad(lambda x: jnp.sum(L.top_k_kd(x, pad_values, pad_indices, tail=tail)))(s)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_bucket_teaches_the_tail_mass_renormalize_does_not():
    # Teacher top-2 hold 60% of the mass; a student with the same ratio
    # between those two but 99% on them is perfect under "renormalize" and
    # penalized under "bucket".
    values = jnp.log(jnp.array([[0.4, 0.2]]))
    indices = jnp.array([[0, 1]])
    student = jnp.log(jnp.array([[0.66, 0.33, 0.005, 0.005]]))
    renorm = float(L.top_k_kd(student, values, indices, tail="renormalize")[0])
    bucket = float(L.top_k_kd(student, values, indices, tail="bucket")[0])
    assert abs(renorm) < 1e-5
    want = np_kl([0.4, 0.2, 0.4], [0.66, 0.33, 0.01])
    np.testing.assert_allclose(bucket, want, rtol=1e-4)


def test_top_k_kd_default_tail_is_the_bucket_divergence():
    k = jax.random.split(jax.random.key(5), 2)
    s, t = jax.random.normal(k[0], (3, 7)), jax.random.normal(k[1], (3, 7))
    values, indices = L.top_k_log_probs(t, k=2)
    np.testing.assert_array_equal(L.top_k_kd(s, values, indices), L.top_k_kd(s, values, indices, tail="bucket"))
    assert sequence.LossSpec("top_k").tail == "bucket"


def test_top_1_with_renormalize_is_refused_because_it_cannot_train():
    # What it would be: loss 0 and gradient 0 for any student.
    s = jax.random.normal(jax.random.key(6), (4, 9))
    values, indices = L.top_k_log_probs(jax.random.normal(jax.random.key(7), (4, 9)), k=1)
    with pytest.raises(ValueError, match="k=1 and tail='renormalize'.*Use tail='bucket'"):
        L.top_k_kd(s, values, indices, tail="renormalize")
    with pytest.raises(ValueError, match="k=1 and tail='renormalize'"):
        chunked.chunked_top_k_kd(s[None], jnp.eye(9), values[None], indices[None], jnp.ones((1, 4)), tail="renormalize")
    value, grad = jax.value_and_grad(lambda x: L.top_k_kd(x, values, indices).sum())(s)  # bucket trains
    assert float(value) > 0 and float(jnp.abs(grad).max()) > 0
    with pytest.raises(ValueError, match="tail must be"):
        sequence.LossSpec("top_k", tail="drop")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_float32_output_for_any_input_dtype(dtype):
    s = jnp.array([[1.0, 2.0, 3.0]], dtype)
    t = jnp.array([[3.0, 2.0, 1.0]], dtype)
    for name, fn in ALL_LOSSES_WITH_WHERE.items():
        assert fn(s, t).dtype == jnp.float32, name


def test_jit_and_vmap_agree_with_eager():
    rng = np.random.default_rng(6)
    s, t = rng.normal(size=(2, 4, 3, 7)).astype(np.float32)
    for name, fn in ALL_LOSSES_WITH_WHERE.items():
        eager = np.asarray(fn(s, t))
        assert eager.shape == (4, 3), name
        np.testing.assert_allclose(jax.jit(fn)(s, t), eager, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(jax.vmap(fn)(s, t), eager, rtol=1e-5, atol=1e-6, err_msg=name)


def test_class_axis_can_be_first():
    rng = np.random.default_rng(7)
    s, t = rng.normal(size=(2, 5, 3)).astype(np.float32)
    for fn in (L.forward_kl, L.reverse_kl, partial(L.hinton_kd, temperature=3.0), L.generalized_jsd, L.logit_mse):
        np.testing.assert_allclose(fn(s.T, t.T, axis=0), fn(s, t), rtol=1e-5)


# ---------------------------------------------------------------- bad input


def test_temperature_must_be_positive():
    s = t = jnp.zeros((2, 3))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        for fn in (L.hinton_kd, L.forward_kl, L.reverse_kl):
            with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
                fn(s, t, bad)
        with pytest.raises(ValueError, match="temperature"):
            L.generalized_jsd(s, t, 0.5, bad)
        with pytest.raises(ValueError, match="temperature"):
            L.decoupled_kd(s, t, jnp.zeros(2, jnp.int32), temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            L.top_k_kd(s, *L.top_k_log_probs(t, 2), temperature=bad)
    with pytest.raises(TypeError, match="schedule"):
        L.hinton_kd(s, t, lambda step: 1.0)


def test_scalars_have_no_class_axis():
    for s, t in ((jnp.zeros(3), jnp.float32(0.0)), (jnp.float32(0.0), jnp.zeros(3))):
        with pytest.raises(ValueError, match="must have a class axis"):
            L.forward_kl(s, t)


def test_class_count_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"different class counts.*student 10.*teacher 100"):
        L.hinton_kd(jnp.zeros((4, 10)), jnp.zeros((4, 100)), 2.0)
    for fn in (L.forward_kl, L.reverse_kl, L.generalized_jsd, L.logit_mse):
        with pytest.raises(ValueError, match="different class counts"):
            fn(jnp.zeros((4, 10)), jnp.zeros((4, 11)))
    with pytest.raises(ValueError, match="different class counts"):
        L.decoupled_kd(jnp.zeros((4, 10)), jnp.zeros((4, 11)), jnp.zeros(4, jnp.int32))


def test_top_k_indices_out_of_range():
    s = jnp.zeros((2, 5))
    values = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match=r"teacher_top_indices must lie in \[0, 5\)"):
        L.top_k_kd(s, values, jnp.array([[0, 5], [1, 2]]))
    with pytest.raises(ValueError, match="teacher_top_indices must lie"):
        L.top_k_kd(s, values, jnp.array([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match="same shape"):
        L.top_k_kd(s, values, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="tail must be"):
        L.top_k_kd(s, values, jnp.zeros((2, 2), jnp.int32), tail="drop")


def test_beta_outside_unit_interval():
    s = t = jnp.zeros((2, 3))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
            L.generalized_jsd(s, t, bad)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="labels must lie"):
        L.decoupled_kd(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.array([0, 3]))
    with pytest.raises(ValueError, match="regressor"):
        L.hint_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="kind must be"):
        L.hint_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), kind="l1")
    with pytest.raises(ValueError, match="spatial"):
        L.attention_transfer(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 5, 5, 3)))
    u, v = np.random.default_rng(10).normal(size=(2, 2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(L.hint_loss(u, v), L.hint_loss(u, v, axis=-1))  # the default axis is the last
    with pytest.raises(ValueError, match="at least a batch and a channel axis"):
        L.attention_transfer(jnp.ones((3,)), jnp.ones((3,)))
    # [batch, channels] maps (no spatial axis) are one attention value each: loss 0.
    np.testing.assert_allclose(L.attention_transfer(jnp.ones((3, 4)), 2 * jnp.ones((3, 5))), 0.0, atol=1e-7)


# ---------------------------------------------------------------- masks on one side only
#
# A -inf logit of *either* model removes its class from both distributions.
# The tests above mask both models at the same positions; these mask one.


def np_masked_pair(s, t, T=1.0):
    """Tempered (q, p) over the classes where both logits are finite (float64)."""
    s = np.asarray(s, np.float64)
    t = np.asarray(t, np.float64)
    valid = np.isfinite(s) & np.isfinite(t)

    def softmax(x):
        x = np.where(valid, x / T, -np.inf)
        m = np.max(np.where(valid, x, -np.inf), -1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.where(valid, np.exp(x - m), 0.0)
        total = e.sum(-1, keepdims=True)
        return e / np.where(total > 0, total, 1.0)

    return softmax(s), softmax(t)


def test_hinton_kd_drops_a_class_the_teacher_masks():
    # The reviewer's case: the teacher's -inf on class 2 takes that class
    # out of the student's distribution too, leaving a 2-class comparison.
    s = jnp.array([[1.0, 2.0, 3.0]])
    t = jnp.array([[0.5, 1.0, -jnp.inf]])
    want = 4.0 * np_forward_kl([[1.0, 2.0]], [[0.5, 1.0]], 2.0)
    np.testing.assert_allclose(L.hinton_kd(s, t, 2.0), want, rtol=1e-5)
    assert abs(float(want[0]) - 0.0304) < 1e-3  # an order of magnitude below 5.58, the unmasked student's KL


@st.composite
def one_sided_masks(draw_fn):
    s, t = draw_fn(logit_pairs(min_classes=4))
    mask_s = draw_fn(hnp.arrays(bool, s.shape, elements=st.booleans()))
    mask_t = draw_fn(hnp.arrays(bool, t.shape, elements=st.booleans()))
    # At least two classes stay valid in each row, so the comparison is not trivial.
    keep = np.zeros_like(mask_s)
    keep[:, :2] = True
    s = np.where(mask_s & ~keep, -np.inf, s).astype(np.float32)
    t = np.where(mask_t & ~keep, -np.inf, t).astype(np.float32)
    return s, t


@given(one_sided_masks(), temperatures)
def test_one_sided_masks_match_numpy_on_the_common_support(pair, T):
    s, t = pair
    q, p = np_masked_pair(s, t, T)
    np.testing.assert_allclose(L.forward_kl(s, t, T), np_kl(p, q), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(L.reverse_kl(s, t, T), np_kl(q, p), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(L.hinton_kd(s, t, T), T**2 * np_kl(p, q), rtol=1e-4, atol=1e-4 * T**2)
    m = 0.3 * p + 0.7 * q
    np.testing.assert_allclose(
        L.generalized_jsd(s, t, 0.3, T), 0.3 * np_kl(p, m) + 0.7 * np_kl(q, m), rtol=1e-3, atol=1e-5
    )


@given(one_sided_masks())
def test_non_negative_and_finite_with_one_sided_masks(pair):
    s, t = pair
    for name, fn in PAIR_LOSSES.items():
        if name.startswith("logit_mse"):
            continue  # a squared distance: -inf entries are not a vocabulary mask there
        value, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, t)))(s)
        per_example = np.asarray(fn(s, t))
        assert np.all(per_example >= -1e-5), (name, per_example)
        assert np.isfinite(value) and np.all(np.isfinite(grad)), name
        # No gradient reaches a class the student masked.
        np.testing.assert_array_equal(np.asarray(grad)[np.isneginf(s)], 0.0, err_msg=name)


def np_top_k_bucket_masked_student(s, values, indices, T):
    """Bucket top-k KL when the student masks part of its vocabulary (float64).

    The student's tail is its mass outside the kept indices *over its own
    valid classes*; the teacher's is one minus its kept mass.
    """
    out = []
    for si, vi, ii in zip(np.asarray(s, np.float64), np.asarray(values, np.float64), np.asarray(indices)):
        valid = np.isfinite(si)
        x = np.where(valid, si / T, -np.inf)
        q = np.where(valid, np.exp(x - x[valid].max()), 0.0)
        q = q / q.sum()
        p_k = np.exp(vi)
        rest = valid.copy()
        rest[ii] = False
        out.append(np_kl(np.append(p_k, 1 - p_k.sum()), np.append(q[ii], q[rest].sum())))
    return np.array(out)


def test_top_k_bucket_tail_counts_only_the_students_valid_classes():
    # The student masks classes 2 and 5; the teacher's top 2 are classes 0 and 1.
    s = jnp.array([[0.3, 0.2, -jnp.inf, 0.1, -0.5, -jnp.inf], [1.0, -1.0, -jnp.inf, 0.5, 0.0, -jnp.inf]])
    t = jnp.array([[2.0, 1.5, 0.0, 0.3, -1.0, 0.2], [0.1, 2.0, -0.5, 0.0, 0.3, -0.4]])
    values, indices = L.top_k_log_probs(t, 2)
    assert not np.isin(np.asarray(indices), [2, 5]).any()
    got = L.top_k_kd(s, values, indices, tail="bucket")
    want = np_top_k_bucket_masked_student(s, values, indices, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got) > 0)


def np_top_k_bucket_common_support(s, values, indices, keep, T=1.0):
    """Bucket top-k KL when some kept entries leave the comparison (float64).

    ``keep`` marks the top-k entries that take part; the others join the
    tail bucket of both the teacher and the student.
    """
    out = []
    for si, vi, ii, ki in zip(np.asarray(s, np.float64), np.asarray(values, np.float64), np.asarray(indices), keep):
        q = np.exp(si / T - (si / T).max())
        q /= q.sum()
        p_k = np.exp(vi)
        kept = np.zeros(len(q), bool)
        kept[ii[ki]] = True
        p = np.append(p_k[ki], 1 - p_k[ki].sum())
        out.append(np_kl(p, np.append(q[ii[ki]], q[~kept].sum())))
    return np.array(out)


def test_top_k_bucket_moves_entries_where_drops_into_both_tails():
    rng = np.random.default_rng(9)
    s = rng.normal(size=(3, 8)).astype(np.float32)
    t = rng.normal(size=(3, 8)).astype(np.float32) * 2
    values, indices = L.top_k_log_probs(t, 3)
    keep = np.array([[True, False, True], [True, True, True], [False, True, True]])
    got = L.top_k_kd(s, values, indices, tail="bucket", where=keep)
    np.testing.assert_allclose(got, np_top_k_bucket_common_support(s, values, indices, keep), rtol=1e-5, atol=1e-6)
    # The row that drops nothing is the plain bucket loss.
    np.testing.assert_allclose(got[1], L.top_k_kd(s, values, indices, tail="bucket")[1], rtol=1e-6)


def test_top_k_bucket_with_a_cache_that_sums_to_over_one_has_no_tail():
    # A bf16 cache can hold top-k probabilities summing to slightly over 1:
    # the tail is then empty (clamped at 0 mass), and the KL is taken over the
    # k entries as stored.
    values = jnp.log(jnp.array([[0.6, 0.45]]))
    indices = jnp.array([[0, 1]])
    s = jnp.array([[1.0, 0.5, -1.0, 0.0]])
    q = np_softmax(np.asarray(s))[0]
    want = 0.6 * np.log(0.6 / q[0]) + 0.45 * np.log(0.45 / q[1])
    np.testing.assert_allclose(L.top_k_kd(s, values, indices, tail="bucket"), [want], rtol=1e-5)


# ---------------------------------------------------------------- low-precision inputs


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_give_the_float32_values_of_the_same_numbers(dtype):
    # Upcast first, compute in float32: a loss of bf16/fp16 logits equals the
    # loss of exactly those numbers held in float32 (computing in bf16 would
    # be off by about 1e-2 here).
    rng = np.random.default_rng(8)
    s = jnp.asarray(rng.normal(size=(4, 7)) * 4, dtype)
    t = jnp.asarray(rng.normal(size=(4, 7)) * 4, dtype)
    for name, fn in ALL_LOSSES_WITH_WHERE.items():
        low = np.asarray(fn(s, t))
        high = np.asarray(fn(s.astype(jnp.float32), t.astype(jnp.float32)))
        np.testing.assert_allclose(low, high, rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(
        L.hinton_kd(s, t, 3.0), 9.0 * np_forward_kl(np.asarray(s, np.float64), np.asarray(t, np.float64), 3.0),
        rtol=1e-4,
    )


# ------------------------------------------------------------------ NaN is never a mask


_NAN_LOSSES = [
    lambda s, t: L.forward_kl(s, t, 2.0),
    lambda s, t: L.reverse_kl(s, t, 2.0),
    lambda s, t: L.hinton_kd(s, t, 4.0),
    lambda s, t: L.generalized_jsd(s, t, 0.3, 2.0),
    lambda s, t: L.logit_mse(s, t),
    lambda s, t: L.decoupled_kd(s, t, labels=jnp.array([0, 1])),
    lambda s, t: L.top_k_kd(s, *L.top_k_log_probs(t, k=3), 2.0, "renormalize"),
    lambda s, t: L.top_k_kd(s, *L.top_k_log_probs(t, k=3), 2.0, "bucket"),
]


@pytest.mark.parametrize("loss", _NAN_LOSSES)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_a_nan_logit_makes_its_row_nan_not_masked(loss, side):
    clean = jnp.zeros((2, 10)).at[:, 0].set(3.0)
    poisoned = clean.at[0, 4].set(jnp.nan)
    s, t = (poisoned, clean) if side == "student" else (clean, poisoned)
    value = np.asarray(loss(s, t))
    assert np.isnan(value[0]), value  # the diverged row: NaN, never a loss of 0
    assert np.isfinite(value[1]), value  # the other row is untouched
    # A NaN where the caller masks the class out explicitly is legitimate padding.
    masked = np.asarray(L.forward_kl(s, t, 2.0, where=jnp.arange(10) != 4))
    assert np.all(np.isfinite(masked))


def test_all_nan_student_logits_give_nan_kd_loss_not_zero():
    # The minimal case of the report: before, [0., 0.].
    assert np.all(np.isnan(np.asarray(L.hinton_kd(jnp.full((2, 10), jnp.nan), jnp.zeros((2, 10)), 4.0))))
    log_p, valid = L.masked_log_softmax(jnp.array([0.0, jnp.nan, -jnp.inf]))
    assert np.all(np.isnan(np.asarray(log_p[:2]))) and np.asarray(valid).tolist() == [True, True, False]


# ------------------------------------------------------------------ ULD (cross-tokenizer)
#
# Mostly through one jitted ``uld`` and a few shapes: compiling the loss once
# per shape is far cheaper than eager op-by-op dispatch on new shapes.

_uld = jax.jit(L.uld, static_argnames="axis")


def _uld_np(s, t, T=1.0, s_where=None, t_where=None, where=None):
    """Universal logit distillation in float64 (Boizard et al. 2024, arXiv:2402.12030).

    Per side: softmax over its own valid classes (not -inf, mask true; no
    valid class gives all zeros), sorted descending; the shorter vector is
    zero-padded; the loss is the L1 distance.
    """

    def side(x, *masks):
        x = np.asarray(x, np.float64)
        valid = ~np.isneginf(x)
        for m in masks:
            if m is not None:
                valid = valid & np.asarray(m, bool)
        x = np.where(valid, x / T, -np.inf)
        m = np.max(x, -1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.where(valid, np.exp(np.where(valid, x - m, 0.0)), 0.0)
        total = e.sum(-1, keepdims=True)
        return -np.sort(-(e / np.where(total > 0, total, 1.0)), axis=-1)

    q, p = side(s, s_where, where), side(t, t_where, where)
    n = max(q.shape[-1], p.shape[-1])
    q = np.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, n - q.shape[-1])])
    p = np.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, n - p.shape[-1])])
    return np.abs(q - p).sum(-1)


@st.composite
def uld_cases(draw_fn):
    """Logits with different (or equal) class counts, -inf entries and class masks on each side."""
    ns, nt = draw_fn(st.sampled_from([(5, 9), (9, 5), (5, 5)]))
    elems = st.floats(-20.0, 20.0, allow_nan=False, width=32)
    s = draw_fn(hnp.arrays(np.float32, (3, ns), elements=elems))
    t = draw_fn(hnp.arrays(np.float32, (3, nt), elements=elems))
    # Mostly-true masks: a few classes leave, now and then a whole row.
    mostly = st.sampled_from([True, True, True, False])
    s = np.where(draw_fn(hnp.arrays(bool, s.shape, elements=mostly)), s, -np.inf).astype(np.float32)
    t = np.where(draw_fn(hnp.arrays(bool, t.shape, elements=mostly)), t, -np.inf).astype(np.float32)
    s_where = draw_fn(hnp.arrays(bool, s.shape, elements=mostly))
    t_where = draw_fn(hnp.arrays(bool, t.shape, elements=mostly))
    return s, t, s_where, t_where


@given(uld_cases(), temperatures)
def test_uld_matches_numpy(case, T):
    s, t, s_where, t_where = case
    got = _uld(s, t, T, student_where=s_where, teacher_where=t_where)
    assert got.dtype == jnp.float32 and got.shape == s.shape[:-1]
    np.testing.assert_allclose(got, _uld_np(s, t, T, s_where, t_where), rtol=1e-5, atol=2e-6)
    assert np.all((np.asarray(got) >= 0) & (np.asarray(got) <= 2 + 1e-6))


def test_uld_golden_values_across_vocabularies():
    rng = np.random.default_rng(11)
    s = (rng.normal(size=(3, 5)) * 3).astype(np.float32)
    t = (rng.normal(size=(3, 9)) * 3).astype(np.float32)
    for T in (0.5, 1.0, 3.0):
        np.testing.assert_allclose(_uld(s, t, T), _uld_np(s, t, T), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_uld(t, s, T), _uld_np(t, s, T), rtol=1e-5, atol=1e-6)
    s_where = rng.random(s.shape) < 0.7
    t_where = rng.random(t.shape) < 0.7
    np.testing.assert_allclose(
        _uld(s, t, 2.0, student_where=s_where, teacher_where=t_where),
        _uld_np(s, t, 2.0, s_where, t_where), rtol=1e-5, atol=1e-6,
    )
    # Class masks shared by every row ([vocab]) and batch axes that broadcast: [3, 1] x [2] -> [3, 2].
    np.testing.assert_allclose(
        _uld(s[:, None], t[:2], student_where=s_where[0], teacher_where=t_where[1]),
        _uld_np(s[:, None], t[:2], 1.0, s_where[0], t_where[1]), rtol=1e-5, atol=1e-6,
    )
    # Hand values: one-hot against uniform over 9 is 2 - 2/9; uniform over 2 against [.5, .25, .25] is 0.5.
    one_hot = np.where(np.arange(5) == 0, 1e4, 0.0)
    np.testing.assert_allclose(_uld(one_hot, np.zeros(9), 1.0), 2 - 2 / 9, rtol=1e-6)
    two = np.where(np.arange(5) < 2, 0.0, -np.inf)
    np.testing.assert_allclose(_uld(two, np.array([np.log(2.0), 0.0, 0.0] + [-np.inf] * 6), 1.0), 0.5, rtol=1e-6)


def test_uld_symmetry_permutation_invariance_and_zeros():
    rng = np.random.default_rng(12)
    s = (rng.normal(size=(3, 5)) * 2).astype(np.float32)
    t = (rng.normal(size=(3, 5)) * 2).astype(np.float32)
    u = (rng.normal(size=(3, 9)) * 2).astype(np.float32)
    np.testing.assert_allclose(_uld(s, t, 2.0), _uld(t, s, 2.0), rtol=1e-6)
    base = np.asarray(_uld(s, u, 2.0))
    assert np.all((base > 0) & (base <= 2))
    for seed in range(3):
        ps, pu = np.random.default_rng(seed).permutation(5), np.random.default_rng(seed).permutation(9)
        np.testing.assert_allclose(_uld(s[:, ps], u, 2.0), base, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_uld(s, u[:, pu], 2.0), base, rtol=1e-5, atol=1e-6)
        # A teacher that permutes the student's probabilities: 0, though the tokens differ.
        np.testing.assert_allclose(_uld(s, s[:, ps], 2.0), 0.0, atol=1e-6)
    np.testing.assert_allclose(_uld(s, s, 2.0), 0.0, atol=0)
    # Extra teacher classes with no mass (-inf) change nothing: that is the zero padding.
    np.testing.assert_allclose(_uld(s, np.pad(s, [(0, 0), (0, 4)], constant_values=-np.inf), 2.0), 0.0, atol=0)
    # ULD compares sorted vectors only: it is no divergence of the two distributions.
    assert np.all(np.asarray(jax.jit(L.forward_kl)(s, s[:, ::-1])) > 0.1)


def test_uld_gradient_matches_finite_differences():
    rng = np.random.default_rng(13)
    s = rng.normal(size=(3, 5)).astype(np.float32)  # distinct values: no ties in the sort
    t = (rng.normal(size=(3, 9)) * 2).astype(np.float32)
    s_where = np.array([True, True, False, True, True])
    T = 2.0
    grad = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(L.uld(x, t, T, student_where=s_where))))(s))
    eps = 1e-6
    want = np.zeros(s.shape, np.float64)
    s64 = s.astype(np.float64)
    for idx in np.ndindex(s.shape):
        d = np.zeros_like(s64)
        d[idx] = eps
        want[idx] = (_uld_np(s64 + d, t, T, s_where).sum() - _uld_np(s64 - d, t, T, s_where).sum()) / (2 * eps)
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-5)
    assert np.all(grad[:, 2] == 0.0) and np.abs(grad).max() > 1e-2


def test_uld_numerics_huge_neg_inf_and_masked_rows():
    value_and_grad = jax.jit(jax.value_and_grad(lambda x, y, **kw: jnp.sum(L.uld(x, y, 2.0, **kw))))
    big = np.array([[1e4, -1e4, 0.0, 5e3, 1.0], [-1e4, 1e4, 1e4, -1e4, 0.0], [0.0, 0.0, -1e4, 1e4, 1e4]])
    big_t = np.concatenate([-big, big[:, :4]], axis=1)  # [3, 9]
    value, grad = value_and_grad(big, big_t)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(_uld(big, big_t, 2.0), _uld_np(big, big_t, 2.0), atol=1e-6)
    # -inf entries: the class leaves that side's softmax, as if it were not in the vocabulary.
    rng = np.random.default_rng(14)
    s, t = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 9)).astype(np.float32)
    s_inf = np.where(np.arange(5) < 3, s, -np.inf).astype(np.float32)
    value, grad = value_and_grad(s_inf, t)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[:, 3:], 0.0)
    np.testing.assert_allclose(_uld(s_inf, t, 2.0), _uld_np(s[:, :3], t, 2.0), rtol=1e-5)
    np.testing.assert_allclose(_uld(s, t, 2.0, student_where=np.arange(5) < 3), _uld(s_inf, t, 2.0), rtol=1e-6)
    # A token mask on both sides (where=mask[..., None]): masked rows give loss 0 and gradient 0.
    keep = np.array([True, False, True])
    per_example = _uld(s, t, 2.0, where=keep[:, None])
    _, grad = value_and_grad(s, t, where=keep[:, None])
    assert float(per_example[1]) == 0.0 and np.all(np.asarray(grad)[1] == 0.0) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(per_example[keep], np.asarray(_uld(s, t, 2.0))[keep], rtol=1e-6)
    # Nothing valid on either side (masks or -inf): 0, with a finite zero gradient.
    value, grad = value_and_grad(np.full((3, 5), -np.inf, np.float32), np.full((3, 9), -np.inf, np.float32))
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
    both = _uld(s, t, 2.0, student_where=np.zeros(5, bool), teacher_where=np.zeros(9, bool))
    np.testing.assert_array_equal(both, 0.0)
    # One side empty: it counts as all zeros, so each row's loss is the other side's mass, 1.
    value, grad = value_and_grad(s, t, teacher_where=np.zeros(9, bool))
    np.testing.assert_allclose(value, 3.0, rtol=1e-6)
    assert np.all(np.isfinite(grad))


def test_uld_dtypes_nan_and_bad_arguments():
    rng = np.random.default_rng(15)
    s = jnp.asarray(rng.normal(size=(3, 5)) * 4, jnp.bfloat16)
    t = jnp.asarray(rng.normal(size=(3, 9)) * 4, jnp.bfloat16)
    low = _uld(s, t, 2.0)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, _uld(s.astype(jnp.float32), t.astype(jnp.float32), 2.0), rtol=1e-6, atol=1e-7)
    # NaN is never a mask, on either side; a NaN the caller masks out is padding.
    clean_s, clean_t = jnp.zeros((3, 5)).at[:, 0].set(3.0), jnp.zeros((3, 9)).at[:, 1].set(2.0)
    for s_, t_ in ((clean_s.at[0, 3].set(jnp.nan), clean_t), (clean_s, clean_t.at[0, 6].set(jnp.nan))):
        value = np.asarray(_uld(s_, t_, 2.0))
        assert np.isnan(value[0]) and np.all(np.isfinite(value[1:])), value
    masked = _uld(clean_s.at[0, 3].set(jnp.nan), clean_t, 2.0, student_where=jnp.arange(5) != 3)
    assert np.all(np.isfinite(np.asarray(masked)))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            L.uld(clean_s, clean_t, bad)
    from distill_jax import checks

    with checks.traced_checks(False):  # a traced T = 0 inside jit: NaN, never a finite value
        assert np.all(np.isnan(np.asarray(jax.jit(lambda T: L.uld(clean_s, clean_t, T))(0.0))))
    # Shape errors (checked while tracing, so jit raises them too).
    with pytest.raises(ValueError, match="class axis"):
        _uld(jnp.float32(0.0), clean_t, 1.0)
    with pytest.raises(ValueError, match="do not broadcast"):
        _uld(jnp.zeros((3, 5)), jnp.zeros((2, 9)), 1.0)
    with pytest.raises(ValueError, match="masks"):
        _uld(clean_s, clean_t, 1.0, where=jnp.ones((3, 5), bool))  # a class mask cannot serve both vocabularies


def test_uld_jit_vmap_grad_and_axis():
    rng = np.random.default_rng(16)
    s = rng.normal(size=(2, 3, 5)).astype(np.float32)
    t = rng.normal(size=(2, 3, 9)).astype(np.float32)
    eager = np.asarray(L.uld(s[0], t[0], 2.0))  # the only eager evaluation on a fresh shape
    np.testing.assert_allclose(_uld(s[0], t[0], 2.0), eager, rtol=1e-6, atol=1e-7)
    batched = np.asarray(_uld(s, t, 2.0))
    assert batched.shape == (2, 3)
    np.testing.assert_allclose(jax.jit(jax.vmap(partial(L.uld, temperature=2.0)))(s, t), batched, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_uld(np.moveaxis(s, -1, 0), np.moveaxis(t, -1, 0), 2.0, axis=0), batched, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda x, y: jnp.sum(L.uld(x, y, 2.0))))(s, t)
    assert grad.shape == s.shape and np.all(np.isfinite(grad))
    # Softmax gradients: each row's gradient sums to 0.
    np.testing.assert_allclose(np.asarray(grad).sum(-1), 0.0, atol=1e-6)


def test_uld_in_objectives_from_spec_and_chunked():
    from distill_jax import objectives

    rng = np.random.default_rng(17)
    s = rng.normal(size=(2, 3, 5)).astype(np.float32)
    t = rng.normal(size=(2, 3, 9)).astype(np.float32)  # another vocabulary
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    objective = jax.jit(objectives.from_spec({"uld": {"loss": "uld", "temperature": 2.0}}))
    per_token, metrics = objective(s, t, {"mask": mask})
    want = _uld_np(s, t, 2.0) * mask
    np.testing.assert_allclose(per_token, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["uld"], want.sum() / mask.sum(), rtol=1e-5)
    # The chunked objective: one shared vocabulary works and matches; another vocabulary is refused.
    hs, ht = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
    ws, wt, wt_other = (rng.normal(size=(4, v)).astype(np.float32) for v in (5, 5, 9))
    chunked_objective = jax.jit(objectives.chunked_from_spec({"uld": {"loss": "uld", "temperature": 2.0}}, chunk_size=2))
    batch = {"mask": mask, "label": np.zeros((2, 3), np.int32)}
    total, _ = chunked_objective((hs, ws), (ht, wt), batch)
    full = _uld_np(hs.astype(np.float64) @ ws, ht.astype(np.float64) @ wt, 2.0)
    np.testing.assert_allclose(total, (full * mask).sum() / mask.sum(), rtol=1e-4)
    with pytest.raises(ValueError, match="shared vocabulary.*from_spec"):
        chunked_objective((hs, ws), (ht, wt_other), batch)
