"""Cross-tokenizer distillation: byte-offset alignment (data/alignment.py) and the aligned losses (cross_tokenizer.py).

Tokenizers are trained here with the ``tokenizers`` library: byte-level BPEs
of two vocabulary sizes, and a character-level BPE without byte fallback.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st
from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

from distill_jax import cross_tokenizer as xt
from distill_jax import losses, objectives
from distill_jax.data import alignment, text
from distill_jax.training import steps

SPECIALS = ["<pad>", "<eos>", "<think>", "</think>"]
CORPUS = ["Q:12+34=<think>2+4+0=06;1+3+0=04;</think>A:46", "héllo wörld ünïcødé 漢字 🙂 tab\there  two  spaces\n",
          "the quick brown fox jumps over the lazy dog"] * 10
# Text drawn for the properties: ASCII, accents, CJK, an emoji, whitespace of several kinds, and a special token.
ALPHABET = list("abQ:=+;0123456789 \t\n") + ["é", "ü", "漢", "字", "🙂", "<think>", "</think>"]


def _tokenizer(vocab_size: int, *, byte_level: bool = True) -> text.Tokenizer:
    backend = Backend(models.BPE())
    if byte_level:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # one token per character, then merges; characters never seen in training are dropped
        backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        backend.decoder = decoders.Fuse()
        alphabet = sorted({c for c in "".join(ALPHABET) if len(c) == 1})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    return text.Tokenizer.from_backend(backend, eos_token="<eos>", pad_token="<pad>")


@functools.cache
def _tokenizers():
    return {"small": _tokenizer(300), "large": _tokenizer(340), "chars": _tokenizer(60, byte_level=False)}


texts = st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=24).map("".join)
pairs = st.sampled_from([("small", "large"), ("large", "small"), ("chars", "small"), ("small", "chars"),
                         ("small", "small"), ("chars", "chars")])


def _spans(ends):
    return list(zip([0] + list(ends[:-1]), ends))


@given(texts, st.sampled_from(["small", "large", "chars"]))
def test_token_spans_cover_every_byte_exactly_once(piece, name):
    tok = _tokenizers()[name]
    ids, ends = alignment.token_byte_ends(tok, piece)
    assert ids == tok.encode(piece)
    assert ends == sorted(ends) and ends[-1] == len(piece.encode("utf-8"))
    covered = [b for start, end in _spans(ends) for b in range(start, end)]
    assert covered == list(range(len(piece.encode("utf-8"))))
    if name != "chars":  # byte-level tokens spell their bytes: each span is exactly its token's bytes
        spelled = alignment.token_bytes(tok)
        data = piece.encode("utf-8")
        assert [data[s:e] for s, e in _spans(ends)] == [spelled[i] for i in ids]


@given(texts, pairs)
def test_groups_cover_the_same_bytes_on_both_sides(piece, pair):
    student, teacher = (_tokenizers()[n] for n in pair)
    _, s_ends = alignment.token_byte_ends(student, piece)
    _, t_ends = alignment.token_byte_ends(teacher, piece)
    s_groups, t_groups = alignment.align_groups(s_ends, t_ends)
    assert s_groups == sorted(s_groups) and t_groups == sorted(t_groups)
    assert set(s_groups) == set(t_groups) == set(range(max(s_groups) + 1))
    for g in set(s_groups):  # the group's last token ends at the same byte on both sides
        s_end = max(e for e, k in zip(s_ends, s_groups) if k == g)
        t_end = max(e for e, k in zip(t_ends, t_groups) if k == g)
        assert s_end == t_end
    if "chars" not in pair:  # each group's tokens decode to the same text on both sides
        data = piece.encode("utf-8")
        s_ids, _ = alignment.token_byte_ends(student, piece)
        t_ids, _ = alignment.token_byte_ends(teacher, piece)
        s_spelled, t_spelled = alignment.token_bytes(student), alignment.token_bytes(teacher)
        for g in set(s_groups):
            s_text = b"".join(s_spelled[i] for i, k in zip(s_ids, s_groups) if k == g)
            t_text = b"".join(t_spelled[i] for i, k in zip(t_ids, t_groups) if k == g)
            assert s_text == t_text and s_text in data


@given(texts, st.sampled_from(["small", "chars"]))
def test_aligning_a_tokenizer_with_itself_is_the_identity(piece, name):
    tok = _tokenizers()[name]
    _, ends = alignment.token_byte_ends(tok, piece)
    s_groups, t_groups = alignment.align_groups(ends, ends)
    assert s_groups == t_groups == list(range(len(ends)))
    vocab = alignment.shared_vocabulary(tok, tok)
    assert vocab.student_ids.tolist() == vocab.teacher_ids.tolist() == list(range(tok.vocab_size))


def test_a_worked_alignment():
    # "12" | "+" | "345" under two tokenizations: [1][2+][34][5] against [12][+3][45].
    s_groups, t_groups = alignment.align_groups([1, 3, 5, 6], [2, 4, 6])
    assert (s_groups, t_groups) == ([0, 0, 0, 0], [0, 0, 0])
    s_groups, t_groups = alignment.align_groups([1, 2, 3, 5, 6], [2, 3, 4, 6])
    assert (s_groups, t_groups) == ([0, 0, 1, 2, 2], [0, 1, 2, 2])
    with pytest.raises(ValueError, match="not of the same text"):
        alignment.align_groups([1, 2], [1, 3])


def test_special_tokens_and_the_shared_vocabulary():
    tok = _tokenizers()
    for name in ("small", "chars"):
        ids, ends = alignment.token_byte_ends(tok[name], "A<think>:")
        think = tok[name].backend.token_to_id("<think>")
        assert think in ids and ends[ids.index(think)] - ends[ids.index(think) - 1] == len("<think>")
    vocab = alignment.shared_vocabulary(tok["chars"], tok["small"])
    pairs = dict(zip(vocab.student_ids.tolist(), vocab.teacher_ids.tolist()))
    assert pairs[tok["chars"].eos_id] == tok["small"].eos_id
    for special in ("<think>", "</think>", "<pad>"):
        assert pairs[tok["chars"].backend.token_to_id(special)] == tok["small"].backend.token_to_id(special)
    s_bytes, t_bytes = alignment.token_bytes(tok["chars"]), alignment.token_bytes(tok["small"])
    assert all(s_bytes[s] == t_bytes[t] for s, t in pairs.items())
    # Every character token of the char-level vocabulary has its byte-level twin, but not the reverse.
    assert 0 < len(vocab) < tok["small"].vocab_size
    assert t_bytes[tok["small"].backend.token_to_id("é")] is None or "é".encode() in t_bytes


ROWS = [{"prompt": "Q:12+34=", "completion": "<think>2+4+0=06;1+3+0=04;</think>A:46"},
        {"prompt": "Q:", "completion": "héllo 漢字 🙂 two  spaces"},
        {"prompt": "the ", "completion": "quick brown fox"}]


def _batch(student: str, teacher: str, max_len: int = 48):
    tok = _tokenizers()
    return {k: jnp.asarray(v) for k, v in
            alignment.encode_aligned_examples(tok[student], tok[teacher], ROWS, max_len=max_len).items()}


def test_aligned_examples_follow_the_students_completion_and_feed_the_teacher_its_own_ids():
    tok = _tokenizers()
    batch = _batch("chars", "small")
    plain = text.encode_examples(tok["chars"], ROWS, max_len=48)
    for key in ("inputs", "valid", "label", "mask"):  # the student's arrays are the ordinary ones
        np.testing.assert_array_equal(batch[key], plain[key])
    theirs = text.encode_examples(tok["small"], ROWS, max_len=48)
    np.testing.assert_array_equal(batch["teacher_inputs"], theirs["inputs"])
    np.testing.assert_array_equal(batch["teacher_label"], theirs["label"])
    mask, starts = np.asarray(batch["mask"]) > 0, np.asarray(batch["align_start"]) > 0
    assert (starts <= mask).all() and ((np.asarray(batch["align_group"]) > 0) == mask).all()
    assert ((np.asarray(batch["teacher_group"]) > 0) == (np.asarray(theirs["mask"]) > 0)).all()
    for r in range(len(ROWS)):  # a group start's teacher position predicts the first teacher token of its group
        for t in np.flatnonzero(starts[r]):
            g, a = int(batch["align_group"][r, t]), int(batch["align_teacher_pos"][r, t])
            assert int(batch["teacher_group"][r, a]) == g and (a == 0 or int(batch["teacher_group"][r, a - 1]) != g)
    # The end tokens are the last group, predicted where each side predicts its end token.
    last = np.asarray(plain["valid"]).sum(1) - 2
    t_last = np.asarray(theirs["valid"]).sum(1) - 2
    for r in range(len(ROWS)):
        assert starts[r, last[r]] and int(batch["align_teacher_pos"][r, last[r]]) == t_last[r]


@pytest.mark.parametrize("name", ["small", "chars"])
def test_aligned_kd_with_one_tokenizer_equals_forward_kl(name):
    tok = _tokenizers()[name]
    batch = _batch(name, name)
    np.testing.assert_array_equal(batch["align_start"], batch["mask"])
    vocab = alignment.shared_vocabulary(tok, tok)
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    s = 3 * jax.random.normal(key1, batch["inputs"].shape + (tok.vocab_size,))
    t = 3 * jax.random.normal(key2, batch["inputs"].shape + (tok.vocab_size,))
    where = batch["mask"] > 0

    @jax.jit
    @functools.partial(jax.value_and_grad, has_aux=True)
    def both(x, temperature):
        ours = xt.aligned_kd(x, t, batch, vocab.student_ids, vocab.teacher_ids, temperature, where=where)
        want = jnp.where(where, losses.forward_kl(x, t, temperature), 0.0)
        return ours.sum(), (ours, want, jax.grad(lambda y: jnp.where(where, losses.forward_kl(y, t, temperature), 0.0).sum())(x))

    for temperature in (1.0, 2.5):
        (_, (ours, want, g_want)), g_ours = both(s, temperature)
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g_ours, g_want, rtol=1e-4, atol=1e-6)


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_aligned_kd_against_a_numpy_reference_across_tokenizers():
    tok = _tokenizers()
    batch = _batch("chars", "small")
    vocab = alignment.shared_vocabulary(tok["chars"], tok["small"])
    key1, key2 = jax.random.split(jax.random.PRNGKey(1))
    s = 2 * jax.random.normal(key1, batch["inputs"].shape + (tok["chars"].vocab_size,))
    t = 2 * jax.random.normal(key2, batch["teacher_inputs"].shape + (tok["small"].vocab_size,))
    T, where = 2.0, batch["mask"] > 0
    ours = np.asarray(xt.aligned_kd(s, t, batch, vocab.student_ids, vocab.teacher_ids, T, where=where))
    b = {k: np.asarray(v) for k, v in batch.items()}
    ls, lt = _np_log_softmax(np.asarray(s) / T), _np_log_softmax(np.asarray(t) / T)
    ls1, lt1 = _np_log_softmax(s), _np_log_softmax(t)
    rest_s = np.setdiff1d(np.arange(s.shape[-1]), vocab.student_ids)
    rest_t = np.setdiff1d(np.arange(t.shape[-1]), vocab.teacher_ids)
    checked = 0
    for r in range(len(ROWS)):
        for pos in np.flatnonzero(b["align_start"][r] * b["mask"][r]):
            a = b["align_teacher_pos"][r, pos]
            q, p = np.exp(ls[r, pos]), np.exp(lt[r, a])
            p_k, q_k = p[vocab.teacher_ids], q[vocab.student_ids]
            p_k, q_k = p_k / p_k.sum(), q_k / q_k.sum()  # renormalized over the shared tokens
            want = np.sum(p_k * (np.log(p_k) - np.log(q_k)))
            q_r, p_r = np.sort(q[rest_s] / q[rest_s].sum())[::-1], np.sort(p[rest_t] / p[rest_t].sum())[::-1]
            width = max(len(q_r), len(p_r))
            want += np.abs(np.pad(q_r, (0, width - len(q_r))) - np.pad(p_r, (0, width - len(p_r)))).sum()
            g = b["align_group"][r, pos]
            s_pos, t_pos = np.flatnonzero(b["align_group"][r] == g), np.flatnonzero(b["teacher_group"][r] == g)
            if len(s_pos) + len(t_pos) > 2:  # the chain rule over each side's tokens of the span
                log_ps = sum(ls1[r, j, b["label"][r, j]] for j in s_pos)
                log_pt = sum(lt1[r, j, b["teacher_label"][r, j]] for j in t_pos)
                pt, ps = np.exp(log_pt), np.exp(log_ps)
                want += pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))
            np.testing.assert_allclose(ours[r, pos], want, rtol=2e-4, atol=2e-5)
            checked += 1
    assert checked > 20
    off = (b["align_start"] == 0) | (b["mask"] == 0)
    assert (ours[off] == 0).all()


def test_aligned_losses_are_finite_for_extreme_and_masked_logits():
    tok = _tokenizers()
    batch = _batch("chars", "small")
    vocab = alignment.shared_vocabulary(tok["chars"], tok["small"])
    s = jnp.zeros(batch["inputs"].shape + (tok["chars"].vocab_size,)).at[..., 3].set(1e4).at[..., 5].set(-jnp.inf)
    t = jnp.zeros(batch["teacher_inputs"].shape + (tok["small"].vocab_size,)).at[..., 7].set(-1e4)
    t = t.at[..., 9].set(-jnp.inf)
    where = batch["mask"] > 0
    for fn in (functools.partial(xt.aligned_kd, shared_student=vocab.student_ids, shared_teacher=vocab.teacher_ids),
               xt.aligned_uld):
        value, grad = jax.value_and_grad(lambda x: fn(x, t, batch, temperature=1.5, where=where).sum())(s)
        assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all()
        none = fn(s, t, batch, temperature=1.5, where=jnp.zeros_like(where))  # nothing selected: 0, gradient 0
        assert float(jnp.abs(none).sum()) == 0.0
    nan = s.at[0, 7, 0].set(jnp.nan)  # NaN is never a mask (position 7 predicts the first completion token)
    assert np.isnan(np.asarray(xt.aligned_kd(nan, t, batch, vocab.student_ids, vocab.teacher_ids, where=where))[0]).any()


def test_the_step_feeds_the_teacher_its_own_tokens():
    tok = _tokenizers()
    batch = _batch("chars", "small", max_len=40)
    batch["teacher_inputs"] = jnp.pad(batch["teacher_inputs"], ((0, 0), (0, 8)))  # a longer teacher row
    batch["teacher_valid"] = jnp.pad(batch["teacher_valid"], ((0, 0), (0, 8)))
    seen = {}

    def teacher_apply(params, tokens, valid, train=False):
        seen["teacher"] = tokens
        return jnp.zeros(tokens.shape + (tok["small"].vocab_size,))

    def student_apply(params, tokens, valid, train=False, rngs=None):
        return params["w"] * jnp.ones(tokens.shape + (tok["chars"].vocab_size,))

    uld_term = objectives.objective_term(lambda s, t, b: xt.aligned_uld(s, t, b, where=b["mask"] > 0))
    objective = objectives.combine(kd=(1.0, uld_term))

    step = steps.make_train_step(student_apply, optax.sgd(0.1), objective, teacher_apply=teacher_apply,
                                 inputs=("inputs", "valid"), teacher_inputs=("teacher_inputs", "teacher_valid"))
    state = steps.create_train_state({"w": jnp.ones(())}, optax.sgd(0.1), jax.random.PRNGKey(0))
    step(state, {}, batch)
    np.testing.assert_array_equal(seen["teacher"], batch["teacher_inputs"])


def test_a_token_by_token_loss_is_refused_for_two_vocabularies(tmp_path):
    from distill_jax import training

    tok = _tokenizers()
    paths = {}
    for name in ("chars", "small"):
        paths[name] = tok[name].save(tmp_path / name)
    data = alignment.encode_aligned_examples(tok["chars"], tok["small"], ROWS * 4, max_len=48)
    config = training.default_config()
    config.model = {"name": "transformer", "vocab_size": tok["chars"].vocab_size, "dim": 16, "depth": 1,
                    "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 32, "max_len": 48}
    config.batch_size, config.num_epochs = 4, 1
    config.objective = {"kd": {"loss": "forward_kl", "weight": 1.0}}
    with pytest.raises(ValueError, match="needs one vocabulary"):
        training.loop._check_cross_tokenizer(config.to_dict(), data, None)
    config.objective = {"kd": {"loss": "aligned_kd", "student_tokenizer": str(paths["chars"]),
                               "teacher_tokenizer": str(paths["small"])}}
    assert training.loop._check_cross_tokenizer(config.to_dict(), data, None) >= data["teacher_inputs"].max() + 1
    plain = text.encode_examples(tok["chars"], ROWS * 4, max_len=48)
    with pytest.raises(ValueError, match="the data is not aligned"):
        training.run(config, tmp_path / "run", datasets={"train": plain, "test": plain}, progress=False)


def test_cross_tokenizer_losses_have_no_chunked_form():
    with pytest.raises(ValueError, match="no chunked form; set config.chunk_size=0"):
        objectives.chunked_from_spec({"kd": {"loss": "aligned_kd"}}, chunk_size=8)
