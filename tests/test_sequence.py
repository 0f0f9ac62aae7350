"""Tests of the LM distillation losses and steps: completion-only masking, padding rows, caches, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import losses
from distill_jax.data import reasoning as R
from distill_jax.models import transformer as tf
from distill_jax.training import sequence as S

VOCAB = R.TOKENIZER.vocab_size
SPECS = {
    "sft": S.LossSpec("sft"),
    "forward_kl": S.LossSpec("forward_kl", temperature=2.0),
    "hinton_kd": S.LossSpec("hinton_kd", temperature=2.0, sft_weight=0.5),
    "top_k": S.LossSpec("top_k", tail="bucket"),
    "gkd": S.LossSpec("gkd", beta=0.5),
}


def batch_with_padding_row():
    """Two real rows and one all-padding row (no completion token)."""
    arrays = R.encode_problems([R.Problem(12, 34), R.Problem(5, 678)], "trace")
    pad_row = {k: np.zeros_like(v[:1]) for k, v in arrays.items()}
    batch = {k: np.concatenate([v, pad_row[k]]) for k, v in arrays.items()}
    shape = batch["inputs"].shape + (VOCAB,)
    student = jax.random.normal(jax.random.key(0), shape) * 3
    teacher = jax.random.normal(jax.random.key(1), shape) * 3
    values, indices = losses.top_k_log_probs(teacher, 4)
    batch |= {"teacher_top_values": values, "teacher_top_indices": indices}
    return {k: jnp.asarray(v) for k, v in batch.items()}, student, teacher


@pytest.mark.parametrize("kind", list(SPECS))
def test_losses_are_zero_off_the_completion_and_padding_rows_change_nothing(kind):
    spec = SPECS[kind]
    batch, student, teacher = batch_with_padding_row()
    per_token = S.token_losses(spec, student, batch, teacher)
    assert np.all(np.asarray(per_token)[np.asarray(batch["loss_mask"]) == 0] == 0)
    loss, grads = jax.value_and_grad(lambda s: S.sequence_loss(spec, s, batch, teacher))(student)
    real = {k: v[:2] for k, v in batch.items()}
    np.testing.assert_allclose(float(loss), float(S.sequence_loss(spec, student[:2], real, teacher[:2])), rtol=1e-6)
    grads = np.asarray(grads)
    assert np.all(np.isfinite(grads)) and np.all(grads[2] == 0)
    # Gradient only at positions whose target is a completion token.
    assert np.all(grads[np.asarray(batch["loss_mask"]) == 0] == 0)


@pytest.mark.parametrize("kind", list(SPECS))
def test_an_all_padding_batch_has_finite_zero_loss_and_gradient(kind):
    batch, student, teacher = batch_with_padding_row()
    batch = {k: v[2:] for k, v in batch.items()}
    loss, grads = jax.value_and_grad(lambda s: S.sequence_loss(SPECS[kind], s, batch, teacher[2:]))(student[2:])
    assert float(loss) == 0.0
    assert np.all(np.asarray(grads) == 0)


def test_sft_loss_is_the_mean_cross_entropy_over_completion_tokens():
    batch, student, _ = batch_with_padding_row()
    log_p = jax.nn.log_softmax(student)
    nll = -np.take_along_axis(np.asarray(log_p), np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"])
    expected = (nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(S.sequence_loss(SPECS["sft"], student, batch)), expected, rtol=1e-5)


def test_averaged_teachers_are_the_log_of_the_mean_probability():
    a, b = jax.random.normal(jax.random.key(0), (2, 3, 5))
    fused = S.average_teacher_logits([a, b])
    np.testing.assert_allclose(np.exp(fused), (jax.nn.softmax(a) + jax.nn.softmax(b)) / 2, rtol=1e-5)


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (0.25, 2), (0.5, 4), (1.0, 8)])
def test_on_policy_schedule_spreads_the_fraction_evenly(fraction, expected):
    schedule = S.on_policy_schedule(8, fraction)
    assert schedule.sum() == expected
    with pytest.raises(ValueError, match="lambda"):
        S.on_policy_schedule(8, 1.5)


def test_top_k_cache_has_k_entries_per_token_and_reports_its_bytes():
    config = tf.TransformerConfig(vocab_size=VOCAB, dim=16, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=16, max_len=64)
    params = tf.init_params(config, jax.random.key(0))
    data = R.encode_problems([R.Problem(1, 2), R.Problem(30, 4), R.Problem(9, 9)])
    cache = S.teacher_top_k_cache(config, params, data, 3, batch_size=2)
    assert cache["teacher_top_values"].shape == data["inputs"].shape + (3,)
    assert S.cache_bytes_per_token(cache) == 3 * (4 + 4)
    full = jax.nn.log_softmax(jax.jit(tf.Transformer(config).apply)({"params": params}, data["inputs"], data["valid"]))
    np.testing.assert_allclose(cache["teacher_top_values"][..., 0], np.asarray(full).max(-1), atol=1e-5)


def test_bad_loss_specs_are_value_errors():
    with pytest.raises(ValueError, match="kind"):
        S.LossSpec("reverse")
    with pytest.raises(ValueError, match="beta"):
        S.LossSpec("gkd", beta=2.0)
    with pytest.raises(ValueError, match="teacher"):
        S.make_lm_train_step(tf.TransformerConfig(vocab_size=5, dim=8, num_heads=2, num_kv_heads=1), S.LossSpec("forward_kl"), S.OptimizerSpec())
