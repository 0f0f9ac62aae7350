"""Image classifiers: Hinton et al.'s MLPs and a small CNN."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class MLP(nn.Module):
    """ReLU MLP on flattened images, e.g. Hinton's 784-1200-1200-10 teacher.

    Dropout on the inputs and on every hidden layer (Srivastava et al. 2014,
    as used by Hinton et al. 2015 for the MNIST teacher); rates of 0 make the
    unregularized 784-800-800-10 student.
    """

    hidden: Sequence[int] = (1200, 1200)
    num_classes: int = 10
    input_dropout: float = 0.0
    hidden_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
            x = nn.Dropout(self.hidden_dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="logits")(x)


class CNN(nn.Module):
    """A small LeNet-style CNN: two conv+pool blocks and one hidden dense layer."""

    features: Sequence[int] = (32, 64)
    dense: int = 256
    num_classes: int = 10
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = x.astype(jnp.float32)
        for i, width in enumerate(self.features):
            x = nn.relu(nn.Conv(width, (3, 3), name=f"conv_{i}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense, name="hidden")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="logits")(x)


def create(config: Mapping[str, Any]) -> nn.Module:
    """Builds a model from a config dict such as ``{"name": "mlp", "hidden": (800, 800)}``.

    Keys other than ``name`` and ``max_norm`` (an optimizer-side constraint,
    see :func:`max_norm_project`) are the module's fields.
    """
    config = dict(config)
    name = config.pop("name", "mlp")
    config.pop("max_norm", None)
    if name == "mlp":
        if "hidden" in config:
            config["hidden"] = tuple(int(w) for w in config["hidden"])
        return MLP(**config)
    if name == "cnn":
        if "features" in config:
            config["features"] = tuple(int(w) for w in config["features"])
        return CNN(**config)
    raise ValueError(f"unknown model {name!r}; choose 'mlp' or 'cnn'.")


def init_params(model: nn.Module, rng: Array, input_shape: Sequence[int] = (1, 28, 28, 1)) -> Any:
    """Initializes parameters for an input of ``input_shape`` (batch dim first)."""
    return model.init(rng, jnp.zeros(tuple(input_shape), jnp.float32), train=False)


def max_norm_project(params: Any, max_norm: float | None) -> Any:
    """Rescales each unit's incoming weight vector to L2 norm <= ``max_norm``.

    The max-norm constraint of Srivastava et al. (2014) that Hinton et al.
    used with dropout on the MNIST teacher. Applied after every update to all
    dense and conv kernels (the incoming weights of unit j are
    ``kernel[..., j]``); biases are left alone. ``None`` or ``<= 0`` is a no-op.
    """
    if not max_norm or max_norm <= 0:
        return params

    def project(path, leaf):
        if not (path and getattr(path[-1], "key", None) == "kernel"):
            return leaf
        reduce_axes = tuple(range(leaf.ndim - 1))
        norms = jnp.sqrt(jnp.sum(jnp.square(leaf), axis=reduce_axes, keepdims=True))
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norms, 1e-12))
        return leaf * scale

    return jax.tree_util.tree_map_with_path(project, params)
