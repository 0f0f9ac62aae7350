"""What a one-member vmapped population compiles to that a single run does not.

  python benchmarks/population_hlo.py [--width 800]

Compiles (does not run) one epoch of a single 2xW student, as an ordinary
single run (``training.make_train_epoch``) and as a 1-member population with
each ``member_axis``, and prints the HLO op counts in which the optimized
programs differ, then the transposes of the vmapped one. On XLA:CPU the
vmapped program carries the weight gradients in a transposed layout and
copies them back in every optimizer update (RESULTS.md, "Where a population
stage's time goes").
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import models, training
from distill_jax.proj.hinton import full as hinton
from distill_jax.training import population

sys.path.insert(0, str(Path(__file__).parent))
from population import _config  # noqa: E402


def op_counts(hlo: str) -> collections.Counter:
    return collections.Counter(m.group(1) for m in re.finditer(r"= \S+ ([a-z][\w-]*)\(", hlo))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=800)
    args = parser.parse_args()
    config = _config()
    member = hinton.student_members(config)[1]  # a distilled student
    model = models.create({"name": "mlp", "hidden": (args.width, args.width), "num_classes": 10})
    n, batch = 1000, 100
    tx = training.make_optimizer(config.student.optimizer, n // batch, 3)
    hparams = {k: jnp.asarray([member[k]], jnp.float32) for k in ("temperature", "soft_weight", "hard_weight")}
    shared = {"image": jnp.zeros((n, 28, 28, 1)), "label": jnp.zeros((n,), jnp.int32)}
    member_data = {"teacher_logits": jnp.zeros((1, n, 10))}
    make_step = hinton.member_step_factory(model, tx)
    states = population.init_population(model, (1, 28, 28, 1), tx, [member["seed"]])
    epoch = np.asarray(0, np.int32)
    programs = {}
    single = training.make_train_epoch(make_step({k: v[0] for k, v in hparams.items()}), batch_size=batch)
    programs["single run"] = single.lower(population.member(states, 0), None,
                                          dict(shared, teacher_logits=member_data["teacher_logits"][0]),
                                          epoch).compile().as_text()
    for axis in population.MEMBER_AXES:
        fn = population.make_population_epoch(make_step, batch_size=batch, member_axis=axis)
        programs[f"1-member {axis}"] = fn.lower(states, hparams, member_data, shared, epoch).compile().as_text()
    counts = {name: op_counts(text) for name, text in programs.items()}
    ops = sorted({op for c in counts.values() for op in c if len({c[op] for c in counts.values()}) > 1})
    print(f"2x{args.width}: HLO ops whose counts differ between the optimized programs")
    print("| op | " + " | ".join(counts) + " |")
    print("|---|" + "---:|" * len(counts))
    for op in ops:
        print(f"| {op} | " + " | ".join(str(c[op]) for c in counts.values()) + " |")
    print("\ntransposes of the 1-member vmap program:")
    for line in programs["1-member vmap"].splitlines():
        if " transpose(" in line:
            print("  " + line.strip().split(", metadata")[0])


if __name__ == "__main__":
    main()
