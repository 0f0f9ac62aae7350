"""Where a vmapped population stage of ``make reproduce-full`` spends its time, epoch by epoch.

  python benchmarks/population_stage_profile.py [--width 800] [--examples 55000] [--epochs 3]

Runs the per-epoch work of ``distill_jax.proj.hinton.full.train_population``
for the 18 students of one width (3 seeds x hard + 5 temperatures) on cached
teacher logits (random ones: their values do not change the speed) and times
each part separately, each after ``block_until_ready``:

* ``train``: the vmapped, scanned epoch;
* ``to_device``: moving the test images to the device (``jnp.asarray``);
* ``evaluate``: the 18 students' test errors;
* ``checkpoint``: the orbax save of params, optimizer state, step and RNG
  (with the checksums ``training.checkpoint`` writes).

and, for comparison, one student's epoch as a 1-member population and as a
single run (``training.make_train_epoch``), all in one process on the same
machine. Epoch 1 includes compilation and is reported apart. Prints a table
and writes results/benchmark_population_stage.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import data as data_lib
from distill_jax import models, training
from distill_jax.proj.hinton import full as hinton
from distill_jax.training import checkpoint as ckpt
from distill_jax.training import population

sys.path.insert(0, str(Path(__file__).parent))
from population import _config  # noqa: E402  (benchmarks/population.py: experiments/hinton_full.py's full profile)

REPO = Path(__file__).resolve().parents[1]


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def profile(width: int, members, train, test, cached, epochs: int, batch_size: int, optimizer,
            member_axis: str = "vmap") -> dict:
    model = models.create({"name": "mlp", "hidden": (width, width), "num_classes": 10})
    steps = train.images.shape[0] // batch_size
    tx = training.make_optimizer(optimizer, steps, epochs)
    hparams = population.check_hparams(
        {k: np.asarray([m[k] for m in members], np.float32) for k in ("temperature", "soft_weight", "hard_weight")},
        len(members))
    member_data = {"teacher_logits": cached[np.asarray([m["teacher_index"] for m in members])]}
    shared = {"image": jnp.asarray(train.images), "label": jnp.asarray(train.labels, jnp.int32)}
    make_step = hinton.member_step_factory(model, tx)
    epoch_fn = population.make_population_epoch(make_step, batch_size=batch_size, member_axis=member_axis)
    states = population.init_population(model, (1, 28, 28, 1), tx, [m["seed"] for m in members])
    evaluate = population.population_map(training.make_evaluate(model.apply, num_classes=10, batch_size=1000))
    # One student, as a 1-member population and as an ordinary single run, timed
    # right after each population epoch: this machine's speed drifts by 10-15 %
    # over minutes, so only epochs measured side by side are compared.
    one = members[:1]
    one_h = {k: v[:1] for k, v in hparams.items()}
    one_data = {"teacher_logits": member_data["teacher_logits"][:1]}
    one_states = population.init_population(model, (1, 28, 28, 1), tx, [one[0]["seed"]])
    single_epoch = training.make_train_epoch(make_step({k: v[0] for k, v in hparams.items()}), batch_size=batch_size)
    init_key, state_key = population.seed_keys(one[0]["seed"])
    state = training.create_train_state(models.init_params(model, init_key, (1, 28, 28, 1)), tx, state_key)
    single_data = dict(shared, teacher_logits=member_data["teacher_logits"][0])
    one_times, single_times = [], []
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ckpt.manager(Path(tmp) / "checkpoints") as mngr:
        for epoch in range(epochs):
            (states, _), t_train = _timed(lambda: epoch_fn(states, hparams, member_data, shared, np.asarray(epoch, np.int32)))
            images, t_move = _timed(lambda: jnp.asarray(test.images))
            _, t_eval = _timed(lambda: evaluate(states.params, images, jnp.asarray(test.labels, jnp.int32))["errors"])
            t0 = time.perf_counter()
            ckpt.save(mngr, epoch + 1, params=states.params, opt_state=states.opt_state, step=states.step,
                      rng=states.rng, meta={"config": {"width": width}})
            mngr.wait_until_finished()
            t_ckpt = time.perf_counter() - t0
            rows.append({"epoch": epoch + 1, "train_s": t_train, "to_device_s": t_move, "evaluate_s": t_eval,
                         "checkpoint_s": t_ckpt})
            (one_states, _), t = _timed(lambda: epoch_fn(one_states, one_h, one_data, shared, np.asarray(epoch, np.int32)))
            one_times.append(t)
            (state, _), t = _timed(lambda: single_epoch(state, None, single_data, np.asarray(epoch, np.int32)))
            single_times.append(t)
    n = train.images.shape[0] // batch_size * batch_size
    steady = rows[1:] or rows
    mean = {k: float(np.mean([r[k] for r in steady])) for k in ("train_s", "to_device_s", "evaluate_s", "checkpoint_s")}
    total = sum(mean.values())
    later = lambda xs: float(np.mean(xs[1:] or xs))
    return {
        "width": width, "member_axis": member_axis, "students": len(members), "examples_per_epoch": n, "epochs": rows,
        "steady_epoch_s": mean, "share_of_epoch": {k: v / total for k, v in mean.items()},
        "population_student_samples_per_s": len(members) * n / mean["train_s"],
        "one_member_population_samples_per_s": n / later(one_times),
        "single_run_samples_per_s": n / later(single_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--examples", type=int, default=55000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--member-axis", default="vmap", choices=population.MEMBER_AXES)
    parser.add_argument("--out", default=str(REPO / "results" / "benchmark_population_stage.json"))
    args = parser.parse_args()
    config = _config()
    members = hinton.student_members(config)
    full_train = data_lib.load_split("mnist", "train")
    train = data_lib.Dataset(full_train.images[: args.examples], full_train.labels[: args.examples])
    test = data_lib.load_split("mnist", "test")
    cached = jax.random.normal(jax.random.PRNGKey(0), (len(config.seeds), args.examples, 10)) * 5.0
    row = profile(args.width, members, train, test, cached, args.epochs, int(config.student.batch_size),
                  config.student.optimizer, args.member_axis)
    s, share = row["steady_epoch_s"], row["share_of_epoch"]
    print(f"2x{args.width}, member_axis={args.member_axis}, {row['students']} students, {row['examples_per_epoch']} examples per epoch "
          f"(epochs 2..{args.epochs}, mean):")
    print("| part | s per epoch | share |")
    print("|---|---:|---:|")
    for key in ("train_s", "to_device_s", "evaluate_s", "checkpoint_s"):
        print(f"| {key[:-2]} | {s[key]:.2f} | {100 * share[key]:.1f}% |")
    pop, one, single = (row[k] for k in ("population_student_samples_per_s", "one_member_population_samples_per_s",
                                        "single_run_samples_per_s"))
    print(f"student-samples/s: population {pop:,.0f}; one student as a 1-member population {one:,.0f}; "
          f"as a single run {single:,.0f} (population / single run = {pop / single:.2f})")
    out = {**row, "command": f"python benchmarks/population_stage_profile.py --width {args.width} "
           f"--examples {args.examples} --epochs {args.epochs} --member-axis {args.member_axis}", "devices": [str(d) for d in jax.devices()]}
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
