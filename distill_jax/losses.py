"""Distillation losses: small pure functions in the style of ``optax.losses``.

Conventions shared by every loss here:

* Logits in, class axis ``axis`` (default ``-1``), per-example (per-token) loss
  out with **no reduction**: the output has the input's shape without ``axis``.
* Computed in float32 whatever the input dtype (bf16 logits are upcast first).
* ``where`` (broadcastable to the logits) selects the classes that take part.
  A ``-inf`` logit also removes its class, in *both* distributions: it means
  "not in the vocabulary for this comparison" (a masked vocabulary, top-k or
  top-p filtered logits). A row with no class left has loss 0 and gradient 0.
  To drop a padding token, pass ``where=mask[..., None]``.
* Finite values and gradients for logits of +-1e4, ``-inf`` entries and fully
  masked rows (no ``0 * inf`` anywhere: masked entries are replaced by 0
  *before* any arithmetic, the "double where" trick).
* Usable under ``jit``, ``grad`` and ``vmap``. Arguments that can be checked
  without tracing (temperature, beta, class counts, index ranges) are checked
  eagerly and give a ``ValueError`` that says what to change. A traced
  temperature, label or index that is invalid (e.g. a schedule reaching
  T = 0 inside ``jit``) makes the loss NaN, never a finite wrong value, and
  raises at the source with traced checks on (:mod:`distill_jax.checks`).

The hard-label term is optax's own
``optax.losses.softmax_cross_entropy_with_integer_labels``; it is not
re-implemented here.
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import checks

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = [
    "hinton_kd",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "logit_mse",
    "decoupled_kd",
    "top_k_kd",
    "top_k_log_probs",
    "hint_loss",
    "attention_transfer",
    "uld",
    "masked_log_softmax",
]


# --------------------------------------------------------------------------
# Argument checks (eager where the value is concrete).


def _concrete(value) -> np.ndarray | None:
    """Returns ``value`` as numpy if it is known without tracing, else None."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value)
    except Exception:  # pragma: no cover - exotic array types
        return None


def _check_temperature(temperature) -> None:
    if callable(temperature):
        raise TypeError(
            "temperature is a function (a schedule?). Losses take a number; "
            "wrap the loss with distill_jax.objectives.combine, which evaluates "
            "schedules at the current step."
        )
    value = _concrete(temperature)
    if value is not None and (np.any(~np.isfinite(value)) or np.any(value <= 0)):
        raise ValueError(
            f"temperature must be a finite number > 0, got {value}. "
            "Hinton et al. use T in [1, 20]; T=1 is the plain softmax."
        )


def _temperature(temperature) -> Array:
    """T as float32, checked; a traced T that is not finite and > 0 becomes NaN (so is the loss)."""
    _check_temperature(temperature)
    t = jnp.asarray(temperature, jnp.float32)
    if _concrete(temperature) is not None:
        return t
    ok = jnp.isfinite(t) & (t > 0)
    checks.require(ok, "temperature must be a finite number > 0")
    return checks.poison(t, ok)


def _check_beta(beta) -> None:
    value = _concrete(beta)
    if value is not None and (np.any(~np.isfinite(value)) or np.any(value < 0) or np.any(value > 1)):
        raise ValueError(
            f"beta must lie in [0, 1], got {value}. beta=0 is forward KL "
            "KL(teacher || student), beta=1 is reverse KL KL(student || teacher)."
        )


def _check_same_classes(student: Array, teacher: Array, axis: int, what: str = "logits") -> None:
    if student.ndim == 0 or teacher.ndim == 0:
        raise ValueError(f"{what} must have a class axis; got scalars.")
    s_classes = student.shape[axis]
    t_classes = teacher.shape[axis]
    if s_classes != t_classes:
        raise ValueError(
            f"student and teacher {what} have different class counts along axis "
            f"{axis}: student {s_classes} (shape {student.shape}) vs teacher "
            f"{t_classes} (shape {teacher.shape}). Give the student the teacher's "
            "output size, or map the teacher's classes onto the student's first."
        )


def _float32(x: ArrayLike) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


# --------------------------------------------------------------------------
# Masked log-softmax: the one numerically delicate primitive everything uses.


def masked_log_softmax(
    logits: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> tuple[Array, Array]:
    """Log-softmax over the valid entries only, safe for masked rows.

    An entry is valid where ``where`` is true and the logit is not ``-inf``.
    NaN is never a mask: a NaN (or ``+inf``) among the valid entries makes
    the row's log-probs NaN, so a diverged model gives a NaN loss, not 0.

    Returns:
      ``(log_probs, valid)``: ``log_probs`` is ``log softmax(logits)`` over the
      valid entries and exactly 0 at invalid ones (so that products with a
      zero probability stay 0, never ``0 * -inf``); ``valid`` is the boolean
      mask actually used. A row with no valid entry gives all zeros.

    Example:
      >>> import jax.numpy as jnp
      >>> log_p, valid = masked_log_softmax(jnp.array([0.0, 0.0, -jnp.inf]))
      >>> jnp.exp(log_p) * valid
      Array([0.5, 0.5, 0. ], dtype=float32)
    """
    x = _float32(logits)
    valid = x != -jnp.inf  # NaN != -inf: a NaN stays valid and poisons its row
    if where is not None:
        valid = valid & jnp.broadcast_to(jnp.asarray(where, bool), x.shape)
    x = jnp.where(valid, x, 0.0)
    # The max shift is only for stability; its gradient cancels, so stop it.
    row_max = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    shifted = jnp.where(valid, x - row_max, 0.0)
    exp = jnp.where(valid, jnp.exp(shifted), 0.0)
    total = jnp.sum(exp, axis=axis, keepdims=True)
    any_valid = total > 0
    log_total = jnp.log(jnp.where(any_valid | jnp.isnan(total), total, 1.0))
    log_probs = jnp.where(valid, shifted - log_total, 0.0)
    return log_probs, valid


def _pair_log_probs(student_logits, teacher_logits, temperature, axis, where):
    """Tempered log-probs of student and teacher over their common support."""
    student_logits = jnp.asarray(student_logits)
    teacher_logits = jnp.asarray(teacher_logits)
    _check_same_classes(student_logits, teacher_logits, axis)
    temperature = _temperature(temperature)
    s = _float32(student_logits)
    t = _float32(teacher_logits)
    shape = jnp.broadcast_shapes(s.shape, t.shape)
    valid = (jnp.broadcast_to(s, shape) != -jnp.inf) & (jnp.broadcast_to(t, shape) != -jnp.inf)
    if where is not None:
        valid = valid & jnp.broadcast_to(jnp.asarray(where, bool), shape)
    s_scaled = jnp.where(valid, jnp.broadcast_to(s, shape), 0.0) / temperature
    t_scaled = jnp.where(valid, jnp.broadcast_to(t, shape), 0.0) / temperature
    log_q, _ = masked_log_softmax(s_scaled, axis=axis, where=valid)
    log_p, _ = masked_log_softmax(t_scaled, axis=axis, where=valid)
    return log_q, log_p, valid


def _kl(log_p: Array, log_q: Array, valid: Array, axis) -> Array:
    """KL(p || q) = sum p (log p - log q) over valid entries; 0*log0 = 0."""
    p = jnp.where(valid, jnp.exp(log_p), 0.0)
    return jnp.sum(jnp.where(valid, p * (log_p - log_q), 0.0), axis=axis)


# --------------------------------------------------------------------------
# Soft-target losses on full logits.


def forward_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperature: ArrayLike = 1.0,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
    r"""Forward KL divergence KL(teacher || student) at temperature T.

    .. math::
      p = \mathrm{softmax}(t / T),\quad q = \mathrm{softmax}(s / T),\quad
      \ell = \sum_i p_i (\log p_i - \log q_i)

    Mode-covering: the student is pushed to put mass wherever the teacher
    does. This is the KD term of Hinton et al. (2015) *without* the T^2
    factor (see :func:`hinton_kd`) and the token-level loss of most LLM
    distillation (e.g. MiniLLM's baseline, Tunix's logit strategy).

    References:
      Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
      2015, arXiv:1503.02531.

    Args:
      student_logits: ``[..., num_classes]`` student logits.
      teacher_logits: teacher logits, same class count (broadcastable batch).
      temperature: T > 0 that divides both sets of logits.
      axis: the class axis.
      where: optional mask of classes that take part, broadcastable to logits.

    Returns:
      Per-example KL, float32, shape of the logits without ``axis``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[0.0, 0.0]]); t = jnp.array([[0.0, jnp.log(3.0)]])
      >>> forward_kl(s, t)  # 0.25 log 0.5 + 0.75 log 1.5
      Array([0.13081...], dtype=float32)
    """
    log_q, log_p, valid = _pair_log_probs(student_logits, teacher_logits, temperature, axis, where)
    return _kl(log_p, log_q, valid, axis)


def reverse_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperature: ArrayLike = 1.0,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
    r"""Reverse KL divergence KL(student || teacher) at temperature T.

    .. math::
      \ell = \sum_i q_i (\log q_i - \log p_i),\quad
      q = \mathrm{softmax}(s / T),\ p = \mathrm{softmax}(t / T)

    Mode-seeking: the student concentrates on the teacher's main modes, the
    objective of MiniLLM for generative models.

    References:
      Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models",
      ICLR 2024, arXiv:2306.08543.

    Args and returns as :func:`forward_kl`.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[0.0, 0.0]]); t = jnp.array([[0.0, jnp.log(3.0)]])
      >>> reverse_kl(s, t)  # 0.5 log 2 + 0.5 log(2/3)
      Array([0.14384...], dtype=float32)
    """
    log_q, log_p, valid = _pair_log_probs(student_logits, teacher_logits, temperature, axis, where)
    return _kl(log_q, log_p, valid, axis)


def hinton_kd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperature: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
    r"""Hinton et al.'s soft-target loss: T^2 * KL(softmax(t/T) || softmax(s/T)).

    .. math::
      \ell = T^2 \sum_i p_i (\log p_i - \log q_i),\quad
      \frac{\partial \ell}{\partial s_i} = T\,(q_i - p_i)

    The gradient of the unscaled KL w.r.t. the student logits is (q - p)/T,
    so the T^2 factor keeps gradient magnitudes comparable across
    temperatures and lets the soft term be mixed with the hard-label
    cross-entropy at fixed weights (paper, section 2). At high T with
    zero-mean logits the gradient tends to (s - t)/N: matching logits, see
    :func:`logit_mse`.

    References:
      Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
      2015, arXiv:1503.02531, eq. (2)-(3).

    Args and returns as :func:`forward_kl`; ``temperature`` is required.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[1.0, 2.0, 3.0]]); t = jnp.array([[3.0, 2.0, 1.0]])
      >>> hinton_kd(s, t, temperature=4.0)
      Array([1.3196...], dtype=float32)
    """
    t_sq = jnp.square(_temperature(temperature))
    return t_sq * forward_kl(student_logits, teacher_logits, temperature, axis=axis, where=where)


def generalized_jsd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    beta: ArrayLike = 0.5,
    temperature: ArrayLike = 1.0,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
    r"""Generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024).

    .. math::
      M = \beta\,p + (1-\beta)\,q,\qquad
      \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p \| M) + (1-\beta)\,\mathrm{KL}(q \| M)

    with p the teacher's and q the student's softmax at temperature T. M is
    mixed in probability space, computed in log space with logsumexp. The
    endpoints follow TRL's ``GKDTrainer`` so numbers compare with TRL:
    ``beta=0`` returns exactly :func:`forward_kl` (KL(p || q)) and ``beta=1``
    exactly :func:`reverse_kl` (KL(q || p)); in between it interpolates from
    mode-covering to mode-seeking. (The formula itself vanishes at both
    endpoints; the endpoint convention is the limit up to the 1/beta scale.)

    References:
      Agarwal et al., "On-Policy Distillation of Language Models: Learning
      from Self-Generated Mistakes", ICLR 2024, arXiv:2306.13649.

    Args:
      student_logits, teacher_logits, temperature, axis, where: as
        :func:`forward_kl`.
      beta: interpolation weight in [0, 1].

    Returns:
      Per-example divergence, float32.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[0.0, 0.0]]); t = jnp.array([[0.0, jnp.log(3.0)]])
      >>> generalized_jsd(s, t, beta=0.5)
      Array([0.0338...], dtype=float32)
    """
    _check_beta(beta)
    log_q, log_p, valid = _pair_log_probs(student_logits, teacher_logits, temperature, axis, where)
    fkl = _kl(log_p, log_q, valid, axis)
    rkl = _kl(log_q, log_p, valid, axis)
    concrete = _concrete(beta)
    if concrete is not None and concrete.ndim == 0:
        if float(concrete) == 0.0:
            return fkl
        if float(concrete) == 1.0:
            return rkl
    beta = jnp.asarray(beta, jnp.float32)
    # Interior betas only reach the logs; endpoints are selected below.
    inner = jnp.clip(beta, 1e-7, 1.0 - 1e-7)
    log_m = jnp.logaddexp(log_p + jnp.log(inner), log_q + jnp.log1p(-inner))
    log_m = jnp.where(valid, log_m, 0.0)
    jsd = inner * _kl(log_p, log_m, valid, axis) + (1.0 - inner) * _kl(log_q, log_m, valid, axis)
    return jnp.where(beta <= 0.0, fkl, jnp.where(beta >= 1.0, rkl, jsd))


def logit_mse(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    zero_mean: bool = False,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
    r"""Logit matching, Hinton's high-temperature limit: 1/2 mean_i (s_i - t_i)^2.

    .. math::
      \ell = \frac{1}{2N} \sum_{i=1}^{N} (s_i - t_i)^2,\qquad
      \frac{\partial \ell}{\partial s_i} = \frac{s_i - t_i}{N}

    which equals the limit of :func:`hinton_kd`'s gradient as T grows, when
    both sets of logits have zero mean (Hinton et al., eq. 3; Bucila et al.
    2006 matched logits directly). With ``zero_mean=True`` each row's mean
    (over the valid classes) is removed first, which makes the loss invariant
    to adding a constant to the logits, as the softmax losses are. N counts
    the valid classes.

    References:
      Hinton, Vinyals & Dean 2015, arXiv:1503.02531, section 2.1;
      Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014.

    Example:
      >>> import jax.numpy as jnp
      >>> logit_mse(jnp.array([[1.0, 3.0]]), jnp.array([[0.0, 0.0]]))
      Array([2.5], dtype=float32)
    """
    student_logits = jnp.asarray(student_logits)
    teacher_logits = jnp.asarray(teacher_logits)
    _check_same_classes(student_logits, teacher_logits, axis)
    s = _float32(student_logits)
    t = _float32(teacher_logits)
    shape = jnp.broadcast_shapes(s.shape, t.shape)
    s = jnp.broadcast_to(s, shape)
    t = jnp.broadcast_to(t, shape)
    valid = (s != -jnp.inf) & (t != -jnp.inf)
    if where is not None:
        valid = valid & jnp.broadcast_to(jnp.asarray(where, bool), shape)
    s = jnp.where(valid, s, 0.0)
    t = jnp.where(valid, t, 0.0)
    count = jnp.sum(valid, axis=axis, keepdims=True).astype(jnp.float32)
    safe_count = jnp.maximum(count, 1.0)
    if zero_mean:
        s = jnp.where(valid, s - jnp.sum(s, axis=axis, keepdims=True) / safe_count, 0.0)
        t = jnp.where(valid, t - jnp.sum(t, axis=axis, keepdims=True) / safe_count, 0.0)
    sq = jnp.where(valid, jnp.square(s - t), 0.0)
    return 0.5 * jnp.sum(sq, axis=axis) / jnp.squeeze(safe_count, axis=axis)


# --------------------------------------------------------------------------
# Label-aware and sparse-teacher losses.


def decoupled_kd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    alpha: ArrayLike = 1.0,
    beta: ArrayLike = 8.0,
    temperature: ArrayLike = 4.0,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
    r"""Decoupled knowledge distillation (DKD, Zhao et al. 2022).

    Splits KD into a target-class term (TCKD) and a non-target-class term
    (NCKD), weighted independently:

    .. math::
      b = [p_y, 1 - p_y],\quad \hat p_j = \frac{p_j}{1 - p_y}\ (j \ne y)

      \ell = \alpha\,T^2\,\mathrm{KL}(b^{t} \| b^{s})
           + \beta\,T^2\,\mathrm{KL}(\hat p^{t} \| \hat p^{s})

    with p = softmax(logits / T) and y the label, as mdistiller's
    ``dkd_loss`` defines it (its batch mean becomes a per-example loss here;
    its warm-up is a weight schedule, see ``distill_jax.objectives``).
    The non-target softmax excludes the target class exactly (mdistiller
    subtracts 1000 from it), and log(1 - p_y) is computed as a logsumexp over
    the other classes, so it stays finite when p_y -> 1.

    References:
      Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022,
      arXiv:2203.08679.

    Args:
      student_logits, teacher_logits: ``[..., num_classes]``.
      labels: integer targets, shape of the logits without ``axis``.
      alpha: weight of TCKD. beta: weight of NCKD. temperature: T > 0.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[2.0, 1.0, 0.0]]); t = jnp.array([[3.0, 0.0, 1.0]])
      >>> decoupled_kd(s, t, jnp.array([0]), temperature=1.0)
      Array([3.7784...], dtype=float32)
    """
    student_logits = jnp.asarray(student_logits)
    teacher_logits = jnp.asarray(teacher_logits)
    _check_same_classes(student_logits, teacher_logits, axis)
    temperature = _temperature(temperature)
    num_classes = student_logits.shape[axis]
    labels = jnp.asarray(labels)
    labels_ok = checks.in_range(labels, num_classes, "labels")
    axis = axis % student_logits.ndim
    batch_shape = jnp.broadcast_shapes(student_logits.shape, teacher_logits.shape)
    batch_shape = batch_shape[:axis] + batch_shape[axis + 1 :]
    if labels.shape != batch_shape:
        raise ValueError(
            f"labels have shape {labels.shape} but the logits need one label per example, shape {batch_shape}; "
            "a label array is never broadcast over the examples."
        )
    one_hot = jax.nn.one_hot(labels, num_classes, axis=axis, dtype=bool)
    log_q, log_p, valid = _pair_log_probs(student_logits, teacher_logits, temperature, axis, where)
    target = one_hot & valid
    others = (~one_hot) & valid

    def binary_and_rest(log_probs):
        # log p_y and log(1 - p_y) = logsumexp over the other classes.
        log_target = jnp.sum(jnp.where(target, log_probs, 0.0), axis=axis)
        has_target = jnp.any(target, axis=axis)
        rest_max = jax.lax.stop_gradient(
            jnp.max(jnp.where(others, log_probs, -jnp.inf), axis=axis, keepdims=True)
        )
        rest_max = jnp.where(jnp.isfinite(rest_max), rest_max, 0.0)
        rest_sum = jnp.sum(jnp.where(others, jnp.exp(jnp.where(others, log_probs - rest_max, 0.0)), 0.0), axis=axis)
        has_rest = rest_sum > 0
        log_rest = jnp.log(jnp.where(has_rest, rest_sum, 1.0)) + jnp.squeeze(rest_max, axis)
        binary = jnp.stack([log_target, log_rest], axis=-1)
        binary_valid = jnp.stack([has_target, has_rest], axis=-1)
        # Non-target distribution: renormalize over the other classes.
        non_target = jnp.where(others, log_probs - jnp.expand_dims(log_rest, axis), 0.0)
        return binary, binary_valid, non_target

    b_s, b_valid, n_s = binary_and_rest(log_q)
    b_t, _, n_t = binary_and_rest(log_p)
    tckd = _kl(b_t, b_s, b_valid, -1)
    nckd = _kl(n_t, n_s, others, axis)
    loss = jnp.square(temperature) * (jnp.asarray(alpha, jnp.float32) * tckd + jnp.asarray(beta, jnp.float32) * nckd)
    return loss if labels_ok is None else checks.poison(loss, labels_ok)


def top_k_log_probs(
    teacher_logits: ArrayLike,
    k: int,
    temperature: ArrayLike = 1.0,
    *,
    axis: int = -1,
) -> tuple[Array, Array]:
    """The teacher's k largest log-probabilities at temperature T, and their indices.

    What a logit cache or an API teacher stores per token, and the input of
    :func:`top_k_kd`. The values are ``log_softmax(teacher_logits / T)`` over
    the full vocabulary, so the mass outside the top k is recoverable as
    ``1 - sum(exp(values))``. Vocabularies smaller than k are padded with
    ``-inf`` values (index 0).

    Returns:
      ``(values, indices)``, float32 and int32, class axis moved last.
    """
    logits = jnp.moveaxis(_float32(teacher_logits), axis, -1)
    log_p, valid = masked_log_softmax(logits / _temperature(temperature))
    log_p = jnp.where(valid, log_p, -jnp.inf)
    vocab = log_p.shape[-1]
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}.")
    if k > vocab:
        pad = [(0, 0)] * (log_p.ndim - 1) + [(0, k - vocab)]
        log_p = jnp.pad(log_p, pad, constant_values=-jnp.inf)
    values, indices = jax.lax.top_k(log_p, k)
    indices = jnp.where(indices < vocab, indices, 0).astype(jnp.int32)
    return values, indices


def check_top_k_tail(tail: str, k: int | None) -> None:
    """Refuses a tail mode that does not exist, and a top-k loss that cannot train (k=1 with renormalize)."""
    if tail not in ("renormalize", "bucket"):
        raise ValueError(f"tail must be 'renormalize' or 'bucket', got {tail!r}.")
    if tail == "renormalize" and k == 1:
        raise ValueError(
            "top-k KD with k=1 and tail='renormalize' is 0 with gradient 0 for every student (one kept entry "
            "renormalizes to probability 1 on both sides), so it would train nothing. Use tail='bucket', which "
            "also scores the mass outside the teacher's top k, or keep k >= 2 entries."
        )


def top_k_kd(
    student_logits: ArrayLike,
    teacher_top_values: ArrayLike,
    teacher_top_indices: ArrayLike,
    temperature: ArrayLike = 1.0,
    tail: Literal["renormalize", "bucket"] = "bucket",
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> Array:
    r"""Forward KL against a sparse teacher that kept only its top-k log-probs.

    ``teacher_top_values`` are the teacher's log-probabilities at the
    distillation temperature T (see :func:`top_k_log_probs`), at
    ``teacher_top_indices`` in the student's vocabulary; ``-inf`` values are
    padding and take no part. The student's distribution is
    q = softmax(s / T) over its full vocabulary. Two ways to treat the
    teacher's missing mass:

    * ``tail="bucket"`` (the default): a (k+1)-th "tail" entry holds the remaining mass,
      :math:`1 - \sum_K p` for the teacher and :math:`\sum_{j \notin K} q_j`
      for the student (computed as a logsumexp, not by subtraction), so the
      student is also told how much mass to keep off the top k. With k equal
      to the vocabulary size this is exactly :func:`forward_kl`. A kept
      entry that the student masks (``-inf`` logit) or ``where`` drops joins
      the tail on both sides; a student with no mass left outside the kept
      entries has no tail, and then the teacher's tail mass leaves the
      comparison and the rest is renormalized.
    * ``tail="renormalize"``: both distributions are renormalized over the k
      kept entries, :math:`\ell = \mathrm{KL}(\hat p_K \| \hat q_K)`
      (what many top-k logit caches do). Not a divergence between the full
      distributions: it ignores how much mass the student puts outside the
      teacher's top k (any amount there costs nothing), and with k = 1 it
      is 0 with gradient 0 for every student, so k = 1 is refused; a row
      whose padding leaves one kept entry contributes nothing either.

    No T^2 factor (as :func:`forward_kl`); scale the objective weight by T^2
    for Hinton-style mixing.

    References:
      Raman et al., "For Distillation, Tokens Are Not All You Need", 2023;
      Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
      Distillation in LLMs", ACL 2025, arXiv:2503.16870 (top-k bias and
      tail handling).

    Args:
      student_logits: ``[..., vocab]``.
      teacher_top_values: ``[..., k]`` teacher log-probabilities at T.
      teacher_top_indices: ``[..., k]`` integer indices into the vocabulary.
      temperature: T > 0 applied to the student's logits.
      tail: ``"renormalize"`` or ``"bucket"``.
      axis: class axis of ``student_logits`` (the k axis is last).
      where: optional mask over the k entries, broadcastable to the values.

    Returns:
      Per-example KL, float32.
    """
    check_top_k_tail(tail, jnp.shape(teacher_top_values)[-1] if jnp.ndim(teacher_top_values) else None)
    temperature = _temperature(temperature)
    student = jnp.moveaxis(_float32(student_logits), axis, -1)
    values = _float32(teacher_top_values)
    indices = jnp.asarray(teacher_top_indices)
    if values.shape != indices.shape:
        raise ValueError(
            f"teacher_top_values {values.shape} and teacher_top_indices "
            f"{indices.shape} must have the same shape."
        )
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"teacher_top_indices must be integers, got {indices.dtype}.")
    vocab = student.shape[-1]
    indices_ok = checks.in_range(indices, vocab, "teacher_top_indices",
                           " They index the student's vocabulary: pad with a valid index and a -inf value instead.")
    log_q_full, q_valid = masked_log_softmax(student / temperature)
    batch_shape = jnp.broadcast_shapes(student.shape[:-1], values.shape[:-1])
    log_q_full = jnp.broadcast_to(log_q_full, batch_shape + (vocab,))
    q_valid = jnp.broadcast_to(q_valid, batch_shape + (vocab,))
    values = jnp.broadcast_to(values, batch_shape + values.shape[-1:])
    indices = jnp.broadcast_to(indices, batch_shape + indices.shape[-1:])
    log_q_k = jnp.take_along_axis(log_q_full, indices, axis=-1)
    q_valid_k = jnp.take_along_axis(q_valid, indices, axis=-1)
    valid = (values != -jnp.inf) & q_valid_k
    if where is not None:
        valid = valid & jnp.broadcast_to(jnp.asarray(where, bool), values.shape)
    values = jnp.where(valid, values, 0.0)
    log_q_k = jnp.where(valid, log_q_k, 0.0)

    if tail == "renormalize":
        log_p_hat, _ = masked_log_softmax(values, where=valid)
        log_q_hat, _ = masked_log_softmax(log_q_k, where=valid)
        return _poison_rows(_kl(log_p_hat, log_q_hat, valid, -1), indices_ok)

    # Teacher tail: log(1 - sum_K p) = log1p(-exp(logsumexp_K log p)), clamped
    # at 0 mass (a cache stored in bf16 can sum to slightly over 1).
    has_any = jnp.any(valid, axis=-1)
    log_mass_k = jax.nn.logsumexp(jnp.where(valid, values, -jnp.inf), axis=-1)
    log_mass_k = jnp.where(has_any, log_mass_k, -1.0)
    mass_k = jnp.clip(jnp.exp(log_mass_k), 0.0, 1.0)
    tail_mass = 1.0 - mass_k
    teacher_has_tail = has_any & (tail_mass > 1e-7)
    log_p_tail = jnp.log(jnp.where(teacher_has_tail, tail_mass, 1.0))
    # Student tail: logsumexp of its log-probs outside the kept indices.
    # Scatter (not one_hot) so memory stays O(batch * vocab), not O(batch * k * vocab).
    rows = int(np.prod(batch_shape))
    kept = (
        jnp.zeros((rows, vocab), bool)
        .at[jnp.arange(rows)[:, None], indices.reshape(rows, indices.shape[-1])]
        .max(valid.reshape(rows, valid.shape[-1]))
        .reshape(batch_shape + (vocab,))
    )
    outside = q_valid & ~kept
    rest_max = jax.lax.stop_gradient(jnp.max(jnp.where(outside, log_q_full, -jnp.inf), axis=-1))
    rest_max = jnp.where(jnp.isfinite(rest_max), rest_max, 0.0)
    shifted = jnp.where(outside, log_q_full - rest_max[..., None], 0.0)
    rest_sum = jnp.sum(jnp.where(outside, jnp.exp(shifted), 0.0), axis=-1)
    student_has_tail = rest_sum > 0
    log_q_tail = jnp.log(jnp.where(student_has_tail, rest_sum, 1.0)) + rest_max
    # Teacher mass on the tail with no student mass there would be an
    # infinite KL; that cannot happen unless the student masks its own
    # vocabulary, so the tail entry needs both sides.
    tail_valid = teacher_has_tail & student_has_tail
    log_p = jnp.concatenate([values, log_p_tail[..., None]], axis=-1)
    log_q = jnp.concatenate([log_q_k, log_q_tail[..., None]], axis=-1)
    full_valid = jnp.concatenate([valid, tail_valid[..., None]], axis=-1)
    # A student that masks every class outside the kept ones has no tail: the
    # teacher's tail mass then leaves the comparison and the rest is
    # renormalized over the common support (else the KL could go negative).
    dropped = (teacher_has_tail & ~tail_valid)[..., None]
    log_p_common, _ = masked_log_softmax(log_p, where=full_valid)
    log_p = jnp.where(dropped, log_p_common, jnp.where(full_valid, log_p, 0.0))
    log_q = jnp.where(full_valid, log_q, 0.0)
    return _poison_rows(_kl(log_p, log_q, full_valid, -1), indices_ok)


def _poison_rows(loss: Array, entries_ok: Array | None) -> Array:
    """NaN for every row with an invalid entry (``entries_ok`` has a trailing entry axis)."""
    return loss if entries_ok is None else checks.poison(loss, jnp.all(entries_ok, axis=-1))


# --------------------------------------------------------------------------
# Cross-tokenizer losses.


def _sorted_probs(logits: Array, temperature: Array, axis: int, masks: Sequence, who: str) -> Array:
    """One side of :func:`uld`: tempered softmax over its valid classes, class axis last, sorted descending.

    The masks (``None`` or boolean arrays) are ANDed with ``logits != -inf``;
    they may add leading batch axes. A row with no valid class is all zeros.
    """
    x = _float32(logits)
    if x.ndim == 0:
        raise ValueError(f"{who} logits must have a class axis; got a scalar.")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for the {who} logits of shape {x.shape}.")
    axis = axis % x.ndim - x.ndim  # counted from the end: masks may add leading axes
    masks = [jnp.asarray(m, bool) for m in masks if m is not None]
    try:
        shape = jnp.broadcast_shapes(x.shape, *(m.shape for m in masks))
    except ValueError:
        raise ValueError(
            f"the {who} masks (shapes {[m.shape for m in masks]}) do not broadcast to the {who} logits "
            f"{x.shape}; a mask over classes must have that side's class count, a mask of tokens a "
            "class axis of size 1 (mask[..., None])."
        ) from None
    x = jnp.broadcast_to(x, shape)
    valid = x != -jnp.inf  # NaN != -inf: a NaN stays valid and poisons its row
    for m in masks:
        valid = valid & jnp.broadcast_to(m, shape)
    # Masked entries become 0 before the division (no -inf / T in any gradient).
    log_p, valid = masked_log_softmax(jnp.where(valid, x, 0.0) / temperature, axis=axis, where=valid)
    p = jnp.moveaxis(jnp.where(valid, jnp.exp(log_p), 0.0), axis, -1)
    return -jnp.sort(-p, axis=-1)


def uld(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperature: ArrayLike = 1.0,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    student_where: ArrayLike | None = None,
    teacher_where: ArrayLike | None = None,
) -> Array:
    r"""Universal Logit Distillation (ULD): L1 distance of the sorted probability vectors.

    .. math::
      q = \mathrm{sort}_\downarrow\big(\mathrm{softmax}(s / T)\big),\quad
      p = \mathrm{sort}_\downarrow\big(\mathrm{softmax}(t / T)\big),\quad
      \ell = \sum_{i=1}^{\max(N_s, N_t)} |q_i - p_i|

    where the shorter of the two sorted vectors is padded with zeros, so the
    student's and the teacher's vocabularies (class counts :math:`N_s`,
    :math:`N_t`) may differ: a student can learn from a teacher with another
    tokenizer. ULD is **not** a divergence of two distributions over one
    vocabulary: it compares the sorted probability vectors only, so it is
    invariant to permuting either vocabulary, and it is 0 whenever the sorted
    vectors match, even if the tokens that carry the mass differ. (That is
    why it needs no token alignment; the paper adds it to the student's
    cross-entropy on its own tokens, which supplies the token identities.)
    Values lie in [0, 2]. The paper obtains this sum as a closed form of a
    Wasserstein distance between the two distributions under a uniform
    transport cost. Pairing the student's and the teacher's token positions
    (the two tokenizers cut a text differently) is the caller's, as is the
    mean over tokens.

    Each side's distribution is a softmax over *its own* valid classes: an
    entry is valid where its logit is not ``-inf`` and that side's masks are
    true. A side with no valid class in a row counts as all zeros there, so a
    row with nothing valid on either side has loss 0 and gradient 0. NaN is
    never a mask: a NaN among a side's valid logits makes the row NaN.
    No T^2 factor.

    References:
      Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal
      Logit Distillation Loss for LLMs", 2024, arXiv:2402.12030.

    Args:
      student_logits: ``[..., student_vocab]`` student logits.
      teacher_logits: ``[..., teacher_vocab]`` teacher logits; the vocabulary
        size may differ, the batch axes must broadcast with the student's.
      temperature: T > 0 that divides both sets of logits.
      axis: the class axis of both sets of logits.
      where: optional mask of examples/tokens, broadcast to both sides' class
        axes and ANDed into both, e.g. ``mask[..., None]`` (what
        :func:`distill_jax.objectives.combine` passes); masked-out tokens
        give exactly 0. Its class axis must be 1 when the vocabularies differ.
      student_where: optional mask of the student's classes, broadcastable to
        ``student_logits``.
      teacher_where: optional mask of the teacher's classes, broadcastable to
        ``teacher_logits``.

    Returns:
      Per-example loss, float32, the broadcast batch shape (the logits'
      shapes without ``axis``).

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[0.0, 0.0]]); t = jnp.array([[jnp.log(2.0), 0.0, 0.0]])
      >>> uld(s, t)  # |0.5 - 0.5| + |0.5 - 0.25| + |0 - 0.25|
      Array([0.5...], dtype=float32)
      >>> uld(jnp.array([[0.0, 1.0]]), jnp.array([[1.0, 0.0]]))  # same probabilities, other tokens
      Array([0.], dtype=float32)
    """
    temperature = _temperature(temperature)
    q = _sorted_probs(student_logits, temperature, axis, (where, student_where), "student")
    p = _sorted_probs(teacher_logits, temperature, axis, (where, teacher_where), "teacher")
    try:
        batch = jnp.broadcast_shapes(q.shape[:-1], p.shape[:-1])
    except ValueError:
        raise ValueError(
            f"student logits {jnp.shape(student_logits)} and teacher logits {jnp.shape(teacher_logits)} "
            f"have batch shapes {q.shape[:-1]} and {p.shape[:-1]} (class axis {axis} removed) that do not "
            "broadcast; the vocabularies may differ, the examples must match."
        ) from None
    n = max(q.shape[-1], p.shape[-1])
    q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, n - q.shape[-1])])
    p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, n - p.shape[-1])])
    diff = jnp.broadcast_to(q, batch + (n,)) - jnp.broadcast_to(p, batch + (n,))
    return jnp.sum(jnp.abs(diff), axis=-1)


# --------------------------------------------------------------------------
# Feature losses.


def _as_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def hint_loss(
    student_features: ArrayLike,
    teacher_features: ArrayLike,
    kind: Literal["mse", "cosine"] = "mse",
    *,
    axis: int | Sequence[int] = -1,
    where: ArrayLike | None = None,
) -> Array:
    r"""FitNets hint loss between (regressed) student and teacher features.

    .. math::
      \ell_{\mathrm{mse}} = \frac{1}{D} \sum_d (u_d - v_d)^2,\qquad
      \ell_{\mathrm{cosine}} = 1 - \frac{u \cdot v}{\|u\|\,\|v\|}

    The student's features should already be mapped to the teacher's width
    by a learned regressor (part of the student), as in FitNets. ``axis``
    names the feature axes reduced per example, e.g. ``(1, 2, 3)`` for NHWC
    maps. Zero vectors give cosine loss 1 with finite gradients.

    References:
      Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015,
      arXiv:1412.6550.

    Example:
      >>> import jax.numpy as jnp
      >>> hint_loss(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]]), kind="cosine")
      Array([1.], dtype=float32)
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}.")
    u = _float32(student_features)
    v = _float32(teacher_features)
    if u.shape != v.shape:
        raise ValueError(
            f"student features {u.shape} and teacher features {v.shape} differ in shape; "
            "map the student's features to the teacher's with a regressor first (FitNets)."
        )
    axes = _as_axes(axis, u.ndim)
    mask = jnp.ones(u.shape, bool) if where is None else jnp.broadcast_to(jnp.asarray(where, bool), u.shape)
    u = jnp.where(mask, u, 0.0)
    v = jnp.where(mask, v, 0.0)
    if kind == "mse":
        count = jnp.maximum(jnp.sum(mask, axis=axes), 1).astype(jnp.float32)
        return jnp.sum(jnp.square(u - v), axis=axes) / count
    eps = 1e-12
    dot = jnp.sum(u * v, axis=axes)
    norm_u = jnp.sqrt(jnp.maximum(jnp.sum(u * u, axis=axes), eps))
    norm_v = jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=axes), eps))
    return 1.0 - dot / (norm_u * norm_v)


def attention_transfer(
    student_maps: ArrayLike,
    teacher_maps: ArrayLike,
    p: float = 2,
    *,
    channel_axis: int = -1,
) -> Array:
    r"""Activation-based attention transfer (Zagoruyko & Komodakis 2017).

    The attention map of activations A (``[batch, *spatial, channels]``) is
    the channel mean of |A|^p, flattened and L2-normalized; the loss is the
    mean squared difference of the student's and teacher's normalized maps:

    .. math::
      Q = \mathrm{vec}\Big(\frac{1}{C}\sum_c |A_c|^p\Big),\qquad
      \ell = \frac{1}{HW} \Big\| \frac{Q^s}{\|Q^s\|_2} - \frac{Q^t}{\|Q^t\|_2} \Big\|_2^2

    as in the authors' code (``at_loss``) and mdistiller. Channel counts may
    differ between student and teacher; spatial sizes must agree.

    References:
      Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017,
      arXiv:1612.03928.

    Returns:
      Per-example loss, shape ``[batch]``.
    """
    s = jnp.moveaxis(_float32(student_maps), channel_axis, -1)
    t = jnp.moveaxis(_float32(teacher_maps), channel_axis, -1)
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(
            f"student maps {s.shape} and teacher maps {t.shape} differ in batch or spatial "
            "size (channels may differ); resize one of them first."
        )
    if s.ndim < 2:
        raise ValueError("maps need at least a batch and a channel axis.")

    def attention(a):
        # Explicit sizes, not -1: an empty batch has no size to infer from.
        q = jnp.mean(jnp.power(jnp.abs(a) + 0.0, p), axis=-1).reshape(a.shape[0], int(np.prod(a.shape[1:-1])))
        norm = jnp.sqrt(jnp.maximum(jnp.sum(q * q, axis=-1, keepdims=True), 1e-24))
        return q / norm

    return jnp.mean(jnp.square(attention(s) - attention(t)), axis=-1)
