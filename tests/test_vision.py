"""The image models: the CNN's im2col convolution and reshape pooling against XLA's own ops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_jax import models
from distill_jax.models import vision


class _LaxCNN(nn.Module):
    """The same network written with nn.Conv and nn.max_pool: the independent reference."""

    features: tuple = (4, 6)
    dense: int = 8

    @nn.compact
    def __call__(self, x, train=False):
        for i, width in enumerate(self.features):
            x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", name=f"conv_{i}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense, name="hidden")(x))
        return nn.Dense(10, name="logits")(x)


@settings(max_examples=20, deadline=None)
@given(kh=st.sampled_from([1, 3, 5]), kw=st.sampled_from([1, 3]), height=st.integers(1, 9),
       width=st.integers(1, 9), channels=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_conv_same_equals_xla_convolution(kh, kw, height, width, channels, seed):
    kx, kk, kb = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (2, height, width, channels))
    kernel = jax.random.normal(kk, (kh, kw, channels, 4))
    bias = jax.random.normal(kb, (4,))
    expected = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    np.testing.assert_allclose(vision.conv_same(x, kernel, bias), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 28, 28, 3), (1, 7, 5, 2), (3, 1, 4, 1)])
def test_max_pool_2x2_equals_nn_max_pool(shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    expected = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    np.testing.assert_array_equal(vision.max_pool_2x2(x), expected)


def test_cnn_matches_the_nn_conv_network_with_the_same_parameters_and_gradients():
    model = models.create({"name": "cnn", "features": (4, 6), "dense": 8})
    reference = _LaxCNN()
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 28, 28, 1))
    params = models.init_params(model, jax.random.PRNGKey(0))
    # Same parameter tree as nn.Conv's, so checkpoints of either load in the other.
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        reference.init(jax.random.PRNGKey(0), x))
    assert params["params"]["conv_0"]["kernel"].shape == (3, 3, 1, 4)
    np.testing.assert_allclose(model.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)

    def loss(apply):
        return lambda p: jnp.sum(jnp.sin(apply(p, x)))

    grads, expected = jax.grad(loss(model.apply))(params), jax.grad(loss(reference.apply))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, expected)


def test_conv_same_refuses_even_kernels():
    with pytest.raises(ValueError, match="odd kernel size"):
        vision.conv_same(jnp.zeros((1, 4, 4, 1)), jnp.zeros((2, 3, 1, 1)), jnp.zeros((1,)))


def test_the_cnn_teacher_recipe_trains_and_teaches_an_mlp_through_the_core(tmp_path):
    """The Fashion-MNIST profile's teacher: jittered CNN training, then an MLP distilled from it in the loop."""
    from distill_jax import data as data_lib
    from distill_jax import training
    from distill_jax.proj.hinton import recipes, report
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "hinton_full", Path(__file__).resolve().parents[1] / "experiments" / "hinton_full.py")
    hinton_full = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hinton_full)
    config = hinton_full.get_config("fashion5")
    assert config.teacher.model.name == "cnn" and config.datasets == ("fashion_mnist",)
    assert "CNN" in report.teacher_label(config.teacher.to_dict())
    images = jax.random.uniform(jax.random.PRNGKey(0), (200, 28, 28, 1))
    split = data_lib.Dataset(images, jnp.arange(200, dtype=jnp.int32) % 10)
    teacher = recipes.cnn_teacher(1)
    teacher.batch_size = 50
    results = training.run(teacher, tmp_path / "teacher", datasets={"train": split, "test": split}, progress=False)
    assert results["finished"] and 0 <= results["test"]["errors"] <= 200
    student = recipes.hinton_student(1, temperature=4.0, hidden=(16, 16), teacher_checkpoint=str(tmp_path / "teacher"))
    student.batch_size, student.jitter, student.cache_teacher = 50, 2, "false"
    results = training.run(student, tmp_path / "student", datasets={"train": split, "test": split}, progress=False)
    assert results["finished"] and not results["teacher_cached"]
