"""Nothing silent (issue 16): non-finite training stops with the step named, one run per workdir,
workdirs that are not ours are never written into, corrupted checkpoints are detected and skipped.

Each test failed on the code before these guarantees existed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

import sharding_worker as w
from distill_jax import checks, training
from distill_jax.training import checkpoint as ckpt
from distill_jax.training import loop as loop_lib
from distill_jax.training import rundir

DATA = w.synthetic_datasets()


def _config(epochs=3, **changes):
    c = training.default_config()
    c.model.hidden = (32,)
    c.num_epochs = epochs
    c.batch_size = 64
    c.optimizer.learning_rate = 0.05
    c.update(changes)
    return c


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


# ------------------------------------------------------------------ non-finite training


def test_a_diverging_distillation_stops_and_names_the_step(tmp_path):
    # The report's reproduction: SGD at lr 1e8 on (a subset of) MNIST.
    from distill_jax import data as data_lib
    from distill_jax.proj.hinton import recipes

    train = data_lib.take_subset(data_lib.load_split("mnist", "train"), 2000, seed=0)
    test = data_lib.load_split("mnist", "test")
    mnist = {"train": train, "test": data_lib.Dataset(test.images[:1000], test.labels[:1000])}
    teacher = w.write_teacher(tmp_path / "teacher")
    config = recipes.hinton_student(3, temperature=20.0, teacher_checkpoint=str(teacher))
    config.optimizer.name, config.optimizer.learning_rate = "sgd", 1e8
    with pytest.raises(FloatingPointError, match=r"epoch 1: the training loss or gradient norm is not finite from step \d+ on"
                                                 r".*no checkpoint has been written yet. Lower the learning rate"):
        training.run(config, tmp_path / "student", datasets=mnist, progress=False)
    assert not (tmp_path / "student" / "results.json").exists()


def test_a_loss_that_turns_nan_names_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = loop_lib.make_train_epoch

    def poisoning(*args, **kwargs):
        epoch_fn = real(*args, **kwargs)

        def wrapped(state, teacher_params, data, epoch):
            if int(epoch) == 1:  # the second epoch starts from NaN weights
                state = state._replace(params=jax.tree_util.tree_map(lambda x: x * np.nan, state.params))
            return epoch_fn(state, teacher_params, data, epoch)

        return wrapped

    # Soft targets only: before, the NaN student logits were masked, the KD loss was 0 and the run "finished".
    teacher = w.write_teacher(tmp_path / "teacher")
    config = _config(objective={"soft": {"loss": "hinton_kd", "weight": 1.0, "temperature": 4.0}},
                     teacher={"checkpoint": str(teacher), "top_k": 0}, cache_teacher="false")
    monkeypatch.setattr(loop_lib, "make_train_epoch", poisoning)
    steps = w.NUM_TRAIN // 64
    with pytest.raises(FloatingPointError, match=rf"epoch 2: .*not finite from step {steps + 1} on.*"
                                                 r"last good checkpoint \(epoch 1\) is kept"):
        training.run(config, tmp_path / "run", datasets=DATA, progress=False)
    monkeypatch.undo()
    assert [line["epoch"] for line in rundir.MetricsLog(tmp_path / "run", resume_from=99, tensorboard=False).lines()] == [1]
    assert ckpt.latest_epoch(tmp_path / "run" / "checkpoints") == 1
    # The kept checkpoint resumes to exactly the run that never went wrong.
    resumed = training.run(config, tmp_path / "run", datasets=DATA, progress=False, resume=True)
    clean = training.run(config, tmp_path / "clean", datasets=DATA, progress=False)
    assert _leaves_equal(resumed["params"], clean["params"])


# ------------------------------------------------------------------ one run per workdir


def test_a_second_run_on_a_busy_workdir_is_refused_at_once(tmp_path):
    with rundir.owned(tmp_path / "run"):
        with pytest.raises(rundir.WorkdirBusyError, match=r"in use by another run \(.*\"pid\": %d" % os.getpid()):
            training.run(_config(epochs=1), tmp_path / "run", datasets=DATA, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_killed_run_does_not_leave_its_workdir_locked(tmp_path):
    code = ("import sys, time; from distill_jax.training import rundir\n"
            "with rundir.owned(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(rundir.WorkdirBusyError):
        training.run(_config(epochs=1), tmp_path / "run", datasets=DATA, progress=False)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    results = training.run(_config(epochs=1), tmp_path / "run", datasets=DATA, progress=False)
    assert results["finished"]


def test_a_directory_that_is_not_a_run_is_never_written_into(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(rundir.WorkdirError, match=r"holds files \(notes.txt\) but is not a distill-jax run directory"):
        training.run(_config(epochs=1), tmp_path, datasets=DATA, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_finished_run_whose_checkpoints_were_deleted_keeps_its_results(tmp_path):
    training.run(_config(epochs=1), tmp_path, datasets=DATA, progress=False)
    results = (tmp_path / "results.json").read_text()
    import shutil

    shutil.rmtree(tmp_path / "checkpoints")
    for resume in (False, True):
        with pytest.raises(rundir.WorkdirError, match="results.json of a finished run but no checkpoint"):
            training.run(_config(epochs=1, seed=1), tmp_path, datasets=DATA, progress=False, resume=resume)
    assert (tmp_path / "results.json").read_text() == results


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path):
    training.run(_config(epochs=2), tmp_path, datasets=DATA, progress=False, stop_after_epochs=1)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "step": 1')  # the crash came mid-write
    resumed = training.run(_config(epochs=2), tmp_path, datasets=DATA, progress=False, resume=True)
    assert resumed["finished"]
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ------------------------------------------------------------------ verified checkpoints


def _data_files(step_dir: Path) -> list[Path]:
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.stat().st_size > 64]
    return sorted(files, key=lambda p: -p.stat().st_size)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupted_latest_checkpoint_is_reported_and_resume_falls_back(tmp_path, damage):
    full = training.run(_config(epochs=3), tmp_path / "full", datasets=DATA, progress=False)
    run = tmp_path / "run"
    training.run(_config(epochs=3), run, datasets=DATA, progress=False, stop_after_epochs=2)
    target = _data_files(run / "checkpoints" / "2")[0]
    data = bytearray(target.read_bytes())
    if damage == "flip":
        for i in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
            data[i] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    target.write_bytes(bytes(data))
    assert any("changed" in p for p in ckpt.verify(run / "checkpoints", 2))
    with pytest.warns(ckpt.CheckpointCorruptWarning, match=r"epoch 2 is corrupted .*Using epoch 1, the newest intact one"):
        resumed = training.run(_config(epochs=3), run, datasets=DATA, progress=False, resume=True)
    assert _leaves_equal(resumed["params"], full["params"])  # epochs 2 and 3 redone, exactly


def test_when_every_checkpoint_is_corrupted_nothing_is_restored(tmp_path):
    training.run(_config(epochs=2), tmp_path, datasets=DATA, progress=False)
    for epoch in (1, 2):
        target = _data_files(tmp_path / "checkpoints" / str(epoch))[0]
        target.write_bytes(target.read_bytes()[:-7])
    with pytest.raises(ckpt.CheckpointCorruptError, match="every checkpoint .* is corrupted"):
        training.load_teacher(tmp_path)
    with pytest.raises(ckpt.CheckpointCorruptError, match="checkpoint epoch 1 .* is corrupted"):
        ckpt.read_meta(tmp_path / "checkpoints", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact checkpoint restores without a word
        training.run(_config(epochs=1), tmp_path / "fresh", datasets=DATA, progress=False)
        training.load_teacher(tmp_path / "fresh")


# ------------------------------------------------------------------ bad inputs are errors, not wrong numbers


def test_a_top_k_cache_from_a_larger_vocabulary_is_refused_before_training():
    from distill_jax.models import transformer as tf
    from distill_jax.proj.reasoning import sequence as S
    from distill_jax.proj.reasoning import task as R

    config = tf.TransformerConfig(vocab_size=R.TOKENIZER.vocab_size, dim=8, depth=1, num_heads=2, num_kv_heads=1,
                                  mlp_dim=8, max_len=32)
    data = R.encode_problems([R.Problem(1, 2), R.Problem(3, 4)])
    shape = data["inputs"].shape + (2,)
    data |= {"teacher_top_values": np.full(shape, -1.0, np.float32),
             "teacher_top_indices": np.full(shape, config.vocab_size + 3, np.int32)}
    with pytest.raises(ValueError, match=r"top-k cache holds token ids in \[25, 25\], outside the student's vocabulary"):
        S.train(config, data, spec=S.LossSpec("top_k"), optimizer=S.OptimizerSpec(steps=1), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        S.train(config, R.encode_problems([R.Problem(1, 2)]), spec=S.LossSpec("sft"),
                optimizer=S.OptimizerSpec(steps=1), batch_size=0, seed=0)


def test_decoupled_kd_never_broadcasts_one_label_over_the_batch():
    from distill_jax import losses

    logits = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match=r"labels have shape \(1,\) but the logits need one label per example, shape \(3,\)"):
        losses.decoupled_kd(logits, logits, labels=np.array([2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        losses.decoupled_kd(logits, logits, labels=np.array([0, 1, 5]))


def test_generation_refuses_token_ids_outside_the_vocabulary():
    from distill_jax import generation as G
    from distill_jax.models import transformer as tf

    config = tf.TransformerConfig(vocab_size=11, dim=8, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=8, max_len=16)
    params = tf.init_params(config, jax.random.key(0))
    key, sampling = jax.random.key(1), G.SamplingConfig(max_new_tokens=2)
    for bad in (11, -1):
        with pytest.raises(ValueError, match=r"prompt token ids must lie in \[0, 11\)"):
            G.generate(config, params, np.array([[1, bad, 2]]), key, sampling)
    with pytest.raises(ValueError, match="banned_ids must be token ids >= 0"):
        G.SamplingConfig(banned_ids=(-1,))
    with pytest.raises(ValueError, match=r"names token ids \[0, 12\], but the vocabulary has 11"):
        G.generate(config, params, np.array([[1, 2]]), key, G.SamplingConfig(max_new_tokens=2, banned_ids=(12,)))


def test_verify_reads_the_answer_as_written():
    from distill_jax.proj.reasoning import task as R

    problem = R.Problem(347, 598)
    ids = R.TOKENIZER.encode("A:9") + [R.PAD] + R.TOKENIZER.encode("45<eos>")
    assert not R.verify(problem, ids) and R.verify(problem, R.TOKENIZER.encode("A:945<eos>"))
    assert R.verify(problem, "A:" + "9" * 5000 + "<eos>") is False


def test_the_cli_names_an_unknown_config_key_and_a_missing_checkpoint_without_creating_it(tmp_path, capsys):
    from distill_jax import cli

    repo = Path(__file__).resolve().parent.parent
    rc = cli.main(["distill-jax", "train-teacher", f"--config={repo}/experiments/mnist_teacher.py",
                   "--config.num_epoch=3", f"--workdir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "names a key the config does not have" in err and "--config.num_epoch" in err
    assert not (tmp_path / "run").exists()
    rc = cli.main(["distill-jax", "evaluate", f"--checkpoint={tmp_path / 'no_such_run'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "FileNotFoundError: no checkpoint folder" in err and "Traceback" not in err
    assert not (tmp_path / "no_such_run").exists()


def test_empty_batches_give_empty_losses_not_a_division_by_zero():
    from distill_jax import losses

    student = np.zeros((0, 10), np.float32)
    values, indices = losses.top_k_log_probs(student, k=3)
    for tail in ("renormalize", "bucket"):
        assert losses.top_k_kd(student, values, indices, tail=tail).shape == (0,)
    assert losses.attention_transfer(np.zeros((0, 4, 4, 3)), np.zeros((0, 4, 4, 3))).shape == (0,)


def test_a_kv_cache_used_past_its_length_is_an_error_or_nan_never_a_silent_overwrite():
    import jax.numpy as jnp

    from distill_jax.models import transformer as tf

    config = tf.TransformerConfig(vocab_size=11, dim=8, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=8, max_len=16)
    params = tf.init_params(config, jax.random.key(0))
    model = tf.Transformer(config)
    cache = tf.init_cache(config, 1, length=4)
    logits, cache = model.apply({"params": params}, jnp.array([[1, 2, 3]]), cache=cache)
    assert np.all(np.isfinite(np.asarray(logits)))
    with pytest.raises(ValueError, match="the KV cache has 4 slots, 3 used: 2 more tokens do not fit"):
        model.apply({"params": params}, jnp.array([[4, 5]]), cache=cache)
    with checks.traced_checks(False):
        step = jax.jit(lambda c, tokens: model.apply({"params": params}, tokens, cache=c))
        fits, cache = step(cache, jnp.array([[4]]))
        assert np.all(np.isfinite(np.asarray(fits)))
        over, _ = step(cache, jnp.array([[5]]))  # slot 5 of 4, under jit
    assert np.all(np.isnan(np.asarray(over)))
    checked = jax.jit(lambda c, tokens: model.apply({"params": params}, tokens, cache=c))
    with pytest.raises(jax.errors.JaxRuntimeError, match="the KV cache has 4 slots: 1 more tokens do not fit"):
        jax.block_until_ready(checked(cache, jnp.array([[5]])))


# Traced values: NaN with checks off (never a finite wrong value), an error at the source with them on.

def _traced_cases():
    import jax.numpy as jnp

    from distill_jax import losses, objectives

    s = jnp.array([[2.0, 1.0, 0.0], [0.5, 0.0, 1.0]])
    labels = jnp.array([0, 1])
    values, indices = losses.top_k_log_probs(s, k=2)
    return {
        "hinton_kd temperature 0": (lambda t: losses.hinton_kd(s, s + 1.0, t), 0.0, "temperature must be a finite number > 0"),
        "forward_kl temperature -1": (lambda t: losses.forward_kl(s, s * 2.0, t), -1.0, "temperature must be"),
        "top_k_log_probs temperature 0": (lambda t: losses.top_k_log_probs(s, 2, t)[0], 0.0, "temperature must be"),
        "decoupled_kd temperature 0": (lambda t: losses.decoupled_kd(s, s * 2.0, labels, temperature=t), 0.0, "temperature must be"),
        "decoupled_kd label 3": (lambda y: losses.decoupled_kd(s, s * 2.0, y), jnp.array([0, 3]), r"labels must lie in \[0, 3\)"),
        "decoupled_kd label -1": (lambda y: losses.decoupled_kd(s, s * 2.0, y), jnp.array([-1, 0]), "labels must lie in"),
        "top_k_kd index 3": (lambda i: losses.top_k_kd(s, values, i), indices.at[0, 0].set(3), r"teacher_top_indices must lie in \[0, 3\)"),
        "top_k_kd index -1 bucket": (lambda i: losses.top_k_kd(s, values, i, tail="bucket"), indices.at[1, 1].set(-1), "teacher_top_indices"),
        "cross_entropy label -1": (lambda y: objectives.cross_entropy(s, None, {"label": y}), jnp.array([-1, 0]), r"class labels\) must lie in \[0, 3\)"),
    }


@pytest.mark.parametrize("case", list(_traced_cases()))
def test_an_invalid_traced_argument_gives_nan_or_an_error_never_a_finite_value(case):
    fn, bad, message = _traced_cases()[case]
    with checks.traced_checks(False):
        out = np.asarray(jax.jit(lambda x: fn(x))(bad))
    assert np.isnan(out).any(), out
    if "label" in case or "index" in case:
        assert np.isnan(out).sum() < out.size, "only the row with the bad entry is NaN"
    with checks.traced_checks(True), pytest.raises(jax.errors.JaxRuntimeError, match=message):
        jax.block_until_ready(jax.jit(lambda x: fn(x))(bad))
    with pytest.raises(ValueError, match=message):  # the same value, concrete: raised at once
        fn(bad)


def test_token_ids_outside_the_vocabulary_are_an_error_eagerly_and_nan_under_jit():
    import jax.numpy as jnp

    from distill_jax.models import transformer as tf

    config = tf.TransformerConfig(vocab_size=11, dim=8, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=8, max_len=16)
    params = tf.init_params(config, jax.random.key(0))
    model = tf.Transformer(config)
    tokens = jnp.array([[1, 2, 3], [4, 11, 5]])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 11\), got values in \[1, 11\]"):
        model.apply({"params": params}, tokens)
    padded = model.apply({"params": params}, tokens, valid=tokens < 11)  # padding may hold any id
    assert np.isfinite(np.asarray(padded)).all()
    with checks.traced_checks(False):
        logits = np.asarray(jax.jit(lambda x: model.apply({"params": params}, x))(tokens.at[0, 0].set(-1)))
    assert np.isnan(logits).all(), "both rows hold a bad id"
    with checks.traced_checks(False):
        logits = np.asarray(jax.jit(lambda x: model.apply({"params": params}, x))(tokens.at[1, 1].set(0)))
    assert np.isfinite(logits).all()
    with checks.traced_checks(True), pytest.raises(jax.errors.JaxRuntimeError, match=r"token ids must lie in \[0, 11\)"):
        jax.block_until_ready(jax.jit(lambda x: model.apply({"params": params}, x))(tokens))


def test_labels_outside_the_models_classes_are_refused_before_training(tmp_path):
    data = {k: v for k, v in DATA.items()}
    train = data["train"]
    labels = np.array(train.labels)
    labels[7] = 10
    data["train"] = type(train)(train.images, labels)
    with pytest.raises(ValueError, match=r"the train split's 'label' ids lie in \[0, 10\], outside the model's 10 classes"):
        training.run(_config(1), tmp_path / "run", datasets=data, progress=False)
    assert not (tmp_path / "run" / rundir.CONFIG).exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture
def read_only_view(tmp_path):
    """``view(path)``: a read-only bind mount of ``path`` (needs mount rights: root in a container)."""
    mounts = []

    def view(path: Path) -> Path:
        target = tmp_path / f"read_only_{len(mounts)}"
        target.mkdir()
        bind = subprocess.run(["mount", "--bind", str(path), str(target)], capture_output=True)
        if bind.returncode:
            pytest.skip(f"cannot bind-mount here: {bind.stderr.decode().strip()}")
        mounts.append(target)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        with pytest.raises(OSError):
            (target / "probe").touch()
        return target

    yield view
    for target in reversed(mounts):
        subprocess.run(["umount", str(target)], check=True)


def test_a_finished_read_only_run_can_be_re_evaluated_and_used_as_a_teacher(tmp_path, read_only_view, capsys):
    from distill_jax import cli

    config = _config(1)
    done = training.run(config, tmp_path / "run", datasets=DATA, progress=False)
    run = read_only_view(tmp_path / "run")
    again = training.run(config, run, datasets=DATA, progress=False, resume=True)  # re-evaluates, writes nothing
    assert again["test"] == done["test"] and again["epochs"] == 1 and _leaves_equal(again["params"], done["params"])
    apply_fn, params, _ = training.load_teacher(run)
    assert _leaves_equal(params, done["params"])
    assert cli.main(["distill-jax", "evaluate", f"--checkpoint={run}", "--dataset=mnist", "--split=test"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    student = _config(1, objective={"soft": {"loss": "hinton_kd", "weight": 1.0, "temperature": 4.0}})
    student.teacher.checkpoint = str(run)
    student.model.hidden = (16,)
    assert training.run(student, tmp_path / "student", datasets=DATA, progress=False)["epochs"] == 1
