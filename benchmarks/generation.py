"""Benchmark: generated tokens/s of KV-cache batched sampling with the reasoning study's model sizes.

For the teacher and student sizes of ``experiments/reasoning_r1.py`` (full
profile) and a few batch sizes, times temperature-1 sampling of
``--new-tokens`` tokens after a ``--prompt-len`` prompt (no early stop; the
best of 3 runs after a compile run) and writes
``results/benchmark_generation.json``.

    .venv/bin/python benchmarks/generation.py [--batch-sizes 1,32,256]

A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

import reasoning_r1  # noqa: E402

from distill_jax import generation  # noqa: E402
from distill_jax.proj.reasoning import task as reasoning  # noqa: E402
from distill_jax.models.transformer import TransformerConfig, init_params, num_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,32,256")
    parser.add_argument("--prompt-len", type=int, default=13)
    parser.add_argument("--new-tokens", type=int, default=53)
    parser.add_argument("--out", default=str(REPO / "results" / "benchmark_generation.json"))
    args = parser.parse_args()
    config = reasoning_r1.get_config("full")
    rows = []
    for role in ("teacher", "student"):
        model = TransformerConfig.from_mapping(
            dict(config[role].model) | {"vocab_size": reasoning.TOKENIZER.vocab_size, "max_len": args.prompt_len + args.new_tokens}
        )
        params = init_params(model, jax.random.key(0))
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            result = generation.benchmark(
                model, params, batch_size=batch_size, prompt_len=args.prompt_len, max_new_tokens=args.new_tokens
            )
            result |= {"model": role, "params": num_params(params)}
            rows.append(result)
            print(f"{role:8s} ({result['params']:,} params) batch {batch_size:4d}: {result['tokens_per_s']:10,.0f} tokens/s", flush=True)
    out = {"machine": platform.processor() or platform.machine(), "devices": [str(d) for d in jax.devices()], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
