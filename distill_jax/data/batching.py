"""Turn an on-device :class:`Dataset` into fixed-shape batch stacks.

Fixed shapes are the point: a training epoch becomes one ``lax.scan`` over
``[steps, B, ...]`` with no Python loop and no recompilation, and evaluation
pads the last batch and carries a mask instead of producing a ragged batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distill_jax.data.tfds_loading import Dataset


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def num_batches(n: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Batches per epoch: ``n // batch_size`` (training), or the ceiling (evaluation)."""
    _check_batch_size(batch_size)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return n // batch_size if drop_remainder else -(-n // batch_size)


@functools.partial(jax.jit, static_argnames="batch_size")
def epoch_batches(rng: jax.Array, ds: Dataset, batch_size: int) -> Dataset:
    """One shuffled training epoch as ``images [steps, B, ...]``, ``labels [steps, B]``.

    A fresh seeded permutation per call (pass a new key each epoch); the last
    ``n % batch_size`` examples of the permutation are dropped so every step
    has the same shape. The dropped examples differ from epoch to epoch.
    """
    _check_batch_size(batch_size)
    n = ds.labels.shape[0]
    steps = num_batches(n, batch_size)
    if steps == 0:
        raise ValueError(f"dataset of {n} examples is smaller than batch_size={batch_size}")
    idx = jax.random.permutation(rng, n)[: steps * batch_size]
    images = jnp.take(ds.images, idx, axis=0)
    labels = jnp.take(ds.labels, idx, axis=0)
    return Dataset(
        images=images.reshape((steps, batch_size) + ds.images.shape[1:]),
        labels=labels.reshape((steps, batch_size) + ds.labels.shape[1:]),
    )


@functools.partial(jax.jit, static_argnames="batch_size")
def eval_batches(ds: Dataset, batch_size: int) -> tuple[Dataset, jax.Array]:
    """All examples in order, zero-padded to whole batches, plus a validity mask.

    Returns ``(batches, mask)`` with ``batches.images [steps, B, ...]``,
    ``batches.labels [steps, B]`` and bool ``mask [steps, B]``; ``mask.sum()``
    equals N, so masked sums count every example exactly once.
    """
    _check_batch_size(batch_size)
    n = ds.labels.shape[0]
    steps = num_batches(n, batch_size, drop_remainder=False)
    pad = steps * batch_size - n

    def pad_and_stack(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((steps, batch_size) + x.shape[1:])

    mask = (jnp.arange(steps * batch_size) < n).reshape(steps, batch_size)
    return Dataset(images=pad_and_stack(ds.images), labels=pad_and_stack(ds.labels)), mask
