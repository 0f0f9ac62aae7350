"""A decoder-only transformer of the Llama / Qwen2 family, in Flax linen.

RMSNorm (pre-norm), rotary position embeddings, a SwiGLU MLP, grouped-query
attention (``num_kv_heads`` key/value heads shared by ``num_heads`` query
heads; 1 is multi-query, ``num_heads`` is plain multi-head) and tied or
untied input/output embeddings. Sizes come from :class:`TransformerConfig`.

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
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

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

    def __post_init__(self):
        for name in ("vocab_size", "dim", "depth", "num_heads", "num_kv_heads", "mlp_dim", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be an integer >= 1, got {value!r}.")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                "(grouped-query attention shares each key/value head among num_heads // num_kv_heads query heads)."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim / num_heads = {self.head_dim} must be even for rotary embeddings.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

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


def apply_rotary(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding of ``x`` ``[B, T, heads, head_dim]`` at integer ``positions`` ``[B, T]``.

    The "rotate half" layout of Llama / Qwen2 (Su et al. 2021, RoFormer).
    """
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
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
        dense = lambda features, names, name: nn.Dense(  # noqa: E731
            features, use_bias=False, dtype=dtype, kernel_init=_init(names), name=name
        )
        q = dense(c.num_heads * c.head_dim, ("embed", "q_heads"), "q")(x).reshape(b, t, c.num_heads, c.head_dim)
        k = dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), "k")(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), "v")(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        q = apply_rotary(q, positions, c.rope_theta)
        k = apply_rotary(k, positions, c.rope_theta)
        new_cache = None
        if layer_cache is not None:
            k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, index, 0, 0))
            new_cache = {"k": k, "v": v}
        groups = c.num_heads // c.num_kv_heads
        q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dtype)).astype(jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(c.head_dim))
        # A finite fill (not -inf): a padded query with nothing to attend to
        # gets a uniform (ignored) average instead of NaN.
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, v.astype(dtype)).reshape(b, t, c.num_heads * c.head_dim)
        out = dense(c.dim, ("q_heads", "embed"), "o")(out)
        return out, new_cache


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        gate = nn.Dense(c.mlp_dim, use_bias=False, dtype=dtype, kernel_init=_init(("embed", "mlp")), name="gate")(x)
        up = nn.Dense(c.mlp_dim, use_bias=False, dtype=dtype, kernel_init=_init(("embed", "mlp")), name="up")(x)
        return nn.Dense(c.dim, use_bias=False, dtype=dtype, kernel_init=_init(("mlp", "embed")), name="down")(
            nn.silu(gate) * up
        )


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
    def __call__(self, tokens: Array, valid: Array | None = None, cache: Cache | None = None, train: bool = False):
        del train  # no dropout; taken so every model is called the same way (distill_jax.models)
        c = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length] integers, got shape {tokens.shape}.")
        b, t = tokens.shape
        valid = jnp.ones((b, t), bool) if valid is None else jnp.asarray(valid, bool)
        # Rotary position = number of real tokens before this one.
        offsets = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
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
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(
                c.vocab_size, use_bias=False, dtype=jnp.dtype(c.dtype), kernel_init=_init(("embed", "vocab")), name="lm_head"
            )(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        # Under jit the index is traced: a cache used past its length gives NaN logits, never a silent overwrite.
        logits = jnp.where(index + t > slots, jnp.nan, logits)
        new_cache = {
            "layers": new_layers,
            "valid": key_valid,
            "index": index + t,
            "next_position": cache["next_position"] + jnp.sum(valid, axis=1, dtype=jnp.int32),
        }
        return logits, new_cache


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
    shape = (batch_size, length, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    return {
        "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.depth)],
        "valid": jnp.zeros((batch_size, length), bool),
        "index": jnp.asarray(0, jnp.int32),
        "next_position": jnp.zeros((batch_size,), jnp.int32),
    }


def num_params(params: PyTree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
