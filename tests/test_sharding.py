"""Sharding across devices and hosts (distill_jax.sharding, issue 4).

The pytest process keeps its single CPU device (the other test files rely on
it). Multi-device runs happen in subprocesses of tests/sharding_worker.py:

* one process with 8 simulated CPU devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=8``): data-parallel,
  FSDP, tensor-parallel and 2-D/3-D meshes, checkpoints across meshes;
* two processes with 2 CPU devices each, joined by ``jax.distributed`` on
  127.0.0.1 with gloo CPU collectives, started through the CLI's flags.

They run concurrently with the single-device reference runs made here, and
every sharded run is compared with them: per-epoch training metrics and final
parameters to float32 tolerance (rtol 1e-5, atol 1e-6), parameter layouts
against the partition rules, and checkpoints restored across device counts
exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

import sharding_worker as w
from distill_jax import cli, sharding, training
from distill_jax.training import checkpoint as ckpt

HERE = Path(__file__).resolve().parent
WORKER = HERE / "sharding_worker.py"
RTOL, ATOL = 1e-5, 1e-6
TIMEOUT_S = 420  # per subprocess; a hang (e.g. a peer that never joins) fails instead of blocking

# The data-parallel run trains on fewer rows than the others: a count 8 data
# shards do not divide, so its training arrays carry padding rows.
PADDED_TRAIN = w.NUM_TRAIN - 4
# Student 784-64-64-10, teacher 784-128-128-10.
K0, B0 = "['params']['hidden_0']['kernel']", "['params']['hidden_0']['bias']"
K1, B1 = "['params']['hidden_1']['kernel']", "['params']['hidden_1']['bias']"
K2, B2 = "['params']['logits']['kernel']", "['params']['logits']['bias']"


def _abstract_mesh(**axes):
    return AbstractMesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def _student_like():
    from distill_jax import models

    model = models.create({"name": "mlp", "hidden": w.STUDENT_HIDDEN})
    return jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0), (1, 28, 28, 1)))


# ------------------------------------------------------------------ fast, in-process


def test_make_mesh_parses_specs_and_rejects_bad_ones():
    mesh = sharding.make_mesh("data=-1")
    assert dict(mesh.shape) == {"data": jax.device_count()}
    assert sharding.parse_mesh_spec("data=2, fsdp=2,model=2") == {"data": 2, "fsdp": 2, "model": 2}
    assert sharding.parse_mesh_spec({"model": -1, "data": 2}) == {"model": -1, "data": 2}
    assert sharding.parse_mesh_spec("") == {"data": -1}
    with pytest.raises(ValueError, match="needs 2 devices but 1 are available"):
        sharding.make_mesh("data=2")
    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh("data=-1,model=2")
    with pytest.raises(ValueError, match="only one axis may be -1"):
        sharding.parse_mesh_spec("data=-1,model=-1")
    with pytest.raises(ValueError, match="unknown axis 'tensor'"):
        sharding.parse_mesh_spec("tensor=2")
    with pytest.raises(ValueError, match="must be >= 1 or -1"):
        sharding.parse_mesh_spec("data=0")
    with pytest.raises(ValueError, match="given twice"):
        sharding.parse_mesh_spec("data=1,data=1")


def test_batch_spec_covers_the_data_axes():
    assert sharding.batch_spec(_abstract_mesh(data=4, model=2)) == P("data")
    assert sharding.batch_spec(_abstract_mesh(data=2, fsdp=2, model=2)) == P(("data", "fsdp"))
    assert sharding.batch_spec(_abstract_mesh(fsdp=8)) == P("fsdp")
    assert sharding.batch_spec(_abstract_mesh(model=8)) == P()


def test_presets_and_user_rules():
    params = _student_like()
    specs = lambda rules, **axes: sharding.partition_specs(params, rules, _abstract_mesh(**axes))  # noqa: E731
    flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(  # noqa: E731
        tree, is_leaf=lambda x: isinstance(x, P))[0]}

    assert set(flat(specs("replicated", data=8)).values()) == {P()}
    # FSDP: each kernel's largest dim divisible by the axis; over data when there is no fsdp axis.
    assert flat(specs("fsdp", data=2, fsdp=4)) == {K0: P("fsdp"), B0: P(), K1: P("fsdp"), B1: P(), K2: P("fsdp"), B2: P()}
    assert flat(specs("fsdp", data=8))[K0] == P("data")
    # (784, 64) over 49 devices: only 784 is divisible.
    assert flat(specs("fsdp", fsdp=49))[K0] == P("fsdp")
    assert flat(specs("fsdp", fsdp=49))[K1] == P()  # 64 is not: whole
    # Megatron: column, row, column; biases follow the kernel's output split.
    # The logits layer's 10 outputs do not split 8 ways (replicated) but do split 2 ways.
    assert flat(specs("tensor", model=8)) == {K0: P(None, "model"), B0: P("model"), K1: P("model"), B1: P(),
                                               K2: P(), B2: P()}
    assert flat(specs("tensor", data=4, model=2))[K2] == P(None, "model")
    assert set(flat(specs("tensor", data=8)).values()) == {P()}  # no model axis: nothing to split
    # User rules first win; strings as the CLI passes them.
    rules = "logits=;hidden_0.*kernel=None,model;fsdp"
    assert sharding.parse_rules(rules) == [("logits", P()), ("hidden_0.*kernel", P(None, "model")), "fsdp"]
    got = flat(specs(rules, fsdp=4, model=2))
    assert got[K0] == P(None, "model") and got[K1] == P("fsdp") and got[K2] == P() and got[B0] == P()
    assert flat(specs([("kernel", ("data+fsdp", None))], data=2, fsdp=2))[K0] == P(("data", "fsdp"))
    # A preset is complete: rules after it never match.
    assert flat(specs(["replicated", (".*kernel", P("data"))], data=2))[K0] == P()


def test_bad_specs_are_clear_errors():
    params = _student_like()
    mesh = _abstract_mesh(data=2, model=2)
    with pytest.raises(ValueError, match="unknown mesh axis 'modle'"):
        sharding.partition_specs(params, [("kernel", P(None, "modle"))], mesh)
    with pytest.raises(ValueError, match="has 2 entries but the array has shape \\(64,\\)"):
        sharding.partition_specs(params, [(".*", P(None, "model"))], mesh)
    with pytest.raises(ValueError, match="uses mesh axis 'model' twice"):
        sharding.partition_specs(params, [("kernel", P("model", "model"))], mesh)
    with pytest.raises(ValueError, match="expected a preset"):
        sharding.parse_rules("fdsp")


def test_optimizer_state_follows_param_paths_not_only_shapes():
    params = _student_like()
    mesh = _abstract_mesh(model=8)
    param_sh = sharding.param_shardings(params, "tensor", mesh)
    tx = training.make_optimizer({"name": "adam", "learning_rate": 1e-3}, 10, 1)
    opt_sh = sharding.opt_state_shardings(jax.eval_shape(tx.init, params), params, param_sh, mesh)
    flat = {jax.tree_util.keystr(k): v.spec for k, v in jax.tree_util.tree_flatten_with_path(opt_sh)[0]}
    # hidden_0's and hidden_1's biases share the shape (64,) but not the layout.
    assert flat["[0].mu" + B0] == P("model") and flat["[0].nu" + B1] == P()
    assert flat["[0].mu" + K0] == P(None, "model") and flat["[0].nu" + K1] == P("model")
    assert flat["[0].count"] == P()


def test_distributed_from_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(cli, "_distributed_is_initialized", lambda: False)
    none = SimpleNamespace(coordinator_address=None, num_processes=None, process_id=None)
    monkeypatch.delenv(cli.DISTRIBUTED_ENV, raising=False)
    assert cli._init_distributed(none) is False and calls == []
    monkeypatch.setenv(cli.DISTRIBUTED_ENV, "1")
    assert cli._init_distributed(none) is True
    assert calls == [((), {})]  # no arguments: JAX detects the cluster
    flags = SimpleNamespace(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    cli._init_distributed(flags)
    assert calls[-1][1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}


# ------------------------------------------------------------------ multi-device, in subprocesses


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env.pop(cli.DISTRIBUTED_ENV, None)
    return env


def _start(spec: dict, path: Path, devices: int, process_id: int | None = None) -> subprocess.Popen:
    path.write_text(json.dumps(spec))
    args = [sys.executable, str(WORKER), str(path)] + ([] if process_id is None else [str(process_id)])
    log = open(path.with_suffix(f".{process_id}.log" if process_id is not None else ".log"), "w")  # noqa: SIM115
    return subprocess.Popen(args, env=_env(devices), stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parent)


def _finish(procs: list[subprocess.Popen], what: str) -> None:
    """Waits for all of ``procs`` (each with the timeout); kills the rest when one fails or hangs."""
    failed = []
    for proc in procs:
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0:
            failed.append((proc.args, rc))
            for other in procs:
                if other.poll() is None:
                    other.kill()
                    other.wait(timeout=30)
    if failed:
        logs = ""
        for proc in procs:
            log = Path(proc.args[2]).with_suffix(f".{proc.args[3]}.log" if len(proc.args) > 3 else ".log")
            logs += f"\n--- {log}\n" + "\n".join(log.read_text().splitlines()[-40:])
        pytest.fail(f"{what} failed: {failed}{logs}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_lines(workdir) -> list[dict]:
    return [line["train"] for line in w.metrics_lines(workdir)]


def _close_metrics(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, r in zip(got, want):
        assert set(g) == set(r)
        for key in r:
            np.testing.assert_allclose(g[key], r[key], rtol=RTOL, atol=ATOL, err_msg=key)


def _close_params(got: dict, want: dict, exact: bool = False) -> None:
    assert set(got) == set(want)
    for key in want:
        if exact:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)


def _npz(path) -> dict:
    with np.load(path) as f:
        return dict(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Everything the multi-device tests compare, run once."""
    root = tmp_path_factory.mktemp("sharding")
    teacher = str(w.write_teacher(root / "teacher"))
    data = w.synthetic_datasets()
    cfg = lambda **kw: w.student_config(teacher, jitter=1, **kw)  # noqa: E731 - teacher in the loop, jittered

    common = {"teacher_dir": teacher}
    # Two 8-device processes (XLA compiles on one core each) and the 2-process
    # run go in parallel with the single-device references made here.
    eight_a = {
        "results": str(root / "eight_a.json"),
        "jobs": [
            {"name": "dp8", "kind": "run", "workdir": str(root / "dp8"), "npz": str(root / "dp8.npz"), **common,
             "num_train": PADDED_TRAIN, "config": {"mesh": "data=8", "cache_teacher": "auto", "jitter": 0}},
            {"name": "d2f4", "kind": "run", "workdir": str(root / "d2f4"), "npz": str(root / "d2f4.npz"), **common,
             "config": {"mesh": "data=2,fsdp=4", "student_partition": "fsdp", "teacher_partition": "fsdp", "jitter": 1}},
            {"name": "d4m2", "kind": "run", "workdir": str(root / "d4m2"), "npz": str(root / "d4m2.npz"), **common,
             "config": {"mesh": "data=4,model=2", "student_partition": "fsdp", "teacher_partition": "tensor", "jitter": 1}},
            {"name": "teacher_d4m2", "kind": "teacher", "mesh": "data=4,model=2", "rules": "tensor", **common},
            {"name": "teacher_m8", "kind": "teacher", "mesh": "model=8", "rules": "tensor", **common},
            {"name": "teacher_d2f4", "kind": "teacher", "mesh": "data=2,fsdp=4", "rules": "fsdp", **common},
            {"name": "visits", "kind": "visits", "mesh": "data=2,fsdp=4", "num_rows": w.NUM_TRAIN + 3,
             "batch_size": w.BATCH, "seed": 5, "epoch": 1},
            {"name": "layout_tensor_adam", "kind": "layout", "mesh": "data=4,model=2", "rules": "tensor", "optimizer": "adam"},
        ],
    }
    eight_b = {
        "results": str(root / "eight_b.json"),
        "jobs": [
            {"name": "m8", "kind": "run", "workdir": str(root / "m8"), "npz": str(root / "m8.npz"), **common,
             "stop_after": 1,
             "config": {"mesh": "model=8", "student_partition": "tensor", "teacher_partition": "tensor", "jitter": 1}},
            {"name": "restore1", "kind": "restore", "checkpoint_dir": str(root / "from1" / "checkpoints"), "epoch": 1,
             "mesh": "fsdp=8", "rules": "fsdp", "npz": str(root / "restore1.npz")},
            {"name": "from1", "kind": "run", "workdir": str(root / "from1"), "npz": str(root / "from1.npz"), **common,
             "resume": True,
             "config": {"mesh": "data=2,fsdp=2,model=2", "student_partition": "fsdp", "teacher_partition": "tensor",
                        "jitter": 1}},
        ],
    }
    port = _free_port()
    two = {
        "results": str(root / "two.json"),
        "distributed": {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2},
        "jobs": [
            # Through the CLI: its --coordinator_address/--num_processes/--process_id start jax.distributed.
            {"name": "m1", "kind": "cli", "stop_after": 1, "npz": str(root / "two_m1.npz"),
             "argv": ["distill", f"--config={WORKER}", f"--workdir={root / 'two_m1'}", f"--config.teacher.checkpoint={teacher}",
                      "--config.mesh=data=2,model=2", "--config.teacher_partition=tensor",
                      "--config.student_partition=fsdp", "--config.jitter=1", "--noprogress"]},
            {"name": "layout", "kind": "layout", "mesh": "data=4", "rules": "fsdp"},
        ],
    }
    procs = [_start(eight_a, root / "eight_a_jobs.json", devices=8)]
    procs2 = [_start(two, root / "two_jobs.json", devices=2, process_id=i) for i in range(2)]
    out = {}
    try:
        # 1 device, first epoch: the reference's, and the checkpoint an 8-device process resumes.
        ref_part = training.run(cfg(), root / "ref", datasets=data, progress=False, stop_after_epochs=1)
        out["ref_epoch1"] = w.flat_params(ref_part["params"])
        shutil.copytree(root / "ref", root / "from1")
        procs.append(_start(eight_b, root / "eight_b_jobs.json", devices=8))
        # The rest of the reference run, and the cached-teacher variant.
        ref = training.run(cfg(), root / "ref", datasets=data, progress=False, resume=True)
        out["ref"] = w.flat_params(ref["params"])
        out["ref_lines"] = _train_lines(root / "ref")
        ref_cache = training.run(w.student_config(teacher, cache_teacher="auto", jitter=0), root / "refcache",
                                 datasets=w.synthetic_datasets(num_train=PADDED_TRAIN), progress=False)
        assert ref_cache["teacher_cached"]
        out["refcache"] = w.flat_params(ref_cache["params"])
        out["refcache_lines"] = _train_lines(root / "refcache")
    finally:
        _finish(procs, "an 8-device process")
        _finish(procs2, "the 2-process run")
    out["eight"] = {**json.loads(Path(eight_a["results"]).read_text())["jobs"],
                    **json.loads(Path(eight_b["results"]).read_text())["jobs"]}
    out["two"] = [json.loads(Path(f"{two['results']}.{i}").read_text()) for i in range(2)]
    out["root"], out["cfg"], out["data"] = root, cfg, data
    return out




@pytest.mark.slow
@pytest.mark.parametrize("name", ["dp8", "d2f4", "d4m2"])
def test_sharded_run_matches_single_device(runs, name):
    ref, ref_lines = (runs["refcache"], runs["refcache_lines"]) if name == "dp8" else (runs["ref"], runs["ref_lines"])
    _close_metrics(_train_lines(runs["root"] / name), ref_lines)
    _close_params(_npz(runs["root"] / f"{name}.npz"), ref)
    assert runs["eight"][name]["epochs"] == 2


@pytest.mark.slow
def test_padding_rows_are_never_drawn(runs):
    # The data-parallel run (compared with the single-device one above) trained on
    # PADDED_TRAIN rows, padded up to a multiple of 8, and took only full batches of them.
    dp8 = runs["eight"]["dp8"]
    assert dp8["num_train"] == PADDED_TRAIN and PADDED_TRAIN % 8 and dp8["teacher_cached"]
    steps = PADDED_TRAIN // w.BATCH
    assert [line["step"] for line in w.metrics_lines(runs["root"] / "dp8")] == [steps, 2 * steps]
    # One sharded epoch over NUM_TRAIN + 3 rows on data=2,fsdp=4 (padded to 520): the ids it
    # draws are real rows only, each at most once, in the single-device shuffle's order.
    visits, num_rows = runs["eight"]["visits"], w.NUM_TRAIN + 3
    assert visits["padded_rows"] == -(-num_rows // 8) * 8 > num_rows
    assert visits["ids_spec"] == "P(('data', 'fsdp'),)"
    drawn = np.asarray(visits["drawn"])
    assert visits["steps"] == num_rows // w.BATCH and len(drawn) == visits["steps"] * w.BATCH
    assert drawn.max() < num_rows and len(set(drawn.tolist())) == len(drawn)
    want = training.epoch_indices(jax.random.PRNGKey(5), np.asarray(1, np.int32), num_rows, w.BATCH)
    np.testing.assert_array_equal(drawn, np.asarray(want).ravel())


@pytest.mark.slow
def test_params_are_laid_out_as_the_rules_say(runs):
    jobs = runs["eight"]
    assert jobs["dp8"]["mesh"] == {"data": 8} and set(jobs["dp8"]["specs"].values()) == {"P()"}
    fsdp = {K0: "P('fsdp',)", B0: "P()", K1: "P('fsdp',)", B1: "P()", K2: "P('fsdp',)", B2: "P()"}
    assert jobs["d2f4"]["specs"] == fsdp and jobs["from1"]["specs"] == fsdp
    # The teacher under fsdp on the same mesh: its 128-wide kernels split the same way.
    assert jobs["teacher_d2f4"]["specs"] == fsdp
    assert jobs["d4m2"]["specs"] == {k: v.replace("fsdp", "data") for k, v in fsdp.items()}
    assert jobs["m8"]["specs"] == {K0: "P(None, 'model')", B0: "P('model',)", K1: "P('model',)", B1: "P()",
                                   K2: "P()", B2: "P()"}
    # The teacher, tensor-parallel: on model=2 even the 10 logits split; on model=8 they stay whole.
    assert jobs["teacher_d4m2"]["specs"] == {K0: "P(None, 'model')", B0: "P('model',)", K1: "P('model',)", B1: "P()",
                                             K2: "P(None, 'model')", B2: "P('model',)"}
    assert jobs["teacher_m8"]["specs"][K2] == "P()" and jobs["teacher_m8"]["specs"][K0] == "P(None, 'model')"
    # Adam's mu and nu mirror the params; the step and the count are replicated; rows split over data.
    layout = jobs["layout_tensor_adam"]
    for moment in ("mu", "nu"):
        assert {k: layout["opt_state"][f"[0].{moment}{k}"] for k in layout["params"]} == layout["params"]
    assert layout["opt_state"]["[0].count"] == "P()" and layout["step"] == "P()"
    assert layout["rows_spec"] == "P('data',)" and layout["rows_shape"] == [516, 4]  # 515 rows padded to 4 shards


@pytest.mark.slow
def test_checkpoints_move_between_device_counts(runs):
    root, cfg, data = runs["root"], runs["cfg"], runs["data"]
    # 1 -> 8: the 1-device checkpoint restores onto fsdp=8, value for value, split as the rules say ...
    _close_params(_npz(root / "restore1.npz"), runs["ref_epoch1"], exact=True)
    assert runs["eight"]["restore1"]["specs"][K0] == "P('fsdp',)"
    # ... and the run resumed on a 2x2x2 mesh ends where the single-device run does.
    _close_params(_npz(root / "from1.npz"), runs["ref"])
    _close_metrics(_train_lines(root / "from1"), runs["ref_lines"])
    # 8 -> 1: the model=8 (tensor-parallel) checkpoint restores onto one device exactly ...
    like = _student_like()
    restored = w.flat_params(ckpt.restore_params(root / "m8" / "checkpoints", like, 1))
    _close_params(restored, _npz(root / "m8.npz"), exact=True)
    _close_params(restored, runs["ref_epoch1"])
    # ... and resuming it on one device continues the run.
    resumed = training.run(cfg(mesh="data=1"), root / "m8", datasets=data, progress=False, resume=True)
    assert resumed["finished"] and resumed["mesh"] == {"data": 1}
    _close_params(w.flat_params(resumed["params"]), runs["ref"])
    _close_metrics(_train_lines(root / "m8"), runs["ref_lines"])


@pytest.mark.slow
def test_two_processes_match_one(runs):
    root, cfg, data = runs["root"], runs["cfg"], runs["data"]
    for i, result in enumerate(runs["two"]):
        assert result["info"] == {"process_index": i, "process_count": 2, "device_count": 4, "local_device_count": 2,
                                  "collectives": "gloo"}
        assert result["jobs"]["m1"]["rc"] == 0 and result["jobs"]["m1"]["mesh"] == {"data": 2, "model": 2}
        assert result["jobs"]["m1"]["specs"][K0] == "P('data',)"
    # Each process holds (and fed) only its own half of the rows.
    assert [r["jobs"]["layout"]["row_range"] for r in runs["two"]] == [[0, 258], [258, 516]]
    # Epoch 1 across 2 processes (data across them, teacher tensor-parallel within each) = 1 device.
    _close_metrics(_train_lines(root / "two_m1"), runs["ref_lines"][:1])
    two_params = _npz(root / "two_m1.npz")
    _close_params(two_params, runs["ref_epoch1"])
    # 2 processes -> 1: the checkpoint restores exactly, and the run continues on one device.
    _close_params(w.flat_params(ckpt.restore_params(root / "two_m1" / "checkpoints", _student_like(), 1)), two_params,
                  exact=True)
    resumed = training.run(cfg(mesh="data=-1"), root / "two_m1", datasets=data, progress=False, resume=True)
    assert resumed["finished"]
    _close_params(w.flat_params(resumed["params"]), runs["ref"])
    _close_metrics(_train_lines(root / "two_m1"), runs["ref_lines"])
