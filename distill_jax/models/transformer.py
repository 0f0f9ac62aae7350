"""A decoder-only transformer of the Llama / Qwen2 family, in Flax linen.

RMSNorm (pre-norm), rotary position embeddings, a SwiGLU MLP, grouped-query
attention (``num_kv_heads`` key/value heads shared by ``num_heads`` query
heads; 1 is multi-query, ``num_heads`` is plain multi-head) and tied or
untied input/output embeddings. Sizes come from :class:`TransformerConfig`,
which also covers what the Hugging Face Llama, Qwen2 and Qwen3 checkpoints
add (:mod:`distill_jax.models.hf` converts them): q/k/v biases (Qwen2), an
RMSNorm on each query and key head (Qwen3), a head size other than
``dim / num_heads``, and the linear, llama3 and yarn RoPE scalings.

Used purely::

    model = Transformer(config)
    params = init_params(config, jax.random.key(0))
    logits = model.apply({"params": params}, tokens)                 # [B, T, vocab]
    logits, cache = model.apply({"params": params}, tokens, cache=c)  # KV-cache path

**Padding and positions.** ``valid`` (``[B, T]`` bool, default all true)
marks real tokens. Padded slots are never attended to, and a token's rotary
position is the number of real tokens before it, so a left-padded prompt
gives the same logits as the unpadded one. Right padding (training batches)
needs no mask at all: causal attention never looks forward.

**KV cache.** :func:`init_cache` allocates ``[B, max_len]`` key/value slots
per layer. Calling the model with ``cache=`` writes the new tokens' keys and
values at ``cache["index"]`` and attends to every filled slot; a prompt
(prefill) and then one token at a time (decode) give the same logits as one
full forward pass. Everything has static shapes, so it runs under ``jit`` and
inside ``lax.while_loop``.

**Sharding.** Every parameter carries logical axis names
(``nn.with_logical_partitioning``): ``vocab``, ``embed``, ``q_heads``,
``kv_heads``, ``mlp``, ``norm``. :func:`partition_rules` turns them into the
``(regex, PartitionSpec)`` rules of :mod:`distill_jax.sharding` for a
strategy (``replicated``, ``fsdp``, ``tensor``: Megatron-style, attention and
MLP column- then row-parallel).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from distill_jax import checks

Array = jax.Array
PyTree = Any
Cache = dict[str, Any]

__all__ = [
    "TransformerConfig",
    "Transformer",
    "init_params",
    "init_cache",
    "logical_specs",
    "partition_rules",
    "LOGICAL_AXIS_RULES",
    "num_params",
]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes of a decoder-only transformer (hashable, so jitted code can key on it).

    ``mlp_dim`` is the SwiGLU hidden size; ``max_len`` the longest sequence
    (prompt + completion) the model and its KV cache are used with.
    """

    vocab_size: int
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_dim: int = 172
    max_len: int = 128
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype; parameters are always float32
    # Per-head size; None: dim // num_heads. Qwen3 sets it (e.g. 128 with dim 1024 and 16 heads).
    head_dim: int | None = None
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    out_bias: bool = False  # a bias on the attention output projection (Llama's attention_bias)
    mlp_bias: bool = False  # biases on gate, up and down (Llama's mlp_bias)
    qk_norm: bool = False  # RMSNorm of each query and key head before the rotation (Qwen3)
    # RoPE scaling as sorted (key, value) pairs (hashable), e.g. (("factor", 8.0), ("rope_type", "llama3"), ...);
    # a dict is accepted and converted. Types: "linear", "llama3", "yarn" (see rope_frequencies).
    rope_scaling: tuple | None = None

    def __post_init__(self):
        for name in ("vocab_size", "dim", "depth", "num_heads", "num_kv_heads", "mlp_dim", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be an integer >= 1, got {value!r}.")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(dict(self.rope_scaling).items())))
        elif self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(sorted(tuple(pair) for pair in self.rope_scaling)))
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}, or set head_dim.")
        elif not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"TransformerConfig.head_dim must be an integer >= 1 (or None), got {self.head_dim!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                "(grouped-query attention shares each key/value head among num_heads // num_kv_heads query heads)."
            )
        if self.head_size % 2:
            raise ValueError(f"head size {self.head_size} must be even for rotary embeddings.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}.")
        rope_frequencies(self)  # an unknown or incomplete rope_scaling fails here, not at the first call

    @property
    def head_size(self) -> int:
        """The size of each attention head: ``head_dim``, or ``dim // num_heads`` when that is None."""
        return self.dim // self.num_heads if self.head_dim is None else self.head_dim

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "TransformerConfig":
        """From a dict or ConfigDict; unknown keys are an error that lists the known ones."""
        values = dict(values.items())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown transformer config keys {unknown}; known: {sorted(known)}.")
        return cls(**values)

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


def _init(names: tuple[str | None, ...], stddev: float = 0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 (Zhang & Sennrich 2019)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * scale).astype(x.dtype)


_ROPE_KEYS = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings"},
}


def rope_frequencies(config: "TransformerConfig") -> tuple[np.ndarray | None, float]:
    """``(inverse frequencies [head_dim / 2] or None, attention factor)`` of the config's RoPE.

    ``None`` is the plain RoPE, ``theta ** (-2i / head_dim)``, computed in
    the graph. The scalings follow the formulas of the Hugging Face configs
    that use them (float32, as there): ``linear`` divides every frequency
    by ``factor``; ``llama3`` (Llama 3.1) divides the low frequencies by
    ``factor`` and blends the middle band; ``yarn`` (Peng et al. 2023, used
    by Qwen2.5/Qwen3 for long context) blends interpolated and extrapolated
    frequencies over a ramp set by ``beta_fast``/``beta_slow`` and scales
    cos and sin by the attention factor ``0.1 ln(factor) + 1``.
    """
    scaling = dict(config.rope_scaling or ())
    if not scaling:
        return None, 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None, 1.0
    if kind not in _ROPE_KEYS:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: default, {', '.join(_ROPE_KEYS)}.")
    missing = sorted(_ROPE_KEYS[kind] - set(scaling))
    if missing:
        raise ValueError(f"rope_scaling of type {kind!r} needs {missing}; got {sorted(scaling)}.")
    dim = config.head_size
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.float32(config.rope_theta)
    inv_freq = (np.float32(1.0) / (base**exponent)).astype(np.float32)
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
    if kind == "llama3":
        old_len = float(scaling["original_max_position_embeddings"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > old_len / low, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    # yarn
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        get = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
        attention = get(factor, mscale) / get(factor, mscale_all) if mscale and mscale_all else get(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    old_len = float(scaling["original_max_position_embeddings"])
    theta = float(config.rope_theta)
    correction = lambda rotations: dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
    low, high = correction(beta_fast), correction(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = (1 - ramp).astype(np.float32)
    pos_freqs = (base**exponent).astype(np.float32)
    inv_interp = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv_extrap = (np.float32(1.0) / pos_freqs).astype(np.float32)
    inv_freq = (inv_interp * (1 - extrapolation) + inv_extrap * extrapolation).astype(np.float32)
    return inv_freq, float(attention)


def apply_rotary(x: Array, positions: Array, theta: float, inv_freq: np.ndarray | None = None, scale: float = 1.0) -> Array:
    """Rotary embedding of ``x`` ``[B, T, heads, head_dim]`` at integer ``positions`` ``[B, T]``.

    The "rotate half" layout of Llama / Qwen2 (Su et al. 2021, RoFormer).
    ``inv_freq`` and ``scale`` come from :func:`rope_frequencies` for a
    scaled RoPE.
    """
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half) if inv_freq is None else jnp.asarray(inv_freq)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache=None, index=None):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        b, t, _ = x.shape
        dense = lambda features, names, name, bias: nn.Dense(  # noqa: E731
            features, use_bias=bias, dtype=dtype, kernel_init=_init(names),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]), name=name
        )
        q = dense(c.num_heads * c.head_size, ("embed", "q_heads"), "q", c.qkv_bias)(x).reshape(b, t, c.num_heads, c.head_size)
        k = dense(c.num_kv_heads * c.head_size, ("embed", "kv_heads"), "k", c.qkv_bias)(x)
        k = k.reshape(b, t, c.num_kv_heads, c.head_size)
        v = dense(c.num_kv_heads * c.head_size, ("embed", "kv_heads"), "v", c.qkv_bias)(x)
        v = v.reshape(b, t, c.num_kv_heads, c.head_size)
        if c.qk_norm:
            q = RMSNorm(c.norm_eps, name="q_norm")(q)
            k = RMSNorm(c.norm_eps, name="k_norm")(k)
        inv_freq, rope_scale = rope_frequencies(c)
        q = apply_rotary(q, positions, c.rope_theta, inv_freq, rope_scale)
        k = apply_rotary(k, positions, c.rope_theta, inv_freq, rope_scale)
        new_cache = None
        if layer_cache is not None:
            k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, index, 0, 0))
            new_cache = {"k": k, "v": v}
        groups = c.num_heads // c.num_kv_heads
        q = q.reshape(b, t, c.num_kv_heads, groups, c.head_size)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dtype)).astype(jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(c.head_size))
        # A finite fill (not -inf): a padded query with nothing to attend to
        # gets a uniform (ignored) average instead of NaN.
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, v.astype(dtype)).reshape(b, t, c.num_heads * c.head_size)
        out = dense(c.dim, ("q_heads", "embed"), "o", c.out_bias)(out)
        return out, new_cache


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        dense = lambda features, names, name: nn.Dense(  # noqa: E731
            features, use_bias=c.mlp_bias, dtype=dtype, kernel_init=_init(names),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]), name=name
        )
        gate = dense(c.mlp_dim, ("embed", "mlp"), "gate")(x)
        up = dense(c.mlp_dim, ("embed", "mlp"), "up")(x)
        return dense(c.dim, ("mlp", "embed"), "down")(nn.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache=None, index=None):
        c = self.config
        attn_out, new_cache = Attention(c, name="attn")(
            RMSNorm(c.norm_eps, name="attn_norm")(x), positions, mask, layer_cache, index
        )
        x = x + attn_out
        x = x + SwiGLU(c, name="mlp")(RMSNorm(c.norm_eps, name="mlp_norm")(x))
        return x, new_cache


class Transformer(nn.Module):
    """Decoder-only LM: tokens ``[B, T]`` -> logits ``[B, T, vocab]`` (float32).

    With ``cache`` (from :func:`init_cache`) it returns ``(logits, new_cache)``.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens: Array, valid: Array | None = None, segments: Array | None = None,
                 cache: Cache | None = None, train: bool = False, return_hidden: bool = False):
        """Logits ``[B, T, vocab]``; with ``return_hidden``, the final norm's output ``[B, T, dim]`` instead.

        ``segments`` (``[B, T]`` int, packed rows of :func:`distill_jax.data.text.pack_examples`):
        0 on padding, 1, 2, ... per example; a token attends only to earlier
        tokens of its own example and its rotary position restarts at each
        example, so a packed row gives each example the logits it has alone.

        The hidden states and :func:`output_head` are what the memory-bounded
        losses of :mod:`distill_jax.chunked` take: ``logits = hidden @ head``.
        """
        del train  # no dropout; taken so every model is called the same way (distill_jax.models)
        c = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length] integers, got shape {tokens.shape}.")
        b, t = tokens.shape
        valid = jnp.ones((b, t), bool) if valid is None else jnp.asarray(valid, bool)
        # Padding may hold any id; jnp.take would wrap a negative real id and NaN-fill one past the vocabulary.
        tokens = jnp.where(valid, tokens, 0)
        ids_ok = checks.in_range(tokens, c.vocab_size, "token ids",
                                 " Encode with the model's own tokenizer; padding needs valid=False.")
        if segments is not None:
            if cache is not None:
                raise ValueError("segments (packed rows) are for training and scoring, not with a KV cache.")
            segments = jnp.asarray(segments, jnp.int32)
            if segments.shape != (b, t):
                raise ValueError(f"segments {segments.shape} must have the tokens' shape {(b, t)}.")
            valid = valid & (segments > 0)
        # Rotary position = number of real tokens before this one (in its own segment).
        offsets = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
        if segments is not None:
            previous = jnp.pad(segments[:, :-1], ((0, 0), (1, 0)))
            starts = jnp.where((segments != previous) & valid, offsets, 0)
            offsets = offsets - jax.lax.cummax(starts, axis=1)
        if cache is None:
            if t > c.max_len:
                raise ValueError(f"sequence length {t} exceeds max_len={c.max_len}.")
            positions = jnp.maximum(offsets, 0)
            slots_q = jnp.arange(t)
            slots_k = jnp.arange(t)
            key_valid = valid
            index = None
        else:
            index = cache["index"]
            slots = cache["valid"].shape[1]
            try:  # a concrete index (eager use): a cache too short is an error
                overflow_now = int(index) + t > slots
            except (jax.errors.TracerIntegerConversionError, jax.errors.ConcretizationTypeError):
                overflow_now = False
            if overflow_now:
                raise ValueError(
                    f"the KV cache has {slots} slots, {int(index)} used: {t} more tokens do not fit. "
                    "Make a longer cache (init_cache(..., length=...))."
                )
            positions = jnp.maximum(cache["next_position"][:, None] + offsets, 0)
            key_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, index))
            slots_q = index + jnp.arange(t)
            slots_k = jnp.arange(key_valid.shape[1])
        mask = (slots_k[None, None, :] <= slots_q[None, :, None]) & key_valid[:, None, :]
        if segments is not None:
            mask = mask & (segments[:, :, None] == segments[:, None, :])

        embed = nn.Embed(
            c.vocab_size, c.dim, embedding_init=_init(("vocab", "embed"), 1.0 if not c.tie_embeddings else 0.02), name="embed"
        )
        x = embed(tokens).astype(jnp.dtype(c.dtype))
        new_layers = []
        for i in range(c.depth):
            layer_cache = None if cache is None else cache["layers"][i]
            x, new_layer = Block(c, name=f"block_{i}")(x, positions, mask, layer_cache, index)
            new_layers.append(new_layer)
        x = RMSNorm(c.norm_eps, name="final_norm")(x)
        if return_hidden:
            if cache is not None:
                raise ValueError("return_hidden is for training (no KV cache).")
            if ids_ok is not None:
                x = checks.poison(x, jnp.all(ids_ok, axis=1)[:, None, None])
            return x
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(
                c.vocab_size, use_bias=False, dtype=jnp.dtype(c.dtype), kernel_init=_init(("embed", "vocab")), name="lm_head"
            )(x)
        logits = logits.astype(jnp.float32)
        if ids_ok is not None:  # traced ids: a row with an id outside the vocabulary gets NaN logits
            logits = checks.poison(logits, jnp.all(ids_ok, axis=1)[:, None, None])
        if cache is None:
            return logits
        # Under jit the index is traced: a cache used past its length gives NaN logits, never a silent overwrite.
        fits = index + t <= slots
        checks.require(fits, f"the KV cache has {slots} slots: {t} more tokens do not fit")
        logits = checks.poison(logits, fits)
        new_cache = {
            "layers": new_layers,
            "valid": key_valid,
            "index": index + t,
            "next_position": cache["next_position"] + jnp.sum(valid, axis=1, dtype=jnp.int32),
        }
        return logits, new_cache


def output_head(params: PyTree) -> Array:
    """The output projection ``[dim, vocab]`` of a transformer's params (the embedding transposed when tied)."""
    params = params.get("params", params)
    return params["lm_head"]["kernel"] if "lm_head" in params else params["embed"]["embedding"].T


def init_params(config: TransformerConfig, rng: Array) -> PyTree:
    """Plain (unboxed) float32 parameters; the logical axis names are in :func:`logical_specs`."""
    return _jitted_init(config)(rng)


@functools.lru_cache(maxsize=None)
def _jitted_init(config: TransformerConfig):
    """One compiled initializer per config (eager init dispatches hundreds of tiny ops)."""
    model = Transformer(config)
    return jax.jit(lambda rng: nn.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]))


def logical_specs(config: TransformerConfig) -> PyTree:
    """A pytree (like the params) of PartitionSpecs of *logical* axis names, e.g. ``P('embed', 'mlp')``."""
    boxed = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.get_partition_spec(boxed)["params"]


# Logical axis -> mesh axis, per strategy (flax's ``logical_to_mesh_axes`` format).
LOGICAL_AXIS_RULES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "replicated": (),
    # ZeRO-3: the model dimension of every matrix is split over the fsdp axis.
    "fsdp": (("embed", "fsdp"),),
    # Megatron: heads and the MLP hidden split over `model` (q/k/v, gate/up
    # column-parallel; o, down row-parallel), the vocabulary too.
    "tensor": (("q_heads", "model"), ("kv_heads", "model"), ("mlp", "model"), ("vocab", "model")),
}


def partition_rules(
    config: TransformerConfig, strategy: str | tuple = "tensor", *, prefix: str = ""
) -> list[tuple[str, PartitionSpec]]:
    """``(regex, PartitionSpec)`` rules for :func:`distill_jax.sharding.param_shardings`.

    ``strategy`` is a key of :data:`LOGICAL_AXIS_RULES` or explicit
    ``((logical, mesh_axis), ...)`` pairs. One exact-path rule per parameter,
    then a catch-all ``(".*", P())``; dimensions the mesh does not divide are
    replicated by the sharding module (``fit_spec``). ``prefix`` is prepended
    to every path (``"['params']"`` for the variables the training core holds).
    """
    if isinstance(strategy, str):
        if strategy not in LOGICAL_AXIS_RULES:
            raise ValueError(f"unknown strategy {strategy!r}; use one of {sorted(LOGICAL_AXIS_RULES)} or (logical, mesh) pairs.")
        rules = LOGICAL_AXIS_RULES[strategy]
    else:
        rules = tuple(strategy)
    specs = logical_specs(config)
    out = []
    for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]:
        name = jax.tree_util.keystr(path)
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if rules else PartitionSpec()
        out.append(("^" + re.escape(prefix + name) + "$", mesh_spec))
    return out + [(".*", PartitionSpec())]


def init_cache(config: TransformerConfig, batch_size: int, length: int | None = None) -> Cache:
    """An empty KV cache of ``length`` slots (default ``config.max_len``) per row."""
    length = config.max_len if length is None else length
    if length < 1:
        raise ValueError(f"cache length must be >= 1, got {length}.")
    shape = (batch_size, length, config.num_kv_heads, config.head_size)
    dtype = jnp.dtype(config.dtype)
    return {
        "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.depth)],
        "valid": jnp.zeros((batch_size, length), bool),
        "index": jnp.asarray(0, jnp.int32),
        "next_position": jnp.zeros((batch_size,), jnp.int32),
    }


def num_params(params: PyTree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
