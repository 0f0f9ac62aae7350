"""Batched sampling from a :class:`~distill_jax.models.transformer.Transformer` with a KV cache.

One compiled function per (model config, sampling config, batch shape): the
prompt is prefilled into the cache in one pass, then a ``lax.while_loop``
decodes one token per step for the whole batch until every row has emitted
the end token or ``max_new_tokens`` are out. Rows that have finished are
padded with ``pad_id`` (and log-prob 0). Sampling is greedy
(``temperature=0``) or from ``softmax(logits / temperature)`` restricted to
the ``top_k`` most likely tokens and/or the smallest set whose probability
reaches ``top_p`` (Holtzman et al. 2020). The random key for step ``i`` is
``fold_in(key, i)``, so the same key gives the same samples.

Prompts are **left-padded** (``prompt_valid`` marks the real tokens), so the
last column of every row is its last prompt token and all rows start decoding
at the same slot; the model gives left-padded rows the logits of the
unpadded sequence (rotary positions count real tokens only).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.models.transformer import Transformer, TransformerConfig, init_cache

Array = jax.Array
PyTree = Any

__all__ = ["SamplingConfig", "Generation", "filter_logits", "sample_tokens", "generate", "benchmark"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token (hashable: part of the compiled function's key).

    ``temperature=0`` is greedy decoding. ``top_k=0`` and ``top_p=1`` switch
    those filters off. ``eos_id=None`` never stops early (benchmarks).
    ``banned_ids`` are never sampled (padding, begin-of-sequence).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int | None = None
    pad_id: int = 0
    banned_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p}.")
        ids = {"pad_id": [self.pad_id], "banned_ids": list(self.banned_ids)}
        if self.eos_id is not None:
            ids["eos_id"] = [self.eos_id]
        for name, values in ids.items():
            if any(int(v) < 0 for v in values):
                raise ValueError(f"{name} must be token ids >= 0, got {values}; a negative id would wrap to the last token.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Generation(NamedTuple):
    """Output of :func:`generate`.

    tokens: ``[B, max_new_tokens]`` int32, the end token included, ``pad_id`` after it.
    log_probs: ``[B, max_new_tokens]`` float32, the model's log-probability
      (temperature 1, no filtering) of each generated token; 0 after the end.
    lengths: ``[B]`` int32, tokens generated per row (the end token included).
    finished: ``[B]`` bool, whether the row emitted the end token.
    """

    tokens: Array
    log_probs: Array
    lengths: Array
    finished: Array


def filter_logits(logits: Array, sampling: SamplingConfig) -> Array:
    """Logits ``[..., vocab]`` scaled by 1/temperature, with filtered-out tokens at ``-inf``."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if sampling.banned_ids:
        banned = jnp.zeros((vocab,), bool).at[jnp.asarray(sampling.banned_ids)].set(True)
        logits = jnp.where(banned, -jnp.inf, logits)
    if sampling.greedy:
        return logits
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < vocab:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep the most likely tokens until their mass reaches top_p (the first always).
        kept = mass_before < sampling.top_p
        threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_tokens(key: Array, logits: Array, sampling: SamplingConfig) -> Array:
    """One token per row of ``logits`` ``[B, vocab]``: argmax when greedy, else a draw."""
    filtered = filter_logits(logits, sampling)
    if sampling.greedy:
        return jnp.argmax(filtered, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def _generate(config: TransformerConfig, sampling: SamplingConfig, params, prompts, prompt_valid, key):
    model = Transformer(config)
    batch, prompt_len = prompts.shape
    steps = sampling.max_new_tokens
    cache = init_cache(config, batch, prompt_len + steps)
    logits, cache = model.apply({"params": params}, prompts, prompt_valid, cache=cache)
    eos = -1 if sampling.eos_id is None else sampling.eos_id

    def cond(state):
        i, _, _, _, _, _, done = state
        return (i < steps) & ~jnp.all(done)

    def body(state):
        i, last_logits, cache, tokens, log_probs, lengths, done = state
        token = sample_tokens(jax.random.fold_in(key, i), last_logits, sampling)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(last_logits, axis=-1), token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, sampling.pad_id, token)
        tokens = tokens.at[:, i].set(token)
        log_probs = log_probs.at[:, i].set(jnp.where(done, 0.0, log_prob))
        lengths = lengths + (~done).astype(jnp.int32)
        live = ~done
        done = done | (token == eos)
        next_logits, cache = model.apply({"params": params}, token[:, None], live[:, None], cache=cache)
        return i + 1, next_logits[:, 0], cache, tokens, log_probs, lengths, done

    state = (
        jnp.asarray(0, jnp.int32),
        logits[:, -1],
        cache,
        jnp.full((batch, steps), sampling.pad_id, jnp.int32),
        jnp.zeros((batch, steps), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
    )
    _, _, _, tokens, log_probs, lengths, done = jax.lax.while_loop(cond, body, state)
    return Generation(tokens, log_probs, lengths, done)


def generate(
    config: TransformerConfig,
    params: PyTree,
    prompts: Array,
    key: Array,
    sampling: SamplingConfig,
    prompt_valid: Array | None = None,
) -> Generation:
    """Samples a completion for every left-padded prompt row, the whole batch in one compiled loop.

    Args:
      config: the model's sizes (the model is rebuilt from it inside the jit).
      params: its parameters.
      prompts: ``[B, P]`` int token ids, left-padded.
      key: a ``jax.random`` key; the same key gives the same completions.
      sampling: :class:`SamplingConfig`.
      prompt_valid: ``[B, P]`` bool, true on real prompt tokens (default: all).
    """
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2 or prompts.shape[1] == 0:
        raise ValueError(f"prompts must be [batch, length >= 1] token ids, got shape {prompts.shape}.")
    total = prompts.shape[1] + sampling.max_new_tokens
    if total > config.max_len:
        raise ValueError(
            f"prompt length {prompts.shape[1]} + max_new_tokens {sampling.max_new_tokens} = {total} "
            f"exceeds the model's max_len={config.max_len}."
        )
    valid = jnp.ones(prompts.shape, bool) if prompt_valid is None else jnp.asarray(prompt_valid, bool)
    if valid.shape != prompts.shape:
        raise ValueError(f"prompt_valid {valid.shape} must have the prompts' shape {prompts.shape}.")
    special = [sampling.pad_id, *sampling.banned_ids] + ([] if sampling.eos_id is None else [sampling.eos_id])
    if max(special) >= config.vocab_size:
        raise ValueError(f"the sampling config names token ids {special}, but the vocabulary has {config.vocab_size}.")
    try:  # concrete prompts: check their ids (an id past the vocabulary gives NaN, a negative one wraps)
        real = np.asarray(prompts)[np.asarray(valid)]
    except jax.errors.TracerArrayConversionError:
        real = np.zeros(0, np.int32)
    if real.size and (real.min() < 0 or real.max() >= config.vocab_size):
        raise ValueError(f"prompt token ids must lie in [0, {config.vocab_size}), got values in [{real.min()}, {real.max()}].")
    return _generate(config, sampling, params, prompts, valid, key)


def benchmark(
    config: TransformerConfig,
    params: PyTree,
    *,
    batch_size: int = 32,
    prompt_len: int = 16,
    max_new_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Generated tokens per second of temperature-1 sampling (no early stop), after one compile run.

    Returns the best of ``repeats`` timed runs (each ``batch_size x max_new_tokens``
    tokens) and the compile-plus-first-run time.
    """
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    prompts = jax.random.randint(jax.random.key(seed), (batch_size, prompt_len), 0, config.vocab_size)
    t0 = time.perf_counter()
    jax.block_until_ready(generate(config, params, prompts, jax.random.key(seed), sampling))
    first = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(generate(config, params, prompts, jax.random.key(seed + 1 + r), sampling))
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "max_new_tokens": max_new_tokens,
        "tokens_per_s": batch_size * max_new_tokens / best,
        "best_s": best,
        "compile_and_first_run_s": first,
    }
