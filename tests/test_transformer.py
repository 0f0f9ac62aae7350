"""Tests of the Llama/Qwen2-style transformer: causality, KV cache, GQA, padding, sharding rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_jax import sharding
from distill_jax.models import transformer as tf


VOCAB = 17


def tiny(**changes) -> tf.TransformerConfig:
    base = dict(vocab_size=VOCAB, dim=16, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=24, max_len=12)
    return tf.TransformerConfig(**(base | changes))


@pytest.fixture(scope="module")
def model_and_params():
    """A jitted forward (one compile per input shape) and parameters of the default tiny config."""
    config = tiny()
    model = tf.Transformer(config)
    forward = jax.jit(lambda params, tokens, valid=None: model.apply({"params": params}, tokens, valid))
    return forward, tf.init_params(config, jax.random.key(0))


def tokens_of(seed: int, shape=(2, 10)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


@given(position=st.integers(0, 9), new_token=st.integers(0, VOCAB - 1))
@settings(max_examples=10)
def test_changing_a_token_never_changes_earlier_logits(model_and_params, position, new_token):
    forward, params = model_and_params
    tokens = tokens_of(1)
    changed = tokens.at[:, position].set(new_token)
    a = forward(params, tokens)
    b = forward(params, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :position]), np.asarray(b[:, :position]))


@pytest.mark.parametrize(
    "changes",
    [
        dict(num_kv_heads=1),  # multi-query
        dict(num_kv_heads=2),  # grouped
        dict(num_kv_heads=4, tie_embeddings=False),  # multi-head, untied
    ],
    ids=["mqa", "gqa", "mha-untied"],
)
def test_kv_cache_prefill_then_decode_equals_full_forward(changes):
    config = tiny(**changes)
    model = tf.Transformer(config)
    params = tf.init_params(config, jax.random.key(2))
    tokens = tokens_of(3)
    full = jax.jit(model.apply)({"params": params}, tokens)
    cache = tf.init_cache(config, batch_size=2, length=12)
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    logits, cache = step(params, tokens[:, :4], cache)
    pieces = [logits]
    for i in range(4, 10):
        logits, cache = step(params, tokens[:, i : i + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), np.asarray(full), atol=1e-5)
    assert int(cache["index"]) == 10


def test_gqa_head_counts_set_the_key_value_projection_sizes():
    for kv in (1, 2, 4):
        params = tf.init_params(tiny(num_kv_heads=kv), jax.random.key(0))
        assert params["block_0"]["attn"]["k"]["kernel"].shape == (16, kv * 4)
        assert params["block_0"]["attn"]["q"]["kernel"].shape == (16, 16)


def test_tied_embeddings_have_no_output_head_and_untied_do():
    tied = tf.init_params(tiny(), jax.random.key(0))
    untied = tf.init_params(tiny(tie_embeddings=False), jax.random.key(0))
    assert "lm_head" not in tied and "lm_head" in untied
    assert tf.num_params(untied) == tf.num_params(tied) + 16 * VOCAB


def test_left_padding_gives_the_logits_of_the_unpadded_sequence(model_and_params):
    forward, params = model_and_params
    tokens = tokens_of(4, (1, 6))
    plain = forward(params, tokens)
    padded = jnp.concatenate([jnp.zeros((1, 3), tokens.dtype), tokens], axis=1)
    valid = jnp.arange(9)[None, :] >= 3
    logits = forward(params, padded, valid)
    np.testing.assert_allclose(np.asarray(logits[:, 3:]), np.asarray(plain), atol=1e-5)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_partition_rules_cover_every_parameter_and_apply_on_a_mesh():
    config = tiny()
    params = tf.init_params(config, jax.random.key(0))
    mesh = sharding.make_mesh("data=-1")
    for strategy in ("replicated", "fsdp", "tensor"):
        rules = tf.partition_rules(config, strategy)
        shardings = sharding.param_shardings(params, rules, mesh)
        assert jax.tree_util.tree_structure(shardings) == jax.tree_util.tree_structure(params)
    specs = tf.logical_specs(config)
    assert tuple(specs["block_0"]["mlp"]["gate"]["kernel"]) == ("embed", "mlp")
    tensor = dict(tf.partition_rules(config, "tensor"))
    assert tensor[r"^\['block_0'\]\['mlp'\]\['down'\]\['kernel'\]$"] == jax.sharding.PartitionSpec("model", None)


@pytest.mark.parametrize(
    "changes, message",
    [(dict(num_heads=3), "divisible"), (dict(num_kv_heads=3), "multiple"), (dict(dim=12, num_heads=4), "even")],
)
def test_bad_sizes_are_value_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes)


def test_config_from_mapping_rejects_unknown_keys():
    assert tf.TransformerConfig.from_mapping({"vocab_size": 5, "dim": 8, "num_heads": 2, "num_kv_heads": 1}).dim == 8
    with pytest.raises(ValueError, match="unknown"):
        tf.TransformerConfig.from_mapping({"vocab_size": 5, "width": 8})


def test_a_packed_row_gives_each_example_the_logits_it_has_alone():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from distill_jax.models import transformer as tf

    config = tf.TransformerConfig(vocab_size=19, dim=16, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=24, max_len=16)
    params = tf.init_params(config, jax.random.key(0))
    model = tf.Transformer(config)
    a, b = [3, 4, 5, 6, 7], [8, 9, 10]
    packed = jnp.array([a + b + [0, 0]])
    segments = jnp.array([[1] * 5 + [2] * 3 + [0, 0]])
    together = np.asarray(model.apply({"params": params}, packed, segments=segments))
    alone_a = np.asarray(model.apply({"params": params}, jnp.array([a])))
    alone_b = np.asarray(model.apply({"params": params}, jnp.array([b])))
    np.testing.assert_allclose(together[0, :5], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(together[0, 5:8], alone_b[0], atol=1e-5)
    # Without segments the second example sees the first: different logits.
    assert np.abs(np.asarray(model.apply({"params": params}, packed))[0, 5:8] - alone_b[0]).max() > 1e-3
