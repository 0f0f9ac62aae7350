"""The on-disk top-k teacher cache (distill_jax.data.teacher_cache): exact, resumable, refuses what does not fit."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import losses
from distill_jax.data import teacher_cache as tc
from distill_jax.models import transformer as tf

CONFIG = tf.TransformerConfig(vocab_size=37, dim=16, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=24, max_len=16)
PARAMS = tf.init_params(CONFIG, jax.random.key(0))
MODEL = tf.Transformer(CONFIG)


def _teacher(x, v):
    return MODEL.apply({"params": PARAMS}, x, v)


def _rows(n=11, length=9, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, CONFIG.vocab_size, (n, length)).astype(np.int32)
    valid = np.ones((n, length), bool)
    valid[::3, -3:] = False  # right padding on some rows
    return np.where(valid, inputs, 0), valid


def _write(directory, inputs, valid, **kw):
    args = dict(k=5, temperature=2.0, vocab_size=CONFIG.vocab_size, teacher="teacher-sha", tokenizer="tok-sha",
                shard_rows=4, batch_size=3)
    return tc.write(directory, _teacher, inputs, valid, **(args | kw))


def test_the_cache_holds_the_teachers_top_k_at_temperature_and_the_tail_mass(tmp_path):
    inputs, valid = _rows()
    cache = _write(tmp_path / "c", inputs, valid)
    assert cache.complete and cache.bytes_per_token == 5 * 8 + 4
    values, ids, tail = cache.all_rows()
    ref_values, ref_ids = losses.top_k_log_probs(_teacher(jnp.asarray(inputs), jnp.asarray(valid)), 5, 2.0)
    np.testing.assert_allclose(values, np.asarray(ref_values), atol=1e-6)
    np.testing.assert_array_equal(ids, np.asarray(ref_ids))
    mass = np.exp(np.asarray(ref_values, np.float64)).sum(-1)
    np.testing.assert_allclose(np.exp(tail), 1 - mass, atol=1e-5)
    order = np.random.default_rng(1).permutation(len(inputs))  # the training order: any rows, any shard
    got = cache.rows(order)
    np.testing.assert_array_equal(got[0], values[order])
    np.testing.assert_array_equal(got[1], ids[order])


def test_an_interrupted_writer_resumes_to_the_same_files(tmp_path):
    inputs, valid = _rows()
    partial = _write(tmp_path / "r", inputs, valid, stop_after_shards=2)
    assert not partial.complete and partial.meta["shards_done"] == [0, 1]
    with pytest.raises(tc.CacheMismatchError, match=r"shards \[2\] are not written yet"):
        partial.rows([9])
    resumed = _write(tmp_path / "r", inputs, valid)
    whole = _write(tmp_path / "w", inputs, valid)
    for a, b in zip(resumed.all_rows(), whole.all_rows()):
        np.testing.assert_array_equal(a, b)
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_a_cache_is_refused_for_another_vocabulary_tokenizer_setting_or_data(tmp_path):
    inputs, valid = _rows()
    cache = _write(tmp_path / "c", inputs, valid)
    cache.check(vocab_size=37, tokenizer="tok-sha", k=5, temperature=2.0, inputs=inputs, valid=valid)
    with pytest.raises(tc.CacheMismatchError, match="its teacher's vocabulary has 37 entries, the student's 40"):
        cache.check(vocab_size=40)
    with pytest.raises(tc.CacheMismatchError, match="it was made with tokenizer tok-sha"):
        cache.check(vocab_size=37, tokenizer="other")
    with pytest.raises(tc.CacheMismatchError, match="temperature 2.0, the objective uses 1.0"):
        cache.check(vocab_size=37, temperature=1.0)
    with pytest.raises(tc.CacheMismatchError, match="other token rows than this training split"):
        cache.check(vocab_size=37, inputs=inputs[::-1], valid=valid[::-1])
    with pytest.raises(tc.CacheMismatchError, match="teacher: cache 'teacher-sha' vs now 'another-teacher'"):
        _write(tmp_path / "c", inputs, valid, teacher="another-teacher")
    with pytest.raises(ValueError, match="the teacher's logits have 37 entries per token, but vocab_size=40"):
        _write(tmp_path / "d", inputs, valid, vocab_size=40)
    with pytest.raises(FileNotFoundError, match="not a teacher cache"):
        tc.open_cache(tmp_path / "nothing")


def test_float16_values_halve_the_bytes_and_stay_within_float16_rounding(tmp_path):
    inputs, valid = _rows(n=5)
    full = _write(tmp_path / "f32", inputs, valid)
    half = _write(tmp_path / "f16", inputs, valid, dtype="float16")
    assert half.bytes_per_token == 5 * 6 + 4
    a, b = full.all_rows()[0], half.all_rows()[0]
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
    assert json.loads((tmp_path / "f16" / tc.MANIFEST).read_text())["dtype"] == "float16"


def test_the_fingerprint_of_a_checkpoint_changes_with_any_byte(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "a.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "ckpt" / "b.json").write_text("{}")
    before = tc.fingerprint_files(tmp_path / "ckpt")
    assert before == tc.fingerprint_files([tmp_path / "ckpt"])
    (tmp_path / "ckpt" / "a.bin").write_bytes(b"\x00" * 99 + b"\x01")
    assert tc.fingerprint_files(tmp_path / "ckpt") != before
