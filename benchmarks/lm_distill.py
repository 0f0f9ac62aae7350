"""Benchmark: tokens/s of one LM distillation step, this library (JAX) against transformers + PyTorch, side by side.

One step = the teacher's forward pass, the student's forward and backward
pass and an AdamW update, on forward KL(teacher || student) per token (the
token-weighted mean). Both sides use the same two random Qwen2-style models
(built with transformers, loaded here with ``distill_jax.models.hf``) and the
same batch. Each variant runs in its own fresh process, alternating JAX and
PyTorch rounds, because this machine is shared and noisy; the table reports
the median of the rounds' medians, and the ratio of JAX to PyTorch.

Variants (``--variants``):
  torch        transformers eager, torch.set_num_threads(cores), no_grad teacher
  jax          the training core's step (make_train_step), full logits
  jax-chunked  the same with chunk_size=128: logits in sequence chunks (remat)

    .venv/bin/python benchmarks/lm_distill.py [--size 50m|27m] [--batch 4] [--seq 512] [--steps 5] [--rounds 2]

Writes results/benchmark_lm_distill.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SIZES = {
    # teacher, student: Qwen2-style (q/k/v biases), the issue's ~50M -> ~15M pair
    "50m": ({"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
             "intermediate_size": 1408, "vocab_size": 32768, "tie_word_embeddings": False},
            {"hidden_size": 320, "num_hidden_layers": 4, "num_attention_heads": 5, "num_key_value_heads": 1,
             "intermediate_size": 864, "vocab_size": 32768, "tie_word_embeddings": True}),
    # the Llama-style 27.4M -> 5.0M pair the issue measured before (vocab 8192, tied)
    "27m": ({"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
             "intermediate_size": 1376, "vocab_size": 8192, "tie_word_embeddings": True},
            {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 688, "vocab_size": 8192, "tie_word_embeddings": True}),
}


def build(directory: Path, size: str) -> None:
    import torch
    import transformers

    for name, fields, seed in (("teacher", SIZES[size][0], 0), ("student", SIZES[size][1], 1)):
        torch.manual_seed(seed)
        config = transformers.Qwen2Config(max_position_embeddings=4096, **fields)
        transformers.Qwen2ForCausalLM(config).save_pretrained(directory / name)


def _batch(vocab: int, batch: int, seq: int):
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.float32)
    return tokens, mask


def run_torch(directory: Path, batch: int, seq: int, steps: int) -> dict:
    import time

    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(directory / "teacher", dtype=torch.float32).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(directory / "student", dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.01)
    tokens, mask = _batch(teacher.config.vocab_size, batch, seq)
    tokens, mask = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask)

    def step():
        with torch.no_grad():
            t = torch.log_softmax(teacher(tokens).logits.float(), -1)
        s = torch.log_softmax(student(tokens).logits.float(), -1)
        kl = (t.exp() * (t - s)).sum(-1)
        loss = (kl * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss)

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "times": times}


def run_jax(directory: Path, batch: int, seq: int, steps: int, chunk_size: int) -> dict:
    import time

    import jax
    import jax.numpy as jnp
    import optax

    from distill_jax import objectives
    from distill_jax.models import hf
    from distill_jax.models import transformer as tf
    from distill_jax.training.steps import create_train_state, make_train_step

    t_config, t_params = hf.load(directory / "teacher")
    s_config, s_params = hf.load(directory / "student")
    tx = optax.adamw(1e-4, weight_decay=0.01)
    spec = {"kd": {"loss": "forward_kl", "weight": 1.0, "temperature": 1.0}}
    objective = (objectives.chunked_from_spec(spec, chunk_size=chunk_size) if chunk_size
                 else objectives.from_spec(spec))
    step = make_train_step(tf.Transformer(s_config).apply, tx, objective, teacher_apply=tf.Transformer(t_config).apply,
                           inputs=("inputs",), chunk_size=chunk_size)
    step = jax.jit(step, donate_argnums=0)
    state = create_train_state({"params": s_params}, tx, jax.random.key(0))
    tokens, mask = _batch(t_config.vocab_size, batch, seq)
    data = {"inputs": jnp.asarray(tokens), "label": jnp.asarray(tokens), "mask": jnp.asarray(mask)}
    teacher = {"params": t_params}
    state, metrics = step(state, teacher, data)  # compile + warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, teacher, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "times": times}


def child(args) -> None:
    directory = Path(args.dir)
    if args.child == "torch":
        out = run_torch(directory, args.batch, args.seq, args.steps)
    else:
        out = run_jax(directory, args.batch, args.seq, args.steps, 128 if args.child == "jax-chunked" else 0)
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="50m", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="torch,jax,jax-chunked")
    parser.add_argument("--child", default="")
    parser.add_argument("--dir", default="")
    args = parser.parse_args()
    if args.child:
        return child(args)
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.size)
        medians: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant in variants:  # alternate, so slow phases of the machine hit every variant
                out = subprocess.run([sys.executable, __file__, "--child", variant, "--dir", tmp, "--batch", str(args.batch),
                                      "--seq", str(args.seq), "--steps", str(args.steps)],
                                     capture_output=True, text=True, cwd=REPO)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode or not line:
                    raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
                medians[variant].append(json.loads(line[0][7:])["step_s"])
                print(variant, medians[variant][-1], flush=True)
    tokens = args.batch * args.seq
    table = {v: {"step_s": statistics.median(m), "tokens_per_s": tokens / statistics.median(m), "rounds": m}
             for v, m in medians.items()}
    if "torch" in table:
        for v in table:
            table[v]["vs_torch"] = table["torch"]["step_s"] / table[v]["step_s"]
    result = {"size": args.size, "teacher": SIZES[args.size][0], "student": SIZES[args.size][1], "batch": args.batch,
              "seq": args.seq, "steps": args.steps, "rounds": args.rounds, "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "variants": table}
    print(json.dumps(result, indent=2))
    (REPO / "results" / f"benchmark_lm_distill_{args.size}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
