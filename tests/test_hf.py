"""Hugging Face checkpoints in and out (distill_jax.models.hf), against transformers itself.

Tiny random LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM are built
with transformers (CPU torch), saved, and loaded here. Each family is built
with what it adds: Llama untied with llama3 RoPE scaling and attention/MLP
biases, Qwen2 tied with q/k/v biases and a vocabulary padded past the ids
used, Qwen3 with q/k norms, an explicit head_dim and yarn RoPE scaling.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from distill_jax import generation as G  # noqa: E402
from distill_jax.models import hf  # noqa: E402
from distill_jax.models import transformer as tf  # noqa: E402

VOCAB = 131
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
FAMILIES = ("llama", "qwen2", "qwen3")


def _hf_config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(
            **COMMON, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if family == "qwen2":
        return transformers.Qwen2Config(**COMMON, tie_word_embeddings=True)
    return transformers.Qwen3Config(
        **COMMON, head_dim=16, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16})


def _build(family: str, directory: Path, dtype=torch.float32):
    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen3": 2}[family])
    model = getattr(transformers, hf.FAMILIES[family])(_hf_config(family))
    with torch.no_grad():  # random init is near-zero for norms and biases: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = model.to(dtype).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = _build(request.param, directory)
    config, params = hf.load(directory)
    return request.param, directory, model, config, params


def _tokens(rows: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (rows, length))


def _hf_logits(model, tokens, mask=None) -> np.ndarray:
    kwargs = {}
    if mask is not None:  # left padding: positions count real tokens, as in transformers' generate
        m = torch.tensor(mask, dtype=torch.long)
        kwargs = {"attention_mask": m, "position_ids": (m.cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        return model(torch.tensor(tokens), **kwargs).logits.float().numpy()


def test_logits_match_transformers(family):
    name, _, model, config, params = family
    tokens = _tokens(3, 20)
    ours = np.asarray(tf.Transformer(config).apply({"params": params}, jnp.asarray(tokens)))
    delta = np.abs(ours - _hf_logits(model, tokens)).max()
    assert delta <= 1e-4, (name, delta)
    assert {"llama": config.out_bias and config.mlp_bias and config.rope_scaling is not None,
            "qwen2": config.qkv_bias and config.tie_embeddings,
            "qwen3": config.qk_norm and config.head_size == 16 and dict(config.rope_scaling)["rope_type"] == "yarn"}[name]


def test_logits_match_with_left_padding(family):
    name, _, model, config, params = family
    tokens = _tokens(3, 16, seed=1)
    mask = np.ones_like(tokens, bool)
    mask[0, :5] = False
    mask[2, :11] = False
    tokens = np.where(mask, tokens, 0)
    ours = np.asarray(tf.Transformer(config).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask)))
    delta = np.abs(ours - _hf_logits(model, tokens, mask))[mask].max()
    assert delta <= 1e-4, (name, delta)


def test_kv_cache_decode_matches_the_full_forward_of_transformers(family):
    name, _, model, config, params = family
    tokens = _tokens(2, 14, seed=2)
    reference = _hf_logits(model, tokens)
    net = tf.Transformer(config)
    cache = tf.init_cache(config, 2, length=16)
    logits, cache = net.apply({"params": params}, jnp.asarray(tokens[:, :6]), cache=cache)  # prefill
    steps = [np.asarray(logits)]
    for t in range(6, 14):  # then one token at a time
        logits, cache = net.apply({"params": params}, jnp.asarray(tokens[:, t : t + 1]), cache=cache)
        steps.append(np.asarray(logits))
    delta = np.abs(np.concatenate(steps, axis=1) - reference).max()
    assert delta <= 1e-4, (name, delta)


def test_greedy_generation_gives_the_tokens_of_transformers_generate(family):
    name, _, model, config, params = family
    prompts = _tokens(2, 7, seed=3)
    mask = np.ones_like(prompts, bool)
    mask[1, :3] = False
    prompts = np.where(mask, prompts, 0)
    new = 10
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompts), attention_mask=torch.tensor(mask, dtype=torch.long),
                                  max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
                                  min_new_tokens=new)[:, prompts.shape[1]:].numpy()
    out = G.generate(config, params, prompts, jax.random.key(0), G.SamplingConfig(max_new_tokens=new, temperature=0.0),
                     prompt_valid=mask)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, :new], expected, err_msg=name)


def _file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out |= load_file(file)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_then_save_reproduces_every_tensor_bit_for_bit_and_loads_back_in_transformers(family, tmp_path, dtype):
    name, directory, model, _, _ = family
    source = directory
    if dtype == "bfloat16":
        source = tmp_path / "bf16"
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(source)
    config, params = hf.load(source)
    saved = hf.save(tmp_path / "out", config, params, dtype=dtype, hf_config=hf.read_config(source))
    original, ours = _file_tensors(source), _file_tensors(saved)
    if config.tie_embeddings:
        original.pop("lm_head.weight", None)
    assert sorted(ours) == sorted(original)
    for key, value in original.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), (name, key)
    back = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=getattr(torch, dtype)).eval()
    assert type(back).__name__ == hf.FAMILIES[name]
    tokens = _tokens(2, 9, seed=4)
    reference = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.tensor(tokens)).logits.float().numpy(),
                                      reference(torch.tensor(tokens)).logits.float().numpy())


def test_sharded_checkpoints_are_written_and_read_with_an_index(family, tmp_path):
    name, directory, model, config, params = family
    saved = hf.save(tmp_path / "sharded", config, params, max_shard_bytes=40_000)
    index = json.loads((saved / hf.INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (saved / hf.SINGLE).exists()
    again_config, again = hf.load(saved)
    assert again_config == config
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)))
    back = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    tokens = _tokens(2, 5, seed=5)
    np.testing.assert_array_equal(_hf_logits(back, tokens), _hf_logits(model, tokens))


def test_a_vocabulary_padded_beyond_the_tokenizer_keeps_its_rows(family):
    _, directory, _, config, params = family
    embedding = hf.read_safetensors(directory / hf.SINGLE)["model.embed_tokens.weight"]
    assert config.vocab_size == VOCAB and params["embed"]["embedding"].shape == (VOCAB, 32)
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), np.asarray(embedding))


# ------------------------------------------------------------------ clear errors


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    config = json.loads((src / hf.CONFIG).read_text()) | changes
    (dst / hf.CONFIG).write_text(json.dumps(config))
    return dst


def test_unsupported_architectures_and_settings_are_named(tmp_path):
    directory = tmp_path / "qwen2"
    _build("qwen2", directory)
    cases = {
        "gpt2": ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, r"model_type 'gpt2' \(architectures: GPT2LMHeadModel\) is not supported"),
        "gelu": ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        "window": ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
        "dynamic": ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}, "rope_scaling type 'dynamic' is not supported"),
        "depth": ({"num_hidden_layers": 3}, r"missing \['model.layers.2.input_layernorm.weight'"),
        "untied": ({"tie_word_embeddings": False}, r"missing \['lm_head.weight'\]"),
        "shape": ({"intermediate_size": 40}, r"tensor model.layers.0.mlp.gate_proj.weight has shape \(48, 32\), the config needs \(40, 32\)"),
    }
    for label, (changes, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            hf.load(_edit_config(directory, tmp_path / label, **changes))
    with pytest.raises(ValueError, match=r"not expected \['model.layers.0.self_attn.k_proj.bias', 'model.layers.0.self_attn.q_proj.bias'"):
        hf.load(_edit_config(directory, tmp_path / "llama", model_type="llama", architectures=["LlamaForCausalLM"]))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hf.load(tmp_path / "nothing_here")


# ------------------------------------------------------------------ loading sharded over 8 devices

_MESH_SCRIPT = r"""
import json, sys
import jax, numpy as np
from distill_jax import sharding
from distill_jax.models import hf
directory = sys.argv[1]
config, full = hf.load(directory)
mesh = sharding.make_mesh({"fsdp": 8})
config2, placed = hf.load(directory, mesh=mesh, rules="fsdp")
same = all(np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(placed)))
split = sum(1 for leaf in jax.tree_util.tree_leaves(placed) if not leaf.sharding.is_fully_replicated)
total = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(full))
print(json.dumps({"devices": len(jax.devices()), "same": same, "config_same": config2 == config, "split": split,
                  "leaves": len(jax.tree_util.tree_leaves(full)), "total_bytes": int(total),
                  "device0_bytes": hf.device_bytes(placed, jax.devices()[0])}))
"""


def test_loading_onto_8_devices_places_each_shard_and_device_0_holds_its_part(tmp_path):
    directory = tmp_path / "llama"
    _build("llama", directory)
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
                                + ["--xla_force_host_platform_device_count=8"])
    out = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(directory)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print("8-device load:", report)
    assert report["devices"] == 8 and report["same"] and report["config_same"]
    # Every matrix is split 8 ways along its model dimension; the norms (1-D) are replicated.
    assert report["split"] >= 2 + 2 * 7
    assert report["device0_bytes"] < report["total_bytes"] / 4, report
