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


def conv_same(x: Array, kernel: Array, bias: Array) -> Array:
    """A stride-1 'SAME' convolution as one matrix product over image patches (im2col).

    ``x``: ``[batch, height, width, in]``; ``kernel``: ``[kh, kw, in, out]`` with
    odd ``kh``, ``kw``; the result equals ``lax.conv_general_dilated`` with NHWC/HWIO
    layouts and 'SAME' padding. Written this way because XLA:CPU runs a native
    convolution (and its gradients) several times slower inside a loop body,
    such as the scanned epoch of the training core, than on its own
    (jax-ml/jax#12868); a matrix product has no such penalty.
    """
    kh, kw = kernel.shape[:2]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"conv_same needs an odd kernel size, got {kh}x{kw}.")
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    # Patch channels in (dy, dx, in) order, the row order of the reshaped kernel.
    patches = jnp.concatenate(
        [padded[:, dy:dy + height, dx:dx + width, :] for dy in range(kh) for dx in range(kw)], axis=-1)
    return patches @ kernel.reshape(-1, kernel.shape[-1]) + bias


def max_pool_2x2(x: Array) -> Array:
    """2x2 max-pooling with stride 2 ('VALID': an odd last row or column is dropped), by reshape."""
    batch, height, width, channels = x.shape
    x = x[:, : height // 2 * 2, : width // 2 * 2]
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class Conv(nn.Module):
    """A stride-1 'SAME' convolution with ``nn.Conv``'s parameters (``kernel`` HWIO, ``bias``), via :func:`conv_same`."""

    features: int
    kernel_size: Sequence[int] = (3, 3)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return conv_same(x, kernel, bias)


class CNN(nn.Module):
    """A small LeNet-style CNN: two 3x3 conv + 2x2 max-pool blocks and one hidden dense layer.

    Dropout, when set, on the hidden dense units (Srivastava et al. 2014).
    """

    features: Sequence[int] = (32, 64)
    dense: int = 256
    num_classes: int = 10
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = x.astype(jnp.float32)
        for i, width in enumerate(self.features):
            x = max_pool_2x2(nn.relu(Conv(width, name=f"conv_{i}")(x)))
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
