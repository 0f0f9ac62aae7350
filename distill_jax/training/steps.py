"""Jitted training pieces: the update step, a scanned epoch, evaluation, teacher cache.

One update runs, inside a single jitted function (as big_vision's distill
trainer does): optional on-device jitter of the inputs, the teacher forward
under ``stop_gradient`` (or a cached teacher output), the student
forward/backward, the optax update and the max-norm projection. An epoch is a
``lax.scan`` of that update over index batches into device-resident arrays,
so Python dispatch does not bound speed.

All randomness derives from ``state.rng`` and the global step / epoch number
(``fold_in``), never from Python-side counters: a run resumed from a
checkpoint draws exactly the same dropout masks, jitter and shuffles as an
uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from distill_jax.data.augment import jitter
from distill_jax.models import max_norm_project

Array = jax.Array
PyTree = Any

# fold_in tags that keep the streams of random numbers apart.
_SHUFFLE_STREAM = 0
_STEP_STREAM = 1


class TrainState(NamedTuple):
    """Everything that changes during training, as one pytree."""

    step: Array  # int32 scalar: optimizer updates done so far
    params: PyTree
    opt_state: PyTree
    rng: Array  # base PRNG key (raw uint32[2]); never advanced, only folded


def create_train_state(params: PyTree, tx: optax.GradientTransformation, rng: Array) -> TrainState:
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def epoch_indices(rng: Array, epoch: Array, num_examples: int, batch_size: int) -> Array:
    """``[steps, batch_size]`` example indices of one shuffled epoch (remainder dropped)."""
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(f"the training set has {num_examples} examples, fewer than batch_size={batch_size}.")
    key = jax.random.fold_in(jax.random.fold_in(rng, _SHUFFLE_STREAM), epoch)
    perm = jax.random.permutation(key, num_examples)[: steps * batch_size]
    return perm.reshape(steps, batch_size)


def make_train_step(
    student_apply: Callable,
    tx: optax.GradientTransformation,
    objective: Callable,
    *,
    teacher_apply: Callable | None = None,
    jitter_max_shift: int = 0,
    max_norm: float | None = None,
) -> Callable:
    """Builds ``step(state, teacher_params, batch) -> (state, metrics)`` (not jitted).

    ``batch`` is a dict with ``"image"``, ``"label"`` and, when the teacher is
    cached, ``"teacher_logits"``; without it and with ``teacher_apply`` the
    teacher runs here, on the same (jittered) images the student sees.
    Without either, the objective gets ``teacher_outputs=None`` (supervised).
    """

    def step(state: TrainState, teacher_params: PyTree, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.fold_in(state.rng, _STEP_STREAM), state.step)
        dropout_key, jitter_key = jax.random.split(key)
        images = batch["image"]
        if jitter_max_shift:
            images = jitter(jitter_key, images, jitter_max_shift)
        if "teacher_logits" in batch:
            teacher_logits = batch["teacher_logits"]
        elif teacher_apply is not None:
            teacher_logits = jax.lax.stop_gradient(teacher_apply(teacher_params, images, train=False))
        else:
            teacher_logits = None

        def loss_fn(params):
            logits = student_apply(params, images, train=True, rngs={"dropout": dropout_key})
            per_example, metrics = objective(logits, teacher_logits, batch, step=state.step)
            return jnp.mean(per_example), (metrics, logits)

        grads, (metrics, logits) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = max_norm_project(params, max_norm)
        metrics = dict(metrics)
        metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return step


class EpochShardings(NamedTuple):
    """Explicit layout of a jitted epoch on a mesh (see :mod:`distill_jax.sharding`).

    Each field is a sharding or a pytree (prefix) of shardings.
    """

    state: PyTree  # the TrainState, in and out (donated)
    teacher: PyTree  # the teacher params (None: no teacher)
    data: PyTree  # the data dict (example axis split over the data axes)
    batch: Any  # what each step's gathered batch is constrained to
    metrics: Any  # the epoch number in, the mean metrics out (replicated)


def train_epoch_fn(
    step: Callable,
    *,
    batch_size: int,
    batch_sharding: Any = None,
    num_examples: int | None = None,
) -> Callable:
    """``epoch(state, teacher_params, data, epoch) -> (state, mean metrics)``, not jitted.

    A ``lax.scan`` of ``step`` over one shuffled epoch of index batches into
    ``data``. Exposed unjitted so it can be wrapped: :func:`make_train_epoch`
    jits it, :mod:`distill_jax.training.population` vmaps it over students.
    """

    def epoch_fn(state, teacher_params, data, epoch):
        n = data["label"].shape[0] if num_examples is None else num_examples
        indices = epoch_indices(state.rng, epoch, n, batch_size)

        def body(state, idx):
            batch = jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)
            if batch_sharding is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            return step(state, teacher_params, batch)

        state, metrics = jax.lax.scan(body, state, indices)
        return state, jax.tree_util.tree_map(jnp.mean, metrics)

    return epoch_fn


def make_train_epoch(
    step: Callable,
    *,
    batch_size: int,
    shardings: EpochShardings | None = None,
    num_examples: int | None = None,
) -> Callable:
    """Jits ``epoch(state, teacher_params, data, epoch) -> (state, mean metrics)``.

    ``data`` is a dict of device arrays with a leading example axis (images,
    labels, optionally cached teacher logits). The state is donated: its
    buffers are reused for the new state.

    With ``shardings`` the jit gets explicit ``in_shardings``/``out_shardings``
    and every step's batch is constrained to ``shardings.batch``.
    ``num_examples`` (default: the data's leading size) is how many leading
    rows are real examples; rows past it (padding) are never drawn.
    """
    epoch_fn = train_epoch_fn(
        step,
        batch_size=batch_size,
        batch_sharding=None if shardings is None else shardings.batch,
        num_examples=num_examples,
    )
    if shardings is None:
        return jax.jit(epoch_fn, donate_argnums=(0,))
    return jax.jit(
        epoch_fn,
        donate_argnums=(0,),
        in_shardings=(shardings.state, shardings.teacher, shardings.data, shardings.metrics),
        out_shardings=(shardings.state, shardings.metrics),
    )


def _padded_batches(x: Array, batch_size: int) -> Array:
    n = x.shape[0]
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((steps, batch_size) + x.shape[1:])


def make_predict(apply_fn: Callable, *, batch_size: int = 1000) -> Callable:
    """Jits ``predict(params, images) -> logits`` over a whole array, in batches.

    Used for the teacher cache: the teacher's logits on a fixed transfer set
    are computed once instead of every epoch.
    """

    @jax.jit
    def predict(params, images):
        n = images.shape[0]
        batches = _padded_batches(images, batch_size)
        logits = jax.lax.map(lambda x: apply_fn(params, x, train=False), batches)
        return logits.reshape((-1,) + logits.shape[2:])[:n]

    return predict


def make_evaluate(apply_fn: Callable, *, num_classes: int, batch_size: int = 1000) -> Callable:
    """Jits ``evaluate(params, images, labels) -> metrics`` over a whole split.

    Metrics: ``errors`` (count), ``accuracy``, ``loss`` (mean cross-entropy),
    ``count``, and ``errors_per_class`` / ``count_per_class`` (by true label),
    which the omitted-class transfer experiments read.
    """

    @jax.jit
    def evaluate(params, images, labels):
        n = labels.shape[0]
        image_batches = _padded_batches(images, batch_size)
        label_batches = _padded_batches(labels, batch_size)
        mask_batches = _padded_batches(jnp.ones((n,), bool), batch_size)

        def body(_, batch):
            x, y, mask = batch
            logits = apply_fn(params, x, train=False)
            wrong = (jnp.argmax(logits, -1) != y) & mask
            ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
            one_hot = jax.nn.one_hot(y, num_classes, dtype=jnp.int32) * mask[:, None]
            return None, (
                jnp.sum(wrong),
                jnp.sum(jnp.where(mask, ce, 0.0)),
                jnp.sum(one_hot * wrong[:, None], 0),
                jnp.sum(one_hot, 0),
            )

        _, (wrong, ce, wrong_per_class, count_per_class) = jax.lax.scan(
            body, None, (image_batches, label_batches, mask_batches)
        )
        errors = jnp.sum(wrong)
        return {
            "errors": errors,
            "accuracy": 1.0 - errors / n,
            "loss": jnp.sum(ce) / n,
            "count": jnp.asarray(n),
            "errors_per_class": jnp.sum(wrong_per_class, 0),
            "count_per_class": jnp.sum(count_per_class, 0),
        }

    return evaluate


def to_host(metrics: dict) -> dict:
    """Host-side, JSON-friendly copy of a dict of device scalars and vectors."""
    out = {}
    for key, value in metrics.items():
        value = jax.device_get(value)
        out[key] = value.tolist() if getattr(value, "ndim", 0) else value.item()
    return out


__all__ = [
    "EpochShardings",
    "TrainState",
    "create_train_state",
    "epoch_indices",
    "make_train_step",
    "make_train_epoch",
    "train_epoch_fn",
    "make_predict",
    "make_evaluate",
    "to_host",
]
