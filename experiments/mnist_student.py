"""Hinton et al.'s 784-800-800-10 student: "hard" (labels only) or "distill" (soft targets, T=20).

  python -m distill_jax train-teacher --config=experiments/mnist_student.py:hard --workdir=runs/hard
  python -m distill_jax distill --config=experiments/mnist_student.py:distill \
      --config.teacher.checkpoint=runs/teacher --workdir=runs/distilled
"""

from distill_jax import recipes


def get_config(kind: str = "distill"):
    if kind == "hard":
        return recipes.hinton_student()
    if kind == "distill":
        return recipes.hinton_student(temperature=20.0)
    raise ValueError(f"unknown student kind {kind!r}; use 'hard' or 'distill'.")
