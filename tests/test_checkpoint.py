"""Checkpoints on tiny pytrees (fast): retention, restoring an older epoch, shape mismatches."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax.training import checkpoint as ckpt

KERNEL = "['params']['dense']['kernel']"
BIAS = "['params']['dense']['bias']"
OUT = "['params']['out']['kernel']"


def _params(width=4, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"params": {"dense": {"kernel": jax.random.normal(k1, (3, width)), "bias": jax.random.normal(k2, (width,))},
                       "out": {"kernel": jax.random.normal(k3, (2, 2))}}}  # independent of width


def _equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def four_epochs(tmp_path_factory):
    """Saves 4 "epochs" of an Adam-trained tiny pytree; returns the directory and what each epoch saved."""
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    tx = optax.adam(0.1)
    params = _params()
    opt_state = tx.init(params)
    rng = jax.random.PRNGKey(7)
    saved = {}
    with ckpt.manager(directory) as mngr:
        for epoch in range(1, 5):
            grads = jax.tree_util.tree_map(lambda x: jnp.sin(x * epoch), params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            step = jnp.asarray(10 * epoch, jnp.int32)
            ckpt.save(mngr, epoch, params=params, opt_state=opt_state, step=step, rng=rng,
                      meta={"config": {"epoch_note": f"written at {epoch}"}})
            saved[epoch] = jax.device_get({"params": params, "opt_state": opt_state, "step": step})
    return directory, saved, tx


def test_only_the_two_newest_epochs_are_kept(four_epochs):
    directory, _, _ = four_epochs
    steps = sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())
    assert steps == [3, 4]
    assert ckpt.latest_epoch(directory) == 4
    assert ckpt.read_meta(directory)["epoch"] == 4
    with ckpt.manager(directory) as mngr:
        assert sorted(mngr.all_steps()) == [3, 4]
    assert ckpt.latest_epoch(Path(directory).parent / "nowhere") is None


def test_an_older_epoch_restores_that_epochs_state(four_epochs):
    directory, saved, tx = four_epochs
    like = _params(seed=1)  # other values, same shapes: only the structure is taken from it
    assert not _equal(saved[3]["params"], saved[4]["params"])  # the test can tell epochs apart

    meta = ckpt.read_meta(directory, 3)
    assert meta["epoch"] == 3 and meta["config"] == {"epoch_note": "written at 3"}
    assert _equal(ckpt.restore_params(directory, like, 3), saved[3]["params"])
    assert _equal(ckpt.restore_params(directory, like), saved[4]["params"])  # default: the latest

    meta, params, opt_state, train = ckpt.restore_all(
        directory, params_like=like, opt_state_like=tx.init(like),
        train_like={"step": jnp.asarray(0, jnp.int32), "rng": jax.random.PRNGKey(0)}, epoch=3,
    )
    assert meta["epoch"] == 3
    assert _equal(params, saved[3]["params"]) and _equal(opt_state, saved[3]["opt_state"])
    assert int(train["step"]) == 30
    np.testing.assert_array_equal(train["rng"], jax.random.PRNGKey(7))
    # The signature stored with the checkpoint is the params' shapes.
    assert meta["signature"][KERNEL] == [3, 4] and meta["signature"][OUT] == [2, 2]


def test_restoring_into_another_width_names_the_differing_leaves(four_epochs):
    directory, _, tx = four_epochs
    wider = _params(width=5)  # its "out" leaf is unchanged: it must not be reported
    with pytest.raises(ckpt.CheckpointMismatchError, match="another model config") as info:
        ckpt.restore_params(directory, wider)
    message = str(info.value)
    assert KERNEL in message and BIAS in message
    assert "[3, 4]" in message and "[3, 5]" in message  # stored and expected shapes
    assert OUT not in message
    with pytest.raises(ckpt.CheckpointMismatchError, match="another model config"):
        ckpt.restore_all(directory, params_like=wider, opt_state_like=tx.init(wider),
                         train_like={"step": jnp.asarray(0, jnp.int32), "rng": jax.random.PRNGKey(0)}, epoch=3)
    # A missing leaf is a mismatch too.
    fewer = {"params": {"dense": _params()["params"]["dense"]}}
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"\['out'\]"):
        ckpt.restore_params(directory, fewer)


def test_an_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.read_meta(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore_params(tmp_path, _params())
