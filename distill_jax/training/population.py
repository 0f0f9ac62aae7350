"""A population of students trained as one compiled program.

Sweeps over temperature, loss weights and seed train students of one shape on
one transfer set. Instead of a Python loop of separate runs (one compile, one
dispatch stream and small matmuls each), the scanned epoch of
:mod:`distill_jax.training.steps` is ``vmap``-ed over a leading *member* axis:

* the stacked :class:`~distill_jax.training.steps.TrainState` (each member its
  own parameters, optimizer state and PRNG key, hence its own shuffles);
* ``hparams``, a dict of ``[members]`` arrays (e.g. ``temperature``,
  ``soft_weight``, ``hard_weight``) that ``make_step(hparams)`` turns into
  each member's update, so the objective's knobs are traced values;
* ``member_data``, per-member arrays over the examples (e.g. the cached logits
  of the teacher each member distills), next to ``shared_data`` (images,
  labels) that every member indexes.

A member with seed ``s`` starts exactly as :func:`distill_jax.training.run`
with ``seed=s`` would (same initial parameters and PRNG key), so a population
is the same experiment as the loop of single runs, only compiled once.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from distill_jax.training.steps import TrainState, create_train_state, train_epoch_fn

PyTree = Any


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks same-structured pytrees along a new leading member axis."""
    if not trees:
        raise ValueError("stack() needs at least one pytree.")
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def member(tree: PyTree, index: int) -> PyTree:
    """The pytree of one member (index into the leading axis)."""
    return jax.tree_util.tree_map(lambda leaf: leaf[index], tree)


def population_size(tree: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("empty population pytree.")
    return int(leaves[0].shape[0])


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(init_key, state_key)`` of a run with this seed, as the run loop derives them."""
    init_key, state_key = jax.random.split(jax.random.PRNGKey(int(seed)))
    return init_key, state_key


def init_population(
    model, input_shape: Sequence[int], tx: optax.GradientTransformation, seeds: Sequence[int]
) -> TrainState:
    """Stacked initial states, member ``i`` initialized from ``seeds[i]``."""
    if len(seeds) == 0:
        raise ValueError("a population needs at least one member (got no seeds).")
    seeds_array = jnp.asarray([int(s) for s in seeds], jnp.uint32)

    def one(seed):
        init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
        variables = model.init(init_key, jnp.zeros(tuple(input_shape), jnp.float32), train=False)
        return create_train_state(variables, tx, state_key)

    return jax.jit(jax.vmap(one))(seeds_array)


def check_hparams(hparams: Mapping[str, Any], size: int) -> dict[str, jax.Array]:
    """Every hyperparameter is a ``[size]`` array, one value per member."""
    out = {}
    for name, value in hparams.items():
        value = jnp.asarray(value)
        if value.shape != (size,):
            raise ValueError(
                f"hyperparameter {name!r} has shape {value.shape}; a population of {size} "
                f"members needs one value per member, shape ({size},)."
            )
        out[name] = value
    return out


MEMBER_AXES = ("vmap", "map")


def make_population_epoch(
    make_step: Callable[[Mapping[str, jax.Array]], Callable],
    *,
    batch_size: int,
    num_examples: int | None = None,
    member_axis: str = "vmap",
) -> Callable:
    """Jits ``epoch(states, hparams, member_data, shared_data, epoch) -> (states, metrics)``.

    ``make_step(hparams)`` returns the step of :func:`make_train_step` for one
    member's (traced) hyperparameters. ``member_data`` arrays have a leading
    member axis; ``shared_data`` (with ``"label"``) do not. Metrics come back
    per member, ``[members]``. The states are donated.

    ``member_axis`` says how the members share the program:

    * ``"vmap"``: every step updates all members at once (batched matmuls).
      Best for narrow students, whose small matmuls and per-step overheads it
      amortizes.
    * ``"map"``: ``lax.map`` over members, each running the very scanned epoch
      of a single run, one after another. For wide students it is faster: on
      XLA:CPU the batched weight gradients come out in a transposed layout that
      every optimizer update must copy back (RESULTS.md, "Where a population
      stage's time goes").
    """
    if member_axis not in MEMBER_AXES:
        raise ValueError(f"member_axis={member_axis!r}; choose one of {MEMBER_AXES}.")

    def member_epoch(state, hparams, member_data, shared_data, epoch):
        data = {**shared_data, **member_data}
        epoch_fn = train_epoch_fn(make_step(hparams), batch_size=batch_size, num_examples=num_examples)
        return epoch_fn(state, None, data, epoch)

    if member_axis == "vmap":
        return jax.jit(jax.vmap(member_epoch, in_axes=(0, 0, 0, None, None)), donate_argnums=(0,))

    def mapped(states, hparams, member_data, shared_data, epoch):
        return jax.lax.map(lambda m: member_epoch(*m, shared_data, epoch), (states, hparams, member_data))

    return jax.jit(mapped, donate_argnums=(0,))


def population_map(fn: Callable, *, member_args: int = 1) -> Callable:
    """``vmap(fn)`` over the first ``member_args`` arguments, the rest shared, jitted.

    E.g. ``population_map(evaluate)(params, images, labels)`` evaluates every
    member on one split.
    """

    def mapped(*args):
        in_axes = (0,) * member_args + (None,) * (len(args) - member_args)
        return jax.vmap(fn, in_axes=in_axes)(*args)

    return jax.jit(mapped)


__all__ = [
    "MEMBER_AXES",
    "check_hparams",
    "init_population",
    "make_population_epoch",
    "member",
    "population_map",
    "population_size",
    "seed_keys",
    "stack",
]
