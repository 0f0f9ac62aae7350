"""Why models.CNN writes its convolution as im2col matmuls: XLA:CPU's native convolution inside a loop body.

  python benchmarks/conv_in_scan.py [--steps 30] [--batch 100]

The library's training core runs an epoch as one ``lax.scan`` of the update.
On XLA:CPU a native convolution (``lax.conv_general_dilated``, i.e. ``nn.Conv``)
and its gradients run several times slower inside a loop body than in a
jitted step of their own (jax-ml/jax#12868). The same network with the
convolution written as patches times a matrix (``models.vision.conv_same``)
has no such penalty. Times one SGD step of the Fashion-MNIST CNN teacher
(32 and 64 channels, 2x2 max-pool, 256 dense) both ways, as a Python loop of
jitted steps and inside one scan, all in one process. Prints ms per step;
writes nothing.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from distill_jax import models


class NativeConvCNN(nn.Module):
    """models.CNN with nn.Conv and nn.max_pool: the same function and parameters."""

    @nn.compact
    def __call__(self, x, train=False):
        for i, width in enumerate((32, 64)):
            x = nn.relu(nn.Conv(width, (3, 3), name=f"conv_{i}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(256, name="hidden")(x.reshape((x.shape[0], -1))))
        return nn.Dense(10, name="logits")(x)


def time_model(model, steps: int, batch: int) -> dict[str, float]:
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    tx = optax.sgd(0.01, momentum=0.9)
    images = jax.random.uniform(jax.random.PRNGKey(1), (steps * batch, 28, 28, 1))
    labels = jnp.arange(steps * batch, dtype=jnp.int32) % 10

    def step(carry, i):
        params, opt_state = carry
        x = jax.lax.dynamic_slice_in_dim(images, i * batch, batch)
        y = jax.lax.dynamic_slice_in_dim(labels, i * batch, batch)

        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    one_step = jax.jit(step)
    carry = jax.block_until_ready(one_step((params, tx.init(params)), 0)[0])  # compile
    start = time.perf_counter()
    for i in range(steps):
        carry, _ = one_step(carry, i)
    jax.block_until_ready(carry)
    loop_ms = (time.perf_counter() - start) / steps * 1e3

    scanned = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps)))
    jax.block_until_ready(scanned((params, tx.init(params))))  # compile
    start = time.perf_counter()
    jax.block_until_ready(scanned((params, tx.init(params))))
    scan_ms = (time.perf_counter() - start) / steps * 1e3
    return {"python loop of jitted steps": loop_ms, "inside one lax.scan": scan_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    rows = {
        "nn.Conv + nn.max_pool": time_model(NativeConvCNN(), args.steps, args.batch),
        "models.CNN (im2col)": time_model(models.create({"name": "cnn", "features": (32, 64), "dense": 256}),
                                          args.steps, args.batch),
    }
    print(f"ms per SGD step, batch {args.batch}, {args.steps} steps, {jax.devices()[0].device_kind}:")
    print(f"| network | {' | '.join(next(iter(rows.values())))} |")
    print("|---|---:|---:|")
    for name, times in rows.items():
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in times.values()) + " |")


if __name__ == "__main__":
    main()
