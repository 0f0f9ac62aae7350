"""Load time and peak memory of the real teacher (SmolLM2-135M-Instruct, Q4_1 GGUF), each in a fresh process.

    python benchmarks/gguf_load.py [--rounds 2]

Rows: reading the metadata (config only), the tokenizer, the whole model
(dequantized to float32 on the default device), and transformers'
``from_pretrained(gguf_file=)`` for comparison. Peak RSS is the process's
``ru_maxrss`` after the step, minus nothing: it includes Python, JAX (or
torch) and the imports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
step = sys.argv[1]
t0 = time.perf_counter()
from distill_jax.models import pretrained
path = pretrained.resolve("smollm2-135m-instruct")
t1 = time.perf_counter()
if step == "config":
    pretrained.read_config(path)
elif step == "tokenizer":
    pretrained.load_tokenizer(path)
elif step == "model":
    import jax
    config, params = pretrained.load(path)
    jax.block_until_ready(params)
elif step == "transformers":
    import torch, transformers
    transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
t2 = time.perf_counter()
print(json.dumps({"step": step, "import_s": round(t1 - t0, 2), "load_s": round(t2 - t1, 2),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for round_ in range(args.rounds):
        for step in ("config", "tokenizer", "model", "transformers"):
            out = subprocess.run([sys.executable, "-c", CHILD, step], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1]) | {"round": round_}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| step | load s (per round) | peak RSS MiB |\n|---|---|---|")
    for step in ("config", "tokenizer", "model", "transformers"):
        mine = [r for r in rows if r["step"] == step]
        print(f"| {step} | {', '.join(str(r['load_s']) for r in mine)} | {max(r['peak_rss_mib'] for r in mine)} |")


if __name__ == "__main__":
    main()
