"""Helpers of tests/test_sharding.py, and the script it runs in subprocesses.

The multi-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
set before jax starts, which the pytest process (1 device, shared with the
other test files) cannot do; so tests/test_sharding.py runs this file:

  python tests/sharding_worker.py JOBS.json            # one process, N devices
  python tests/sharding_worker.py JOBS.json PROCESS_ID # one of several processes

JOBS.json: ``{"jobs": [...], "distributed": {...}?}``. A job is
``{"kind": "run", ...}`` (``training.run`` on the synthetic data),
``{"kind": "cli", "argv": [...]}`` (``distill_jax.cli.main`` with
``training.run`` fed the synthetic data), ``{"kind": "restore", ...}``
(a checkpoint's params restored onto this process's mesh) or
``{"kind": "layout", ...}`` (a train state laid out by the rules) or
``{"kind": "teacher", ...}`` (a teacher restored into its layout) or
``{"kind": "visits", ...}`` (the example ids one sharded epoch draws) or
``{"kind": "lm_run", ...}`` (``training.run`` of a language model). Results
are written as JSON to ``jobs["results"]`` (+ ``.<process id>``) and params
as ``.npz`` files; they are compared with single-device runs by the test.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

NUM_TRAIN = 512
NUM_TEST = 200
BATCH = 64
# Plain SGD with Nesterov momentum, set here rather than taken from the
# recipes: Adam divides by sqrt(v) + 1e-8, so for a parameter whose gradient
# is ~1e-8 (a nearly dead unit) it turns the float-reassociation noise of a
# cross-device sum (~1e-9) into an update difference ~1e-4 * lr: correct,
# but not comparable at float32 tolerance. SGD keeps differences at rounding.
OPTIMIZER = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "nesterov": True, "schedule": "cosine",
             "warmup_epochs": 0.0, "final_lr_fraction": 0.0, "weight_decay": 0.0}
TEACHER_HIDDEN = (128, 128)
STUDENT_HIDDEN = (64, 64)


def synthetic_datasets(seed: int = 0, num_train: int = NUM_TRAIN):
    """Random images labelled by a fixed random linear map: learnable, identical in every process.

    ``num_train < NUM_TRAIN`` keeps the first rows of the same training set
    (e.g. a count the data shards do not divide, so the arrays get padded).
    """
    from distill_jax import data as data_lib

    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(NUM_TRAIN + NUM_TEST, 28, 28, 1)).astype(np.float32)
    projection = rng.normal(size=(28 * 28, 10)).astype(np.float32)
    labels = np.argmax((images.reshape(len(images), -1) - 0.5) @ projection, -1).astype(np.int32)
    return {
        "train": data_lib.Dataset(images[:num_train], labels[:num_train]),
        "test": data_lib.Dataset(images[NUM_TRAIN:], labels[NUM_TRAIN:]),
    }


def write_teacher(workdir, seed: int = 0) -> Path:
    """A teacher checkpoint with fixed random params (no training), via the project's checkpoint module."""
    import jax

    from distill_jax import models, training
    from distill_jax.training import checkpoint as ckpt

    config = training.default_config()
    config.model.hidden = TEACHER_HIDDEN
    config_dict = json.loads(config.to_json_best_effort())
    config_dict["input_shape"] = [1, 28, 28, 1]
    model = models.create(config_dict["model"])
    params = models.init_params(model, jax.random.PRNGKey(seed), (1, 28, 28, 1))
    # Sharper than at init, so the soft targets are not all uniform.
    params = jax.tree_util.tree_map(lambda x: 3.0 * x, params)
    directory = Path(workdir) / "checkpoints"
    with ckpt.manager(directory) as mngr:
        ckpt.save(mngr, 1, params=params, opt_state={"unused": jax.numpy.zeros(())}, step=jax.numpy.asarray(0), rng=jax.random.PRNGKey(0),
                  meta={"config": config_dict})
    return Path(workdir)


def student_config(teacher_dir: str, *, epochs: int = 2, mesh: str = "data=-1", teacher_partition: str = "replicated",
                   student_partition: str = "replicated", cache_teacher: str = "false", jitter: int = 0):
    from distill_jax.proj.hinton import recipes

    c = recipes.hinton_student(epochs, temperature=4.0, hidden=STUDENT_HIDDEN, hard_weight=0.5,
                               teacher_checkpoint=str(teacher_dir))
    c.num_epochs = epochs
    c.batch_size = BATCH
    c.optimizer.update(OPTIMIZER)
    c.checkpoint_every = 1
    c.mesh = mesh
    c.teacher_partition = teacher_partition
    c.student_partition = student_partition
    c.cache_teacher = cache_teacher
    c.jitter = jitter
    return c


def metrics_lines(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flat_params(tree) -> dict[str, np.ndarray]:
    import jax

    from distill_jax import sharding

    host = sharding.gather_to_host(tree)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(host)[0]}


def _specs(tree) -> dict[str, str]:
    from distill_jax import sharding

    return {k: str(v) for k, v in sharding.specs_of(tree).items()}


def _save(path, tree):
    import jax

    arrays = flat_params(tree)  # every process takes part in the gather
    if jax.process_index() == 0:
        np.savez(path, **arrays)


# ------------------------------------------------------------------ jobs


def _run_job(job: dict) -> dict:
    from distill_jax import training

    config = student_config(job["teacher_dir"], **job.get("config", {}))
    t0 = time.perf_counter()
    datasets = synthetic_datasets(num_train=job.get("num_train", NUM_TRAIN))
    results = training.run(config, job["workdir"], datasets=datasets, progress=False,
                           resume=job.get("resume", False), stop_after_epochs=job.get("stop_after"))
    out = {"time_s": round(time.perf_counter() - t0, 2), "epochs": results["epochs"], "mesh": results["mesh"],
           "num_train": results["num_train"], "teacher_cached": results["teacher_cached"],
           "specs": _specs(results["params"])}
    if job.get("npz"):
        _save(job["npz"], results["params"])
    return out


def _cli_job(job: dict) -> dict:
    """``cli.main(argv)``, with ``training.run`` given the synthetic data (and an optional stop)."""
    from distill_jax import cli, training

    captured = {}
    real_run = training.run

    def run(config, workdir, **kwargs):
        kwargs.setdefault("datasets", synthetic_datasets())
        kwargs.setdefault("stop_after_epochs", job.get("stop_after"))
        results = real_run(config, workdir, **kwargs)
        captured.update(results)  # the CLI pops "params" from what it gets
        return results

    training.run = run
    try:
        t0 = time.perf_counter()
        rc = cli.main(["distill-jax", *job["argv"]])
    finally:
        training.run = real_run
    out = {"rc": rc, "time_s": round(time.perf_counter() - t0, 2)}
    if "params" in captured:
        out["mesh"] = captured["mesh"]
        out["epochs"] = captured["epochs"]
        out["specs"] = _specs(captured["params"])
        if job.get("npz"):
            _save(job["npz"], captured["params"])
    return out


def _restore_job(job: dict) -> dict:
    """Restores a checkpoint's params straight into this process's mesh and rules."""
    import jax

    from distill_jax import models, sharding
    from distill_jax.training import checkpoint as ckpt

    mesh = sharding.make_mesh(job["mesh"])
    model = models.create({"name": "mlp", "hidden": STUDENT_HIDDEN})
    like = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0), (1, 28, 28, 1)))
    shardings = sharding.param_shardings(like, job["rules"], mesh)
    params = ckpt.restore_params(job["checkpoint_dir"], like, job.get("epoch"), shardings=shardings)
    _save(job["npz"], params)
    return {"specs": _specs(params)}


def _layout_job(job: dict) -> dict:
    """A student train state laid out under the rules: its params' and optimizer state's specs."""
    import jax

    from distill_jax import models, sharding
    from distill_jax.training import create_train_state, make_optimizer
    from distill_jax.training.steps import make_layout

    mesh = sharding.make_mesh(job["mesh"])
    model = models.create({"name": "mlp", "hidden": tuple(job.get("hidden", STUDENT_HIDDEN))})
    tx = make_optimizer({"name": job.get("optimizer", "sgd"), "learning_rate": 0.1, "momentum": 0.9}, 10, 1)

    def init():
        return create_train_state(models.init_params(model, jax.random.PRNGKey(0), (1, 28, 28, 1)), tx,
                                   jax.random.PRNGKey(1))

    layout = make_layout(mesh, jax.eval_shape(init), job["rules"])
    state = jax.jit(init, out_shardings=layout.state)()
    rows = sharding.shard_rows(np.zeros((NUM_TRAIN + 3, 4), np.float32), mesh)
    return {
        "params": _specs(state.params),
        "opt_state": _specs(state.opt_state),
        "step": str(state.step.sharding.spec),
        "rows_shape": list(rows.shape),
        "rows_spec": str(rows.sharding.spec),
        "row_range": sharding.process_row_range(mesh, rows.shape[0]),
    }


def _teacher_job(job: dict) -> dict:
    """The teacher restored straight into its layout: its params' specs."""
    from distill_jax import sharding, training

    mesh = sharding.make_mesh(job["mesh"])
    _, params, _ = training.load_teacher(job["teacher_dir"], mesh=mesh, partition=job["rules"])
    return {"specs": _specs(params)}


def _visits_job(job: dict) -> dict:
    """One sharded epoch of a step that only records which example ids it drew, in which order.

    ``num_rows`` real examples, row-sharded and padded to a multiple of the
    data shards as the run loop pads them; every row holds its own id, so a
    padding row drawn shows up as an id >= ``num_rows``. The result: the ids
    in the order drawn.
    """
    import jax
    import jax.numpy as jnp

    from distill_jax import sharding
    from distill_jax.training.steps import TrainState, make_layout, make_train_epoch

    mesh = sharding.make_mesh(job["mesh"])
    num_rows, batch = job["num_rows"], job["batch_size"]
    padded = sharding.padded_num_rows(num_rows, mesh)
    ids = sharding.shard_rows(np.arange(padded, dtype=np.int32), mesh, padded)

    def step(state, _, data):
        drawn = jax.lax.dynamic_update_slice(state.params, data["label"], (state.step * batch,))
        return state._replace(step=state.step + 1, params=drawn), {"loss": jnp.zeros(())}

    def init():
        drawn = jnp.full(padded, -1, jnp.int32)
        return TrainState(jnp.asarray(0, jnp.int32), drawn, (), jax.random.PRNGKey(job["seed"]))

    layout = make_layout(mesh, jax.eval_shape(init), "replicated")
    epoch_fn = make_train_epoch(step, batch_size=batch, layout=layout, num_examples=num_rows)
    state = jax.jit(init, out_shardings=layout.state)()
    state, _ = epoch_fn(state, None, {"label": ids}, np.asarray(job["epoch"], np.int32))
    drawn = np.asarray(sharding.gather_to_host(state.params))[: int(state.step) * batch]
    return {"padded_rows": int(ids.shape[0]), "ids_spec": str(ids.sharding.spec), "steps": int(state.step),
            "drawn": drawn.tolist()}


def lm_config(profile: str, **overrides):
    """experiments/lm_arithmetic.py's smoke profile with SGD (see OPTIMIZER) and ``overrides`` (dotted keys)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_arithmetic", Path(__file__).resolve().parent.parent / "experiments" / "lm_arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(f"{profile},smoke")
    c.optimizer.update(OPTIMIZER)
    c.optimizer.learning_rate = 0.3
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c


def _lm_run_job(job: dict) -> dict:
    """``training.run`` of a language-model config on this process's mesh."""
    from distill_jax import training

    config = lm_config(job["profile"], **job.get("config", {}))
    results = training.run(config, job["workdir"], progress=False)
    if job.get("npz"):
        _save(job["npz"], results["params"])
    return {"mesh": results["mesh"], "epochs": results["epochs"], "specs": _specs(results["params"]),
            "test": results["test"]}


def get_config(arg: str = ""):
    """Lets the CLI load this file: ``--config=tests/sharding_worker.py`` (overrides by flags)."""
    return student_config(arg)


JOBS = {"run": _run_job, "lm_run": _lm_run_job, "cli": _cli_job, "restore": _restore_job, "layout": _layout_job, "teacher": _teacher_job,
        "visits": _visits_job}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    process_id = int(argv[2]) if len(argv) > 2 else None
    import jax

    dist = spec.get("distributed")
    jobs = [dict(job) for job in spec["jobs"]]
    if dist:
        # CPU collectives between processes (gloo), set before initialize.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        flags = [f"--coordinator_address={dist['coordinator_address']}",
                 f"--num_processes={dist['num_processes']}", f"--process_id={process_id}"]
        if jobs and jobs[0]["kind"] == "cli":  # the CLI's own flags start jax.distributed
            jobs[0]["argv"] = [*jobs[0]["argv"], *flags]
        else:
            jax.distributed.initialize(
                coordinator_address=dist["coordinator_address"], num_processes=dist["num_processes"],
                process_id=process_id, initialization_timeout=60,
            )
    results = {"jobs": {}}
    for job in jobs:
        results["jobs"][job["name"]] = JOBS[job["kind"]](job)
    results["info"] = {"process_index": jax.process_index(), "process_count": jax.process_count(),
                       "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
                       "collectives": jax.config.jax_cpu_collectives_implementation}
    out = spec["results"] + ("" if process_id is None else f".{process_id}")
    Path(out).write_text(json.dumps(results, indent=1))
    if spec.get("distributed"):
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main(sys.argv))
