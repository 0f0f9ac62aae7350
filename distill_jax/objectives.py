"""Distillation objectives: weighted sums of losses, with schedules.

An *objective* is a function

    objective(student_outputs, teacher_outputs, batch, step=0)
        -> (per_example_loss, metrics)

where ``metrics`` is a dict of scalars that logs every term separately
(``"<name>"``: the term's mean, ``"<name>/weight"``: its weight at ``step``,
``"loss"``: the weighted total's mean). Build one with :func:`combine`:

    >>> from functools import partial
    >>> from distill_jax.losses import hinton_kd
    >>> objective = combine(
    ...     hard=(0.1, cross_entropy),
    ...     soft=(0.9, partial(hinton_kd, temperature=4.0)),
    ... )

A term may be

* a loss of ``(student_logits, teacher_logits)`` such as ``partial(hinton_kd,
  temperature=4.0)``;
* a loss that also takes ``labels`` (e.g. ``decoupled_kd``): it gets
  ``batch["label"]``;
* a loss of ``(student_logits, teacher_top_values, teacher_top_indices)``
  (``top_k_kd``), when the teacher's outputs are a cached top-k pair;
* a function marked with :func:`objective_term`, called as
  ``fn(student_outputs, teacher_outputs, batch)`` (e.g. :func:`cross_entropy`).

Weights, and any keyword bound with ``functools.partial`` (a temperature,
DKD's beta, ...), may be optax schedules: functions of the step, evaluated at
the ``step`` the objective is called with.

With a ``"mask"`` in the batch (per example, or per token of a language
model), losses get ``where=mask[..., None]``: masked-out entries take no
part and are exactly 0, and the metrics average over the kept ones.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from distill_jax import checks, losses

Array = jax.Array
Objective = Callable[..., tuple[Array, dict[str, Array]]]

__all__ = [
    "objective_term",
    "cross_entropy",
    "combine",
    "masked_mean",
    "supervised",
    "hinton",
    "from_spec",
    "LOSSES",
]

_TERM_MARK = "__distill_objective_term__"


def objective_term(fn: Callable) -> Callable:
    """Marks ``fn(student_outputs, teacher_outputs, batch)`` as a full term."""
    setattr(fn, _TERM_MARK, True)
    return fn


def _is_marked(fn: Callable) -> bool:
    while isinstance(fn, functools.partial):
        if getattr(fn, _TERM_MARK, False):
            return True
        fn = fn.func
    return bool(getattr(fn, _TERM_MARK, False))


@objective_term
def cross_entropy(student_logits, teacher_logits, batch, *, label_key: str = "label") -> Array:
    """Hard-label term: optax's softmax cross-entropy with ``batch[label_key]``.

    ``teacher_logits`` is ignored (it may be None), so the same objective
    machinery trains teachers and hard-label students. A label outside
    ``[0, num_classes)`` is an error, or a NaN loss under ``jit`` (optax
    alone wraps -1 to the last class, a finite wrong value).
    """
    del teacher_logits
    logits = jnp.asarray(student_logits).astype(jnp.float32)
    labels = jnp.asarray(batch[label_key])
    ok = checks.in_range(labels, logits.shape[-1], f"batch[{label_key!r}] (class labels)")
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss if ok is None else checks.poison(loss, ok)


def masked_mean(values: Array, mask: Array | None = None) -> Array:
    """Mean of ``values``, counting only entries where ``mask`` (broadcast) is true.

    0 (not NaN) when nothing is selected: an all-padding batch logs 0.
    """
    values = jnp.asarray(values, jnp.float32)
    if mask is None:
        return jnp.mean(values)
    mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), values.shape)
    total = jnp.sum(jnp.where(mask > 0, values, 0.0) * mask)
    return total / jnp.maximum(jnp.sum(mask), 1.0)


def _at_step(value: Any, step) -> Any:
    return value(step) if callable(value) else value


def _takes_labels(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "labels" in params


def _as_term(fn: Callable) -> Callable:
    """Normalizes any supported term to ``term(student, teacher, batch, step)``."""
    if not callable(fn):
        raise TypeError(f"an objective term must be callable, got {fn!r}.")
    scheduled = {}
    if isinstance(fn, functools.partial):
        scheduled = {k: v for k, v in fn.keywords.items() if callable(v)}
    marked = _is_marked(fn)
    takes_labels = not marked and _takes_labels(fn)

    def term(student, teacher, batch, step):
        call = fn
        if scheduled:
            # Re-bind the scheduled keywords with their value at this step.
            call = functools.partial(fn, **{k: v(step) for k, v in scheduled.items()})
        if marked:
            return call(student, teacher, batch)
        if teacher is None:
            raise ValueError(
                f"term {fn!r} needs teacher outputs but got None; pass teacher "
                "logits or use cross_entropy alone for supervised training."
            )
        extra = {}
        if isinstance(batch, Mapping) and batch.get("mask") is not None:
            # Masked-out examples or tokens take no part (and give exactly 0).
            extra["where"] = jnp.asarray(batch["mask"]) > 0
            extra["where"] = extra["where"][..., None]
        if takes_labels:
            extra["labels"] = batch["label"]
        teacher = teacher if isinstance(teacher, tuple) else (teacher,)  # a top-k cache is (values, indices)
        return call(student, *teacher, **extra)

    return term


def combine(**terms: tuple[Any, Callable]) -> Objective:
    """Combines named ``(weight, term)`` pairs into one objective.

    Args:
      **terms: ``name=(weight, term)``. ``weight`` is a number or a schedule
        (``step -> weight``, e.g. ``optax.linear_schedule``); ``term`` is any
        of the forms in this module's docstring.

    Returns:
      ``objective(student_outputs, teacher_outputs, batch, step=0)`` returning
      the per-example weighted sum and a metrics dict. If ``batch`` has a
      ``"mask"`` entry (per example, or per token), metrics average over the
      true entries only.
    """
    if not terms:
        raise ValueError("combine() needs at least one term, e.g. hard=(1.0, cross_entropy).")
    normalized = {}
    for name, pair in terms.items():
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"term {name!r} must be a (weight, loss) pair, got {pair!r}.")
        weight, fn = pair
        normalized[name] = (weight, _as_term(fn))

    def objective(student_outputs, teacher_outputs, batch, step=0):
        mask = batch.get("mask") if isinstance(batch, Mapping) else None
        total = 0.0
        metrics = {}
        for name, (weight, term) in normalized.items():
            w = jnp.asarray(_at_step(weight, step), jnp.float32)
            value = term(student_outputs, teacher_outputs, batch, step)
            total = total + w * value
            metrics[name] = masked_mean(value, mask)
            metrics[f"{name}/weight"] = w
        metrics["loss"] = masked_mean(total, mask)
        return total, metrics

    objective.terms = tuple(normalized)  # for introspection and configs
    return objective


def supervised() -> Objective:
    """Plain cross-entropy on the labels: teachers and hard-label students."""
    return combine(hard=(1.0, cross_entropy))


def hinton(temperature, soft_weight=1.0, hard_weight=0.0) -> Objective:
    """Hinton et al.'s objective: hard_weight * CE + soft_weight * hinton_kd(T).

    hinton_kd already carries the T^2 factor, so the weights need no
    rescaling when T changes. ``hard_weight=0`` is the paper's MNIST student
    "regularized only by matching the soft targets".
    """
    terms = {"soft": (soft_weight, functools.partial(losses.hinton_kd, temperature=temperature))}
    if not (isinstance(hard_weight, (int, float)) and hard_weight == 0):
        terms["hard"] = (hard_weight, cross_entropy)
    return combine(**terms)


#: Names usable in configs (``from_spec``).
LOSSES: dict[str, Callable] = {
    "cross_entropy": cross_entropy,
    "hinton_kd": losses.hinton_kd,
    "forward_kl": losses.forward_kl,
    "reverse_kl": losses.reverse_kl,
    "generalized_jsd": losses.generalized_jsd,
    "logit_mse": losses.logit_mse,
    "decoupled_kd": losses.decoupled_kd,
    "top_k_kd": losses.top_k_kd,
    "uld": losses.uld,
}


def from_spec(spec: Mapping[str, Mapping[str, Any]]) -> Objective:
    """Builds an objective from a plain dict, as experiment configs hold it.

    Example spec::

        {"hard": {"loss": "cross_entropy", "weight": 0.1},
         "soft": {"loss": "hinton_kd", "weight": 0.9, "temperature": 20.0}}

    Every key other than ``loss`` and ``weight`` is bound to the loss as a
    keyword argument. The cross-tokenizer losses ``aligned_kd`` and
    ``aligned_uld`` (:mod:`distill_jax.cross_tokenizer`) also take
    ``student_tokenizer`` and ``teacher_tokenizer`` paths.
    """
    from distill_jax import cross_tokenizer

    terms = {}
    for name, entry in dict(spec).items():
        entry = dict(entry)
        loss_name = entry.pop("loss", None)
        if loss_name in cross_tokenizer.CROSS_TOKENIZER_LOSSES:
            # A teacher of another tokenizer: the term reads the batch's alignment (distill_jax.cross_tokenizer).
            weight = entry.pop("weight", 1.0)
            terms[name] = (weight, cross_tokenizer.make_term(loss_name, **entry))
            continue
        if loss_name not in LOSSES:
            raise ValueError(
                f"objective term {name!r}: unknown loss {loss_name!r}; choose one of "
                f"{sorted(LOSSES) + list(cross_tokenizer.CROSS_TOKENIZER_LOSSES)}."
            )
        weight = entry.pop("weight", 1.0)
        fn = LOSSES[loss_name]
        terms[name] = (weight, functools.partial(fn, **entry) if entry else fn)
    return combine(**terms)


def chunked_from_spec(spec: Mapping[str, Mapping[str, Any]], *, chunk_size: int) -> Objective:
    """:func:`from_spec` for language models whose logits are never materialized (:mod:`distill_jax.chunked`).

    The objective takes ``student_outputs = (hidden, head)`` (the final norm's
    output and the ``[dim, vocab]`` projection), ``teacher_outputs`` the
    teacher's ``(hidden, head)``, a cached top-k ``(values, indices)`` or
    None, and a batch with ``"label"`` and ``"mask"``; it returns the
    token-weighted mean loss (a scalar: each term is a chunked
    ``total / count``) and the metrics of :func:`combine`. Same value as
    :func:`from_spec`'s token-weighted mean, up to float rounding.

    ``uld`` runs here only with one shared vocabulary (the chunked projection
    needs it); a teacher head of another vocabulary size is refused. For
    cross-tokenizer ULD use :func:`from_spec` on the logits.
    """
    from distill_jax import chunked

    terms = {}
    for name, entry in dict(spec).items():
        entry = dict(entry)
        loss_name = entry.pop("loss", None)
        if loss_name in ("aligned_kd", "aligned_uld"):
            raise ValueError(f"objective term {name!r}: {loss_name} (a teacher of another tokenizer) has no chunked "
                             "form; set config.chunk_size=0.")
        if loss_name not in LOSSES:
            raise ValueError(f"objective term {name!r}: unknown loss {loss_name!r}; choose one of {sorted(LOSSES)}.")
        if loss_name == "decoupled_kd":
            raise ValueError(f"objective term {name!r}: decoupled_kd takes class labels; it has no chunked token form.")
        terms[name] = (entry.pop("weight", 1.0), loss_name, entry)

    def objective(student_outputs, teacher_outputs, batch, step=0):
        hidden, head = student_outputs
        mask = batch["mask"]
        total = jnp.zeros((), jnp.float32)
        metrics = {}
        for name, (weight, loss_name, kwargs) in terms.items():
            w = jnp.asarray(_at_step(weight, step), jnp.float32)
            if loss_name == "cross_entropy":
                value, count = chunked.chunked_cross_entropy(hidden, head, batch["label"], mask, chunk_size=chunk_size)
            elif teacher_outputs is None:
                raise ValueError(f"term {name!r} ({loss_name}) needs the teacher's outputs but got None.")
            elif loss_name == "top_k_kd":
                values, indices = teacher_outputs
                value, count = chunked.chunked_top_k_kd(hidden, head, values, indices, mask, chunk_size=chunk_size, **kwargs)
            else:
                t_hidden, t_head = teacher_outputs
                if loss_name == "uld" and jnp.ndim(t_head) == 2 and jnp.shape(t_head)[1] != jnp.shape(head)[-1]:
                    raise ValueError(
                        f"term {name!r} (uld): the teacher's head has {jnp.shape(t_head)[1]} output classes, the "
                        f"student's {jnp.shape(head)[-1]}; the chunked objective needs one shared vocabulary. "
                        "For cross-tokenizer ULD use from_spec on materialized logits (or losses.uld)."
                    )
                value, count = chunked.chunked_token_loss(hidden, head, t_hidden, t_head, mask, loss=LOSSES[loss_name],
                                                          chunk_size=chunk_size, **kwargs)
            mean = value / jnp.maximum(count, 1.0)
            total = total + w * mean
            metrics[name] = mean
            metrics[f"{name}/weight"] = w
        metrics["loss"] = total
        return total, metrics

    objective.terms = tuple(terms)
    return objective
