"""On-device augmentation: random small translations ("jitter").

Hinton et al. train the MNIST teacher on inputs jittered by up to two pixels.
Doing it with pad + ``lax.dynamic_slice`` under ``vmap`` keeps it inside the
jitted training step: no host round-trip, one random shift per example.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _check_batch(images: jax.Array) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected images of shape [B, H, W, C], got shape {images.shape}")


def _translate_padded(images: jax.Array, shifts: jax.Array, pad: int) -> jax.Array:
    """Shift each image by ``shifts[b] = (dy, dx)``, |dy|, |dx| <= pad, zero fill.

    Output pixel ``(y, x)`` is input pixel ``(y - dy, x - dx)``: positive ``dy``
    moves the content down, positive ``dx`` moves it right. Zero-padding by
    ``pad`` first means every window start ``pad - shift`` is in bounds, so
    ``dynamic_slice`` never clamps.
    """
    _, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    starts = pad - shifts.astype(jnp.int32)

    def one(img: jax.Array, start: jax.Array) -> jax.Array:
        return lax.dynamic_slice(img, (start[0], start[1], 0), (h, w, c))

    return jax.vmap(one)(padded, starts)


def translate(images: jax.Array, shifts: jax.Array) -> jax.Array:
    """Deterministic per-example translation with zero fill (what ``jitter`` samples).

    ``shifts`` is int ``[B, 2]`` of ``(dy, dx)``; shifts beyond the image size
    give an all-zero image. Exposed so tests (and users) can pin the shifts.
    """
    _check_batch(images)
    _, h, w, _ = images.shape
    if shifts.shape != (images.shape[0], 2):
        raise ValueError(f"expected shifts of shape [{images.shape[0]}, 2], got {shifts.shape}")
    pad = max(h, w)
    shifts = jnp.clip(jnp.asarray(shifts, jnp.int32), -pad, pad)
    return _translate_padded(images, shifts, pad)


@functools.partial(jax.jit, static_argnames="max_shift")
def jitter(rng: jax.Array, images: jax.Array, max_shift: int = 2) -> jax.Array:
    """Translate each image by an independent random integer ``(dy, dx)``.

    Each of ``dy``, ``dx`` is uniform in ``[-max_shift, max_shift]``; pixels
    shifted in from outside are zero. Shape and dtype are preserved.
    ``max_shift`` is static (it fixes the padding); ``max_shift=0`` is identity.
    """
    _check_batch(images)
    if not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
    if max_shift == 0:
        return images
    shifts = jax.random.randint(rng, (images.shape[0], 2), -max_shift, max_shift + 1)
    return _translate_padded(images, shifts, max_shift)
