"""Language models on the one training core (distill_jax.training.run): token objectives, distillation,
checkpoints and resume, meshes of 8 simulated devices, and the CLI killed and resumed.

The reference numbers come from independent numpy formulas, from the LM stack
of distill_jax.proj.reasoning.sequence (same losses, another code path), and from
single-device runs that the sharded ones must match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding_worker as w
from distill_jax import losses, models, objectives, training
from distill_jax.training import checkpoint as ckpt
from distill_jax.proj.reasoning import sequence
from distill_jax.training.steps import _mean
from test_sharding import RTOL, ATOL, _close_metrics, _close_params, _env, _finish, _npz, _start

HERE = Path(__file__).resolve().parent
EXPERIMENT = HERE.parent / "experiments" / "lm_arithmetic.py"
TEACHER = {"task.num_train": 1024, "num_epochs": 10, "batch_size": 32, "model.dim": 32, "model.depth": 2,
           "model.mlp_dim": 64}
STUDENT = {"task.num_train": 512, "num_epochs": 4, "batch_size": 32}


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _token_case(seed=0):
    rng = np.random.default_rng(seed)
    b, t, v = 3, 5, 7
    student = (3 * rng.normal(size=(b, t, v))).astype(np.float32)
    teacher = (3 * rng.normal(size=(b, t, v))).astype(np.float32)
    labels = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = rng.random((b, t)) < 0.6
    mask[0, 0], mask[2] = True, False  # some tokens, and one fully masked row
    # Masked-out positions hold extreme logits: they must change nothing.
    student[~mask] = 1e4 * np.sign(rng.normal(size=student[~mask].shape))
    return student, teacher, labels, mask.astype(np.float32)


def test_token_objective_is_the_token_weighted_mean_of_its_terms():
    student, teacher, labels, mask = _token_case()
    objective = objectives.from_spec({"sft": {"loss": "cross_entropy", "weight": 0.5},
                                      "kd": {"loss": "forward_kl", "weight": 1.0, "temperature": 2.0}})
    per_token, metrics = objective(jnp.asarray(student), jnp.asarray(teacher), {"label": labels, "mask": mask})
    ls = _log_softmax(student.astype(np.float64))
    ce = -np.take_along_axis(ls, labels[..., None], -1)[..., 0]
    log_p, log_q = _log_softmax(teacher / 2.0), _log_softmax(student.astype(np.float64) / 2.0)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    keep = mask > 0
    want = (0.5 * ce[keep] + kl[keep]).sum() / keep.sum()
    assert float(_mean(per_token, jnp.asarray(mask))) == pytest.approx(want, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(metrics["kd"]) == pytest.approx(kl[keep].mean(), rel=1e-5)
    assert np.all(np.isfinite(np.asarray(per_token)))


@pytest.mark.parametrize("kind", ["forward_kl", "hinton_kd", "gkd", "top_k"])
def test_core_token_losses_equal_the_lm_stacks(kind):
    student, teacher, labels, mask = _token_case(1)
    spec = {"forward_kl": sequence.LossSpec("forward_kl", temperature=2.0, sft_weight=0.3),
            "hinton_kd": sequence.LossSpec("hinton_kd", temperature=3.0),
            "gkd": sequence.LossSpec("gkd", beta=0.3, temperature=1.5),
            "top_k": sequence.LossSpec("top_k", temperature=2.0, tail="bucket", sft_weight=0.2)}[kind]
    loss = {"forward_kl": "forward_kl", "hinton_kd": "hinton_kd", "gkd": "generalized_jsd", "top_k": "top_k_kd"}[kind]
    term = {"loss": loss, "weight": 1.0, "temperature": spec.temperature}
    term |= {"beta": spec.beta} if kind == "gkd" else {"tail": spec.tail} if kind == "top_k" else {}
    terms = {"kd": term} | ({"sft": {"loss": "cross_entropy", "weight": spec.sft_weight}} if spec.sft_weight else {})
    lm_batch = {"targets": labels, "loss_mask": mask}
    teacher_outputs = jnp.asarray(teacher)
    if kind == "top_k":
        values, indices = losses.top_k_log_probs(jnp.asarray(teacher), k=3, temperature=spec.temperature)
        lm_batch |= {"teacher_top_values": values, "teacher_top_indices": indices}
        teacher_outputs = (values, indices)
    per_token, _ = objectives.from_spec(terms)(jnp.asarray(student), teacher_outputs, {"label": labels, "mask": mask})
    want = sequence.sequence_loss(spec, jnp.asarray(student), lm_batch, None if kind == "top_k" else jnp.asarray(teacher))
    assert float(_mean(per_token, jnp.asarray(mask))) == pytest.approx(float(want), rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------ runs on one device


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory):
    """A transformer teacher trained through training.run on the arithmetic task (one device)."""
    root = tmp_path_factory.mktemp("lm")
    results = training.run(w.lm_config("teacher", **TEACHER), root / "teacher", progress=False)
    return root / "teacher", results


def _lines(workdir):
    return [{k: v for k, v in line.items() if k != "epoch_time_s"} for line in w.metrics_lines(workdir)]


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def test_lm_teacher_learns_the_task(lm_teacher):
    teacher_dir, results = lm_teacher
    losses_ = [line["train"]["loss"] for line in w.metrics_lines(teacher_dir)]
    assert losses_[-1] < 0.7 * losses_[0]
    # Chance is 1 / 22 tokens; the trace's separators alone are not a third of the tokens.
    assert results["test"]["token_accuracy"] > 0.5 and results["test"]["tokens"] > 0


def _agreement(student_params, teacher_dir, split):
    apply_t, teacher_params, _ = training.load_teacher(teacher_dir)
    student = models.create(dict(w.lm_config("distill").model))
    s = student.apply(student_params, split["inputs"], split["valid"])
    t = apply_t(teacher_params, split["inputs"], split["valid"])
    keep = split["mask"] > 0
    return float(np.mean((np.argmax(s, -1) == np.argmax(t, -1))[keep]))


@pytest.mark.parametrize("profile", ["distill", "top_k"])
def test_lm_distillation_learns_and_resumes_bitwise(tmp_path, lm_teacher, profile):
    teacher_dir, _ = lm_teacher
    config = w.lm_config(profile, **STUDENT, **{"teacher.checkpoint": str(teacher_dir)})
    full = training.run(config, tmp_path / "full", progress=False)
    assert full["teacher_cached"] is False  # the top-k cache is its own entry of the batch, not the full logits
    # Killed after epoch 1 (stop_after_epochs leaves a checkpoint as a crash would), then resumed.
    part = training.run(config, tmp_path / "part", progress=False, stop_after_epochs=1)
    assert not part["finished"] and part["epochs"] == 1
    resumed = training.run(config, tmp_path / "part", progress=False, resume=True)
    assert resumed["finished"] and _leaves_equal(resumed["params"], full["params"])
    assert _lines(tmp_path / "part") == _lines(tmp_path / "full")
    # The distillation loss falls, and the student agrees with its teacher far above chance (1/22).
    kd = [line["train"]["kd"] for line in w.metrics_lines(tmp_path / "full")]
    assert kd[-1] < kd[0]
    test_split = training.load_datasets(json.loads(config.to_json_best_effort()))["test"]
    untrained = models.init_params(models.create(dict(config.model)), jax.random.PRNGKey(0))
    before, after = _agreement(untrained, teacher_dir, test_split), _agreement(full["params"], teacher_dir, test_split)
    print(f"{profile}: top-1 agreement with the teacher on test completion tokens {before:.3f} -> {after:.3f}")
    assert after > max(4 / 22, before + 0.1)


def test_lm_teacher_from_another_vocabulary_is_refused(tmp_path, lm_teacher):
    teacher_dir, _ = lm_teacher
    config = w.lm_config("distill", **STUDENT, **{"teacher.checkpoint": str(teacher_dir), "model.vocab_size": 30})
    with pytest.raises(ValueError, match="22 tokens but the student has 30.*vocab_size=22"):
        training.run(config, tmp_path / "student", progress=False)
    assert not (tmp_path / "student" / "checkpoints").exists()


def test_top_k_objective_needs_the_cache_size(tmp_path, lm_teacher):
    config = w.lm_config("top_k", **STUDENT, **{"teacher.checkpoint": str(lm_teacher[0]), "teacher.top_k": 0})
    with pytest.raises(ValueError, match="config.teacher.top_k"):
        training.run(config, tmp_path / "student", progress=False)


def test_lm_split_with_missing_arrays_is_a_clear_error(tmp_path):
    config = w.lm_config("teacher")
    with pytest.raises(ValueError, match="'inputs', 'valid', 'label' and 'mask'.*keys \\['inputs', 'label'\\]"):
        training.run(config, tmp_path / "run", progress=False,
                     datasets={"train": {"inputs": np.zeros((4, 3), np.int32), "label": np.zeros((4, 3), np.int32)}})


# ------------------------------------------------------------------ meshes of 8 devices, the CLI


EMBED = "['params']['embed']['embedding']"
Q = "['params']['block_0']['attn']['q']['kernel']"
UP = "['params']['block_0']['mlp']['up']['kernel']"


@pytest.mark.slow
def test_lm_runs_on_meshes_match_one_device_and_follow_the_logical_rules(tmp_path, lm_teacher):
    teacher_dir, _ = lm_teacher
    student = {**STUDENT, "teacher.checkpoint": str(teacher_dir), "num_epochs": 2}
    meshes = {"dp8": ("data=8", "replicated", "replicated"), "fsdp": ("fsdp=4,data=2", "fsdp", "fsdp"),
              "tensor": ("model=2,data=4", "tensor", "tensor")}
    jobs = []
    for name, (mesh, student_rules, teacher_rules) in meshes.items():
        jobs.append({"name": name, "kind": "lm_run", "profile": "distill", "workdir": str(tmp_path / name),
                     "npz": str(tmp_path / f"{name}.npz"),
                     "config": {**student, "mesh": mesh, "student_partition": student_rules,
                                "teacher_partition": teacher_rules}})
        jobs.append({"name": f"teacher_{name}", "kind": "teacher", "mesh": mesh, "rules": teacher_rules,
                     "teacher_dir": str(teacher_dir)})
    spec = {"results": str(tmp_path / "eight.json"), "jobs": jobs}
    procs = [_start(spec, tmp_path / "eight_jobs.json", devices=8)]
    try:
        ref = training.run(w.lm_config("distill", **student), tmp_path / "ref", progress=False)
    finally:
        _finish(procs, "the 8-device LM runs")
    got = json.loads(Path(spec["results"]).read_text())["jobs"]
    ref_params, ref_lines = w.flat_params(ref["params"]), [line["train"] for line in w.metrics_lines(tmp_path / "ref")]
    for name in meshes:
        assert got[name]["epochs"] == 2
        _close_metrics([line["train"] for line in w.metrics_lines(tmp_path / name)], ref_lines)
        _close_params(_npz(tmp_path / f"{name}.npz"), ref_params)
        np.testing.assert_allclose(got[name]["test"]["loss"], ref["test"]["loss"], rtol=RTOL, atol=ATOL)
    # Student (dim 16, mlp 32, 4 query / 2 kv heads, vocabulary 22) and teacher (dim 32, mlp 64):
    # fsdp splits the embed axis, tensor the heads, the MLP hidden and the vocabulary.
    assert set(got["dp8"]["specs"].values()) == {"P()"}
    assert set(got["teacher_dp8"]["specs"].values()) == {"P()"}
    for who in ("fsdp", "teacher_fsdp"):
        specs = got[who]["specs"]
        assert specs[EMBED] == "P(None, 'fsdp')" and specs[Q] == "P('fsdp',)" and specs[UP] == "P('fsdp',)"
    for who in ("tensor", "teacher_tensor"):
        specs = got[who]["specs"]
        assert specs[EMBED] == "P('model',)" and specs[Q] == "P(None, 'model')" and specs[UP] == "P(None, 'model')"


def _saved_epochs(workdir) -> list[int]:
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_lm_distillation_from_the_cli_killed_and_resumed_on_fsdp_mesh_ends_bitwise_equal(tmp_path, lm_teacher):
    teacher_dir, _ = lm_teacher
    argv = [sys.executable, "-m", "distill_jax", "distill", f"--config={EXPERIMENT}:distill,smoke",
            f"--config.teacher.checkpoint={teacher_dir}", "--config.mesh=fsdp=4,data=2",
            "--config.student_partition=fsdp", "--config.teacher_partition=fsdp", "--config.num_epochs=12",
            "--config.task.num_train=512", "--noprogress"]
    env = _env(8)
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("full", "killed", "resumed")}  # noqa: SIM115

    def start(name, *extra):
        workdir = tmp_path / ("full" if name == "full" else "run")
        return subprocess.Popen(argv + [f"--workdir={workdir}", *extra], env=env, stdout=logs[name],
                                stderr=subprocess.STDOUT, cwd=HERE.parent)

    full, killed = start("full"), start("killed")
    deadline = time.monotonic() + 400
    while not ((tmp_path / "run" / "checkpoints").is_dir() and _saved_epochs(tmp_path / "run")):
        assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run finished before it was killed"
    kept = _saved_epochs(tmp_path / "run")
    assert kept and kept[-1] < 12
    resumed = start("resumed", "--resume")
    for proc, name in ((full, "full"), (resumed, "resumed")):
        assert proc.wait(timeout=400) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    like = jax.eval_shape(lambda: models.init_params(models.create(dict(w.lm_config("distill").model)),
                                                     jax.random.PRNGKey(0)))
    a = ckpt.restore_params(tmp_path / "full" / "checkpoints", like)
    b = ckpt.restore_params(tmp_path / "run" / "checkpoints", like)
    assert ckpt.read_meta(tmp_path / "run" / "checkpoints")["epoch"] == 12
    assert _leaves_equal(a, b)
    assert _lines(tmp_path / "run") == _lines(tmp_path / "full")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["mesh"] == {"fsdp": 4, "data": 2}


def test_top_k_distillation_from_an_on_disk_cache_equals_the_in_memory_cache(tmp_path, lm_teacher):
    from distill_jax.data import teacher_cache

    teacher_dir, _ = lm_teacher
    config = w.lm_config("top_k", **STUDENT, **{"teacher.checkpoint": str(teacher_dir)})
    train = training.load_datasets(json.loads(config.to_json_best_effort()))["train"]
    apply_t, teacher_params, _ = training.load_teacher(teacher_dir)
    cache = teacher_cache.write(
        tmp_path / "cache", lambda x, v: apply_t(teacher_params, x, v), train["inputs"], train["valid"],
        k=config.teacher.top_k, temperature=1.0, vocab_size=int(config.model.vocab_size),
        teacher=teacher_cache.fingerprint_files(teacher_dir / "checkpoints"), tokenizer="arithmetic-chars",
        shard_rows=200, batch_size=64)
    print(f"teacher cache: {cache.bytes_per_token} bytes per token, k={config.teacher.top_k}")
    in_memory = training.run(config, tmp_path / "in_memory", progress=False)
    from_disk = w.lm_config("top_k", **STUDENT, **{"teacher.checkpoint": "", "teacher.cache_dir": str(tmp_path / "cache")})
    result = training.run(from_disk, tmp_path / "from_disk", progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(result["params"]), jax.tree_util.tree_leaves(in_memory["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    other = w.lm_config("top_k", **(STUDENT | {"task.num_train": 256, "teacher.checkpoint": "",
                                               "teacher.cache_dir": str(tmp_path / "cache")}))
    with pytest.raises(teacher_cache.CacheMismatchError, match="other token rows than this training split"):
        training.run(other, tmp_path / "other", progress=False)


@pytest.mark.parametrize("profile", ["distill", "top_k"])
def test_chunked_lm_training_matches_the_unchunked_run(tmp_path, lm_teacher, profile, monkeypatch):
    # chunk_size=5 does not divide the 64-token rows: the last chunk is padded.
    from distill_jax import chunked as chunked_lib

    teacher_dir, _ = lm_teacher
    overrides = STUDENT | {"teacher.checkpoint": str(teacher_dir), "num_epochs": 2}
    full = training.run(w.lm_config(profile, **overrides), tmp_path / "full", progress=False)
    traced = []
    name = "chunked_top_k_kd" if profile == "top_k" else "chunked_token_loss"
    original = getattr(chunked_lib, name)
    monkeypatch.setattr(chunked_lib, name, lambda *a, **k: traced.append(k["chunk_size"]) or original(*a, **k))
    chunked = training.run(w.lm_config(profile, **overrides, chunk_size=5), tmp_path / "chunked", progress=False)
    assert traced and set(traced) == {5}, "the chunked objective ran"
    for a, b in zip(jax.tree_util.tree_leaves(chunked["params"]), jax.tree_util.tree_leaves(full["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    for line_c, line_f in zip(w.metrics_lines(tmp_path / "chunked"), w.metrics_lines(tmp_path / "full"), strict=True):
        for key in ("loss", "accuracy", "kd"):
            assert line_c["train"][key] == pytest.approx(line_f["train"][key], rel=1e-4, abs=1e-5), key
        assert line_c["test"]["loss"] == pytest.approx(line_f["test"]["loss"], rel=1e-4)
        assert line_c["test"]["token_accuracy"] == pytest.approx(line_f["test"]["token_accuracy"], abs=1e-6)
