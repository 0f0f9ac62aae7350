"""Wall time of a vmapped population of students vs a Python loop of separate runs.

  python benchmarks/population.py [--examples 20000] [--epochs 1] [--widths 800,300,30]

For each width: the population of experiments/hinton_full.py (per seed, a
hard-label student and one per temperature; 18 students) trained for
``--epochs`` epochs on the first ``--examples`` MNIST training images with
cached teacher logits, (a) as one vmapped program, (b) as one jitted run per
student, one after the other, as a loop of ``distill_jax distill`` calls would
(each compiles its own program). Both include compilation and initialization;
neither includes data loading or the teacher cache, which a loop of separate
runs would also repeat, so the loop's cost is a lower bound.
Prints a table and writes results/benchmark_population.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import data as data_lib
from distill_jax import models, training
from distill_jax.proj.hinton import full as hinton
from distill_jax.training import population

REPO = Path(__file__).resolve().parents[1]


def _config():
    spec = importlib.util.spec_from_file_location("hinton_full", REPO / "experiments" / "hinton_full.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("full")


def measure(width: int, members, images, labels, cached, epochs: int, batch_size: int, optimizer) -> dict:
    model = models.create({"name": "mlp", "hidden": (width, width), "num_classes": 10})
    tx = training.make_optimizer(optimizer, images.shape[0] // batch_size, epochs)
    shared = {"image": images, "label": labels}
    hparams = {k: np.asarray([m[k] for m in members], np.float32) for k in ("temperature", "soft_weight", "hard_weight")}
    member_data = {"teacher_logits": cached[np.asarray([m["teacher_index"] for m in members])]}
    make_step = hinton.member_step_factory(model, tx)

    t0 = time.perf_counter()
    states = population.init_population(model, (1, 28, 28, 1), tx, [m["seed"] for m in members])
    epoch_fn = population.make_population_epoch(make_step, batch_size=batch_size)
    for e in range(epochs):
        states, _ = epoch_fn(states, hparams, member_data, shared, np.asarray(e, np.int32))
    jax.block_until_ready(states)
    vmapped = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i, m in enumerate(members):
        init_key, state_key = population.seed_keys(m["seed"])
        state = training.create_train_state(models.init_params(model, init_key, (1, 28, 28, 1)), tx, state_key)
        h = {k: jnp.asarray(v[i]) for k, v in hparams.items()}
        # A fresh jit per run, as separate processes would compile.
        single = training.make_train_epoch(make_step(h), batch_size=batch_size)
        data = dict(shared, teacher_logits=member_data["teacher_logits"][i])
        for e in range(epochs):
            state, _ = single(state, None, data, np.asarray(e, np.int32))
        jax.block_until_ready(state)
    loop = time.perf_counter() - t0
    return {"width": width, "students": len(members), "vmapped_s": round(vmapped, 2), "loop_s": round(loop, 2),
            "saved_s": round(loop - vmapped, 2), "speedup": round(loop / vmapped, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--widths", default="800,300,30")
    parser.add_argument("--out", default=str(REPO / "results" / "benchmark_population.json"))
    args = parser.parse_args()
    config = _config()
    members = hinton.student_members(config)
    train = data_lib.load_split("mnist", "train")
    images, labels = train.images[: args.examples], train.labels[: args.examples]
    # Teacher logits' values do not change the speed; random ones spare a teacher.
    cached = jax.random.normal(jax.random.PRNGKey(0), (len(config.seeds), args.examples, 10)) * 5.0
    rows = []
    print(f"{len(members)} students, {args.examples} examples, {args.epochs} epoch(s), batch {config.student.batch_size}")
    print("| width | vmapped population (s) | loop of separate runs (s) | saved (s) | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for width in (int(w) for w in args.widths.split(",")):
        row = measure(width, members, images, labels, cached, args.epochs, int(config.student.batch_size),
                      config.student.optimizer)
        rows.append(row)
        print(f"| 2x{width} | {row['vmapped_s']} | {row['loop_s']} | {row['saved_s']} | {row['speedup']}x |", flush=True)
    out = {"examples": args.examples, "epochs": args.epochs, "students": len(members), "rows": rows,
           "devices": [str(d) for d in jax.devices()], "command": "python benchmarks/population.py "
           f"--examples {args.examples} --epochs {args.epochs} --widths {args.widths}"}
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
