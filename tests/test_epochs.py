"""The shuffled epoch and the update step, on tiny hand-made steps and models (fast)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import training
from distill_jax.training import steps


def _indices(rng, epoch, n, batch_size):
    return np.asarray(steps.epoch_indices(rng, jnp.asarray(epoch, jnp.int32), n, batch_size))


# ------------------------------------------------------------------ epoch_indices


def test_an_epoch_is_a_permutation_of_steps_times_batch_size_examples():
    rng = jax.random.PRNGKey(0)
    idx = _indices(rng, 0, 103, 10)
    assert idx.shape == (10, 10)  # 103 // 10 steps; the remainder of 3 is dropped
    flat = idx.ravel()
    assert len(np.unique(flat)) == flat.size  # no example twice
    assert flat.min() >= 0 and flat.max() < 103
    # Without a remainder an epoch is every example exactly once.
    np.testing.assert_array_equal(np.sort(_indices(rng, 0, 100, 10).ravel()), np.arange(100))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        steps.epoch_indices(rng, 0, 9, 10)


def test_shuffles_depend_on_the_rng_and_the_epoch_and_nothing_else():
    rng, other = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    first = _indices(rng, 0, 103, 10)
    # Same (rng, epoch): same order, also traced under jit (as the scanned epoch calls it).
    np.testing.assert_array_equal(first, _indices(rng, 0, 103, 10))
    jitted = jax.jit(lambda r, e: steps.epoch_indices(r, e, 103, 10))
    np.testing.assert_array_equal(first, jitted(rng, jnp.asarray(0, jnp.int32)))
    assert not np.array_equal(first, _indices(rng, 1, 103, 10))
    assert not np.array_equal(first, _indices(other, 0, 103, 10))
    assert not np.array_equal(first.ravel(), np.arange(100))  # shuffled, not in dataset order
    # The dropped remainder is redrawn every epoch, so no example is left out for good.
    seen = set()
    for epoch in range(10):
        seen.update(_indices(rng, epoch, 103, 10).ravel().tolist())
    assert seen == set(range(103))


# ------------------------------------------------------------------ the scanned epoch


def _recording_step(state, teacher_params, batch):
    """Records, per example id (= label), the position at which it was drawn, and checks rows travel together."""
    ids = batch["label"]
    position = state.step * ids.shape[0] + jnp.arange(ids.shape[0])
    params = {
        "count": state.params["count"].at[ids].add(1),
        "position": state.params["position"].at[ids].set(position),
        # The image row gathered with each label is that example's (image value = its id).
        "mismatch": state.params["mismatch"] + jnp.sum(batch["image"][:, 0] != ids),
    }
    return state._replace(step=state.step + 1, params=params), {"loss": jnp.zeros(())}


def test_train_epoch_draws_each_real_example_at_most_once_in_the_epoch_order():
    num_rows, num_real, batch_size = 108, 103, 10  # rows past 103 are padding
    ids = np.arange(num_rows, dtype=np.int32)
    data = {"image": jnp.asarray(np.stack([ids, ids], 1).astype(np.float32)), "label": jnp.asarray(ids)}
    rng = jax.random.PRNGKey(3)

    def fresh():  # a new state each epoch: the epoch donates (deletes) the one it gets
        params = {"count": jnp.zeros(num_rows, jnp.int32), "position": jnp.full(num_rows, -1, jnp.int32),
                  "mismatch": jnp.zeros((), jnp.int32)}
        return steps.TrainState(jnp.asarray(0, jnp.int32), params, (), jnp.array(rng))

    epoch_fn = steps.make_train_epoch(_recording_step, batch_size=batch_size, num_examples=num_real)
    orders = []
    for epoch in range(2):
        state, _ = epoch_fn(fresh(), None, data, np.asarray(epoch, np.int32))
        count = np.asarray(state.params["count"])
        assert int(state.step) == num_real // batch_size
        assert count.max() == 1 and count.sum() == (num_real // batch_size) * batch_size
        assert count[num_real:].sum() == 0  # padding rows are never drawn
        assert int(state.params["mismatch"]) == 0
        # The order is the epoch's shuffle from the state's rng: what a resumed run redraws.
        position = np.asarray(state.params["position"])
        drawn = np.argsort(np.where(position < 0, np.iinfo(np.int32).max, position))[: count.sum()]
        np.testing.assert_array_equal(drawn, _indices(rng, epoch, num_real, batch_size).ravel())
        orders.append(drawn)
    assert not np.array_equal(orders[0], orders[1])


# ------------------------------------------------------------------ the update step


def _linear(params, x, train=False, rngs=None):
    return x.reshape(x.shape[0], -1) * params["w"]


def _exposing_objective(logits, teacher_logits, batch, step):
    """Squared distance to the teacher, with the logits both sides saw as metrics."""
    per_example = jnp.mean((logits - teacher_logits) ** 2, -1)
    return per_example, {"loss": jnp.mean(per_example), "student": logits, "teacher": teacher_logits}


def _step_inputs(seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.uniform(0.1, 1.0, (6, 8, 8, 1)).astype(np.float32))  # no zero pixel
    batch = {"image": images, "label": jnp.zeros(6, jnp.int32)}
    tx = optax.sgd(0.1)
    state = training.create_train_state({"w": jnp.ones(())}, tx, jax.random.PRNGKey(seed))
    return tx, state, batch


def _jitter2(key, batch):
    from distill_jax.data import jitter

    return {**batch, "image": jitter(key, batch["image"], 2)}


def test_the_teacher_sees_the_jittered_images_the_student_sees():
    tx, state, batch = _step_inputs()
    teacher_params = {"w": jnp.asarray(2.0)}
    step = jax.jit(training.make_train_step(_linear, tx, _exposing_objective, teacher_apply=_linear,
                                            batch_transform=_jitter2))
    new_state, m = step(state, teacher_params, batch)
    raw = np.asarray(batch["image"]).reshape(6, -1)
    # The student's inputs are jittered (some pixel shifted in as zero) ...
    assert not np.allclose(np.asarray(m["student"]), raw)
    # ... and the teacher ran on exactly those inputs (its logits are 2x the student's, w=1).
    np.testing.assert_allclose(np.asarray(m["teacher"]), 2.0 * np.asarray(m["student"]), rtol=1e-6)

    # A cached teacher output in the batch is used instead of running the teacher:
    # computed once on the raw images, it is not what the jittered step gives.
    cached = dict(batch, teacher_logits=2.0 * jnp.asarray(raw))
    cached_state, cm = step(state, teacher_params, cached)
    np.testing.assert_array_equal(np.asarray(cm["teacher"]), np.asarray(cached["teacher_logits"]))
    np.testing.assert_array_equal(np.asarray(cm["student"]), np.asarray(m["student"]))  # same jitter draw
    assert not np.allclose(cached_state.params["w"], new_state.params["w"])


def test_without_jitter_a_cached_teacher_is_the_teacher_in_the_step():
    tx, state, batch = _step_inputs(1)
    teacher_params = {"w": jnp.asarray(2.0)}
    step = jax.jit(training.make_train_step(_linear, tx, _exposing_objective, teacher_apply=_linear))
    in_step, m = step(state, teacher_params, batch)
    np.testing.assert_allclose(np.asarray(m["student"]), np.asarray(batch["image"]).reshape(6, -1))
    cached = dict(batch, teacher_logits=_linear(teacher_params, batch["image"]))
    from_cache, _ = step(state, teacher_params, cached)
    np.testing.assert_allclose(from_cache.params["w"], in_step.params["w"], rtol=1e-6)
    assert int(in_step.step) == 1 and not np.allclose(in_step.params["w"], 1.0)  # it did update


def test_evaluate_counts_errors_per_class_over_several_batches():
    # 10 examples in batches of 3 (the last one padded): the per-class counts
    # add up over batches, padding counts for nothing.
    from distill_jax.training import steps

    labels = jnp.asarray([0, 1, 2, 2, 1, 0, 2, 2, 1, 0], jnp.int32)
    predicted = jnp.asarray([0, 2, 2, 1, 1, 0, 0, 2, 2, 1], jnp.int32)
    apply_fn = lambda params, x, train: jax.nn.one_hot(x[:, 0].astype(jnp.int32), 3) * 5.0
    evaluate = steps.make_evaluate(apply_fn, num_classes=3, batch_size=3)
    result = evaluate(None, predicted[:, None].astype(jnp.float32), labels)
    wrong = np.asarray(predicted != labels)
    np.testing.assert_array_equal(result["errors_per_class"], np.bincount(np.asarray(labels)[wrong], minlength=3))
    np.testing.assert_array_equal(result["count_per_class"], np.bincount(np.asarray(labels), minlength=3))
    assert int(result["errors"]) == wrong.sum() and int(result["count"]) == 10
    assert float(result["accuracy"]) == pytest.approx(1 - wrong.mean())


def test_the_shuffle_and_step_streams_are_distinct():
    # Epoch e's permutation and step e's dropout/jitter keys fold the same
    # base key; their stream tags keep them independent.
    assert steps._SHUFFLE_STREAM != steps._STEP_STREAM


def test_an_epoch_donates_the_state_and_keeps_the_teacher():
    # The jitted epoch reuses the state's buffers (donated), never the
    # teacher's: the same teacher params serve every epoch.
    from distill_jax import sharding

    def step(state, teacher_params, batch):
        update = jnp.mean(batch["image"]) * teacher_params["scale"]
        new = state._replace(step=state.step + 1, params={"w": state.params["w"] + update})
        return new, {"loss": update}

    tx = optax.sgd(0.1)
    data = {"image": jnp.arange(8.0).reshape(8, 1), "label": jnp.zeros(8, jnp.int32)}
    teacher = {"scale": jnp.ones(())}
    make_state = lambda: steps.create_train_state({"w": jnp.zeros(3)}, tx, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh("data=-1")
    layout = steps.make_layout(mesh, jax.eval_shape(make_state), "replicated", teacher, "replicated")
    for epoch_fn in (steps.make_train_epoch(step, batch_size=4),
                     steps.make_train_epoch(step, batch_size=4, layout=layout)):
        state = jax.device_put(make_state(), layout.state)
        teacher_on_mesh = jax.device_put(teacher, layout.teacher)
        for epoch in range(2):
            old = state
            state, _ = epoch_fn(state, teacher_on_mesh, data, np.asarray(epoch, np.int32))
            assert old.params["w"].is_deleted() and not teacher_on_mesh["scale"].is_deleted()
        np.testing.assert_allclose(state.params["w"], 2 * 2 * 3.5)  # 2 epochs x 2 steps x mean of 4 of 0..7


def test_the_student_trains_with_dropout_drawn_from_the_step_key():
    from distill_jax import models, objectives

    model = models.create({"name": "mlp", "hidden": (16,), "hidden_dropout": 0.5})
    params = models.init_params(model, jax.random.PRNGKey(0), (1, 4, 4, 1))
    tx = optax.sgd(0.1)
    step = jax.jit(training.make_train_step(model.apply, tx, objectives.supervised()))
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(1), (8, 4, 4, 1)), "label": jnp.arange(8) % 10}
    losses = []
    for seed in (0, 1):
        state = training.create_train_state(params, tx, jax.random.PRNGKey(seed))
        _, metrics = step(state, None, batch)
        losses.append(float(metrics["loss"]))
    # Without dropout the loss would not depend on the run's key; with it, the masks differ.
    clean = float(objectives.supervised()(model.apply(params, batch["image"], train=False), None, batch)[1]["loss"])
    assert losses[0] != losses[1] and clean not in losses
