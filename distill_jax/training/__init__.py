"""Training: jitted steps, scanned epochs, teacher cache, checkpoints and the run loop."""

from distill_jax.training import checkpoint, population
from distill_jax.training.loop import default_config, load_datasets, load_teacher, make_optimizer, run
from distill_jax.training.steps import (
    Layout,
    TrainState,
    create_train_state,
    epoch_indices,
    make_evaluate,
    make_layout,
    make_predict,
    make_token_evaluate,
    make_train_epoch,
    make_train_step,
    to_host,
    train_epoch_fn,
)

__all__ = [
    "Layout",
    "TrainState",
    "checkpoint",
    "create_train_state",
    "default_config",
    "epoch_indices",
    "load_datasets",
    "load_teacher",
    "make_evaluate",
    "make_optimizer",
    "make_predict",
    "make_layout",
    "make_token_evaluate",
    "make_train_epoch",
    "make_train_step",
    "population",
    "run",
    "train_epoch_fn",
    "to_host",
]
