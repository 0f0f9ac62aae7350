"""Does the nesting of the population's program matter? vmap(scan(step)) against scan(vmap(step)).

  python benchmarks/population_nesting.py [--examples 20000] [--width 800]

``training.population.make_population_epoch`` vmaps a whole scanned epoch over
the students (each with its own shuffle); the alternative scans over steps and
vmaps each step. Both are timed (epochs 2-3 of 3, student-samples/s) for a
population of 1 and of the 18 students of experiments/hinton_full.py, on cached
random teacher logits. Prints the figures; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import data as data_lib
from distill_jax import models, training
from distill_jax.proj.hinton import full as hinton
from distill_jax.training import population
from distill_jax.training.steps import epoch_indices

sys.path.insert(0, str(Path(__file__).parent))
from population import _config  # noqa: E402


def scan_of_vmap(make_step, *, batch_size: int, num_examples: int):
    """The other nesting: one scan over steps, each step vmapped over the students (same batches, same RNG)."""

    def epoch(states, hparams, member_data, shared, epoch_number):
        indices = jax.vmap(lambda s: epoch_indices(s.rng, epoch_number, num_examples, batch_size))(states)

        def body(states, idx):
            def one(state, h, data, i):
                batch = jax.tree_util.tree_map(lambda x: jnp.take(x, i, axis=0), {**shared, **data})
                return make_step(h)(state, None, batch)

            return jax.vmap(one)(states, hparams, member_data, idx)

        return jax.lax.scan(body, states, jnp.swapaxes(indices, 0, 1))

    return jax.jit(epoch, donate_argnums=(0,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--width", type=int, default=800)
    args = parser.parse_args()
    config = _config()
    n, batch = args.examples, int(config.student.batch_size)
    train = data_lib.load_split("mnist", "train")
    shared = {"image": jnp.asarray(train.images[:n]), "label": jnp.asarray(train.labels[:n], jnp.int32)}
    cached = jax.random.normal(jax.random.PRNGKey(0), (len(config.seeds), n, 10)) * 5.0
    model = models.create({"name": "mlp", "hidden": (args.width, args.width), "num_classes": 10})
    tx = training.make_optimizer(config.student.optimizer, n // batch, 3)
    make_step = hinton.member_step_factory(model, tx)
    print(f"2x{args.width}, {n} examples, batch {batch}: student-samples/s (epochs 2-3 of 3)")
    for size in (1, 18):
        members = hinton.student_members(config)[:size]
        hparams = population.check_hparams(
            {k: np.asarray([m[k] for m in members], np.float32) for k in ("temperature", "soft_weight", "hard_weight")},
            size)
        member_data = {"teacher_logits": cached[np.asarray([m["teacher_index"] for m in members])]}
        programs = {"vmap(scan(step))": population.make_population_epoch(make_step, batch_size=batch),
                    "scan(vmap(step))": scan_of_vmap(make_step, batch_size=batch, num_examples=n)}
        for name, epoch_fn in programs.items():
            states = population.init_population(model, (1, 28, 28, 1), tx, [m["seed"] for m in members])
            times = []
            for e in range(3):
                t0 = time.perf_counter()
                states, _ = epoch_fn(states, hparams, member_data, shared, np.asarray(e, np.int32))
                jax.block_until_ready(states)
                times.append(time.perf_counter() - t0)
            print(f"  {size:2d} student(s), {name}: {size * (n // batch) * batch / np.mean(times[1:]):,.0f}", flush=True)


if __name__ == "__main__":
    main()
