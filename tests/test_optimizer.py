"""training.make_optimizer against the update rules written out by hand (fast, no data)."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax.training import make_optimizer

STEPS_PER_EPOCH, EPOCHS = 10, 2
GRAD = {"w": jnp.array([0.5, -2.0, 1.0])}
PARAMS = {"w": jnp.array([1.0, 1.0, -3.0])}


def _updates(config, steps, params=PARAMS, grads=GRAD):
    """The updates of ``steps`` optimizer steps with a constant gradient (params held fixed)."""
    tx = make_optimizer(config, STEPS_PER_EPOCH, EPOCHS)
    state = tx.init(params)
    out = []
    for _ in range(steps):
        update, state = tx.update(grads, state, params)
        out.append(np.asarray(update["w"]))
    return out


def _sgd(**kw):
    return {"name": "sgd", "learning_rate": 0.1, "momentum": 0.0, **kw}


def cosine_lr(step, peak, warmup, total, final):
    if warmup and step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    end = peak * final
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def test_constant_schedule_keeps_the_learning_rate():
    for update in _updates(_sgd(schedule="constant"), 20):
        np.testing.assert_allclose(update, -0.1 * np.asarray(GRAD["w"]), rtol=1e-6)
    # The default schedule is constant too.
    np.testing.assert_allclose(_updates(_sgd(), 20)[-1], -0.1 * np.asarray(GRAD["w"]), rtol=1e-6)


@pytest.mark.parametrize("warmup_epochs, final", [(0.0, 0.0), (0.5, 0.0), (1.0, 0.1)])
def test_cosine_schedule_follows_warmup_and_half_cosine(warmup_epochs, final):
    config = _sgd(schedule="cosine", warmup_epochs=warmup_epochs, final_lr_fraction=final)
    updates = _updates(config, 20)
    warmup = int(round(warmup_epochs * STEPS_PER_EPOCH))
    for step, update in enumerate(updates):
        lr = cosine_lr(step, 0.1, warmup, STEPS_PER_EPOCH * EPOCHS, final)
        np.testing.assert_allclose(update, -lr * np.asarray(GRAD["w"]), rtol=1e-5, atol=1e-8, err_msg=f"step {step}")


def test_sgd_momentum_nesterov_and_weight_decay():
    g, p = np.asarray(GRAD["w"]), np.asarray(PARAMS["w"])
    heavy = _updates(_sgd(momentum=0.9), 3)
    np.testing.assert_allclose(heavy[1], -0.1 * (g + 0.9 * g), rtol=1e-6)  # trace = g + 0.9 * trace
    np.testing.assert_allclose(heavy[2], -0.1 * (g + 0.9 * (g + 0.9 * g)), rtol=1e-6)
    nesterov = _updates(_sgd(momentum=0.9, nesterov=True), 2)
    np.testing.assert_allclose(nesterov[0], -0.1 * (g + 0.9 * g), rtol=1e-6)  # g + 0.9 * trace, trace = g
    decayed = _updates(_sgd(weight_decay=0.01), 1)
    np.testing.assert_allclose(decayed[0], -0.1 * (g + 0.01 * p), rtol=1e-6)


def test_adam_and_adamw():
    g, p = np.asarray(GRAD["w"]), np.asarray(PARAMS["w"])
    # Adam's first step is lr * g / (|g| + eps): the sign of the gradient.
    adam = _updates({"name": "adam", "learning_rate": 0.01}, 1)[0]
    np.testing.assert_allclose(adam, -0.01 * np.sign(g), rtol=1e-5)
    adamw = _updates({"name": "adamw", "learning_rate": 0.01, "weight_decay": 0.5}, 1)[0]
    np.testing.assert_allclose(adamw, -0.01 * (np.sign(g) + 0.5 * p), rtol=1e-5, atol=1e-7)
    plain_adamw = _updates({"name": "adamw", "learning_rate": 0.01}, 1)[0]
    np.testing.assert_allclose(plain_adamw, -0.01 * np.sign(g), rtol=1e-5)


def test_an_empty_schedule_still_builds():
    tx = make_optimizer(_sgd(schedule="cosine"), 0, 0)
    update, _ = tx.update(GRAD, tx.init(PARAMS), PARAMS)
    assert np.all(np.isfinite(np.asarray(update["w"])))


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        make_optimizer(_sgd(schedule="linear"), 10, 2)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer({"name": "rmsprop", "learning_rate": 0.1}, 10, 2)
    assert isinstance(make_optimizer({"learning_rate": 0.1}, 10, 2), optax.GradientTransformation)  # sgd by default
