"""Benchmark: loading a Hugging Face checkpoint onto 8 (simulated) devices, shard by shard.

Builds a random Qwen2-style model of about 50M parameters with transformers
(dim 512, 8 layers, 8 heads / 2 KV heads, SwiGLU 1408, vocab 32768, untied),
saves it as bfloat16 safetensors, then loads it with ``distill_jax.models.hf``
(float32) replicated on one device and sharded ``fsdp=8`` over 8 CPU devices.
Prints the bytes each layout puts on device 0, the load times and the
process's peak resident memory after each load. Writes results/benchmark_hf_load.json.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/hf_load.py

A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    import torch
    import transformers

    from distill_jax import sharding
    from distill_jax.models import hf

    if len(jax.devices()) < 8:
        raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    config = transformers.Qwen2Config(vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        file_mib = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 2**20
        rss_before = _peak_rss_mib()
        t0 = time.perf_counter()
        mesh = sharding.make_mesh({"fsdp": 8})
        _, placed = hf.load(tmp, mesh=mesh, rules="fsdp")
        jax.block_until_ready(placed)
        sharded_s = time.perf_counter() - t0
        rss_sharded = _peak_rss_mib()
        total = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(placed))
        sharded_dev0 = hf.device_bytes(placed, jax.devices()[0])
        del placed
        t0 = time.perf_counter()
        cfg, full = hf.load(tmp)
        jax.block_until_ready(full)
        full_s = time.perf_counter() - t0
        full_dev0 = hf.device_bytes(full, jax.devices()[0])
        params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(full))
    result = {
        "parameters": params,
        "file_mib_bf16": round(file_mib, 1),
        "float32_mib": round(total / 2**20, 1),
        "device0_mib_replicated": round(full_dev0 / 2**20, 1),
        "device0_mib_fsdp8": round(sharded_dev0 / 2**20, 1),
        "load_s_replicated": round(full_s, 2),
        "load_s_fsdp8": round(sharded_s, 2),
        "peak_rss_mib_before": round(rss_before, 0),
        "peak_rss_mib_after_sharded_load": round(rss_sharded, 0),
        "devices": len(jax.devices()),
        "backend": jax.default_backend(),
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent.parent / "results" / "benchmark_hf_load.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
