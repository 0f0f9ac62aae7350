"""Benchmark: one LM train step of the reasoning study's student, default threading vs one pinned core.

Why the study runs its seeds as single-core worker processes: on a small
model, XLA's CPU thread pool spends much of each step synchronizing, and glibc
returns freed blocks to the OS and maps new ones every step. This times
``--steps`` SFT steps (after a compile step) of the full profile's student at
``--batch-size`` in two fresh processes, one with the defaults and one pinned
to a single core with malloc told to keep freed memory (what
``reasoning_study`` does for its workers). Prints wall, user and system CPU
seconds and writes ``results/benchmark_lm_step.json``.

    .venv/bin/python benchmarks/lm_step.py [--steps 30] [--batch-size 64]

A benchmark, not a test: nothing is asserted. Linux only (sched_setaffinity).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIG = str(2**31 - 1)


def measure(steps: int, batch_size: int) -> dict:
    """Runs in the child: times the steps, returns wall/user/system seconds."""
    import time

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(REPO / "experiments"))
    import reasoning_r1

    from distill_jax.proj.reasoning import study as reasoning_study
    from distill_jax.proj.reasoning import sequence as seq

    config = reasoning_r1.get_config("full")
    task = reasoning_study._Task(config)
    data = task.arrays(task.splits["train"][:batch_size], "trace")
    model = reasoning_study._model(config.student.model, task)
    optimizer = reasoning_study._optimizer(config.student)
    step = seq.make_lm_train_step(model, seq.LossSpec("sft"), optimizer, ())
    state = seq.init_train_state(model, optimizer, 0)
    batch = {name: jnp.asarray(value) for name, value in data.items()}
    state, metrics = step(state, batch, ())
    jax.block_until_ready(metrics)
    t0, c0 = time.perf_counter(), os.times()
    for _ in range(steps):
        state, metrics = step(state, batch, ())
    jax.block_until_ready(metrics)
    c1 = os.times()
    return {"wall_s": time.perf_counter() - t0, "user_s": c1.user - c0.user, "system_s": c1.system - c0.system}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", choices=("default", "pinned"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "results" / "benchmark_lm_step.json"))
    args = parser.parse_args()
    if args.child:
        if args.child == "pinned":
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        print(json.dumps(measure(args.steps, args.batch_size)))
        return
    rows = []
    for setup in ("default", "pinned"):
        env = dict(os.environ)
        if setup == "pinned":  # glibc reads these at process start, hence a fresh process
            env |= {"MALLOC_MMAP_THRESHOLD_": BIG, "MALLOC_TRIM_THRESHOLD_": BIG}
        cmd = [sys.executable, __file__, f"--child={setup}", f"--steps={args.steps}", f"--batch-size={args.batch_size}"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1]) | {"setup": setup}
        rows.append(result)
        print(f"{setup:8s}: {args.steps} steps in {result['wall_s']:.2f} s wall, "
              f"{result['user_s']:.2f} s user, {result['system_s']:.2f} s system", flush=True)
    record = {"machine": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
              "steps": args.steps, "batch_size": args.batch_size, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
