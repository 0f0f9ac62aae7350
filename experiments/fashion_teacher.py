"""A convolutional Fashion-MNIST teacher (distill_jax.proj.hinton.recipes.cnn_teacher).

  python -m distill_jax train-teacher --config=experiments/fashion_teacher.py --workdir=runs/fashion_teacher
"""

from distill_jax.proj.hinton import recipes


def get_config():
    return recipes.cnn_teacher()
