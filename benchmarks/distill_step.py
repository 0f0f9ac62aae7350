"""Benchmark: the machine's f32 matmul peak and the distillation step's throughput.

Prints, for teacher 784-1200-1200-10 -> student 784-800-800-10 and batch sizes
16, 128 and 1024, with the teacher in the loop and with cached teacher logits:
samples/s, achieved GFLOP/s and the fraction of the measured matmul peak.
Writes the same figures to results/benchmark_distill_step.json.

    .venv/bin/python benchmarks/distill_step.py [--steps 200]

A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from distill_jax import models, objectives, training


def matmul_peak(n: int = 2048, repeats: int = 20) -> float:
    """GFLOP/s of a jitted n x n float32 matmul (best of ``repeats``)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def mlp_forward_flops(widths: list[int]) -> int:
    return sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))


def step_flops(cached: bool) -> int:
    """FLOPs per example: student forward + backward (~2x forward), plus the teacher forward if in the loop."""
    student = mlp_forward_flops([784, 800, 800, 10])
    teacher = mlp_forward_flops([784, 1200, 1200, 10])
    return 3 * student + (0 if cached else teacher)


def throughput(batch_size: int, cached: bool, steps: int) -> float:
    teacher = models.create({"name": "mlp", "hidden": (1200, 1200)})
    student = models.create({"name": "mlp", "hidden": (800, 800)})
    teacher_params = models.init_params(teacher, jax.random.PRNGKey(0))
    student_params = models.init_params(student, jax.random.PRNGKey(1))
    n = batch_size * steps
    data = {
        "image": jax.random.uniform(jax.random.PRNGKey(2), (n, 28, 28, 1)),
        "label": jax.random.randint(jax.random.PRNGKey(3), (n,), 0, 10),
    }
    if cached:
        data["teacher_logits"] = training.make_predict(teacher.apply)(teacher_params, data["image"])
    tx = training.make_optimizer({"name": "sgd", "learning_rate": 0.01, "momentum": 0.9}, steps, 1)
    step = training.make_train_step(
        student.apply, tx, objectives.hinton(temperature=20.0), teacher_apply=teacher.apply
    )
    epoch = training.make_train_epoch(step, batch_size=batch_size)
    state = training.create_train_state(student_params, tx, jax.random.PRNGKey(4))
    state, metrics = epoch(state, teacher_params, data, jnp.asarray(0))  # compile + warm up
    jax.block_until_ready(metrics)
    best = float("inf")
    for i in range(3):
        t0 = time.perf_counter()
        state, metrics = epoch(state, teacher_params, data, jnp.asarray(i + 1))
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per timed scan (default: ~32k samples)")
    parser.add_argument("--out", default="results/benchmark_distill_step.json")
    args = parser.parse_args()

    peak = matmul_peak()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}   f32 matmul peak (2048^3): {peak:.1f} GFLOP/s")
    print(f"{'batch':>6} {'teacher':>8} {'samples/s':>11} {'GFLOP/s':>9} {'of peak':>8}")
    rows = []
    for batch_size in (16, 128, 1024):
        steps = args.steps or max(8, 32768 // batch_size)
        for cached in (False, True):
            rate = throughput(batch_size, cached, steps)
            gflops = rate * step_flops(cached) / 1e9
            row = {"batch_size": batch_size, "teacher": "cached" if cached else "in loop",
                   "samples_per_s": round(rate, 1), "gflop_per_s": round(gflops, 2),
                   "fraction_of_peak": round(gflops / peak, 3)}
            rows.append(row)
            print(f"{batch_size:>6} {row['teacher']:>8} {rate:>11.0f} {gflops:>9.1f} {gflops / peak:>8.1%}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "devices": jax.device_count(),
                               "backend": jax.default_backend(), "matmul_peak_gflop_per_s": round(peak, 1),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
