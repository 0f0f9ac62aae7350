"""Flax models: Hinton's MLPs, a small CNN and a Llama/Qwen-style transformer, built from configs.

Every model is a Flax linen module used purely, with one calling convention:
``logits = model.apply(variables, *inputs, train=..., rngs={"dropout": key})``
where ``inputs`` are ``(images,)`` for the vision models and ``(tokens,
valid)`` for the transformer, and ``variables`` is ``{"params": ...}``
(:func:`init_params`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.models import vision
from distill_jax.models.transformer import Transformer, TransformerConfig
from distill_jax.models.vision import CNN, MLP, max_norm_project

__all__ = [
    "MLP", "CNN", "Transformer", "TransformerConfig", "create", "init_params", "is_token_model",
    "max_norm_project", "num_outputs",
]


def is_token_model(config: Mapping[str, Any]) -> bool:
    """Whether a model config describes a language model (tokens in, next-token logits out)."""
    return config.get("name") == "transformer"


def create(config: Mapping[str, Any]) -> nn.Module:
    """Builds a model from a config dict such as ``{"name": "mlp", "hidden": (800, 800)}``.

    ``{"name": "transformer", "vocab_size": ..., "dim": ...}`` builds a
    :class:`Transformer` (the other keys are :class:`TransformerConfig`'s);
    see :func:`distill_jax.models.vision.create` for the vision models.
    """
    if is_token_model(config):
        return Transformer(TransformerConfig.from_mapping({k: v for k, v in dict(config).items() if k != "name"}))
    return vision.create(config)


def num_outputs(config: Mapping[str, Any]) -> int:
    """Classes of a vision model, vocabulary size of a language model."""
    if is_token_model(config):
        return int(config["vocab_size"])
    return int(config.get("num_classes", 10))


def init_params(model: nn.Module, rng: jax.Array, input_shape: Sequence[int] = (1, 28, 28, 1)) -> Any:
    """Initial ``{"params": ...}`` for an input of ``input_shape`` (batch dim first).

    A transformer's parameters do not depend on the sequence length; they are
    returned unboxed (the logical axis names are in
    :func:`distill_jax.models.transformer.logical_specs`).
    """
    if isinstance(model, Transformer):
        tokens = jnp.zeros((1, 1), jnp.int32)
        return {"params": nn.unbox(model.init(rng, tokens)["params"])}
    return vision.init_params(model, rng, input_shape)
