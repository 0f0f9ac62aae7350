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


def test_restore_targets_keep_python_scalars_and_place_arrays():
    # Python scalars (no shape/dtype) become orbax's own targets; arrays get a
    # sharding: the one given, else their own, else this process's first device.
    tree = {"count": 3, "x": jnp.zeros((2, 3))}
    targets = ckpt._abstract(tree)
    assert targets["count"] == ocp_target(3)
    assert isinstance(targets["x"], jax.ShapeDtypeStruct)
    assert targets["x"].shape == (2, 3) and targets["x"].dtype == jnp.float32
    assert targets["x"].sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("data",))
    named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    given = ckpt._abstract({"x": jax.ShapeDtypeStruct((2, 3), jnp.float32)}, {"x": named})
    assert given["x"].sharding == named
    own = ckpt._abstract({"x": jax.device_put(jnp.zeros((2, 3)), named)})
    assert own["x"].sharding == named


def ocp_target(value):
    import orbax.checkpoint as ocp

    return ocp.utils.to_shape_dtype_struct(value)


RESTORE_ON_TWO_DEVICES = r"""
import sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from distill_jax.training import checkpoint as ckpt
directory = sys.argv[1]
params = {"w": jnp.arange(8.0).reshape(4, 2)}
with ckpt.manager(directory) as mngr:
    ckpt.save(mngr, 1, params=params, opt_state={"count": jnp.zeros((), jnp.int32)}, step=jnp.int32(0), rng=jax.random.PRNGKey(0), meta={"config": {}})
like = jax.eval_shape(lambda: params)
plain = ckpt.restore_params(directory, like)
assert plain["w"].devices() == {jax.local_devices()[0]}, plain["w"].devices()
mesh = Mesh(np.array(jax.devices()), ("data",))
split = ckpt.restore_params(directory, like, shardings={"w": NamedSharding(mesh, P("data"))})
assert split["w"].sharding.spec == P("data") and len(split["w"].devices()) == 2
assert np.array_equal(np.asarray(split["w"]), np.asarray(params["w"]))
print("ok")
"""


def test_restores_land_on_the_first_device_or_the_given_sharding(tmp_path):
    # Two simulated devices in a child process (XLA reads the flag at start).
    import os
    import subprocess
    import sys

    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", RESTORE_ON_TWO_DEVICES, str(tmp_path / "ckpt")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
