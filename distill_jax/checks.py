"""Checks of values that may be traced: an error where it can be raised, NaN where it cannot.

An argument known without tracing (a Python float temperature, a numpy label
array) is checked eagerly by the function that takes it, with a
``ValueError`` that names the value. Inside ``jit`` the value is a tracer and
cannot be raised on cheaply, so every function that takes one does two
things:

* it **poisons** its output with NaN where the value is invalid
  (:func:`poison`), so a bad temperature, label or token id gives a NaN loss,
  never a finite wrong one, and the training loop stops on it naming the step;
* with traced checks on (:func:`enable`, or ``DISTILL_JAX_CHECKS=1`` in the
  environment; the test suite turns them on) it also raises at the source: a
  host callback raises ``ValueError`` with the message, which surfaces as a
  ``JaxRuntimeError`` that contains it (:func:`require`). The callback costs
  a device-to-host copy of one boolean array per call, which is why it is off
  by default.

Checks are decided when a function is traced: turn them on before the first
call of a jitted function, or clear its cache (``jax.clear_caches()``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> @jax.jit
  ... def scaled(x, t):
  ...     ok = t > 0
  ...     require(ok, "t must be > 0")
  ...     return poison(x / t, ok)
  >>> with traced_checks(False):
  ...     scaled(jnp.ones(2), -1.0)
  Array([nan, nan], dtype=float32)
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["enable", "enabled", "traced_checks", "require", "poison", "in_range"]

_ENV = "DISTILL_JAX_CHECKS"
_override: bool | None = None


def enabled() -> bool:
    """Whether traced checks raise (set by :func:`enable`, else ``$DISTILL_JAX_CHECKS``)."""
    if _override is not None:
        return _override
    return os.environ.get(_ENV, "").strip().lower() not in ("", "0", "false", "no")


def enable(on: bool = True) -> bool | None:
    """Turns traced checks on (or off); returns the previous setting, ``None`` meaning "from the environment"."""
    global _override
    previous, _override = _override, bool(on)
    return previous


@contextlib.contextmanager
def traced_checks(on: bool = True):
    """Context manager form of :func:`enable`."""
    global _override
    previous = enable(on)
    try:
        yield
    finally:
        _override = previous


def _raise_unless(message: str, ok) -> None:
    ok = np.asarray(ok)
    if not ok.all():
        bad = int(ok.size - np.count_nonzero(ok))
        raise ValueError(f"{message} ({bad} of {ok.size} values invalid, seen inside jit)")


def require(ok, message: str) -> None:
    """Raises ``ValueError(message)`` when some of ``ok`` is false.

    Concrete ``ok``: at once. Traced ``ok``: when the computation runs, and
    only with traced checks on; otherwise the caller's :func:`poison` is
    what reports the problem.
    """
    if not isinstance(ok, jax.core.Tracer):
        if not np.asarray(ok).all():
            raise ValueError(message)
    elif enabled():
        jax.debug.callback(functools.partial(_raise_unless, message), ok)


def poison(x, ok):
    """``x`` where ``ok`` holds (broadcast), NaN elsewhere; bitwise ``x`` when all is well."""
    x = jnp.asarray(x)
    return jnp.where(ok, x, jnp.asarray(jnp.nan, x.dtype))


def in_range(indices, size: int, what: str, hint: str = ""):
    """Checks integer ``indices`` against ``[0, size)``.

    Concrete indices: ``ValueError`` naming the range found, else ``None``.
    Traced ones: the per-entry ok mask (for :func:`poison`), after
    :func:`require`. (``jnp`` indexing would wrap a negative index and clamp
    or NaN-fill a large one, silently.)
    """
    if not isinstance(indices, jax.core.Tracer):
        concrete = np.asarray(indices)
        if concrete.size and (concrete.min() < 0 or concrete.max() >= size):
            raise ValueError(f"{what} must lie in [0, {size}), got values in [{concrete.min()}, {concrete.max()}].{hint}")
        return None
    ok = (indices >= 0) & (indices < size)
    require(ok, f"{what} must lie in [0, {size})")
    return ok
