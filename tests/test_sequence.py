"""Tests of the LM distillation losses and steps: completion-only masking, padding rows, caches, schedules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import generation as G
from distill_jax import losses
from distill_jax.proj.reasoning import task as R
from distill_jax.models import transformer as tf
from distill_jax.proj.reasoning import sequence as S

VOCAB = R.TOKENIZER.vocab_size
SPECS = {
    "sft": S.LossSpec("sft"),
    "forward_kl": S.LossSpec("forward_kl", temperature=2.0),
    "hinton_kd": S.LossSpec("hinton_kd", temperature=2.0, sft_weight=0.5),
    "top_k": S.LossSpec("top_k", tail="bucket"),
    "gkd": S.LossSpec("gkd", beta=0.5),
}


def batch_with_padding_row():
    """Two real rows and one all-padding row (no completion token)."""
    arrays = R.encode_problems([R.Problem(12, 34), R.Problem(5, 678)], "trace")
    pad_row = {k: np.zeros_like(v[:1]) for k, v in arrays.items()}
    batch = {k: np.concatenate([v, pad_row[k]]) for k, v in arrays.items()}
    shape = batch["inputs"].shape + (VOCAB,)
    student = jax.random.normal(jax.random.key(0), shape) * 3
    teacher = jax.random.normal(jax.random.key(1), shape) * 3
    values, indices = losses.top_k_log_probs(teacher, 4)
    batch |= {"teacher_top_values": values, "teacher_top_indices": indices}
    return {k: jnp.asarray(v) for k, v in batch.items()}, student, teacher


@pytest.mark.parametrize("kind", list(SPECS))
def test_losses_are_zero_off_the_completion_and_padding_rows_change_nothing(kind):
    spec = SPECS[kind]
    batch, student, teacher = batch_with_padding_row()
    per_token = S.token_losses(spec, student, batch, teacher)
    assert np.all(np.asarray(per_token)[np.asarray(batch["loss_mask"]) == 0] == 0)
    loss, grads = jax.value_and_grad(lambda s: S.sequence_loss(spec, s, batch, teacher))(student)
    real = {k: v[:2] for k, v in batch.items()}
    np.testing.assert_allclose(float(loss), float(S.sequence_loss(spec, student[:2], real, teacher[:2])), rtol=1e-6)
    grads = np.asarray(grads)
    assert np.all(np.isfinite(grads)) and np.all(grads[2] == 0)
    # Gradient only at positions whose target is a completion token.
    assert np.all(grads[np.asarray(batch["loss_mask"]) == 0] == 0)


@pytest.mark.parametrize("kind", list(SPECS))
def test_an_all_padding_batch_has_finite_zero_loss_and_gradient(kind):
    batch, student, teacher = batch_with_padding_row()
    batch = {k: v[2:] for k, v in batch.items()}
    loss, grads = jax.value_and_grad(lambda s: S.sequence_loss(SPECS[kind], s, batch, teacher[2:]))(student[2:])
    assert float(loss) == 0.0
    assert np.all(np.asarray(grads) == 0)


def test_sft_loss_is_the_mean_cross_entropy_over_completion_tokens():
    batch, student, _ = batch_with_padding_row()
    log_p = jax.nn.log_softmax(student)
    nll = -np.take_along_axis(np.asarray(log_p), np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"])
    expected = (nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(S.sequence_loss(SPECS["sft"], student, batch)), expected, rtol=1e-5)


def test_averaged_teachers_are_the_log_of_the_mean_probability():
    a, b = jax.random.normal(jax.random.key(0), (2, 3, 5))
    fused = S.average_teacher_logits([a, b])
    np.testing.assert_allclose(np.exp(fused), (jax.nn.softmax(a) + jax.nn.softmax(b)) / 2, rtol=1e-5)


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (0.25, 2), (0.5, 4), (1.0, 8)])
def test_on_policy_schedule_spreads_the_fraction_evenly(fraction, expected):
    schedule = S.on_policy_schedule(8, fraction)
    assert schedule.sum() == expected
    with pytest.raises(ValueError, match="lambda"):
        S.on_policy_schedule(8, 1.5)


def test_top_k_cache_has_k_entries_per_token_and_reports_its_bytes():
    config = tf.TransformerConfig(vocab_size=VOCAB, dim=16, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=16, max_len=64)
    params = tf.init_params(config, jax.random.key(0))
    data = R.encode_problems([R.Problem(1, 2), R.Problem(30, 4), R.Problem(9, 9)])
    cache = S.teacher_top_k_cache(config, params, data, 3, batch_size=2)
    assert cache["teacher_top_values"].shape == data["inputs"].shape + (3,)
    assert S.cache_bytes_per_token(cache) == 3 * (4 + 4)
    full = jax.nn.log_softmax(jax.jit(tf.Transformer(config).apply)({"params": params}, data["inputs"], data["valid"]))
    np.testing.assert_allclose(cache["teacher_top_values"][..., 0], np.asarray(full).max(-1), atol=1e-5)


def test_bad_loss_specs_are_value_errors():
    with pytest.raises(ValueError, match="kind"):
        S.LossSpec("reverse")
    with pytest.raises(ValueError, match="beta"):
        S.LossSpec("gkd", beta=2.0)
    with pytest.raises(ValueError, match="teacher"):
        S.make_lm_train_step(tf.TransformerConfig(vocab_size=5, dim=8, num_heads=2, num_kv_heads=1), S.LossSpec("forward_kl"), S.OptimizerSpec())


# ------------------------------------------------------------------ golden token losses (float64 numpy references)


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_kl(log_p, log_q):
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def _np_top_k(teacher, k, temperature):
    """The teacher's k largest log-probs at T and their indices, by numpy sorting."""
    log_p = _np_log_softmax(np.asarray(teacher, np.float64) / temperature)
    indices = np.argsort(-log_p, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(log_p, indices, -1), indices


def _np_distill_term(spec, student, teacher, values=None, indices=None):
    """Per-token distillation term of ``spec`` from its paper formula, float64."""
    T = spec.temperature
    log_q = _np_log_softmax(np.asarray(student, np.float64) / T)
    if spec.kind == "top_k":
        log_q_k = np.take_along_axis(log_q, indices, -1)
        if spec.tail == "renormalize":
            return _np_kl(_np_log_softmax(values), _np_log_softmax(log_q_k))
        kept = np.zeros(log_q.shape, bool)
        np.put_along_axis(kept, indices, True, -1)
        p_tail = 1.0 - np.exp(values).sum(-1, keepdims=True)
        q_tail = np.where(kept, 0.0, np.exp(log_q)).sum(-1, keepdims=True)
        return _np_kl(np.log(np.concatenate([np.exp(values), p_tail], -1)),
                      np.log(np.concatenate([np.exp(log_q_k), q_tail], -1)))
    log_p = _np_log_softmax(np.asarray(teacher, np.float64) / T)
    if spec.kind == "forward_kl":
        return _np_kl(log_p, log_q)
    if spec.kind == "hinton_kd":
        return T**2 * _np_kl(log_p, log_q)
    assert spec.kind == "gkd"
    b = spec.beta
    if b == 0.0:
        return _np_kl(log_p, log_q)
    if b == 1.0:
        return _np_kl(log_q, log_p)
    log_m = np.log(b * np.exp(log_p) + (1 - b) * np.exp(log_q))
    return b * _np_kl(log_p, log_m) + (1 - b) * _np_kl(log_q, log_m)


def _np_cross_entropy(student, targets):
    return -np.take_along_axis(_np_log_softmax(student), np.asarray(targets)[..., None], -1)[..., 0]


GOLDEN_SPECS = [
    S.LossSpec("forward_kl", temperature=2.0),
    S.LossSpec("forward_kl", temperature=0.7, sft_weight=0.3),
    S.LossSpec("hinton_kd", temperature=4.0),
    S.LossSpec("hinton_kd", temperature=2.0, sft_weight=0.5),
    S.LossSpec("gkd", beta=0.1),
    S.LossSpec("gkd", beta=0.9, temperature=2.0, sft_weight=0.2),
    S.LossSpec("gkd", beta=0.0, temperature=1.5),
    S.LossSpec("gkd", beta=1.0),
    S.LossSpec("top_k", temperature=2.0, tail="renormalize"),
    S.LossSpec("top_k", temperature=2.0, tail="bucket", sft_weight=0.25),
    S.LossSpec("top_k", tail="bucket"),
]


def _golden_batch(spec, k=4):
    """The padded batch with a top-k cache of the teacher at the spec's temperature (numpy sorted)."""
    batch, student, teacher = batch_with_padding_row()
    values, indices = _np_top_k(teacher, k, spec.temperature)
    batch = dict(batch) | {"teacher_top_values": jnp.asarray(values, jnp.float32),
                           "teacher_top_indices": jnp.asarray(indices, jnp.int32)}
    return batch, student, teacher, values, indices


@pytest.mark.parametrize("spec", GOLDEN_SPECS, ids=lambda s: f"{s.kind}-T{s.temperature}-b{s.beta}-{s.tail}-w{s.sft_weight}")
def test_token_losses_match_the_formula_plus_weighted_cross_entropy_on_completion_tokens(spec):
    batch, student, teacher, values, indices = _golden_batch(spec)
    mask = np.asarray(batch["loss_mask"])
    expected = _np_distill_term(spec, student, teacher, values, indices)
    expected = (expected + spec.sft_weight * _np_cross_entropy(student, batch["targets"])) * (mask > 0)
    per_token = np.asarray(S.token_losses(spec, student, batch, teacher))
    np.testing.assert_allclose(per_token, expected, rtol=2e-4, atol=2e-5)
    # sequence_loss: the mean over completion tokens only (not over padding or prompt positions).
    np.testing.assert_allclose(float(S.sequence_loss(spec, student, batch, teacher)), expected.sum() / mask.sum(),
                               rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "hinton_kd", "gkd", "top_k"])
def test_sft_weight_adds_exactly_that_multiple_of_the_cross_entropy(kind):
    base = S.LossSpec(kind, temperature=2.0, beta=0.3, tail="bucket")
    batch, student, teacher, _, _ = _golden_batch(base)
    mask = np.asarray(batch["loss_mask"]) > 0
    ce = _np_cross_entropy(student, batch["targets"]) * mask
    plain = np.asarray(S.token_losses(base, student, batch, teacher))
    for weight in (0.1, 2.0):
        weighted = np.asarray(S.token_losses(dataclasses.replace(base, sft_weight=weight), student, batch, teacher))
        np.testing.assert_allclose(weighted - plain, weight * ce, rtol=1e-4, atol=5e-5)


def test_tail_beta_and_temperature_each_reach_the_loss():
    # The knobs must not be ignored: each setting gives its own formula's value (and they differ).
    batch, student, teacher, values, indices = _golden_batch(S.LossSpec("top_k", temperature=2.0))
    seen = {}
    for spec in (S.LossSpec("top_k", temperature=2.0, tail="renormalize"), S.LossSpec("top_k", temperature=2.0, tail="bucket"),
                 S.LossSpec("gkd", beta=0.2), S.LossSpec("gkd", beta=0.7), S.LossSpec("hinton_kd", temperature=1.0),
                 S.LossSpec("hinton_kd", temperature=3.0)):
        got = float(S.sequence_loss(spec, student, batch, teacher))
        mask = np.asarray(batch["loss_mask"])
        want = (_np_distill_term(spec, student, teacher, values, indices) * mask).sum() / mask.sum()
        np.testing.assert_allclose(got, want, rtol=2e-4)
        seen[spec] = got
    pairs = list(seen.values())
    assert abs(pairs[0] - pairs[1]) > 1e-3 and abs(pairs[2] - pairs[3]) > 1e-3 and abs(pairs[4] - pairs[5]) > 1e-3


# ------------------------------------------------------------------ top-k cache, every slot and the last partial chunk

TINY = tf.TransformerConfig(vocab_size=VOCAB, dim=16, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=16, max_len=64)


def test_top_k_cache_holds_the_sorted_top_k_log_probs_at_its_temperature_in_every_slot_and_row():
    temperature = 2.5
    # Scaled-up weights: logits far apart, so the top k are well separated.
    params = jax.tree_util.tree_map(lambda x: 8.0 * x, tf.init_params(TINY, jax.random.key(0)))
    problems = [R.Problem(1, 2), R.Problem(30, 4), R.Problem(9, 9), R.Problem(77, 5), R.Problem(4, 608)]
    data = R.encode_problems(problems)
    k = 5
    cache = S.teacher_top_k_cache(TINY, params, data, k, temperature=temperature, batch_size=2)  # chunks of 2, 2, 1
    values, indices = cache["teacher_top_values"], cache["teacher_top_indices"]
    assert values.shape == indices.shape == data["inputs"].shape + (k,)
    logits = np.asarray(jax.jit(tf.Transformer(TINY).apply)({"params": params}, data["inputs"], data["valid"]), np.float64)
    full = _np_log_softmax(logits / temperature)
    expected = -np.sort(-full, axis=-1)[..., :k]
    np.testing.assert_allclose(values, expected, atol=1e-4)  # every slot, every row (the last chunk's too)
    np.testing.assert_allclose(np.take_along_axis(full, indices.astype(np.int64), -1), values, atol=1e-4)
    assert np.all(np.sort(indices, -1)[..., 1:] != np.sort(indices, -1)[..., :-1])  # k distinct tokens
    assert np.all(np.diff(values, axis=-1) <= 0)
    # The temperature reached the cache: at T > 1 the distribution is flatter, the top-1 log-prob lower than at T = 1.
    assert np.all(values[..., 0] < _np_log_softmax(logits).max(-1) - 1e-3)


# ------------------------------------------------------------------ on-policy schedule and the batches train() makes


@pytest.mark.parametrize("num_steps, fraction, on_steps", [
    (8, 0.25, {3, 7}),
    (8, 0.5, {1, 3, 5, 7}),
    (8, 0.75, {1, 2, 3, 5, 6, 7}),
    (9, 1 / 3, {2, 5, 8}),
    (10, 0.2, {4, 9}),
    (4, 1.0, {0, 1, 2, 3}),
    (6, 0.0, set()),
])
def test_on_policy_schedule_picks_evenly_spread_steps(num_steps, fraction, on_steps):
    schedule = S.on_policy_schedule(num_steps, fraction)
    assert schedule.shape == (num_steps,) and schedule.dtype == bool
    assert set(np.flatnonzero(schedule)) == on_steps


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.4, 0.5, 0.6, 0.8])
def test_on_policy_schedule_count_is_the_fraction_of_the_steps_and_gaps_are_even(fraction):
    for n in (20, 40, 100):  # fraction * n is a whole number here: no rounding convention involved
        on = np.flatnonzero(S.on_policy_schedule(n, fraction))
        assert len(on) == round(fraction * n)
        if len(on) > 1 and fraction <= 0.5:  # on-policy steps never bunch up: every gap is floor or ceil of 1/fraction
            assert set(np.diff(on)) <= {int(np.floor(1 / fraction)), int(np.ceil(1 / fraction))}


@pytest.mark.parametrize("num_steps, fraction", [(3, 0.9), (10, 0.99), (1, 0.6), (3, 0.5), (7, 0.3)])
def test_on_policy_schedule_count_rounds_down(num_steps, fraction):
    # A batch becomes on-policy only once a whole one is due: floor, not round.
    assert S.on_policy_schedule(num_steps, fraction).sum() == int(np.floor(num_steps * fraction))


PROMPT_LEN, NEW_TOKENS = R.max_prompt_len(1), R.max_completion_len(1)
ONE_DIGIT = [R.Problem(a, b) for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2))]
# No warmup: the first step already has the full learning rate. Shared by the tests below: one compile each.
STEP_OPTIMIZER = S.OptimizerSpec(learning_rate=1e-2, steps=8, warmup_steps=0, weight_decay=0.1)


def one_digit_data():
    """Training rows of exactly prompt + completion budget: on- and off-policy batches share one shape."""
    return R.encode_problems(ONE_DIGIT, length=PROMPT_LEN + NEW_TOKENS)


@pytest.mark.parametrize("temperature", [None, 0.5])
def test_train_makes_exactly_the_scheduled_batches_from_the_students_own_samples(monkeypatch, temperature):
    steps, fraction, batch_size = STEP_OPTIMIZER.steps, 0.25, 4
    prompt_tokens, prompt_valid = R.prompt_arrays(ONE_DIGIT, length=PROMPT_LEN)
    data = one_digit_data()
    events = []
    real_make = S.make_lm_train_step

    def fake_generate(config, params, tokens, key, sampling, valid):
        # Stands in for sampling (no decode loop to compile): distinct random completions ending in <eos>.
        rng = np.random.default_rng(len(events))
        rows = tokens.shape[0]
        lengths = rng.integers(2, sampling.max_new_tokens + 1, rows)
        out = rng.integers(R.END_THINK + 1, VOCAB, (rows, sampling.max_new_tokens))
        out[np.arange(rows), lengths - 1] = R.EOS
        out = np.where(np.arange(sampling.max_new_tokens)[None] < lengths[:, None], out, R.PAD).astype(np.int32)
        gen = G.Generation(jnp.asarray(out), jnp.zeros(out.shape), jnp.asarray(lengths, jnp.int32), jnp.ones(rows, bool))
        events.append(("generate", jax.tree_util.tree_map(np.asarray, params), np.asarray(tokens), np.asarray(valid), sampling, gen))
        return gen

    def recording_make(*args):
        step = real_make(*args)

        def wrapped(state, batch, teacher_params):
            batch_np = {k: np.asarray(v) for k, v in batch.items()}
            state, metrics = step(state, batch, teacher_params)
            events.append(("step", jax.tree_util.tree_map(np.asarray, state.params), batch_np))
            return state, metrics

        return wrapped

    monkeypatch.setattr(S, "generate", fake_generate)
    monkeypatch.setattr(S, "make_lm_train_step", recording_make)
    # SFT on the samples keeps it cheap (no teacher to compile); the schedule does not depend on the loss.
    _, history = S.train(
        TINY, data, spec=S.LossSpec("sft"), optimizer=STEP_OPTIMIZER, batch_size=batch_size, seed=0,
        on_policy_fraction=fraction, prompts={"tokens": prompt_tokens, "valid": prompt_valid}, max_new_tokens=NEW_TOKENS,
        **({} if temperature is None else {"on_policy_temperature": temperature}),
    )
    step_events = [i for i, e in enumerate(events) if e[0] == "step"]
    assert len(step_events) == steps
    # The step that follows a generate call is on-policy: steps 3 and 7 of 8 at lambda = 1/4, nothing else samples.
    on_policy = [n for n, i in enumerate(step_events) if i > 0 and events[i - 1][0] == "generate"]
    assert on_policy == [3, 7] and history["on_policy_batches"] == 2
    assert len(events) == steps + 2
    rows = {tuple(r) for r in data["inputs"]}
    prompt_rows = {tuple(r) for r in prompt_tokens}
    for n, i in enumerate(step_events):
        batch = events[i][2]
        if n not in on_policy:  # off-policy: rows of the training data
            assert all(tuple(r) in rows for r in batch["inputs"])
            continue
        _, gen_params, gen_prompts, gen_valid, sampling, out = events[i - 1]
        # Drawn at the configured temperature (GKD's default: 1).
        assert sampling.temperature == (1.0 if temperature is None else temperature)
        assert sampling.max_new_tokens == NEW_TOKENS
        assert len(gen_prompts) == batch_size and all(tuple(p) in prompt_rows for p in gen_prompts)
        np.testing.assert_array_equal(gen_valid, gen_prompts != R.PAD)
        # Sampled by the student as it is at that step: the parameters after the previous update.
        jax.tree_util.tree_map(np.testing.assert_array_equal, gen_params, events[step_events[n - 1]][1])
        # The batch is prompt + the student's samples, with the loss on the sampled tokens only.
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        np.testing.assert_array_equal(batch["inputs"][:, :PROMPT_LEN], gen_prompts)
        mask = batch["loss_mask"] > 0
        for row in range(batch_size):
            np.testing.assert_array_equal(batch["targets"][row][mask[row]], tokens[row, : lengths[row]])


def test_an_invalid_on_policy_temperature_is_refused_before_training():
    prompt_tokens, prompt_valid = R.prompt_arrays(ONE_DIGIT, length=PROMPT_LEN)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="on_policy_temperature must be"):
            S.train(TINY, one_digit_data(), spec=S.LossSpec("sft"), optimizer=STEP_OPTIMIZER, batch_size=4, seed=0,
                    on_policy_fraction=0.5, prompts={"tokens": prompt_tokens, "valid": prompt_valid},
                    max_new_tokens=NEW_TOKENS, on_policy_temperature=bad)


# ------------------------------------------------------------------ the jitted LM step against an independent computation


def _fresh_state(config, optimizer, seed):
    return S.init_train_state(config, optimizer, seed)


def test_lm_step_loss_and_grad_norm_match_an_independent_gradient_with_two_teachers():
    spec = S.LossSpec("forward_kl", temperature=2.0, sft_weight=0.5)
    batch = {k: jnp.asarray(v[:4]) for k, v in one_digit_data().items()}
    teachers = tuple(tf.init_params(TINY, jax.random.key(s)) for s in (11, 12))
    teachers = tuple(jax.tree_util.tree_map(lambda x: 10.0 * np.asarray(x), t) for t in teachers)  # confident, different
    state = _fresh_state(TINY, STEP_OPTIMIZER, 0)
    params0 = jax.tree_util.tree_map(np.asarray, state.params)
    model = tf.Transformer(TINY)
    mask = batch["loss_mask"]

    def reference_loss(params):
        # The fused teacher: log of the teachers' mean probability; loss averaged over completion tokens.
        probs = [jax.nn.softmax(model.apply({"params": t}, batch["inputs"], batch["valid"])) for t in teachers]
        fused = jnp.log((probs[0] + probs[1]) / 2)
        logits = model.apply({"params": params}, batch["inputs"], batch["valid"])
        kd = losses.forward_kl(logits, fused, 2.0)
        ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum((kd + 0.5 * ce) * mask) / jnp.sum(mask), logits

    (want_loss, logits), grads = jax.jit(jax.value_and_grad(reference_loss, has_aux=True))(params0)
    step = S.make_lm_train_step(TINY, spec, STEP_OPTIMIZER, (TINY, TINY))
    new_state, metrics = step(state, batch, teachers)
    np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(grads)), rtol=1e-4)
    assert float(metrics["completion_tokens"]) == float(jnp.sum(mask))
    correct = np.asarray(jnp.argmax(logits, -1) == batch["targets"])
    np.testing.assert_allclose(float(metrics["token_accuracy"]), correct[np.asarray(mask) > 0].mean(), rtol=1e-6)
    assert int(new_state.step) == 1
    # One AdamW step with these gradients: the same optimizer applied by hand.
    tx = STEP_OPTIMIZER.make()
    by_hand = jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(grads, params0)
    # Adam's first step moves each weight by about lr = 1e-2 in the gradient's sign: a wrong gradient shows.
    jax.tree_util.tree_map(lambda got, want: np.testing.assert_allclose(got, want, atol=2e-4), new_state.params, by_hand)


def test_lm_step_on_a_padding_only_batch_changes_parameters_by_weight_decay_alone():
    batch = {k: jnp.zeros_like(jnp.asarray(v[:4])) for k, v in one_digit_data().items()}
    state = _fresh_state(TINY, STEP_OPTIMIZER, 0)
    params0 = jax.tree_util.tree_map(np.asarray, state.params)
    new_state, metrics = S.make_lm_train_step(TINY, S.LossSpec("sft"), STEP_OPTIMIZER, ())(state, batch, ())
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0 and float(metrics["completion_tokens"]) == 0
    # Zero gradient: Adam's update is 0, so only AdamW's decoupled decay p <- p - lr * wd * p acts (full lr at
    # step 0). Any nonzero gradient would move every weight by about lr, far outside this tolerance.
    lr, wd = STEP_OPTIMIZER.learning_rate, STEP_OPTIMIZER.weight_decay
    for got, p in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(params0)):
        np.testing.assert_allclose(got, p * (1 - lr * wd), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- rejection sampling and evaluation bookkeeping


def _fake_generate_for(samples):
    """A stand-in for generate_for returning fixed completions; records its calls."""
    calls = []

    def fake(config, params, problems, *, key, max_new_tokens, temperature=0.0, num_samples=1, **kw):
        calls.append({"key": key, "temperature": temperature, "num_samples": num_samples})
        return [[R.TOKENIZER.encode(text) for text in samples[(p.a, p.b)][:num_samples]] for p in problems]

    return fake, calls


def test_sample_verified_keeps_distinct_verified_texts_and_counts_them(monkeypatch):
    problems = [R.Problem(1, 2), R.Problem(3, 4), R.Problem(5, 5)]
    right = lambda p, fmt: R.completion(p, fmt)
    samples = {
        (1, 2): [right(problems[0], "trace"), right(problems[0], "trace"), "A:4<eos>"],  # 2 right, 1 text
        (3, 4): ["A:8<eos>", "A:1<eos>", "A:0<eos>"],  # none right
        (5, 5): [right(problems[2], "answer"), "A:9<eos>", right(problems[2], "trace")],  # 2 right, 2 texts
    }
    fake, calls = _fake_generate_for(samples)
    monkeypatch.setattr(S, "generate_for", fake)
    kept, stats = S.sample_verified(None, None, problems, num_samples=3, max_new_tokens=8, temperature=0.7, seed=4)
    assert calls[0]["num_samples"] == 3 and calls[0]["temperature"] == 0.7
    assert stats == {"sampled": 9, "accepted": 4, "acceptance_rate": 4 / 9, "problems_covered": 2 / 3, "kept_unique": 3}
    assert sorted((p.a, p.b, text) for p, text in kept) == sorted(
        [(1, 2, right(problems[0], "trace")), (5, 5, right(problems[2], "answer")), (5, 5, right(problems[2], "trace"))]
    )


def test_evaluate_scores_greedy_and_pass_at_k_from_their_own_samples(monkeypatch):
    problems = [R.Problem(1, 2), R.Problem(3, 4)]
    right = [R.completion(p, "answer") for p in problems]
    samples = {(1, 2): [right[0], "A:0<eos>"], (3, 4): ["A:0<eos>", right[1]]}
    fake, calls = _fake_generate_for(samples)
    monkeypatch.setattr(S, "generate_for", fake)
    result = S.evaluate(None, None, problems, max_new_tokens=8, pass_k=2, pass_temperature=0.9, seed=3)
    # Greedy takes the first completion (1 of 2 right); pass@2 finds a right one for both.
    assert result == {"greedy": 0.5, "count": 2, "pass@2": 1.0}
    greedy_call, pass_call = calls
    assert greedy_call["temperature"] == 0.0 and greedy_call["num_samples"] == 1
    assert pass_call["temperature"] == 0.9 and pass_call["num_samples"] == 2
    # pass@k samples draw from their own key, not the greedy one.
    assert not np.array_equal(jax.random.key_data(greedy_call["key"]), jax.random.key_data(pass_call["key"]))
    with pytest.raises(ValueError, match="at least one problem"):
        S.evaluate(None, None, [], max_new_tokens=8)


def test_spec_defaults_are_temperature_one_and_a_50_step_warmup():
    batch, student, teacher = batch_with_padding_row()
    np.testing.assert_allclose(
        S.token_losses(S.LossSpec("forward_kl"), student, batch, teacher),
        S.token_losses(S.LossSpec("forward_kl", temperature=1.0), student, batch, teacher),
    )
    assert S.LossSpec().kind == "sft" and S.LossSpec().tail == "bucket"  # a divergence; renormalize with k=1 cannot train
    # AdamW's learning rate warms up linearly over 50 steps, then decays by a cosine to 10%.
    spec = S.OptimizerSpec(learning_rate=1.0, steps=1000, weight_decay=0.0, clip_norm=1e9)
    tx = spec.make()
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    sizes = []
    for _ in range(51):
        update, state = tx.update({"w": jnp.ones(3)}, state, params)
        sizes.append(float(jnp.abs(update["w"][0])))
    # Adam's normalized step is ~1, so each update's size is the learning rate of that step.
    np.testing.assert_allclose(sizes[25], 25 / 50, rtol=1e-3)
    np.testing.assert_allclose(sizes[50], 1.0, rtol=1e-3)
    # ... and ends at a tenth of the peak.
    short = S.OptimizerSpec(learning_rate=1.0, steps=60, warmup_steps=10, weight_decay=0.0, clip_norm=1e9).make()
    state = short.init(params)
    for _ in range(61):
        update, state = short.update({"w": jnp.ones(3)}, state, params)
    np.testing.assert_allclose(float(jnp.abs(update["w"][0])), 0.1, rtol=1e-3)


def test_train_refuses_an_empty_dataset():
    config = tf.TransformerConfig(vocab_size=VOCAB, dim=8, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=8, max_len=32)
    empty = {k: v[:0] for k, v in R.encode_problems([R.Problem(1, 2)]).items()}
    with pytest.raises(ValueError, match="no training rows"):
        S.train(config, empty, spec=S.LossSpec("sft"), optimizer=S.OptimizerSpec(steps=1), batch_size=2, seed=0)


def test_generate_for_chunks_give_each_problem_its_own_greedy_completion():
    config = tf.TransformerConfig(vocab_size=VOCAB, dim=16, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=16, max_len=64)
    params = tf.init_params(config, jax.random.key(5))
    problems = [R.Problem(1, 2), R.Problem(34, 5), R.Problem(7, 80)]
    length = R.max_prompt_len(2)
    chunked = S.generate_for(config, params, problems, key=jax.random.key(0), max_new_tokens=6, batch_size=2, prompt_len=length)
    alone = [S.generate_for(config, params, [p], key=jax.random.key(0), max_new_tokens=6, batch_size=2, prompt_len=length)[0]
             for p in problems]
    assert chunked == alone and len(chunked) == 3


def test_cache_bytes_count_the_k_slots_of_a_token():
    cache = {"teacher_top_values": np.zeros((5, 7, 2), np.float32), "teacher_top_indices": np.zeros((5, 7, 2), np.int32)}
    assert S.cache_bytes_per_token(cache) == 2 * (4 + 4)
    cache16 = {"teacher_top_values": np.zeros((5, 7, 3), np.float16), "teacher_top_indices": np.zeros((5, 7, 3), np.int32)}
    assert S.cache_bytes_per_token(cache16) == 3 * (2 + 4)


def test_train_logs_every_nth_step_and_the_last_and_donates_its_state():
    config = tf.TransformerConfig(vocab_size=VOCAB, dim=8, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=8, max_len=32)
    data = R.encode_problems([R.Problem(1, 2), R.Problem(3, 4)])
    optimizer = S.OptimizerSpec(steps=5, warmup_steps=0)
    _, history = S.train(config, data, spec=S.LossSpec("sft"), optimizer=optimizer, batch_size=2, seed=0, log_every=3)
    assert [i for i, _ in history["loss"]] == [0, 3, 4]
    step = S.make_lm_train_step(config, S.LossSpec("sft"), optimizer, ())
    state = S.init_train_state(config, optimizer, 0)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    new_state, _ = step(state, batch, ())
    assert jax.tree_util.tree_leaves(state.params)[0].is_deleted()
    assert not jax.tree_util.tree_leaves(new_state.params)[0].is_deleted()


def test_beta_below_zero_is_refused():
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\], got -0.5"):
        S.LossSpec("gkd", beta=-0.5)
    assert S.LossSpec("gkd", beta=0.0).beta == 0.0


def test_a_one_step_schedule_with_a_long_warmup_still_updates():
    # warmup is capped at steps - 1 = 0: the single step runs at the peak rate, not at 0.
    tx = S.OptimizerSpec(learning_rate=0.1, steps=1, warmup_steps=50, weight_decay=0.0, clip_norm=1e9).make()
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    assert np.all(np.asarray(updates["w"]) < -0.05)


def test_generate_for_gives_one_sample_by_default_and_num_samples_each_otherwise():
    config = tf.TransformerConfig(vocab_size=VOCAB, dim=16, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=16, max_len=64)
    params = tf.init_params(config, jax.random.key(5))
    problems = [R.Problem(1, 2), R.Problem(34, 5), R.Problem(7, 80)]
    one = S.generate_for(config, params, problems, key=jax.random.key(0), max_new_tokens=6, batch_size=4)
    assert [len(samples) for samples in one] == [1, 1, 1]
    three = S.generate_for(config, params, problems, key=jax.random.key(0), max_new_tokens=6, batch_size=4,
                           num_samples=3, temperature=1.0)
    assert [len(samples) for samples in three] == [3, 3, 3]
    # Greedy samples of one problem are its greedy completion, whatever the repetition.
    greedy3 = S.generate_for(config, params, problems, key=jax.random.key(0), max_new_tokens=6, batch_size=4, num_samples=3)
    assert all(samples == [first[0]] * 3 for samples, first in zip(greedy3, one))
