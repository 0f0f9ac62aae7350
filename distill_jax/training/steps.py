"""Jitted training pieces: the update step, a scanned epoch, evaluation, teacher cache.

One update runs, inside a single jitted function (as big_vision's distill
trainer does): an optional batch transform (e.g. on-device jitter), the
teacher forward under ``stop_gradient`` (or a cached teacher output), the
student forward/backward, the optax update and an optional projection of the
parameters (e.g. max-norm, in the manner of ``optax.projections``). An epoch
is a ``lax.scan`` of that update over index batches into device-resident
arrays, so Python dispatch does not bound speed.

Image and token models share this code. A batch is a dict of arrays with a
leading example axis: the model inputs (``inputs``: which keys, passed
positionally to ``apply``; ``("image",)`` for images, ``("inputs",
"valid")`` for the transformer), ``"label"`` and, for token models,
``"mask"`` (1 on the completion tokens that carry loss). With a mask, the
loss and accuracy are token-weighted means over the masked-in entries.

All randomness derives from ``state.rng`` and the global step / epoch number
(``fold_in``), never from Python-side counters: a run resumed from a
checkpoint draws exactly the same dropout masks, jitter and shuffles as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from distill_jax import sharding as sharding_lib
from distill_jax.objectives import masked_mean

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


def _mean(values: Array, mask: Array | None) -> Array:
    """Plain mean without a mask (images), token-weighted mean over ``mask`` with one."""
    return jnp.mean(values) if mask is None else masked_mean(values, mask)


def teacher_outputs_of(batch: dict, teacher_apply: Callable | None, teacher_params: PyTree, inputs: Sequence[str]):
    """What the objective gets as the teacher's outputs for ``batch``.

    Cached logits (``teacher_logits``), a cached top-k pair
    ``(teacher_top_values, teacher_top_indices)``, the teacher run on the
    batch's ``inputs`` keys under ``stop_gradient``, or None (supervised).
    """
    if "teacher_logits" in batch:
        return batch["teacher_logits"]
    if "teacher_top_values" in batch:
        return batch["teacher_top_values"], batch["teacher_top_indices"]
    if teacher_apply is not None:
        return jax.lax.stop_gradient(teacher_apply(teacher_params, *(batch[k] for k in inputs), train=False))
    return None


def make_train_step(
    student_apply: Callable,
    tx: optax.GradientTransformation,
    objective: Callable,
    *,
    teacher_apply: Callable | None = None,
    inputs: Sequence[str] = ("image",),
    batch_transform: Callable | None = None,
    projection: Callable | None = None,
    chunk_size: int = 0,
    teacher_inputs: Sequence[str] | None = None,
) -> Callable:
    """Builds ``step(state, teacher_params, batch) -> (state, metrics)`` (not jitted).

    Args:
      student_apply, teacher_apply: ``apply(params, *batch[inputs], train=...,
        rngs=...)`` (flax's ``Module.apply``). Without a cached teacher output
        in the batch and with ``teacher_apply``, the teacher runs here, on the
        same (transformed) batch the student sees; without either, the
        objective gets ``teacher_outputs=None`` (supervised).
      tx: the optax optimizer.
      objective: ``objective(student_outputs, teacher_outputs, batch, step)
        -> (per-example or per-token loss, metrics)``
        (:func:`distill_jax.objectives.combine`).
      inputs: the batch keys passed positionally to the models.
      batch_transform: ``transform(key, batch) -> batch`` run first, inside
        the jitted step (e.g. random jitter of the images).
      projection: ``params -> params`` applied after every update (e.g. a
        max-norm constraint), as ``optax.projections`` are.
      chunk_size: language models only: > 0 computes the objective
        (:func:`distill_jax.objectives.chunked_from_spec`) from the models'
        hidden states and output heads in chunks of this many positions, so
        no ``[batch, seq, vocab]`` array of either model exists.
      teacher_inputs: the batch keys passed to the teacher (default:
        ``inputs``); a teacher with another tokenizer reads its own tokens
        (``("teacher_inputs", "teacher_valid")``, see
        :mod:`distill_jax.data.alignment`).
    """
    inputs = tuple(inputs)
    teacher_inputs = inputs if teacher_inputs is None else tuple(teacher_inputs)
    if chunk_size:
        if teacher_inputs != inputs:
            raise ValueError("chunk_size > 0 needs a teacher of the student's tokenizer; set chunk_size=0.")
        return _chunked_train_step(student_apply, tx, objective, teacher_apply=teacher_apply, inputs=inputs,
                                   chunk_size=chunk_size)

    def step(state: TrainState, teacher_params: PyTree, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.fold_in(state.rng, _STEP_STREAM), state.step)
        dropout_key, transform_key = jax.random.split(key)
        if batch_transform is not None:
            batch = batch_transform(transform_key, batch)
        teacher_outputs = teacher_outputs_of(batch, teacher_apply, teacher_params, teacher_inputs)
        mask = batch.get("mask")
        model_inputs = tuple(batch[k] for k in inputs)

        def loss_fn(params):
            logits = student_apply(params, *model_inputs, train=True, rngs={"dropout": dropout_key})
            per_example, metrics = objective(logits, teacher_outputs, batch, step=state.step)
            return _mean(per_example, mask), (metrics, logits)

        grads, (metrics, logits) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if projection is not None:
            params = projection(params)
        metrics = dict(metrics)
        metrics["accuracy"] = _mean(jnp.argmax(logits, -1) == batch["label"], mask)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return step


def _chunked_train_step(student_apply, tx, objective, *, teacher_apply, inputs, chunk_size: int) -> Callable:
    """:func:`make_train_step` for token models whose logits are never materialized (see ``chunk_size`` there)."""
    from distill_jax import chunked
    from distill_jax.models.transformer import output_head

    def step(state: TrainState, teacher_params: PyTree, batch: dict) -> tuple[TrainState, dict]:
        model_inputs = tuple(batch[k] for k in inputs)
        if "teacher_top_values" in batch:
            teacher_outputs = (batch["teacher_top_values"], batch["teacher_top_indices"])
        elif teacher_apply is not None:
            teacher_outputs = jax.lax.stop_gradient(
                (teacher_apply(teacher_params, *model_inputs, train=False, return_hidden=True), output_head(teacher_params)))
        else:
            teacher_outputs = None

        def loss_fn(params):
            hidden = student_apply(params, *model_inputs, train=True, return_hidden=True)
            loss, metrics = objective((hidden, output_head(params)), teacher_outputs, batch, step=state.step)
            return loss, (metrics, hidden)

        grads, (metrics, hidden) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        right, count = chunked.chunked_accuracy(hidden, output_head(state.params), batch["label"], batch["mask"],
                                                chunk_size=chunk_size)
        metrics = dict(metrics)
        metrics["accuracy"] = right / jnp.maximum(count, 1.0)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return step


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything of a training run lives on ``mesh`` (see :mod:`distill_jax.sharding`)."""

    mesh: Any
    state: Any  # TrainState of NamedSharding (in and out; donated)
    teacher: PyTree | None  # teacher params' NamedShardings (None: no teacher)

    @property
    def data(self):
        """The data dict and each step's batch: example axis split over the data axes."""
        return sharding_lib.row_sharding(self.mesh)

    @property
    def replicated(self):
        """The epoch number in, the mean metrics out."""
        return sharding_lib.replicated(self.mesh)


def make_layout(mesh, state_like: TrainState, student_rules, teacher_params: PyTree | None = None, teacher_rules=None) -> Layout:
    """The :class:`Layout` of a ``TrainState`` (arrays or ShapeDtypeStructs) and teacher params under the rules."""
    student = sharding_lib.param_shardings(state_like.params, student_rules, mesh)
    teacher = None if teacher_params is None else sharding_lib.param_shardings(teacher_params, teacher_rules, mesh)
    return Layout(mesh, sharding_lib.train_state_shardings(state_like, student, mesh), teacher)


def first_nonfinite_step(step_metrics: dict, first_step: Array) -> Array:
    """The number (1-based, counting from the run's start) of the first step whose loss or gradient norm is not finite; 0 if none.

    ``step_metrics``: the per-step metrics of a scanned epoch (leading axis:
    the steps), ``first_step``: the state's step count before the epoch.
    """
    finite = None
    for key in ("loss", "grad_norm"):
        if key in step_metrics:
            ok = jnp.isfinite(step_metrics[key])
            finite = ok if finite is None else finite & ok
    if finite is None:
        return jnp.zeros_like(first_step)
    return jnp.where(jnp.all(finite), 0, first_step + jnp.argmin(finite) + 1).astype(jnp.int32)


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
        first_step = state.step

        def body(state, idx):
            batch = jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)
            if batch_sharding is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            return step(state, teacher_params, batch)

        state, metrics = jax.lax.scan(body, state, indices)
        means = jax.tree_util.tree_map(jnp.mean, metrics)
        means["nonfinite_step"] = first_nonfinite_step(metrics, first_step)
        return state, means

    return epoch_fn


def make_train_epoch(
    step: Callable,
    *,
    batch_size: int,
    layout: Layout | None = None,
    num_examples: int | None = None,
) -> Callable:
    """Jits ``epoch(state, teacher_params, data, epoch) -> (state, mean metrics)``.

    ``data`` is a dict of device arrays with a leading example axis (inputs,
    labels, optionally cached teacher outputs). The state is donated: its
    buffers are reused for the new state.

    With ``layout`` the jit gets explicit ``in_shardings``/``out_shardings``
    on ``layout.mesh`` and every step's batch is constrained to the data
    sharding; ``batch_size`` must then divide over the data shards.
    ``num_examples`` (default: the data's leading size) is how many leading
    rows are real examples; rows past it (padding, see
    :func:`distill_jax.sharding.shard_rows`) are never drawn.
    """
    if layout is None:
        return jax.jit(train_epoch_fn(step, batch_size=batch_size, num_examples=num_examples), donate_argnums=(0,))
    k = sharding_lib.num_data_shards(layout.mesh)
    if batch_size % k:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {k} data shards of mesh "
            f"{dict(layout.mesh.shape)}; choose a multiple of {k}."
        )
    epoch_fn = train_epoch_fn(step, batch_size=batch_size, batch_sharding=layout.data, num_examples=num_examples)
    return jax.jit(
        epoch_fn,
        donate_argnums=(0,),
        in_shardings=(layout.state, layout.teacher, layout.data, layout.replicated),
        out_shardings=(layout.state, layout.replicated),
    )


def _padded_batches(x: Array, batch_size: int) -> Array:
    n = x.shape[0]
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((steps, batch_size) + x.shape[1:])


def make_predict(apply_fn: Callable, *, batch_size: int = 1000, transform: Callable | None = None) -> Callable:
    """Jits ``predict(params, *inputs) -> outputs`` over whole arrays, in batches.

    Used for the teacher cache: the teacher's outputs on a fixed transfer set
    are computed once instead of every epoch. ``transform`` maps each
    batch's logits to what is kept (e.g. their top-k log-probs), so the full
    logits of a large vocabulary never exist for the whole set at once.
    """

    @jax.jit
    def predict(params, *inputs):
        n = inputs[0].shape[0]
        batches = tuple(_padded_batches(x, batch_size) for x in inputs)

        def one(xs):
            logits = apply_fn(params, *xs, train=False)
            return logits if transform is None else transform(logits)

        outputs = jax.lax.map(one, batches)
        return jax.tree_util.tree_map(lambda y: y.reshape((-1,) + y.shape[2:])[:n], outputs)

    return predict


def make_token_evaluate(apply_fn: Callable, *, inputs: Sequence[str] = ("inputs", "valid"), batch_size: int = 256,
                        chunk_size: int = 0) -> Callable:
    """Jits ``evaluate(params, split) -> metrics`` of a token model, teacher-forced, over a whole split.

    ``split``: a dict with ``inputs``, ``"label"`` (next tokens) and
    ``"mask"`` (1 on scored tokens). Metrics: ``loss`` (cross-entropy per
    scored token), ``token_accuracy``, ``tokens`` (how many were scored).
    ``chunk_size > 0`` computes them in sequence chunks (no full logits).
    """
    inputs = tuple(inputs)

    @jax.jit
    def evaluate(params, split):
        batches = {k: _padded_batches(split[k], batch_size) for k in inputs + ("label", "mask")}

        def body(_, batch):
            mask = batch["mask"] > 0  # padded rows have mask 0
            if chunk_size:
                from distill_jax import chunked
                from distill_jax.models.transformer import output_head

                hidden = apply_fn(params, *(batch[k] for k in inputs), train=False, return_hidden=True)
                weights = mask.astype(jnp.float32)
                ce, count = chunked.chunked_cross_entropy(hidden, output_head(params), batch["label"], weights,
                                                          chunk_size=chunk_size)
                right, _ = chunked.chunked_accuracy(hidden, output_head(params), batch["label"], weights,
                                                    chunk_size=chunk_size)
                return None, (ce, right.astype(jnp.int32), count.astype(jnp.int32))
            logits = apply_fn(params, *(batch[k] for k in inputs), train=False)
            ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"])
            right = jnp.argmax(logits, -1) == batch["label"]
            return None, (jnp.sum(jnp.where(mask, ce, 0.0)), jnp.sum(right & mask), jnp.sum(mask))

        _, (ce, right, count) = jax.lax.scan(body, None, batches)
        tokens = jnp.sum(count)
        return {
            "loss": jnp.sum(ce) / jnp.maximum(tokens, 1),
            "token_accuracy": jnp.sum(right) / jnp.maximum(tokens, 1),
            "tokens": tokens,
        }

    return evaluate


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
    "Layout",
    "TrainState",
    "make_layout",
    "make_token_evaluate",
    "teacher_outputs_of",
    "create_train_state",
    "epoch_indices",
    "make_train_step",
    "make_train_epoch",
    "train_epoch_fn",
    "make_predict",
    "make_evaluate",
    "to_host",
]
