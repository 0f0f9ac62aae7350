"""Build transfer sets: the data a student is distilled on.

Hinton et al.'s experiments distill on modified transfer sets (e.g. MNIST with
every "3" removed, or a small random subset). These helpers run once, eagerly,
with host-side index arithmetic; the arrays stay on device.

All selection is by seeded permutation, never by position: TFDS does not keep
the IDX order (see :mod:`distill_jax.data.tfds_loading`), so "the last 10k" is
not a meaningful or reproducible split.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data.tfds_loading import Dataset


def _size(ds: Dataset) -> int:
    return int(ds.labels.shape[0])


def _select(ds: Dataset, idx: np.ndarray) -> Dataset:
    idx = jnp.asarray(idx, dtype=jnp.int32)
    return Dataset(images=jnp.take(ds.images, idx, axis=0), labels=jnp.take(ds.labels, idx, axis=0))


def _class_array(classes: Iterable[int], num_classes: int) -> np.ndarray:
    arr = np.asarray(list(classes))
    if arr.size == 0:
        raise ValueError("classes must name at least one class")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"class ids must be integers, got {arr.tolist()!r}")
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise ValueError(f"class ids {sorted(set(bad.tolist()))} out of range [0, {num_classes})")
    return arr


def _filter(ds: Dataset, keep: np.ndarray, what: str) -> Dataset:
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise ValueError(f"{what} leaves no examples")
    return _select(ds, idx)


def drop_classes(ds: Dataset, classes: Iterable[int], *, num_classes: int = 10) -> Dataset:
    """All examples whose label is not in ``classes`` (order kept)."""
    cls = _class_array(classes, num_classes)
    return _filter(ds, ~np.isin(np.asarray(ds.labels), cls), f"drop_classes({cls.tolist()})")


def keep_classes(ds: Dataset, classes: Iterable[int], *, num_classes: int = 10) -> Dataset:
    """Only the examples whose label is in ``classes`` (order kept)."""
    cls = _class_array(classes, num_classes)
    return _filter(ds, np.isin(np.asarray(ds.labels), cls), f"keep_classes({cls.tolist()})")


def _permutation(n: int, seed: int) -> np.ndarray:
    if not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return np.asarray(jax.random.permutation(jax.random.key(int(seed)), n))


def take_subset(ds: Dataset, n: int, *, seed: int) -> Dataset:
    """``n`` examples drawn without replacement by a seeded permutation.

    The chosen examples keep their dataset order, so ``n == len`` returns the
    dataset unchanged and a subset is never an accidental shuffle.
    """
    size = _size(ds)
    if not 0 < n <= size:
        raise ValueError(f"n must be in [1, {size}], got {n}")
    return _select(ds, np.sort(_permutation(size, seed)[:n]))


def train_val_split(ds: Dataset, num_val: int, *, seed: int) -> tuple[Dataset, Dataset]:
    """Disjoint ``(train, val)`` from a seeded permutation; ``val`` has ``num_val`` examples.

    Both parts keep dataset order. Use this rather than slicing off the tail.
    """
    size = _size(ds)
    if not 0 < num_val < size:
        raise ValueError(f"num_val must be in [1, {size - 1}], got {num_val}")
    perm = _permutation(size, seed)
    return _select(ds, np.sort(perm[num_val:])), _select(ds, np.sort(perm[:num_val]))


def class_counts(ds: Dataset, num_classes: int = 10) -> np.ndarray:
    """Examples per class as int64 ``[num_classes]``; rejects out-of-range labels."""
    labels = np.asarray(ds.labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes})"
        )
    return np.bincount(labels.astype(np.int64), minlength=num_classes)
