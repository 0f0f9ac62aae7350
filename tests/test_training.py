"""End-to-end tests of the training pipeline on small slices of real MNIST."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import data as data_lib
from distill_jax import models, training
from distill_jax.proj.hinton import recipes
from distill_jax.training import checkpoint as ckpt
from distill_jax.training import loop as loop_lib

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_mnist():
    train = data_lib.load_split("mnist", "train")
    test = data_lib.load_split("mnist", "test")
    return {
        "train": data_lib.take_subset(train, 2000, seed=0),
        "test": data_lib.Dataset(test.images[:1000], test.labels[:1000]),
    }


def _teacher_config(epochs=3):
    c = recipes.hinton_teacher(epochs)
    c.model.hidden = (128, 128)
    c.batch_size = 50
    c.optimizer.learning_rate = 3e-3  # few steps here: a faster rate than the recipe's
    return c


def _student_config(teacher_dir, epochs=3, **kwargs):
    c = recipes.hinton_student(epochs, temperature=4.0, teacher_checkpoint=str(teacher_dir), **kwargs)
    c.model.hidden = (64, 64)
    c.batch_size = 50
    c.optimizer.learning_rate = 3e-3
    return c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, small_mnist):
    workdir = tmp_path_factory.mktemp("teacher")
    results = training.run(_teacher_config(), workdir, datasets=small_mnist, progress=False)
    assert results["test"]["accuracy"] > 0.8, results["test"]
    return workdir


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _metric_lines(workdir):
    """metrics.jsonl without the wall times (the only thing two identical runs may differ in)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "epoch_time_s"} for x in lines]


def _saved_epochs(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_run_writes_config_metrics_results_and_checkpoints(teacher_dir):
    config = json.loads((teacher_dir / "config.json").read_text())
    assert config["model"]["hidden"] == [128, 128]
    lines = [json.loads(line) for line in (teacher_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert {"loss", "accuracy", "hard"} <= set(lines[0]["train"])
    assert lines[-1]["test"]["count"] == 1000
    results = json.loads((teacher_dir / "results.json").read_text())
    assert results["finished"] and results["epochs"] == 3
    assert ckpt.latest_epoch(teacher_dir / "checkpoints") == 3
    # Error counts agree with accuracy and with the per-class breakdown.
    test = results["test"]
    assert test["errors"] == sum(test["errors_per_class"])
    assert test["errors"] == round((1 - test["accuracy"]) * 1000)


@pytest.mark.parametrize("kind", ["teacher", "distill_in_loop"])
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, small_mnist, teacher_dir, kind):
    if kind == "teacher":
        config = _teacher_config(epochs=4)  # dropout + jitter + max-norm: every RNG stream
    else:
        config = _student_config(teacher_dir, epochs=4)
        config.jitter = 2  # the teacher must run in the loop on jittered inputs
    full = training.run(config, tmp_path / "full", datasets=small_mnist, progress=False)
    part = training.run(config, tmp_path / "part", datasets=small_mnist, progress=False, stop_after_epochs=2)
    assert not part["finished"] and part["epochs"] == 2
    assert not (tmp_path / "part" / "results.json").exists()
    resumed = training.run(config, tmp_path / "part", datasets=small_mnist, progress=False, resume=True)
    assert resumed["finished"] and resumed["epochs"] == 4
    assert _leaves_equal(full["params"], resumed["params"])
    assert full["test"] == resumed["test"]
    full_lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    resumed_lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "epoch_time_s"} for x in lines]
    assert strip(full_lines) == strip(resumed_lines)
    # Reusing a finished run retrains nothing and keeps the record of the run that trained it.
    recorded = (tmp_path / "full" / "results.json").read_text()
    reused = training.run(config, tmp_path / "full", datasets=small_mnist, progress=False, resume=True)
    assert reused["test"] == full["test"] and len((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "full" / "results.json").read_text() == recorded
    assert _saved_epochs(tmp_path / "full") == [3, 4]  # the manager keeps the two newest
    if kind == "distill_in_loop":
        # cache_teacher="auto" with jitter: the teacher is not cached but runs on each jittered
        # batch, i.e. the run is the cache_teacher="false" run, bit for bit.
        assert not full["teacher_cached"] and not part["teacher_cached"] and not resumed["teacher_cached"]
        assert json.loads(recorded)["teacher_cached"] is False
        never = _student_config(teacher_dir, epochs=4)
        never.jitter, never.cache_teacher = 2, "false"
        forced = training.run(never, tmp_path / "never", datasets=small_mnist, progress=False)
        assert _leaves_equal(full["params"], forced["params"])
        assert _metric_lines(tmp_path / "never") == _metric_lines(tmp_path / "full")


def test_resume_after_a_crash_between_checkpoints_redoes_the_lost_epochs(
    tmp_path, small_mnist, teacher_dir, monkeypatch
):
    config = _teacher_config(epochs=4)  # dropout + jitter + max-norm: every RNG stream
    config.checkpoint_every = 2
    every_epoch = _teacher_config(epochs=4)
    every_epoch.checkpoint_every = 1  # may differ on resume; it changes nothing in the training
    full = training.run(every_epoch, tmp_path / "full", datasets=small_mnist, progress=False)

    # The run dies during epoch 4: epoch 3 is in metrics.jsonl but its last checkpoint is epoch 2.
    # (The loop builds its jitted epoch with steps.make_train_epoch; the wrapper
    # also keeps a host copy of the params after each epoch.)
    real_epoch_fn = loop_lib.make_train_epoch
    after_epoch = {}

    def crashing(*args, **kwargs):
        epoch_fn = real_epoch_fn(*args, **kwargs)

        def wrapped(state, teacher_params, data, epoch):
            if int(epoch) == 3:
                raise RuntimeError("simulated crash in epoch 4")
            state, metrics = epoch_fn(state, teacher_params, data, epoch)
            after_epoch[int(epoch) + 1] = jax.device_get(state.params)
            return state, metrics

        return wrapped

    monkeypatch.setattr(loop_lib, "make_train_epoch", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        training.run(config, tmp_path / "crashed", datasets=small_mnist, progress=False)
    monkeypatch.undo()
    assert [line["epoch"] for line in _metric_lines(tmp_path / "crashed")] == [1, 2, 3]
    assert _saved_epochs(tmp_path / "crashed") == [2]

    # The uninterrupted run's older checkpoint is what the crashed run had after that epoch.
    checkpoints = tmp_path / "full" / "checkpoints"
    assert _saved_epochs(tmp_path / "full") == [3, 4]
    assert ckpt.read_meta(checkpoints, 3)["epoch"] == 3
    epoch3 = ckpt.restore_params(checkpoints, full["params"], 3)
    assert _leaves_equal(epoch3, after_epoch[3]) and not _leaves_equal(epoch3, full["params"])

    # Resuming drops the line of the lost epoch 3, redoes it and ends where the uninterrupted run does.
    resumed = training.run(config, tmp_path / "crashed", datasets=small_mnist, progress=False, resume=True)
    assert resumed["finished"] and resumed["epochs"] == 4
    assert _metric_lines(tmp_path / "crashed") == _metric_lines(tmp_path / "full")
    assert _leaves_equal(resumed["params"], full["params"])
    assert resumed["test"] == full["test"]
    assert _saved_epochs(tmp_path / "crashed") == [2, 4]  # every 2nd epoch, and the last


def test_teacher_cache_matches_teacher_in_the_loop(tmp_path, small_mnist, teacher_dir):
    cached_config = _student_config(teacher_dir, epochs=2)
    loop_config = _student_config(teacher_dir, epochs=2)
    loop_config.cache_teacher = "false"
    cached = training.run(cached_config, tmp_path / "cached", datasets=small_mnist, progress=False)
    in_loop = training.run(loop_config, tmp_path / "loop", datasets=small_mnist, progress=False)
    assert cached["teacher_cached"] and not in_loop["teacher_cached"]
    for a, b in zip(jax.tree_util.tree_leaves(cached["params"]), jax.tree_util.tree_leaves(in_loop["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert abs(cached["test"]["errors"] - in_loop["test"]["errors"]) <= 2


def test_cache_with_jitter_is_refused(tmp_path, small_mnist, teacher_dir):
    config = _student_config(teacher_dir)
    config.jitter = 2
    config.cache_teacher = "true"
    with pytest.raises(ValueError, match="cache_teacher=true with jitter"):
        training.run(config, tmp_path / "x", datasets=small_mnist, progress=False)


def test_distillation_learns_from_the_teacher(tmp_path, small_mnist, teacher_dir):
    config = _student_config(teacher_dir, epochs=6)
    results = training.run(config, tmp_path / "s", datasets=small_mnist, progress=False)
    teacher = json.loads((teacher_dir / "results.json").read_text())["test"]
    # The student predicts what its teacher predicts on test images it never saw (chance: ~10%).
    teacher_apply, teacher_params, _ = training.load_teacher(teacher_dir)
    images = small_mnist["test"].images
    teacher_pred = np.argmax(teacher_apply(teacher_params, images, train=False), -1)
    student_pred = np.argmax(models.create(config.model).apply(results["params"], images, train=False), -1)
    agreement = float(np.mean(teacher_pred == student_pred))
    assert agreement > 0.8, agreement
    # Trained only on soft targets, it copies the teacher (mistakes included) more than it matches the labels.
    assert agreement > results["test"]["accuracy"], (agreement, results["test"])
    # A student 1/4 the width, trained on 2,000 images only through the
    # teacher's soft targets, gets within 10 points of it (chance is 10%).
    assert results["test"]["accuracy"] > max(0.7, teacher["accuracy"] - 0.1), (results["test"], teacher)
    lines = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train"]["soft"] < lines[0]["train"]["soft"]


def test_restoring_a_checkpoint_of_another_model_is_a_clear_error(tmp_path, small_mnist, teacher_dir):
    config = _teacher_config(epochs=2)
    training.run(config, tmp_path / "run", datasets=small_mnist, progress=False, stop_after_epochs=1)
    other = _teacher_config(epochs=2)
    other.model.hidden = (32, 32)
    with pytest.raises(ckpt.CheckpointMismatchError, match="another model config"):
        training.run(other, tmp_path / "run", datasets=small_mnist, progress=False, resume=True)
    changed = _teacher_config(epochs=2)
    changed.optimizer.learning_rate = 0.5
    with pytest.raises(ckpt.CheckpointMismatchError, match="optimizer.learning_rate"):
        training.run(changed, tmp_path / "run", datasets=small_mnist, progress=False, resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        training.run(config, tmp_path / "run", datasets=small_mnist, progress=False)


def test_bad_inputs_fail_before_training(tmp_path, small_mnist, teacher_dir):
    bad_temperature = _student_config(teacher_dir)
    bad_temperature.objective.soft.temperature = 0.0
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        training.run(bad_temperature, tmp_path / "a", datasets=small_mnist, progress=False)
    assert ckpt.latest_epoch(tmp_path / "a" / "checkpoints") is None

    wrong_classes = _student_config(teacher_dir)
    wrong_classes.model.num_classes = 5
    with pytest.raises(ValueError, match="predicts 10 classes but the student has 5"):
        training.run(wrong_classes, tmp_path / "b", datasets=small_mnist, progress=False)

    no_teacher = _student_config("")
    with pytest.raises(ValueError, match="teacher.checkpoint is empty"):
        training.run(no_teacher, tmp_path / "c", datasets=small_mnist, progress=False)

    missing = _student_config(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        training.run(missing, tmp_path / "d", datasets=small_mnist, progress=False)

    images = np.array(small_mnist["train"].images)
    images[3, 10, 10, 0] = np.nan
    nan_data = dict(small_mnist, train=data_lib.Dataset(jnp.asarray(images), small_mnist["train"].labels))
    with pytest.raises(ValueError, match="NaN"):
        training.run(_teacher_config(), tmp_path / "e", datasets=nan_data, progress=False)


def test_max_norm_constraint_holds_after_training(teacher_dir):
    apply_fn, params, model_config = training.load_teacher(teacher_dir)
    assert model_config["max_norm"] == pytest.approx(3.5)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path[-1].key == "kernel":
            assert float(jnp.linalg.norm(leaf, axis=0).max()) <= 3.5 + 1e-4
