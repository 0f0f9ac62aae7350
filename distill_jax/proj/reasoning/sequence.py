"""Language-model training and distillation steps for the transformer, masked to completion tokens.

One jitted update (``make_lm_train_step``) for every token-level objective:

* ``sft``: cross-entropy on the completion tokens (ground-truth traces,
  answers, or sequence-level KD: verified teacher samples);
* ``forward_kl`` / ``hinton_kd``: token-level KD against a teacher run in the
  loop (several teachers: their averaged distribution);
* ``top_k``: KD from an offline cache of the teacher's top-k log-probs
  (:func:`teacher_top_k_cache`, :func:`distill_jax.losses.top_k_kd`);
* ``gkd``: :func:`distill_jax.losses.generalized_jsd` at ``beta``, the loss
  of on-policy distillation (GKD); :func:`train` makes a fraction ``lambda``
  of the batches from the student's own samples.

Every per-token loss comes from :mod:`distill_jax.losses` with
``where=loss_mask[..., None]`` and is averaged over the completion tokens of
the batch (:func:`distill_jax.objectives.masked_mean`), so prompt and padding
tokens carry no loss and an all-padding row gives loss 0 and gradient 0.
Compiled steps are cached by (model config, loss, optimizer), so many runs of
the same shapes in one process (a study) compile once.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_jax import losses
from distill_jax.proj.reasoning import task as reasoning
from distill_jax.generation import SamplingConfig, generate
from distill_jax.models.transformer import Transformer, TransformerConfig, init_params
from distill_jax.objectives import masked_mean
from distill_jax.training.steps import TrainState, create_train_state

Array = jax.Array
PyTree = Any
LossKind = Literal["sft", "forward_kl", "hinton_kd", "top_k", "gkd"]
LOSS_KINDS = ("sft", "forward_kl", "hinton_kd", "top_k", "gkd")
TEACHER_KINDS = ("forward_kl", "hinton_kd", "gkd")

__all__ = [
    "LossSpec",
    "OptimizerSpec",
    "token_losses",
    "sequence_loss",
    "make_lm_train_step",
    "average_teacher_logits",
    "teacher_top_k_cache",
    "cache_bytes_per_token",
    "on_policy_schedule",
    "train",
    "generate_for",
    "evaluate",
    "sample_verified",
]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Which token-level loss, and its knobs (hashable: part of the compiled step's key).

    ``sft_weight`` adds that multiple of the cross-entropy on the batch's
    targets to a distillation loss (Hinton's hard-label term).
    """

    kind: LossKind = "sft"
    temperature: float = 1.0
    beta: float = 0.5
    tail: Literal["renormalize", "bucket"] = "bucket"
    sft_weight: float = 0.0

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {self.kind!r}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}.")
        losses.check_top_k_tail(self.tail, None)

    @property
    def needs_teacher(self) -> bool:
        return self.kind in TEACHER_KINDS


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """AdamW with linear warmup and cosine decay, global-norm clipping."""

    learning_rate: float = 3e-3
    steps: int = 1000
    warmup_steps: int = 50
    weight_decay: float = 0.01
    clip_norm: float = 1.0

    def make(self) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, min(self.warmup_steps, max(self.steps - 1, 0)), max(self.steps, 1), self.learning_rate * 0.1
        )
        return optax.chain(optax.clip_by_global_norm(self.clip_norm), optax.adamw(schedule, weight_decay=self.weight_decay))


def token_losses(
    spec: LossSpec,
    student_logits: Array,
    batch: Mapping[str, Array],
    teacher_logits: Array | None = None,
) -> Array:
    """Per-token loss ``[B, T]``, exactly 0 where ``batch["loss_mask"]`` is 0.

    ``batch`` holds ``targets`` and ``loss_mask``; for ``top_k`` also
    ``teacher_top_values`` / ``teacher_top_indices`` ``[B, T, k]``.
    """
    mask = batch["loss_mask"] > 0
    where = mask[..., None]
    if spec.kind == "top_k":
        per_token = losses.top_k_kd(
            student_logits, batch["teacher_top_values"], batch["teacher_top_indices"], spec.temperature, spec.tail, where=where
        )
    elif spec.kind == "sft":
        per_token = jnp.zeros(mask.shape, jnp.float32)
    else:
        if teacher_logits is None:
            raise ValueError(f"loss {spec.kind!r} needs teacher logits.")
        if spec.kind == "forward_kl":
            per_token = losses.forward_kl(student_logits, teacher_logits, spec.temperature, where=where)
        elif spec.kind == "hinton_kd":
            per_token = losses.hinton_kd(student_logits, teacher_logits, spec.temperature, where=where)
        else:
            per_token = losses.generalized_jsd(student_logits, teacher_logits, spec.beta, spec.temperature, where=where)
    sft_weight = 1.0 if spec.kind == "sft" else spec.sft_weight
    if sft_weight:
        ce = optax.losses.softmax_cross_entropy_with_integer_labels(student_logits.astype(jnp.float32), batch["targets"])
        per_token = per_token + sft_weight * ce
    return jnp.where(mask, per_token, 0.0)


def sequence_loss(spec: LossSpec, student_logits: Array, batch: Mapping[str, Array], teacher_logits: Array | None = None) -> Array:
    """Mean of :func:`token_losses` over the batch's completion tokens (0 when there are none)."""
    return masked_mean(token_losses(spec, student_logits, batch, teacher_logits), batch["loss_mask"])


def average_teacher_logits(all_logits: Sequence[Array]) -> Array:
    """Log of the teachers' mean probability, ``log(1/n sum_i softmax(t_i))``: usable as logits.

    The fused distribution of several teachers (at temperature 1; a loss's
    temperature then tempers the mixture).
    """
    if len(all_logits) == 1:
        return all_logits[0]
    log_probs = jnp.stack([jax.nn.log_softmax(t.astype(jnp.float32), axis=-1) for t in all_logits])
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(float(len(all_logits)))


@functools.lru_cache(maxsize=None)
def make_lm_train_step(
    student_config: TransformerConfig,
    spec: LossSpec,
    optimizer: OptimizerSpec,
    teacher_configs: tuple[TransformerConfig, ...] = (),
) -> Callable:
    """The jitted ``step(state, batch, teacher_params) -> (state, metrics)``; cached per arguments.

    ``batch``: ``inputs``, ``targets``, ``valid``, ``loss_mask`` ``[B, T]``
    (plus the top-k cache entries for ``top_k``). ``teacher_params``: a
    tuple, one per ``teacher_configs`` (empty without teachers). The state
    buffers are donated.
    """
    if spec.needs_teacher and not teacher_configs:
        raise ValueError(f"loss {spec.kind!r} needs at least one teacher config.")
    student = Transformer(student_config)
    teachers = tuple(Transformer(c) for c in teacher_configs)
    tx = optimizer.make()

    def step(state: TrainState, batch: dict, teacher_params: tuple) -> tuple[TrainState, dict]:
        teacher_logits = None
        if spec.needs_teacher:
            teacher_logits = jax.lax.stop_gradient(
                average_teacher_logits(
                    [t.apply({"params": p}, batch["inputs"], batch["valid"]) for t, p in zip(teachers, teacher_params)]
                )
            )

        def loss_fn(params):
            logits = student.apply({"params": params}, batch["inputs"], batch["valid"])
            return sequence_loss(spec, logits, batch, teacher_logits), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
        metrics = {
            "loss": loss,
            "token_accuracy": masked_mean(correct, batch["loss_mask"]),
            "completion_tokens": jnp.sum(batch["loss_mask"]),
            "grad_norm": optax.global_norm(grads),
        }
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return jax.jit(step, donate_argnums=(0,))


def init_train_state(config: TransformerConfig, optimizer: OptimizerSpec, seed: int) -> TrainState:
    """Fresh parameters (from ``seed``) and optimizer state."""
    key = jax.random.key(seed)
    return create_train_state(init_params(config, key), optimizer.make(), jax.random.key_data(jax.random.fold_in(key, 1)))


# ------------------------------------------------------------------ teacher top-k cache


@functools.lru_cache(maxsize=None)
def _jitted_forward(config: TransformerConfig) -> Callable:
    model = Transformer(config)
    return jax.jit(lambda params, inputs, valid: model.apply({"params": params}, inputs, valid))


def teacher_top_k_cache(
    config: TransformerConfig,
    params: PyTree,
    data: Mapping[str, np.ndarray],
    k: int,
    *,
    temperature: float = 1.0,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """The teacher's top-k log-probs at ``temperature`` for every position of ``data`` (computed once, offline).

    Returns ``teacher_top_values`` (float32) and ``teacher_top_indices``
    (int32), ``[N, T, k]``, ready to be merged into the training arrays.
    """
    forward = _jitted_forward(config)
    top_k = jax.jit(functools.partial(losses.top_k_log_probs, k=k, temperature=temperature))
    n = len(data["inputs"])
    values, indices = [], []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        inputs, valid = _padded_rows(data["inputs"], start, stop, batch_size), _padded_rows(data["valid"], start, stop, batch_size)
        v, i = top_k(forward(params, inputs, valid))
        values.append(np.asarray(v)[: stop - start])
        indices.append(np.asarray(i)[: stop - start])
    return {"teacher_top_values": np.concatenate(values), "teacher_top_indices": np.concatenate(indices)}


def cache_bytes_per_token(cache: Mapping[str, np.ndarray]) -> int:
    """Bytes the cache stores per token position: k values plus k indices."""
    values, indices = cache["teacher_top_values"], cache["teacher_top_indices"]
    return int(values.shape[-1] * (values.dtype.itemsize + indices.dtype.itemsize))


def _padded_rows(array: np.ndarray, start: int, stop: int, size: int) -> np.ndarray:
    """``array[start:stop]`` padded with zero rows to ``size`` rows (one compiled shape for every chunk)."""
    rows = np.asarray(array[start:stop])
    if len(rows) == size:
        return rows
    pad = np.zeros((size - len(rows),) + rows.shape[1:], rows.dtype)
    return np.concatenate([rows, pad])


# ------------------------------------------------------------------ training loop


def on_policy_schedule(num_steps: int, fraction: float) -> np.ndarray:
    """Which of ``num_steps`` batches are on-policy: evenly spread, ``floor(fraction * num_steps)`` of them.

    Batch ``i`` is on-policy when ``floor((i + 1) * fraction)`` steps past
    ``floor(i * fraction)``, so the on-policy batches end each run of ``1 / fraction``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the on-policy fraction lambda must lie in [0, 1], got {fraction}.")
    i = np.arange(num_steps)
    return np.floor((i + 1) * fraction + 1e-9) > np.floor(i * fraction + 1e-9)


def train(
    config: TransformerConfig,
    data: Mapping[str, np.ndarray],
    *,
    spec: LossSpec,
    optimizer: OptimizerSpec,
    batch_size: int,
    seed: int,
    teachers: Sequence[tuple[TransformerConfig, PyTree]] = (),
    params: PyTree | None = None,
    on_policy_fraction: float = 0.0,
    prompts: Mapping[str, np.ndarray] | None = None,
    max_new_tokens: int | None = None,
    on_policy_temperature: float = 1.0,
    log_every: int = 0,
    checkpoint_every: int = 0,
) -> tuple[PyTree, dict]:
    """Trains ``config`` for ``optimizer.steps`` batches; returns ``(params, history)``.

    ``data``: the arrays of :func:`distill_jax.proj.reasoning.task.encode_examples`
    (plus a top-k cache for ``top_k``), one row per example; batches are
    drawn by a seeded shuffle, epoch after epoch. With
    ``on_policy_fraction`` > 0 (GKD's lambda), that fraction of the batches
    is instead made of the student's own samples, drawn at
    ``on_policy_temperature`` (0 = greedy; GKD samples at 1), for
    ``prompts`` (``{"tokens", "valid"}``, left-padded, see
    :func:`~distill_jax.proj.reasoning.task.prompt_arrays`), and scored with the
    same loss. ``params`` (default: a fresh init from ``seed``) continues
    training from given weights. ``checkpoint_every`` > 0 keeps a host copy
    of the parameters after every that many steps and after the last one, in
    ``history["checkpoints"]`` as ``(steps done, params)`` (for choosing a
    checkpoint on validation data afterwards).
    """
    n = len(data["inputs"])
    if n == 0:
        raise ValueError("no training rows.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if "teacher_top_indices" in data:
        indices = np.asarray(data["teacher_top_indices"])
        if indices.size and (indices.min() < 0 or indices.max() >= config.vocab_size):
            raise ValueError(
                f"the top-k cache holds token ids in [{indices.min()}, {indices.max()}], outside the student's "
                f"vocabulary [0, {config.vocab_size}): it was made by a teacher with another vocabulary."
            )
    if spec.kind == "top_k" and "teacher_top_values" not in data:
        raise ValueError("loss 'top_k' needs teacher_top_values / teacher_top_indices in data (teacher_top_k_cache).")
    if on_policy_fraction and (prompts is None or max_new_tokens is None):
        raise ValueError("on-policy batches need prompts and max_new_tokens.")
    if not (np.isfinite(on_policy_temperature) and on_policy_temperature >= 0):
        raise ValueError(f"on_policy_temperature must be a finite number >= 0 (0 = greedy), got {on_policy_temperature}.")
    teacher_configs = tuple(c for c, _ in teachers)
    teacher_params = tuple(p for _, p in teachers)
    step = make_lm_train_step(config, spec, optimizer, teacher_configs)
    if params is None:
        state = init_train_state(config, optimizer, seed)
    else:  # a copy: the step donates its state, which must not delete the caller's arrays
        params = jax.tree_util.tree_map(jnp.array, params)
        state = create_train_state(params, optimizer.make(), jax.random.key_data(jax.random.key(seed)))
    device_data = {name: jnp.asarray(value) for name, value in data.items()}
    on_policy = on_policy_schedule(optimizer.steps, on_policy_fraction)
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens or 1, temperature=float(on_policy_temperature), eos_id=reasoning.EOS, pad_id=reasoning.PAD,
        banned_ids=(reasoning.PAD, reasoning.BOS),
    )
    rng = np.random.default_rng(seed)
    order = np.empty(0, np.int64)
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}.")
    history: dict[str, list] = {"loss": [], "token_accuracy": [], "checkpoints": []}
    t0 = time.perf_counter()
    for i in range(optimizer.steps):
        while len(order) < batch_size:  # epochs back to back (several per batch if n < batch_size)
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:batch_size], order[batch_size:]
        if on_policy[i]:
            p_idx = jnp.asarray(rng.integers(0, len(prompts["tokens"]), batch_size))
            p_tokens, p_valid = jnp.asarray(prompts["tokens"])[p_idx], jnp.asarray(prompts["valid"])[p_idx]
            out = generate(config, state.params, p_tokens, jax.random.key(seed * 1_000_003 + i), sampling, p_valid)
            batch = reasoning.completion_batch(p_tokens, p_valid, out.tokens, out.lengths)
        else:
            batch = {name: value[jnp.asarray(idx)] for name, value in device_data.items()}
        state, metrics = step(state, batch, teacher_params)
        if log_every and (i % log_every == 0 or i == optimizer.steps - 1):
            history["loss"].append((i, float(metrics["loss"])))
            history["token_accuracy"].append((i, float(metrics["token_accuracy"])))
        if checkpoint_every and ((i + 1) % checkpoint_every == 0 or i == optimizer.steps - 1):
            history["checkpoints"].append((i + 1, jax.tree_util.tree_map(np.array, state.params)))  # copies: the step donates its state
    jax.block_until_ready(state.params)
    history["final_loss"] = float(metrics["loss"]) if optimizer.steps else float("nan")
    history["wall_time_s"] = time.perf_counter() - t0
    history["on_policy_batches"] = int(on_policy.sum())
    return state.params, history


# ------------------------------------------------------------------ generation, evaluation, rejection sampling


def generate_for(
    config: TransformerConfig,
    params: PyTree,
    problems: Sequence[reasoning.Problem],
    *,
    key: Array,
    max_new_tokens: int,
    temperature: float = 0.0,
    num_samples: int = 1,
    batch_size: int = 256,
    prompt_len: int | None = None,
) -> list[list[list[int]]]:
    """``num_samples`` completions (token ids up to and including ``<eos>``) per problem.

    Prompts are left-padded to ``prompt_len`` (default: the longest) and
    chunked into ``batch_size`` rows (the last chunk padded), so one compiled
    loop serves every split with the same prompt length.
    """
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, eos_id=reasoning.EOS, pad_id=reasoning.PAD,
        banned_ids=(reasoning.PAD, reasoning.BOS),
    )
    tokens, valid = reasoning.prompt_arrays(problems, length=prompt_len)
    tokens, valid = np.repeat(tokens, num_samples, axis=0), np.repeat(valid, num_samples, axis=0)
    rows = len(tokens)
    out_tokens, out_lengths = [], []
    for chunk, start in enumerate(range(0, rows, batch_size)):
        stop = min(start + batch_size, rows)
        t = _padded_rows(tokens, start, stop, batch_size)
        v = _padded_rows(valid, start, stop, batch_size)
        v[stop - start :, -1] = True  # padding rows: one real token, so nothing is empty
        out = generate(config, params, t, jax.random.fold_in(key, chunk), sampling, v)
        out_tokens.append(np.asarray(out.tokens)[: stop - start])
        out_lengths.append(np.asarray(out.lengths)[: stop - start])
    generated, lengths = np.concatenate(out_tokens), np.concatenate(out_lengths)
    flat = [list(row[:length]) for row, length in zip(generated, lengths)]
    return [flat[i * num_samples : (i + 1) * num_samples] for i in range(len(problems))]


def evaluate(
    config: TransformerConfig,
    params: PyTree,
    problems: Sequence[reasoning.Problem],
    *,
    max_new_tokens: int,
    pass_k: int = 0,
    pass_temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    prompt_len: int | None = None,
) -> dict[str, float]:
    """Exact-match accuracy of greedy decoding, and pass@k (any of k samples correct) when ``pass_k`` > 0."""
    if not problems:
        raise ValueError("evaluate needs at least one problem.")
    key = jax.random.key(seed)
    common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, prompt_len=prompt_len)
    greedy = generate_for(config, params, problems, key=key, **common)
    result = {"greedy": float(np.mean([reasoning.verify(p, g[0]) for p, g in zip(problems, greedy)])), "count": len(problems)}
    if pass_k:
        samples = generate_for(
            config, params, problems, key=jax.random.fold_in(key, 1), temperature=pass_temperature, num_samples=pass_k, **common
        )
        result[f"pass@{pass_k}"] = float(np.mean([any(reasoning.verify(p, s) for s in ss) for p, ss in zip(problems, samples)]))
    return result


def sample_verified(
    config: TransformerConfig,
    params: PyTree,
    problems: Sequence[reasoning.Problem],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    prompt_len: int | None = None,
) -> tuple[list[tuple[reasoning.Problem, str]], dict[str, float]]:
    """Rejection sampling (the R1 recipe): ``num_samples`` completions per problem, the verified ones kept.

    Returns ``(kept, stats)``: ``kept`` as ``(problem, completion text)``
    pairs, duplicates of the same problem's text dropped; ``stats`` with the
    acceptance rate (verified / sampled) and the fraction of problems with at
    least one verified sample.
    """
    samples = generate_for(
        config, params, problems, key=jax.random.key(seed), max_new_tokens=max_new_tokens,
        temperature=temperature, num_samples=num_samples, batch_size=batch_size, prompt_len=prompt_len,
    )
    kept, accepted, covered = [], 0, 0
    for problem, completions in zip(problems, samples):
        texts = {reasoning.TOKENIZER.decode(c) for c in completions if reasoning.verify(problem, c)}
        accepted += sum(reasoning.verify(problem, c) for c in completions)
        covered += bool(texts)
        kept.extend((problem, text) for text in sorted(texts))
    stats = {
        "sampled": len(problems) * num_samples,
        "accepted": accepted,
        "acceptance_rate": accepted / max(len(problems) * num_samples, 1),
        "problems_covered": covered / max(len(problems), 1),
        "kept_unique": len(kept),
    }
    return kept, stats
