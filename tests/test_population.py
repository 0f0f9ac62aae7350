"""A vmapped population of students is the same experiment as separate runs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import models, objectives, training
from distill_jax.proj.hinton import full as hinton
from distill_jax.training import population

NUM_CLASSES = 10


def _data(n=240, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, 28, 28, 1), np.float32)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    teacher_logits = rng.normal(0, 3, (2, n, NUM_CLASSES)).astype(np.float32)
    return images, labels, teacher_logits


def _model():
    return models.create({"name": "mlp", "hidden": (16, 16), "num_classes": NUM_CLASSES})


def _make_step(model, tx):
    def make_step(h):
        objective = objectives.hinton(h["temperature"], soft_weight=h["soft_weight"], hard_weight=h["hard_weight"])
        return training.make_train_step(model.apply, tx, objective)

    return make_step


@pytest.mark.parametrize("member_axis", population.MEMBER_AXES)
def test_each_member_equals_its_own_single_run(member_axis):
    images, labels, teacher_logits = _data()
    model, tx = _model(), optax.adam(1e-2)
    members = [  # (seed, teacher, T, soft weight, hard weight)
        (0, 0, 4.0, 1.0, 0.1),
        (1, 1, 20.0, 1.0, 0.1),
        (0, 0, 1.0, 0.0, 1.0),  # hard labels only
    ]
    hparams = {"temperature": np.array([m[2] for m in members], np.float32),
               "soft_weight": np.array([m[3] for m in members], np.float32),
               "hard_weight": np.array([m[4] for m in members], np.float32)}
    states = population.init_population(model, (1, 28, 28, 1), tx, [m[0] for m in members])
    epoch = population.make_population_epoch(_make_step(model, tx), batch_size=40, member_axis=member_axis)
    member_data = {"teacher_logits": jnp.asarray(teacher_logits[[m[1] for m in members]])}
    shared = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    for e in range(2):
        states, metrics = epoch(states, hparams, member_data, shared, np.asarray(e, np.int32))
    assert metrics["loss"].shape == (len(members),)

    for i, (seed, teacher, temperature, soft_weight, hard_weight) in enumerate(members):
        # The single run, built as the run loop builds it.
        init_key, state_key = population.seed_keys(seed)
        state = training.create_train_state(models.init_params(model, init_key, (1, 28, 28, 1)), tx, state_key)
        if soft_weight == 0:
            objective = objectives.supervised()
        else:
            objective = objectives.hinton(temperature, soft_weight=soft_weight, hard_weight=hard_weight)
        single_epoch = training.make_train_epoch(training.make_train_step(model.apply, tx, objective), batch_size=40)
        data = dict(shared, teacher_logits=jnp.asarray(teacher_logits[teacher]))
        for e in range(2):
            state, single_metrics = single_epoch(state, None, data, np.asarray(e, np.int32))
        got = population.member(states.params, i)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(state.params)):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(metrics["loss"][i], single_metrics["loss"], rtol=1e-4)


def test_an_unknown_member_axis_is_refused():
    with pytest.raises(ValueError, match="member_axis='pmap'"):
        population.make_population_epoch(_make_step(_model(), optax.adam(1e-2)), batch_size=40, member_axis="pmap")


def test_the_study_refuses_an_unknown_member_axis_before_training(tmp_path):
    import ml_collections

    config = ml_collections.ConfigDict({"name": "x", "profile": "x", "seeds": (0,), "widths": (30,),
                                        "datasets": ("mnist",), "member_axis_by_width": {"30": "pmap"}})
    with pytest.raises(ValueError, match=r"member_axis_by_width\['30'\]='pmap'"):
        hinton.run_study(config, runs_root=tmp_path / "runs", results_dir=tmp_path / "results", progress=False)
    assert not (tmp_path / "runs").exists()
    assert hinton.member_axis_for(ml_collections.ConfigDict({"widths": (800,)}), 800) == "vmap"


def _largest_leaf(tree):
    return max(jax.tree_util.tree_leaves(tree), key=lambda leaf: leaf.size)


def test_members_differ_by_seed_and_temperature():
    images, labels, teacher_logits = _data()
    model, tx = _model(), optax.adam(1e-2)
    hparams = {"temperature": np.array([2.0, 2.0, 8.0], np.float32), "soft_weight": np.ones(3, np.float32),
               "hard_weight": np.zeros(3, np.float32)}
    states = population.init_population(model, (1, 28, 28, 1), tx, [0, 1, 0])
    first = _largest_leaf(states.params)
    assert not np.allclose(first[0], first[1])  # other seed: other init
    np.testing.assert_array_equal(first[0], first[2])  # same seed: same init
    epoch = population.make_population_epoch(_make_step(model, tx), batch_size=40)
    states, _ = epoch(states, hparams, {"teacher_logits": jnp.asarray(teacher_logits[[0, 0, 0]])},
                      {"image": jnp.asarray(images), "label": jnp.asarray(labels)}, np.asarray(0, np.int32))
    after = _largest_leaf(states.params)
    assert not np.allclose(after[0], after[2])  # same init, other temperature


def test_hparams_need_one_value_per_member():
    with pytest.raises(ValueError, match="one value per member"):
        population.check_hparams({"temperature": np.ones(2)}, 3)
    with pytest.raises(ValueError, match="at least one member"):
        population.init_population(_model(), (1, 28, 28, 1), optax.sgd(0.1), [])


def test_stack_and_member_round_trip():
    trees = [{"a": jnp.full((2,), float(i)), "b": (jnp.asarray(i),)} for i in range(3)]
    stacked = population.stack(trees)
    assert population.population_size(stacked) == 3
    for i, tree in enumerate(trees):
        np.testing.assert_array_equal(population.member(stacked, i)["a"], tree["a"])


def test_shifted_errors_against_a_loop():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (200, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 200)
    shifts = np.array([-2.0, 0.0, 1.5, 6.0], np.float32)
    got = hinton.shifted_errors(logits, labels, [3, 5], shifts)
    for k, shift in enumerate(shifts):
        adjusted = logits.copy()
        adjusted[:, [3, 5]] += shift
        assert got[k] == int(np.sum(adjusted.argmax(-1) != labels))


def test_agreement_counts_by_hand():
    labels = np.array([0, 1, 2, 0])
    # Predictions: teacher 0, 1, 1, 2 (wrong on 2 and 3); student 0, 2, 1, 0 (wrong on 1 and 2).
    teacher = np.array([[5, 0, 0], [0, 5, 0], [0, 5, 0], [0, 0, 5]], np.float32)
    student = np.array([[5, 0, 0], [0, 0, 5], [0, 5, 0], [5, 0, 0]], np.float32)
    got = hinton.agreement(teacher, student, labels)
    assert {k: got[k] for k in ("teacher_errors", "student_errors", "both_wrong", "student_only", "teacher_only",
                                "disagreements")} == {"teacher_errors": 2, "student_errors": 2, "both_wrong": 1,
                                                      "student_only": 1, "teacher_only": 1, "disagreements": 2}
    # Independent formula: rows 1 and 3 differ by a permuted one-hot of 5 ([0,-5,5] after centring), rows 0, 2 match.
    assert got["centered_logit_rmse"] == pytest.approx(np.sqrt(2 * 50 / 12), abs=1e-4)
    # A constant added per example changes no soft target, so it is not a difference.
    assert hinton.agreement(teacher, teacher + np.arange(4)[:, None], labels)["centered_logit_rmse"] == 0.0
    with pytest.raises(ValueError, match="differ"):
        hinton.agreement(teacher, student[:, :2], labels)


def test_choose_shift_recovers_a_missing_class():
    # A model that never learned class 3: its logit sits 2.5 below the truth.
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, 500)
    logits = rng.normal(0, 0.3, (500, 10)).astype(np.float32)
    logits[np.arange(500), labels] += 2.0
    logits[:, 3] -= 2.5
    grid = np.arange(0, 6.01, 0.25)
    shift = hinton.choose_shift(logits, labels, [3], grid, sign=1.0)
    assert 2.0 <= shift <= 3.0
    # Lowering (sign -1) classes that are over-predicted.
    logits2 = rng.normal(0, 0.3, (500, 10)).astype(np.float32)
    logits2[np.arange(500), labels] += 2.0
    logits2[:, [7, 8]] += 4.0
    assert 3.5 <= hinton.choose_shift(logits2, labels, [7, 8], grid, sign=-1.0) <= 5.0


def test_student_members_cover_the_grid():
    from ml_collections import config_flags  # noqa: F401  (the config file imports ml_collections)
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "experiments" / "hinton_full.py"
    spec = importlib.util.spec_from_file_location("hinton_full", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("full")
    members = hinton.student_members(config)
    assert len(members) == len(config.seeds) * (1 + len(config.temperatures))
    keys = {(m["seed"], hinton._member_key(m)) for m in members}
    assert len(keys) == len(members)
    assert all(m["soft_weight"] == 0 and m["hard_weight"] == 1 for m in members if m["kind"] == "hard")
    with pytest.raises(ValueError, match="unknown profile"):
        module.get_config("nope")
