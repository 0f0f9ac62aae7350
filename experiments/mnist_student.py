"""Hinton et al.'s 784-800-800-10 student: "hard" (labels only) or "distill" (soft targets, T=20).

  python -m distill_jax train-teacher --config=experiments/mnist_student.py:hard --workdir=runs/hard
  python -m distill_jax distill --config=experiments/mnist_student.py:distill \
      --config.teacher.checkpoint=runs/teacher --workdir=runs/distilled

"distill,hard=0.1" adds 0.1 x the hard-label cross-entropy to the soft
targets (the weight used by experiments/hinton_full.py).
"""

from distill_jax.proj.hinton import recipes


def get_config(kind: str = "distill"):
    name, _, hard_weight = kind.partition(",hard=")
    if name == "hard" and not hard_weight:
        return recipes.hinton_student()
    if name == "distill":
        return recipes.hinton_student(temperature=20.0, hard_weight=float(hard_weight or 0.0))
    raise ValueError(f"unknown student kind {kind!r}; use 'hard', 'distill' or 'distill,hard=<weight>'.")
