r"""Memory-bounded token losses: the output projection and the loss, chunk by chunk.

For a language model the per-token losses of :mod:`distill_jax.losses` need
the ``[batch, seq, vocab]`` logits of the student *and* of the teacher, and
their backward pass keeps a few more arrays of that size (log-probs,
probabilities, the logits' cotangent). At a vocabulary of 151,936 (Qwen) one
such float32 array is 1.2 GB for 4 x 512 tokens; the unchunked
``value_and_grad`` needs several of them.

The functions here take the hidden states *after the final norm* and the
output projection instead of logits, and never form a ``[B, T, V]`` array:

* the sequence is cut into chunks of ``chunk_size`` positions (the last one
  padded, with mask 0), and a ``jax.lax.scan`` runs over the chunks;
* each step computes that chunk's logits ``hidden_chunk @ head`` (float32
  accumulation), the per-token loss, and its mask-weighted sum: only
  ``[B, chunk_size, V]`` arrays exist at a time;
* the step is wrapped in ``jax.checkpoint`` (remat), so the backward pass
  recomputes each chunk's logits from the saved hidden states instead of
  keeping them: the residuals are the inputs (``O(B T D)``), and the head's
  gradient is accumulated over the chunks in one ``[D, V]`` array;
* the teacher's side is under ``stop_gradient`` (its logits are recomputed
  in the backward pass too; that is the price of not storing them).

Peak extra memory is therefore a few ``B * chunk_size * V * 4`` bytes plus
the head gradient, independent of T (``benchmarks/chunked_kd_memory.py``
measures it). Every function returns ``(total, count)``: the token-weighted
**sum** of the loss and the sum of the mask, both float32 scalars,

.. math::
  \mathrm{total} = \sum_{b,t} m_{bt}\,\ell(s_{bt}, t_{bt}),\qquad
  \mathrm{count} = \sum_{b,t} m_{bt}

so that micro-batches (gradient accumulation) and data-parallel hosts can
add their totals and counts and divide once: ``sum(total) / sum(count)`` and
its gradient are exactly those of one large batch, which a mean per
micro-batch is not when micro-batches hold different numbers of tokens.

Conventions (as :mod:`distill_jax.losses`): float32 results whatever the
input dtype; ``mask`` holds weights, 0 meaning "not scored" (padding, the
prompt). A position with mask 0 contributes 0 and gets gradient exactly 0,
whatever its hidden state, label or cached values hold (they are replaced
before any arithmetic); NaN is never a mask: a NaN hidden state, or a NaN
mask weight, at a scored position makes the total NaN.

With :class:`distill_jax.models.transformer.Transformer` the hidden states
are the output of its ``final_norm`` (the model itself returns logits, so a
caller needs that output, not the logits) and the head is
``params["embed"]["embedding"].T`` for a tied model (``logits = x @
embedding.T``), ``params["lm_head"]["kernel"]`` otherwise.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_jax import checks, losses

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = ["chunked_token_loss", "chunked_cross_entropy", "chunked_top_k_kd"]

DEFAULT_CHUNK_SIZE = 128


# --------------------------------------------------------------------------
# Shape checks (all eager: shapes are static under jit).


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise ValueError(f"chunk_size must be a Python int >= 1 (a static number of positions), got {chunk_size!r}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 positions per chunk, got {chunk_size}.")
    return int(chunk_size)


def _check_hidden_head(hidden: Array, head: Array, who: str) -> None:
    """``who`` prefixes the argument names: ``"student_"``, ``"teacher_"`` or ``""``."""
    if hidden.ndim != 3:
        raise ValueError(
            f"{who}hidden must be [batch, seq, dim] (the hidden states after the final norm), got shape {hidden.shape}."
        )
    if head.ndim != 2:
        raise ValueError(f"{who}head must be [dim, vocab], got shape {head.shape}.")
    if hidden.shape[-1] != head.shape[0]:
        hint = (
            f" It looks like an embedding table [vocab, dim]: pass embedding.T for a tied model."
            if head.shape[1] == hidden.shape[-1]
            else ""
        )
        raise ValueError(
            f"{who}hidden has width {hidden.shape[-1]} (shape {hidden.shape}) but {who}head has "
            f"{head.shape[0]} input rows (shape {head.shape}); the head must be [dim, vocab].{hint}"
        )


def _check_mask(mask: Array, batch_seq: tuple[int, int], what: str = "hidden states") -> None:
    if mask.shape != batch_seq:
        raise ValueError(
            f"mask has shape {mask.shape} but the {what} need one weight per position, shape {batch_seq} "
            "([batch, seq]; 0 = not scored)."
        )


def _check_loss_kwargs(loss_kwargs: dict[str, Any]) -> None:
    if "axis" in loss_kwargs:
        raise ValueError("axis is not a loss keyword here: the class axis of the chunked logits is always the last one.")
    for name, value in loss_kwargs.items():
        shape = np.shape(value) if not callable(value) else ()
        if len(shape) >= 2 and any(d != 1 for d in shape[:-1]):
            raise ValueError(
                f"loss keyword {name!r} has shape {shape}; it is applied unchanged to every chunk of logits "
                "[batch, chunk_size, vocab], so only scalars and vocabulary-shaped ([vocab]) arrays are "
                "allowed. Per-token weights belong in mask."
            )


# --------------------------------------------------------------------------
# The chunked driver.


def _project(hidden: Array, head: Array) -> Array:
    """``hidden @ head`` for one chunk, accumulated (and returned) in float32."""
    return jnp.einsum("bcd,dv->bcv", hidden, head, preferred_element_type=jnp.float32).astype(jnp.float32)


def _split(x: Array, n: int, c: int) -> Array:
    """``[B, T, ...]`` -> ``[n, B, c, ...]``, the sequence zero-padded to ``n * c``."""
    b, t = x.shape[:2]
    if n * c > t:
        x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)


def _chunked_sum(
    per_token: Callable[..., Array],
    consts: tuple,
    per_position: tuple[Array, ...],
    mask: Array,
    chunk_size: int,
) -> tuple[Array, Array]:
    """``(sum(where(mask != 0, per_token * mask, 0)), sum(mask))`` over chunks of the sequence.

    ``per_token(consts, keep, *chunks)`` returns the ``[B, c]`` loss of one
    chunk; ``keep`` is the ``[B, c]`` boolean "scored" mask (padding is
    False). The chunk function is rematerialized: only its inputs are saved
    for the backward pass.
    """
    b, t = mask.shape
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    mask_chunks = _split(mask, n, c)
    chunks = tuple(_split(x, n, c) for x in per_position)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_total(consts, m, *xs):
        keep = m != 0  # NaN != 0: a NaN weight is scored, and poisons the total
        per = per_token(consts, keep, *xs)
        return jnp.sum(jnp.where(keep, per * m, 0.0))

    def body(total, inputs):
        return total + chunk_total(consts, *inputs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (mask_chunks,) + chunks)
    return total, jnp.sum(mask)


def _zero_unscored(x: Array, keep: Array, fill=0) -> Array:
    """``x`` at scored positions, ``fill`` elsewhere (``keep`` is ``[B, c]``)."""
    keep = keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim))
    return jnp.where(keep, x, jnp.asarray(fill, x.dtype))


# --------------------------------------------------------------------------
# Public losses.


def chunked_token_loss(
    student_hidden: ArrayLike,
    student_head: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_head: ArrayLike,
    mask: ArrayLike,
    *,
    loss: Callable[..., Array] = losses.forward_kl,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **loss_kwargs,
) -> tuple[Array, Array]:
    r"""A per-token distillation loss on logits it never materializes in full.

    .. math::
      s_{bt} = h^S_{bt} W^S,\quad t_{bt} = \mathrm{sg}(h^T_{bt} W^T),\quad
      \mathrm{total} = \sum_{b,t} m_{bt}\,\ell(s_{bt}, t_{bt}),\quad
      \mathrm{count} = \sum_{b,t} m_{bt}

    with :math:`\ell` = ``loss(student_logits, teacher_logits, **loss_kwargs)``
    and sg the stop-gradient. ``total / count`` is the masked mean of the
    unchunked loss, to float rounding (the sum runs chunk by chunk).

    Materialized: per chunk, a few ``[batch, chunk_size, vocab]`` float32
    arrays (both models' logits and the loss's log-probs), in the forward
    pass and again in the backward pass (remat); never ``[batch, seq, vocab]``.
    Saved for the backward pass: the hidden states and the mask. The
    student head's gradient is accumulated in one ``[Ds, vocab]`` array.

    Args:
      student_hidden: ``[batch, seq, Ds]`` student hidden states after the
        final norm (any float dtype).
      student_head: ``[Ds, vocab]`` output projection (``embedding.T`` for a
        tied model).
      teacher_hidden: ``[batch, seq, Dt]``; Dt may differ from Ds.
      teacher_head: ``[Dt, vocab]``, the student's vocabulary.
      mask: ``[batch, seq]`` weights (bool or float); 0 = not scored.
      loss: a per-token loss of ``(student_logits, teacher_logits, **kw)``
        from :mod:`distill_jax.losses`: :func:`~distill_jax.losses.forward_kl`
        (the default), :func:`~distill_jax.losses.hinton_kd` (pass
        ``temperature=``), :func:`~distill_jax.losses.reverse_kl`,
        :func:`~distill_jax.losses.generalized_jsd` (``beta=``), ...
      chunk_size: positions per chunk (static). Peak memory grows linearly
        with it; the last chunk is padded with mask 0.
      **loss_kwargs: passed to ``loss`` for every chunk: scalars (temperature,
        beta, possibly traced) or a ``[vocab]`` class mask ``where=``.

    Returns:
      ``(total, count)``, float32 scalars; the loss is ``total / count``
      (after summing both over micro-batches or hosts).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from distill_jax import losses
      >>> k = jax.random.split(jax.random.PRNGKey(0), 4)
      >>> hs, ws = jax.random.normal(k[0], (2, 5, 4)), jax.random.normal(k[1], (4, 11))
      >>> ht, wt = jax.random.normal(k[2], (2, 5, 6)), jax.random.normal(k[3], (6, 11))
      >>> mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
      >>> total, count = chunked_token_loss(hs, ws, ht, wt, mask, loss=losses.hinton_kd,
      ...                                   temperature=2.0, chunk_size=2)
      >>> count
      Array(8., dtype=float32)
      >>> full = losses.hinton_kd(hs @ ws, ht @ wt, temperature=2.0)  # [2, 5, 11] logits
      >>> bool(jnp.allclose(total / count, jnp.sum(full * mask) / jnp.sum(mask), rtol=1e-5))
      True
    """
    if not callable(loss):
        raise TypeError(f"loss must be a per-token loss function from distill_jax.losses, got {loss!r}.")
    chunk_size = _check_chunk_size(chunk_size)
    _check_loss_kwargs(loss_kwargs)
    s_h, s_w = jnp.asarray(student_hidden), jnp.asarray(student_head)
    t_h, t_w = jnp.asarray(teacher_hidden), jnp.asarray(teacher_head)
    _check_hidden_head(s_h, s_w, "student_")
    _check_hidden_head(t_h, t_w, "teacher_")
    if s_w.shape[1] != t_w.shape[1]:
        raise ValueError(
            f"student_head {s_w.shape} and teacher_head {t_w.shape} have different vocabularies "
            f"({s_w.shape[1]} vs {t_w.shape[1]}); token distillation needs a shared vocabulary."
        )
    if s_h.shape[:2] != t_h.shape[:2]:
        raise ValueError(
            f"student_hidden {s_h.shape} and teacher_hidden {t_h.shape} cover different [batch, seq] "
            f"({s_h.shape[:2]} vs {t_h.shape[:2]}); run both models on the same tokens."
        )
    mask = jnp.asarray(mask).astype(jnp.float32)
    _check_mask(mask, s_h.shape[:2])
    # No gradient reaches the teacher, not even a zero accumulated over chunks.
    t_h, t_w = jax.lax.stop_gradient(t_h), jax.lax.stop_gradient(t_w)

    def per_token(consts, keep, s_chunk, t_chunk):
        s_head, t_head = consts
        s_logits = _project(_zero_unscored(s_chunk, keep), s_head)
        t_logits = jax.lax.stop_gradient(_project(_zero_unscored(t_chunk, keep), t_head))
        return loss(s_logits, t_logits, **loss_kwargs)

    return _chunked_sum(per_token, (s_w, t_w), (s_h, t_h), mask, chunk_size)


def chunked_cross_entropy(
    hidden: ArrayLike,
    head: ArrayLike,
    labels: ArrayLike,
    mask: ArrayLike,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Array, Array]:
    r"""Token cross-entropy (SFT, or the hard-label term of KD) without full logits.

    .. math::
      \mathrm{total} = \sum_{b,t} m_{bt}\,\big(\log\textstyle\sum_v e^{s_{btv}} - s_{bt y_{bt}}\big),
      \quad s = h W,\quad \mathrm{count} = \sum_{b,t} m_{bt}

    The per-token term is optax's
    ``softmax_cross_entropy_with_integer_labels``, applied chunk by chunk
    under remat as in :func:`chunked_token_loss` (what is materialized is
    the same: ``[batch, chunk_size, vocab]`` at a time, never
    ``[batch, seq, vocab]``).

    Args:
      hidden: ``[batch, seq, dim]`` hidden states after the final norm.
      head: ``[dim, vocab]`` output projection.
      labels: ``[batch, seq]`` integer targets in ``[0, vocab)`` where the
        mask is nonzero; positions with mask 0 may hold anything (e.g. -100).
        An out-of-range label at a scored position is a ``ValueError`` when
        the labels are concrete, a NaN total under ``jit``.
      mask: ``[batch, seq]`` weights; 0 = not scored.
      chunk_size: positions per chunk.

    Returns:
      ``(total, count)``, float32 scalars.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> k = jax.random.split(jax.random.PRNGKey(0), 2)
      >>> h, w = jax.random.normal(k[0], (2, 5, 4)), jax.random.normal(k[1], (4, 11))
      >>> labels = jnp.array([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
      >>> mask = labels >= 0
      >>> total, count = chunked_cross_entropy(h, w, labels, mask, chunk_size=3)
      >>> full = optax.losses.softmax_cross_entropy_with_integer_labels(h @ w, jnp.maximum(labels, 0))
      >>> bool(jnp.allclose(total / count, jnp.sum(full * mask) / jnp.sum(mask), rtol=1e-5))
      True
    """
    chunk_size = _check_chunk_size(chunk_size)
    h, w = jnp.asarray(hidden), jnp.asarray(head)
    _check_hidden_head(h, w, "")
    labels = jnp.asarray(labels)
    if labels.shape != h.shape[:2]:
        raise ValueError(f"labels have shape {labels.shape} but hidden {h.shape} needs one label per position, {h.shape[:2]}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers (token ids), got {labels.dtype}.")
    mask = jnp.asarray(mask).astype(jnp.float32)
    _check_mask(mask, h.shape[:2])
    vocab = w.shape[1]
    labels = jnp.where(mask != 0, labels, 0).astype(jnp.int32)
    labels_ok = checks.in_range(labels, vocab, "labels (at positions with mask != 0)")
    per_position = (h, labels) if labels_ok is None else (h, labels, labels_ok)

    def per_token(consts, keep, h_chunk, y_chunk, *ok):
        (head_,) = consts
        logits = _project(_zero_unscored(h_chunk, keep), head_)
        y_chunk = jnp.clip(y_chunk, 0, vocab - 1)  # in range; a bad label is poisoned below
        ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, y_chunk)
        return checks.poison(ce, ok[0]) if ok else ce

    return _chunked_sum(per_token, (w,), per_position, mask, chunk_size)


def chunked_top_k_kd(
    student_hidden: ArrayLike,
    student_head: ArrayLike,
    teacher_top_values: ArrayLike,
    teacher_top_indices: ArrayLike,
    mask: ArrayLike,
    *,
    tail: Literal["renormalize", "bucket"] = "bucket",
    temperature: ArrayLike = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Array, Array]:
    r""":func:`~distill_jax.losses.top_k_kd` against a cached sparse teacher, chunk by chunk.

    .. math::
      \mathrm{total} = \sum_{b,t} m_{bt}\,\mathrm{KL}\big(p^K_{bt} \,\|\, q^K_{bt}\big),\quad
      q_{bt} = \mathrm{softmax}(h_{bt} W / T)

    where :math:`p^K` is the teacher's stored top-k log-probabilities at T
    (:func:`~distill_jax.losses.top_k_log_probs`, what a logit cache keeps)
    and the tail is handled as ``tail`` says (``"bucket"``, the default: a
    (k+1)-th entry holds the remaining mass; ``"renormalize"``: both sides
    renormalized over the kept entries, which ignores the student's mass
    outside them and is refused for k = 1). No T^2 factor, as :func:`~distill_jax.losses.top_k_kd`.

    Materialized: the student's ``[batch, chunk_size, vocab]`` logits and
    log-probs per chunk (recomputed in the backward pass); the teacher side
    is only ``[batch, seq, k]``.

    Args:
      student_hidden: ``[batch, seq, dim]`` after the final norm.
      student_head: ``[dim, vocab]``.
      teacher_top_values: ``[batch, seq, k]`` teacher log-probs at T
        (``-inf`` = padding entry).
      teacher_top_indices: ``[batch, seq, k]`` integer ids in ``[0, vocab)``.
      mask: ``[batch, seq]`` weights; 0 = not scored.
      tail: ``"renormalize"`` or ``"bucket"``.
      temperature: T > 0 applied to the student's logits.
      chunk_size: positions per chunk.

    Returns:
      ``(total, count)``, float32 scalars.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from distill_jax import losses
      >>> k = jax.random.split(jax.random.PRNGKey(0), 3)
      >>> h, w = jax.random.normal(k[0], (2, 5, 4)), jax.random.normal(k[1], (4, 11))
      >>> values, indices = losses.top_k_log_probs(jax.random.normal(k[2], (2, 5, 11)), k=3)
      >>> mask = jnp.ones((2, 5))
      >>> total, count = chunked_top_k_kd(h, w, values, indices, mask, tail="bucket", chunk_size=2)
      >>> full = losses.top_k_kd(h @ w, values, indices, tail="bucket")
      >>> bool(jnp.allclose(total / count, full.mean(), rtol=1e-5))
      True
    """
    losses.check_top_k_tail(tail, jnp.shape(teacher_top_values)[-1] if jnp.ndim(teacher_top_values) else None)
    chunk_size = _check_chunk_size(chunk_size)
    losses._check_temperature(temperature)
    h, w = jnp.asarray(student_hidden), jnp.asarray(student_head)
    _check_hidden_head(h, w, "student_")
    values = jnp.asarray(teacher_top_values).astype(jnp.float32)
    indices = jnp.asarray(teacher_top_indices)
    if values.shape != indices.shape:
        raise ValueError(
            f"teacher_top_values {values.shape} and teacher_top_indices {indices.shape} must have the same shape."
        )
    if values.ndim != 3 or values.shape[:2] != h.shape[:2]:
        raise ValueError(
            f"teacher_top_values/indices have shape {values.shape} but student_hidden {h.shape} needs "
            f"[batch, seq, k] = {h.shape[:2] + (values.shape[-1] if values.ndim else 'k',)}."
        )
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"teacher_top_indices must be integers, got {indices.dtype}.")
    mask = jnp.asarray(mask).astype(jnp.float32)
    _check_mask(mask, h.shape[:2])
    vocab = w.shape[1]
    scored = (mask != 0)[..., None]
    values = jnp.where(scored, values, -jnp.inf)
    indices = jnp.where(scored, indices, 0).astype(jnp.int32)
    # Concrete indices: a ValueError now (inside the scan they are traced;
    # top_k_kd then poisons the row and, with traced checks on, raises).
    if not isinstance(indices, jax.core.Tracer):
        checks.in_range(indices, vocab, "teacher_top_indices (at positions with mask != 0)",
                        " They index the student's vocabulary: pad with a valid index and a -inf value instead.")

    def per_token(consts, keep, h_chunk, v_chunk, i_chunk):
        (head_,) = consts
        logits = _project(_zero_unscored(h_chunk, keep), head_)
        # Padding positions of the last chunk: -inf values, no entry takes part.
        v_chunk = _zero_unscored(v_chunk, keep, -jnp.inf)
        return losses.top_k_kd(logits, v_chunk, i_chunk, temperature, tail)

    return _chunked_sum(per_token, (w,), (h, values, indices), mask, chunk_size)


def chunked_accuracy(
    hidden: ArrayLike,
    head: ArrayLike,
    labels: ArrayLike,
    mask: ArrayLike,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Array, Array]:
    """``(sum of mask where argmax(h W) == label, sum of mask)``, chunk by chunk; no gradient.

    A metric (top-1 agreement with the labels), so it runs under
    ``stop_gradient`` and needs no remat.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> h, w = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 4)), jnp.eye(4)
      >>> right, count = chunked_accuracy(h, w, jnp.argmax(h, -1), jnp.ones((1, 5)), chunk_size=2)
      >>> float(right), float(count)
      (5.0, 5.0)
    """
    chunk_size = _check_chunk_size(chunk_size)
    h, w = jax.lax.stop_gradient(jnp.asarray(hidden)), jax.lax.stop_gradient(jnp.asarray(head))
    _check_hidden_head(h, w, "")
    mask = jnp.asarray(mask).astype(jnp.float32)
    _check_mask(mask, h.shape[:2])
    b, t = mask.shape
    c = max(1, min(chunk_size, t))
    n = -(-t // c)

    def one(inputs):
        h_chunk, y_chunk, m_chunk = inputs
        right = jnp.argmax(_project(h_chunk, w), -1) == y_chunk
        return jnp.sum(jnp.where(right & (m_chunk != 0), m_chunk, 0.0))

    rights = jax.lax.map(one, (_split(h, n, c), _split(jnp.asarray(labels), n, c), _split(mask, n, c)))
    return jnp.sum(rights), jnp.sum(mask)
