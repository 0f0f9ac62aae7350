"""Tests for distill_jax.objectives: combination, schedules, configs, masking."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import losses as L
from distill_jax import objectives as O


def _batch(seed=0, n=6, classes=5):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(n, classes)).astype(np.float32)
    teacher = rng.normal(size=(n, classes)).astype(np.float32)
    labels = rng.integers(0, classes, size=n)
    return student, teacher, {"label": jnp.asarray(labels)}


def test_combine_weights_terms_and_logs_each():
    s, t, batch = _batch()
    objective = O.combine(hard=(0.1, O.cross_entropy), soft=(0.9, partial(L.hinton_kd, temperature=4.0)))
    loss, metrics = objective(s, t, batch)
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(s, batch["label"])
    kd = L.hinton_kd(s, t, 4.0)
    np.testing.assert_allclose(loss, 0.1 * ce + 0.9 * kd, rtol=1e-6)
    assert loss.shape == (6,)
    np.testing.assert_allclose(metrics["hard"], ce.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["soft"], kd.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], (0.1 * ce + 0.9 * kd).mean(), rtol=1e-6)
    assert float(metrics["hard/weight"]) == pytest.approx(0.1)
    assert objective.terms == ("hard", "soft")


def test_weights_and_temperature_may_be_schedules():
    s, t, batch = _batch(1)
    weight = optax.linear_schedule(0.0, 1.0, transition_steps=10)
    temperature = optax.linear_schedule(1.0, 11.0, transition_steps=10)
    objective = O.combine(soft=(weight, partial(L.hinton_kd, temperature=temperature)))
    for step in (0, 5, 10):
        loss, metrics = objective(s, t, batch, step=step)
        T = 1.0 + step
        np.testing.assert_allclose(loss, (step / 10) * L.hinton_kd(s, t, T), rtol=1e-5, atol=1e-7)
        assert float(metrics["soft/weight"]) == pytest.approx(step / 10)
    # Under jit with a traced step: same numbers.
    jitted = jax.jit(lambda step: objective(s, t, batch, step=step)[0])
    np.testing.assert_allclose(jitted(5), 0.5 * L.hinton_kd(s, t, 6.0), rtol=1e-5)


def test_label_taking_losses_get_batch_labels():
    s, t, batch = _batch(2)
    objective = O.combine(dkd=(1.0, partial(L.decoupled_kd, alpha=1.0, beta=8.0, temperature=4.0)))
    loss, _ = objective(s, t, batch)
    np.testing.assert_allclose(loss, L.decoupled_kd(s, t, batch["label"]), rtol=1e-6)


def test_mask_excludes_padded_examples_from_metrics():
    s, t, batch = _batch(3)
    mask = jnp.array([1, 1, 1, 0, 0, 0], bool)
    objective = O.hinton(temperature=2.0, soft_weight=1.0, hard_weight=0.5)
    loss, metrics = objective(s, t, {**batch, "mask": mask})
    np.testing.assert_allclose(metrics["loss"], loss[:3].mean(), rtol=1e-6)
    _, empty = objective(s, t, {**batch, "mask": jnp.zeros(6, bool)})
    assert float(empty["loss"]) == 0.0


def test_masked_mean_per_token():
    values = jnp.array([[1.0, 2.0, 3.0], [4.0, jnp.nan, 6.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
    assert float(O.masked_mean(values, mask)) == pytest.approx(7.0 / 3)


def test_supervised_ignores_teacher():
    s, _, batch = _batch(4)
    loss, metrics = O.supervised()(s, None, batch)
    np.testing.assert_allclose(loss, optax.losses.softmax_cross_entropy_with_integer_labels(s, batch["label"]))
    assert set(metrics) == {"hard", "hard/weight", "loss"}


def test_teacher_term_without_teacher_is_a_clear_error():
    s, _, batch = _batch(5)
    with pytest.raises(ValueError, match="needs teacher outputs"):
        O.hinton(4.0)(s, None, batch)


def test_from_spec_builds_the_same_objective():
    s, t, batch = _batch(6)
    spec = {
        "hard": {"loss": "cross_entropy", "weight": 0.2},
        "soft": {"loss": "hinton_kd", "weight": 0.8, "temperature": 20.0},
    }
    loss, metrics = O.from_spec(spec)(s, t, batch)
    want, _ = O.combine(hard=(0.2, O.cross_entropy), soft=(0.8, partial(L.hinton_kd, temperature=20.0)))(s, t, batch)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss 'kd'"):
        O.from_spec({"soft": {"loss": "kd"}})


def test_bad_terms():
    with pytest.raises(ValueError, match="at least one term"):
        O.combine()
    with pytest.raises(TypeError, match=r"\(weight, loss\) pair"):
        O.combine(soft=L.hinton_kd)


# ---------------------------------------------------------------- defaults and term kinds


def test_a_partial_of_a_marked_term_is_still_a_full_term():
    s, t, batch = _batch(7)
    term = partial(O.cross_entropy, label_key="target")
    loss, _ = O.combine(hard=(1.0, term))(s, t, {"target": batch["label"]})
    np.testing.assert_allclose(loss, optax.losses.softmax_cross_entropy_with_integer_labels(s, batch["label"]), rtol=1e-6)


def test_a_marked_partial_of_an_unmarked_function_is_a_full_term():
    s, t, batch = _batch(7)

    def scaled_ce(student, teacher, batch, scale):
        return scale * O.cross_entropy(student, teacher, batch)

    loss, _ = O.combine(ce=(1.0, O.objective_term(partial(scaled_ce, scale=2.0))))(s, None, batch)
    np.testing.assert_allclose(loss, 2.0 * optax.losses.softmax_cross_entropy_with_integer_labels(s, batch["label"]), rtol=1e-6)


def test_cross_entropy_takes_its_label_key_by_keyword_only():
    s, t, batch = _batch(7)
    with pytest.raises(TypeError):
        O.cross_entropy(s, t, batch, "label")


def test_masked_mean_divides_by_the_selected_count():
    assert float(O.masked_mean(jnp.array([3.0, 5.0]), jnp.array([1.0, 0.0]))) == pytest.approx(3.0)
    assert float(O.masked_mean(jnp.array([3.0, 5.0]), jnp.array([0.0, 0.0]))) == 0.0
    assert float(O.masked_mean(jnp.array([3.0, 5.0]))) == pytest.approx(4.0)


class _NoSignature:
    """A callable whose signature cannot be inspected (TypeError from inspect)."""

    __signature__ = "not a signature"

    def __call__(self, s, t):
        return L.forward_kl(s, t)


def test_terms_without_an_inspectable_signature_get_student_and_teacher():
    s, t, batch = _batch(8)
    loss, _ = O.combine(kl=(1.0, _NoSignature()))(s, t, batch)
    np.testing.assert_allclose(loss, L.forward_kl(s, t), rtol=1e-6)
    # A builtin without a signature (ValueError from inspect) is called the same way.
    loss, _ = O.combine(top=(1.0, max))(jnp.float32(2.0), jnp.float32(3.0), batch)
    assert float(loss) == 3.0


def test_the_default_step_is_zero():
    s, t, batch = _batch(9)
    objective = O.combine(soft=(lambda step: 0.25 + step, partial(L.hinton_kd, temperature=2.0)))
    np.testing.assert_array_equal(objective(s, t, batch)[0], objective(s, t, batch, step=0)[0])
    np.testing.assert_allclose(objective(s, t, batch)[0], 0.25 * L.hinton_kd(s, t, 2.0), rtol=1e-6)


def test_hinton_objective_defaults_and_hard_term():
    s, t, batch = _batch(10)
    loss, metrics = O.hinton(temperature=3.0)(s, t, batch)
    np.testing.assert_allclose(loss, L.hinton_kd(s, t, 3.0), rtol=1e-6)
    assert set(metrics) == {"soft", "soft/weight", "loss"}  # hard_weight=0: no hard term at all
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(s, batch["label"])
    loss, metrics = O.hinton(3.0, soft_weight=0.5, hard_weight=0.25)(s, t, batch)
    np.testing.assert_allclose(loss, 0.5 * L.hinton_kd(s, t, 3.0) + 0.25 * ce, rtol=1e-6)
    # A scheduled hard weight is a term even though it starts at 0.
    loss, metrics = O.hinton(3.0, hard_weight=optax.linear_schedule(0.0, 1.0, 4))(s, t, batch, step=2)
    assert float(metrics["hard/weight"]) == pytest.approx(0.5)
    np.testing.assert_allclose(loss, L.hinton_kd(s, t, 3.0) + 0.5 * ce, rtol=1e-6)


def test_from_spec_weight_defaults_to_one():
    s, t, batch = _batch(11)
    loss, metrics = O.from_spec({"soft": {"loss": "forward_kl", "temperature": 2.0}})(s, t, batch)
    np.testing.assert_allclose(loss, L.forward_kl(s, t, 2.0), rtol=1e-6)
    assert float(metrics["soft/weight"]) == 1.0
