"""Benchmark: memory and time of a token-distillation step, chunked (distill_jax.chunked) vs full logits.

For a fixed batch and sequence length (default B=4, T=512), a student of
width Ds=256 and a teacher of width Dt=512, and vocabularies of 1024, 8192,
32768 and 151,936 (Qwen's), it compiles ``jax.value_and_grad`` of the
forward-KL token loss w.r.t. the student's hidden states and head, twice:

* ``unchunked``: logits ``hidden @ head`` of both models as ``[B, T, V]``
  arrays, then :func:`distill_jax.losses.forward_kl` and the masked mean;
* ``chunked``: :func:`distill_jax.chunked.chunked_token_loss` (each of
  ``--chunk-sizes`` positions at a time, remat), ``total / count``.

It prints XLA's temp buffer size of each compiled step (``memory_analysis``,
the memory the step needs beyond its inputs and outputs), the size of one
``[B, T, V]`` float32 array for scale, and the median wall time of
``--reps`` steps after a warm-up. An unchunked step whose temp buffers
exceed ``--max-unchunked-gib`` is compiled (its memory is reported) but not
run. Writes ``results/benchmark_chunked_kd_memory.json`` and a markdown table
next to it.

    .venv/bin/python benchmarks/chunked_kd_memory.py [--reps 3] [--chunk-sizes 128,32]

A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import chunked, losses

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def unchunked_fn(hs, ws, ht, wt, mask):
    per_token = losses.forward_kl(hs @ ws, jax.lax.stop_gradient(ht @ wt))
    return jnp.sum(per_token * mask) / jnp.sum(mask)


def chunked_fn(chunk_size: int):
    def fn(hs, ws, ht, wt, mask):
        total, count = chunked.chunked_token_loss(hs, ws, ht, wt, mask, chunk_size=chunk_size)
        return total / count

    return fn


def inputs(b: int, t: int, ds: int, dt: int, vocab: int):
    k = jax.random.split(jax.random.PRNGKey(vocab), 4)
    hs = jax.random.normal(k[0], (b, t, ds), jnp.float32)
    ws = jax.random.normal(k[1], (ds, vocab), jnp.float32) / np.sqrt(ds)
    ht = jax.random.normal(k[2], (b, t, dt), jnp.float32)
    wt = jax.random.normal(k[3], (dt, vocab), jnp.float32) * 2 / np.sqrt(dt)
    mask = jnp.ones((b, t), jnp.float32).at[:, t - t // 8 :].set(0.0)  # some padding
    return hs, ws, ht, wt, mask


def measure(fn, args, reps: int, max_temp_gib: float | None) -> dict:
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    temp = int(stats.temp_size_in_bytes)
    row = {"temp_mib": temp / MIB, "argument_mib": stats.argument_size_in_bytes / MIB,
           "output_mib": stats.output_size_in_bytes / MIB, "compile_s": compile_s}
    if max_temp_gib is not None and temp > max_temp_gib * 2**30:
        row["skipped"] = f"temp buffers {temp / 2**30:.2f} GiB > --max-unchunked-gib {max_temp_gib:g} (RAM)"
        return row
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    row["median_s"] = statistics.median(times)
    row["times_s"] = times
    return row


def _time(row: dict) -> str:
    return f"{row['median_s']:.3f}" if "median_s" in row else "skipped"


def markdown(record: dict) -> str:
    c = record["config"]
    sizes = c["chunk_sizes"]
    head = "| vocab | one [B,T,V] f32 (MiB) | unchunked temp (MiB) | unchunked step (s) |"
    head += "".join(f" chunk {cs} temp (MiB) | chunk {cs} step (s) |" for cs in sizes)
    lines = [
        f"B={c['batch_size']}, T={c['seq_len']}, Ds={c['student_dim']}, Dt={c['teacher_dim']}, forward KL, "
        f"jit(value_and_grad) w.r.t. student hidden + head; temp = XLA temp buffers of the compiled step; "
        f"median of {c['reps']} steps after a warm-up; {record['machine']}, {record['cpus']} CPUs, "
        f"jax {record['jax']} ({record['backend']}).",
        "",
        head,
        "|" + "---:|" * (4 + 2 * len(sizes)),
    ]
    for r in record["rows"]:
        u = r["unchunked"]
        line = f"| {r['vocab']} | {r['logits_mib']:.0f} | {u['temp_mib']:.1f} | {_time(u)} |"
        for cs in sizes:
            ch = r["chunked"][str(cs)]
            line += f" {ch['temp_mib']:.1f} | {_time(ch)} |"
        lines.append(line)
    skipped = [f"vocab {r['vocab']}: {r['unchunked']['skipped']}" for r in record["rows"] if "skipped" in r["unchunked"]]
    if skipped:
        lines += ["", "Unchunked steps not run: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--student-dim", type=int, default=256)
    parser.add_argument("--teacher-dim", type=int, default=512)
    parser.add_argument("--vocabs", default="1024,8192,32768,151936")
    parser.add_argument("--chunk-sizes", default=f"{chunked.DEFAULT_CHUNK_SIZE},32")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-unchunked-gib", type=float, default=12.0,
                        help="compile but do not run an unchunked step whose temp buffers exceed this")
    parser.add_argument("--out", default=str(REPO / "results" / "benchmark_chunked_kd_memory.json"))
    args = parser.parse_args()
    b, t, ds, dt = args.batch_size, args.seq_len, args.student_dim, args.teacher_dim
    sizes = [int(cs) for cs in args.chunk_sizes.split(",")]
    rows = []
    header = f"{'vocab':>7s} {'[B,T,V] MiB':>12s} {'full temp MiB':>14s} {'full s':>8s}"
    header += "".join(f" {f'c{cs} temp MiB':>14s} {f'c{cs} s':>8s}" for cs in sizes)
    print(header, flush=True)
    for vocab in (int(v) for v in args.vocabs.split(",")):
        data = inputs(b, t, ds, dt, vocab)
        row = {"vocab": vocab, "logits_mib": b * t * vocab * 4 / MIB}
        row["unchunked"] = measure(unchunked_fn, data, args.reps, args.max_unchunked_gib)
        row["chunked"] = {str(cs): measure(chunked_fn(cs), data, args.reps, None) for cs in sizes}
        rows.append(row)
        u = row["unchunked"]
        line = f"{vocab:7d} {row['logits_mib']:12.0f} {u['temp_mib']:14.1f} {_time(u):>8s}"
        line += "".join(f" {row['chunked'][str(cs)]['temp_mib']:14.1f} {_time(row['chunked'][str(cs)]):>8s}" for cs in sizes)
        print(line, flush=True)
        if "skipped" in u:
            print(f"        unchunked not run: {u['skipped']}", flush=True)
        del data
    record = {
        "machine": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
        "jax": jax.__version__, "backend": jax.default_backend(),
        "config": {"batch_size": b, "seq_len": t, "student_dim": ds, "teacher_dim": dt,
                   "chunk_sizes": sizes, "reps": args.reps, "loss": "forward_kl"},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    out.with_suffix(".md").write_text(markdown(record))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
