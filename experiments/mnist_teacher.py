"""Hinton et al.'s MNIST teacher: 784-1200-1200-10, dropout, max-norm, 2-px jitter.

  python -m distill_jax train-teacher --config=experiments/mnist_teacher.py --workdir=runs/teacher
"""

from distill_jax.proj.hinton import recipes


def get_config():
    return recipes.hinton_teacher()
