r"""Token-level distillation between a teacher and a student with different tokenizers.

The teacher reads its own tokenization of the text and the student its own;
:mod:`distill_jax.data.alignment` groups their tokens into spans of the same
bytes. At the first token of each group both models have read the same text,
so their next-token distributions there describe the same continuation. Two
losses use that (per student token, 0 away from group starts, optax style:
no reduction, float32):

* :func:`aligned_uld`: Universal Logit Distillation (:func:`losses.uld`)
  between the two full distributions at each group start. The ULD paper
  pairs positions by index; after a tokenizer change index ``i`` of one
  sequence is often another piece of text than index ``i`` of the other,
  so here the pairs are the aligned group starts.
* :func:`aligned_kd`, the hybrid of GOLD (TRL) built on the alignment:

  .. math::
    \ell_g = \underbrace{\mathrm{KL}\big(p_{\cap} \,\|\, q_{\cap}\big)}_{\text{shared vocabulary}}
      + \lambda_u\, \underbrace{\mathrm{ULD}\big(\hat p_{\setminus}, \hat q_{\setminus}\big)}_{\text{the rest}}
      + \lambda_s\, \underbrace{\mathrm{KL}\big(\mathrm{Bern}(P_T(x_g)) \,\|\, \mathrm{Bern}(P_S(x_g))\big)}_{\text{multi-token spans}}

  At the start of group ``g``, :math:`p_\cap` is the teacher's
  distribution over the tokens both vocabularies spell the same way,
  renormalized over them and mapped into the student's ids, and
  :math:`q_\cap` the student's, likewise (:func:`losses.top_k_kd` with the
  renormalize tail: the shared tokens are the teacher's "kept" entries).
  Renormalized, not with a bucket for the rest: a teacher token is also a
  prefix of longer student tokens (the teacher's ``+`` covers the
  student's ``+0=``), so the two sides' masses outside the shared part are
  not the same event, and matching them would push the student off its own
  merged tokens. Tokens outside the shared part have no counterpart, so
  their renormalized distributions are compared by their sorted
  probabilities (ULD). The span term uses the chain rule: :math:`P_T(x_g) = \prod_{a \in g} p(t_a \mid
  \ldots)` is the teacher's probability of the group's whole text over its
  own tokens, :math:`P_S(x_g)` the student's over its tokens, compared as
  a binary distribution (the text continues with :math:`x_g` or not). It
  applies to groups of more than one token on either side, which the
  first term does not see beyond their first token.

  With identical tokenizers every group is one shared token, the ULD and
  span terms vanish and :func:`aligned_kd` equals :func:`losses.forward_kl`
  at every completion token (tested).

References:
  Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit
  Distillation Loss for LLMs", 2024, arXiv:2402.12030;
  TRL's GOLD trainer (General On-policy Logit Distillation), 2025.

The batch keys these read are those of
:func:`distill_jax.data.alignment.encode_aligned_examples`.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from distill_jax import losses
from distill_jax.data import alignment

Array = jax.Array

__all__ = ["CROSS_TOKENIZER_LOSSES", "aligned_kd", "aligned_uld", "make_term", "teacher_at_starts"]

#: The objective losses (config names) that take a teacher of another tokenizer.
CROSS_TOKENIZER_LOSSES = ("aligned_kd", "aligned_uld")


def teacher_at_starts(teacher_logits: Array, align_teacher_pos: Array) -> Array:
    """The teacher's logits ``[B, Lt, Vt]`` at the teacher position aligned with each student position: ``[B, L, Vt]``."""
    return jnp.take_along_axis(teacher_logits, align_teacher_pos[..., None].astype(jnp.int32), axis=1)


def _starts(batch: Mapping[str, Array], where: Array | None) -> Array:
    starts = jnp.asarray(batch["align_start"]) > 0
    return starts if where is None else starts & jnp.asarray(where, bool)


def aligned_uld(student_logits, teacher_logits, batch: Mapping[str, Array], temperature=1.0, *,
                where: Array | None = None) -> Array:
    """ULD at the aligned group starts: per student token ``[B, L]``, 0 elsewhere (see the module docstring).

    ``where``: ``[B, L]`` student tokens that take part (e.g. the loss mask).
    """
    rows = _starts(batch, where)
    at = teacher_at_starts(teacher_logits, batch["align_teacher_pos"])
    loss = losses.uld(student_logits, at, temperature, where=rows[..., None])
    return jnp.where(rows, loss, 0.0)


def _log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _label_log_probs(logits: Array, labels: Array) -> Array:
    log_p, _ = losses.masked_log_softmax(logits)
    return jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _group_sums(values: Array, groups: Array, num_groups: int) -> Array:
    """Per-row sums of ``values`` by ``groups`` (0: no group), ``[B, num_groups + 1]``."""
    values = jnp.where(groups > 0, values, 0.0)
    return jax.vmap(lambda v, g: jax.ops.segment_sum(v, g, num_segments=num_groups + 1))(values, groups)


def span_kl(student_logits, teacher_logits, batch: Mapping[str, Array], *, where: Array | None = None) -> Array:
    """The chain-rule span term of :func:`aligned_kd` alone, at each multi-token group's start ``[B, L]``.

    KL(Bern(P_T) || Bern(P_S)) of the probabilities the two models give the
    group's text, each as the product of its own tokens' conditionals
    (temperature 1: the models' probabilities of the actual text).
    """
    rows = _starts(batch, where)
    groups = jnp.asarray(batch["align_group"], jnp.int32)
    t_groups = jnp.asarray(batch["teacher_group"], jnp.int32)
    num_groups = groups.shape[-1]
    s_log = _group_sums(_label_log_probs(student_logits, batch["label"]), groups, num_groups)
    t_log = _group_sums(_label_log_probs(teacher_logits, batch["teacher_label"]), t_groups, num_groups)
    sizes = (_group_sums(jnp.ones(groups.shape), groups, num_groups)
             + _group_sums(jnp.ones(t_groups.shape), t_groups, num_groups))
    take = functools.partial(jnp.take_along_axis, indices=groups, axis=-1)
    # Clamped below probability 1, where the complement's log is -inf; float32 resolves about 1e-7 there.
    s, t = jnp.minimum(take(s_log), -1e-7), jnp.minimum(take(t_log), -1e-7)
    p = jnp.exp(t)
    kl = p * (t - s) + (1.0 - p) * (_log1mexp(t) - _log1mexp(s))
    return jnp.where(rows & (take(sizes) > 2), kl, 0.0)


def aligned_kd(student_logits, teacher_logits, batch: Mapping[str, Array], shared_student: Array,
               shared_teacher: Array, temperature=1.0, *, uld_weight: float = 1.0, span_weight: float = 1.0,
               tail: str = "renormalize", where: Array | None = None) -> Array:
    """The hybrid cross-tokenizer loss (module docstring), per student token ``[B, L]``; 0 away from group starts.

    Args:
      student_logits: ``[B, L, Vs]``. teacher_logits: ``[B, Lt, Vt]``, on the
        teacher's own tokens.
      batch: the alignment arrays (``align_start``, ``align_teacher_pos``,
        ``align_group``, ``label``, ``teacher_label``, ``teacher_group``).
      shared_student, shared_teacher: ``[M]`` ids of the tokens both
        vocabularies spell the same (:func:`alignment.shared_vocabulary`).
      temperature: T of the shared-vocabulary KL and of ULD.
      uld_weight, span_weight: the weights of the ULD and span terms.
      tail: ``"renormalize"`` (the default, see the module docstring) or
        ``"bucket"`` (the mass outside the shared tokens as one more entry
        on each side: GOLD's exact-match part taken literally; an ablation).
      where: ``[B, L]`` student tokens that take part (the loss mask).
    """
    temperature = losses._temperature(temperature)
    rows = _starts(batch, where)
    s = jnp.asarray(student_logits).astype(jnp.float32)
    at = teacher_at_starts(jnp.asarray(teacher_logits).astype(jnp.float32), batch["align_teacher_pos"])
    shared_student = jnp.asarray(shared_student, jnp.int32)
    shared_teacher = jnp.asarray(shared_teacher, jnp.int32)
    log_p, _ = losses.masked_log_softmax(at / temperature)
    values = jnp.take(log_p, shared_teacher, axis=-1)
    indices = jnp.broadcast_to(shared_student, values.shape)
    shared = losses.top_k_kd(s, values, indices, temperature, tail=tail, where=rows[..., None])
    loss = jnp.where(rows, shared, 0.0)
    if uld_weight:
        rest_s = jnp.ones(s.shape[-1], bool).at[shared_student].set(False)
        rest_t = jnp.ones(at.shape[-1], bool).at[shared_teacher].set(False)
        rest = losses.uld(s, at, temperature, student_where=rest_s & rows[..., None],
                          teacher_where=rest_t & rows[..., None])
        loss = loss + uld_weight * jnp.where(rows, rest, 0.0)
    if span_weight:
        loss = loss + span_weight * span_kl(s, teacher_logits, batch, where=where)
    return loss


def make_term(loss: str, *, student_tokenizer: str, teacher_tokenizer: str, **kwargs):
    """An objective term (``fn(student_logits, teacher_logits, batch)``) of ``aligned_kd`` or ``aligned_uld``.

    The tokenizers (Hugging Face directories or ``tokenizer.json`` files)
    give the shared vocabulary; ``kwargs`` go to the loss (``temperature``,
    ``uld_weight``, ``span_weight``). The loss mask of the batch (the
    student's completion tokens) selects the tokens.
    """
    from distill_jax.data import text
    from distill_jax.objectives import objective_term

    if loss not in CROSS_TOKENIZER_LOSSES:
        raise ValueError(f"unknown cross-tokenizer loss {loss!r}; choose one of {CROSS_TOKENIZER_LOSSES}.")
    if not student_tokenizer or not teacher_tokenizer:
        raise ValueError(f"{loss} needs student_tokenizer and teacher_tokenizer (Hugging Face tokenizer paths).")
    losses._check_temperature(kwargs.get("temperature", 1.0))
    if loss == "aligned_kd":
        vocab = alignment.shared_vocabulary(text.load_tokenizer(student_tokenizer), text.load_tokenizer(teacher_tokenizer))
        if len(vocab) < 2:
            raise ValueError(f"the two tokenizers share {len(vocab)} token(s): too few for aligned_kd's shared-vocabulary "
                             "KL. Use aligned_uld.")
        fn = functools.partial(aligned_kd, shared_student=vocab.student_ids, shared_teacher=vocab.teacher_ids, **kwargs)
    else:
        fn = functools.partial(aligned_uld, **kwargs)

    @objective_term
    def term(student_logits, teacher_logits, batch):
        if teacher_logits is None:
            raise ValueError(f"{loss} needs the teacher's logits (config.teacher.checkpoint).")
        missing = [k for k in alignment.ALIGNED_KEYS + alignment.TEACHER_KEYS if k not in batch]
        if missing:
            raise ValueError(f"{loss} needs aligned cross-tokenizer batches (distill_jax.data.alignment."
                             f"encode_aligned_examples); this batch lacks {missing}.")
        where = jnp.asarray(batch["mask"]) > 0 if batch.get("mask") is not None else None
        return fn(student_logits, teacher_logits, batch, where=where)

    term.__name__ = loss
    return term
