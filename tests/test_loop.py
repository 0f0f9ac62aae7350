"""Pieces of training.loop: make_optimizer against the update rules written out by hand, datasets, teachers (fast, no MNIST)."""

import json
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


# ---------------------------------------------------------------- datasets, teachers, runs without MNIST

import jax  # noqa: E402

from distill_jax import data as data_lib  # noqa: E402
from distill_jax import models, training  # noqa: E402
from distill_jax.training import checkpoint as ckpt  # noqa: E402
from distill_jax.training import loop  # noqa: E402


def _synthetic(n, seed, shape=(28, 28, 1)):
    rng = np.random.default_rng(seed)
    return data_lib.Dataset(jnp.asarray(rng.random((n,) + shape, np.float32)), jnp.asarray(np.arange(n) % 10, jnp.int32))


def _config(**transfer):
    c = training.default_config()
    c.transfer.update(transfer)
    return c


def test_load_datasets_applies_the_transfer_filters(monkeypatch):
    monkeypatch.setattr(data_lib, "load_split", lambda name, split, **kw: _synthetic(100 if split == "train" else 20, 0))
    kept = loop.load_datasets(_config(keep_classes=(7, 8)))
    assert set(np.unique(np.asarray(kept["train"].labels))) == {7, 8} and len(kept["train"].labels) == 20
    dropped = loop.load_datasets(_config(drop_classes=(3,)))
    assert 3 not in set(np.asarray(dropped["train"].labels)) and len(dropped["train"].labels) == 90
    subset = loop.load_datasets(_config(subset=30))
    assert len(subset["train"].labels) == 30
    plain = loop.load_datasets(_config())
    assert len(plain["train"].labels) == 100 and len(plain["test"].labels) == 20 and "val" not in plain
    bare = loop.load_datasets({"dataset": "mnist", "model": {"name": "mlp"}})  # a plain dict: every key optional
    assert "val" not in bare and len(bare["train"].labels) == 100
    # The split seed defaults to 0.
    bare_subset = loop.load_datasets({"dataset": "mnist", "model": {"name": "mlp"}, "transfer": {"subset": 30}})
    np.testing.assert_array_equal(bare_subset["train"].images, subset["train"].images)
    config = _config()
    config.val_size = 10
    split = loop.load_datasets(config)
    assert len(split["val"].labels) == 10 and len(split["train"].labels) == 90


def test_a_teacher_checkpoint_without_an_input_shape_is_an_mnist_one(tmp_path):
    # Checkpoints written before configs recorded input_shape hold 28x28x1 models.
    model_config = {"name": "mlp", "hidden": (8,), "num_classes": 10}
    model = models.create(model_config)
    params = models.init_params(model, jax.random.PRNGKey(0), (1, 28, 28, 1))
    with ckpt.manager(tmp_path / "checkpoints") as mngr:
        ckpt.save(mngr, 1, params=params, opt_state={"count": jnp.zeros((), jnp.int32)}, step=jnp.int32(0),
                  rng=jax.random.PRNGKey(0), meta={"config": {"model": model_config}})
    apply_fn, restored, restored_config = training.load_teacher(tmp_path)
    assert tuple(restored_config["hidden"]) == (8,)
    x = jnp.ones((2, 28, 28, 1))
    np.testing.assert_array_equal(apply_fn(restored, x, train=False), model.apply(params, x, train=False))


def test_a_run_without_a_test_split_trains_and_reports_what_it_has(tmp_path):
    config = training.default_config()
    config.model.hidden = (16,)
    config.num_epochs, config.batch_size = 1, 25  # one step per epoch
    results = training.run(config, tmp_path / "run", datasets={"train": _synthetic(25, 1)}, progress=True)
    assert results["finished"] and "test" not in results and results["num_train"] == 25
    for bad, message in (({"num_epochs": 0}, "must be >= 1"), ({"batch_size": 0}, "must be >= 1"),
                         ({"batch_size": 26}, "25 examples, fewer than batch_size=26")):
        wrong = training.default_config()
        wrong.model.hidden = (16,)
        wrong.batch_size = 25
        wrong.update(bad)
        with pytest.raises(ValueError, match=message):
            training.run(wrong, tmp_path / "bad", datasets={"train": _synthetic(25, 1)}, progress=False)


def test_a_one_step_cosine_schedule_reaches_its_end_value_after_that_step():
    tx = make_optimizer(_sgd(schedule="cosine", final_lr_fraction=0.5), 1, 1)
    state = tx.init(PARAMS)
    first, state = tx.update(GRAD, state, PARAMS)
    second, _ = tx.update(GRAD, state, PARAMS)
    np.testing.assert_allclose(first["w"], -0.1 * np.asarray(GRAD["w"]), rtol=1e-6)
    np.testing.assert_allclose(second["w"], -0.05 * np.asarray(GRAD["w"]), rtol=1e-6)


def test_transfer_filters_check_classes_against_ten_by_default(monkeypatch):
    monkeypatch.setattr(data_lib, "load_split", lambda name, split, **kw: _synthetic(100 if split == "train" else 20, 0))
    with pytest.raises(ValueError, match=r"class ids \[10\] out of range \[0, 10\)"):
        loop.load_datasets({"dataset": "mnist", "model": {"name": "mlp"}, "transfer": {"drop_classes": [10]}})


def _plain_config(**changes):
    config = json.loads(training.default_config().to_json_best_effort())
    config["model"]["hidden"] = [8]
    config.update(num_epochs=4, batch_size=25, **changes)
    return config


def test_a_plain_config_without_checkpoint_every_saves_every_epoch_and_keeps_the_last_two(tmp_path):
    config = _plain_config()
    del config["checkpoint_every"]
    training.run(config, tmp_path, datasets={"train": _synthetic(50, 1)}, progress=False)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4]


def test_resuming_may_change_the_checkpoint_rhythm_and_the_mesh_but_not_the_training(tmp_path):
    data = {"train": _synthetic(50, 1)}
    training.run(_plain_config(), tmp_path, datasets=data, progress=False, stop_after_epochs=1)
    resumed = training.run(_plain_config(checkpoint_every=3, progress=False, mesh="data=1"), tmp_path,
                           datasets=data, progress=False, resume=True, stop_after_epochs=1)
    assert resumed["epochs"] == 2
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"seed: stored 0 vs now 1"):
        training.run(_plain_config(seed=1), tmp_path, datasets=data, progress=False, resume=True)
