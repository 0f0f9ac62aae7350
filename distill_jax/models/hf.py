"""Hugging Face Llama / Qwen2 / Qwen3 checkpoints in and out of :class:`~distill_jax.models.transformer.Transformer`.

A Hugging Face model directory holds ``config.json`` and either
``model.safetensors`` or shards named by ``model.safetensors.index.json``.
:func:`load` reads it into a :class:`TransformerConfig` and a params pytree
that ``Transformer(config).apply({"params": params}, tokens)`` runs;
:func:`save` writes a directory that ``transformers`` loads back
(``AutoModelForCausalLM.from_pretrained``). Neither needs ``transformers``
or ``torch``: safetensors files are read by memory-mapping (a 8-byte header
length, a JSON header, then raw little-endian tensors), so with a ``mesh``
each device's shard is read straight from the file into its place and no
process holds a full copy of a tensor it does not need.

What the families add to the shared Llama layout, and where it goes:

============  =====================================================
Llama         ``attention_bias`` (q/k/v/o biases), ``mlp_bias``
Qwen2         q/k/v biases, no output bias
Qwen3         an RMSNorm over each query and key head (``q_norm``,
              ``k_norm``), an explicit ``head_dim``
all           tied or untied embeddings, ``rope_theta``, the
              ``linear``/``llama3``/``yarn`` RoPE scalings, a vocabulary
              padded beyond the tokenizer (the rows are kept)
============  =====================================================

Sliding-window attention, other activations, partial rotary and other RoPE
types are refused with an error that names the setting.

Example::

    config, params = hf.load("Qwen2.5-0.5B")             # float32 on the default device
    config, params = hf.load(path, mesh=mesh, rules="fsdp")  # sharded while it is read
    hf.save("student_hf", config, params, dtype="bfloat16")
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from distill_jax.models import transformer as tf

PyTree = Any

__all__ = ["FAMILIES", "read_config", "config_from_hf", "config_to_hf", "tensor_map", "load", "save",
           "read_safetensors", "write_safetensors", "place_tensors", "check_tensor_names"]

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
           "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
           "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool)}
_CODES = {v: k for k, v in _DTYPES.items()}


# ----------------------------------------------------------------------------- safetensors files


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length).")
        size = int.from_bytes(size_bytes, "little")
        if size > os.path.getsize(path) - 8:
            raise ValueError(f"{path}: the header length {size} runs past the end of the file (truncated?).")
        header = json.loads(f.read(size))
    return header, 8 + size


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file, as read-only memory-mapped numpy arrays (bf16 as ``ml_dtypes.bfloat16``)."""
    path = Path(path)
    header, start = _header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this reader does not know.")
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != dtype.itemsize * math.prod(shape):
            raise ValueError(f"{path}: tensor {name!r} of shape {shape} {info['dtype']} spans {end - begin} bytes.")
        if math.prod(shape) == 0:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
    return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` (numpy, C order) as one safetensors file, atomically (temporary file, then rename)."""
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _CODES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be written to safetensors here.")
        header[name] = {"dtype": _CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays[name] = array
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the reference writer does
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name in sorted(arrays):
            f.write(arrays[name].tobytes())
    os.replace(tmp, path)


def _checkpoint_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Name -> memory-mapped tensor over all the files of a checkpoint (single file or index)."""
    if (directory / INDEX).exists():
        index = json.loads((directory / INDEX).read_text())
        files = sorted(set(index.get("weight_map", {}).values()))
        if not files:
            raise ValueError(f"{directory / INDEX} has no weight_map.")
        tensors: dict[str, np.ndarray] = {}
        for name in files:
            if not (directory / name).exists():
                raise FileNotFoundError(f"{directory / INDEX} names {name}, which is not in {directory}.")
            tensors |= read_safetensors(directory / name)
        return tensors
    if (directory / SINGLE).exists():
        return read_safetensors(directory / SINGLE)
    raise FileNotFoundError(f"{directory} holds neither {SINGLE} nor {INDEX}: not a Hugging Face safetensors checkpoint.")


# ----------------------------------------------------------------------------- configs


def read_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a Hugging Face model directory, as a dict."""
    path = Path(path)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"{path} has no {CONFIG}: point to a Hugging Face model directory.")
    return json.loads((path / CONFIG).read_text())


def _rope(hf: Mapping) -> tuple[float, tuple | None]:
    """``(rope_theta, rope_scaling)`` from the old (``rope_theta`` + ``rope_scaling``) or new (``rope_parameters``) keys."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10_000.0))
    scaling = dict(hf.get("rope_scaling") or {}) or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")} | {"rope_type": kind}
    if kind in ("llama3", "yarn") and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = hf["max_position_embeddings"]
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={scaling['partial_rotary_factor']} is not supported (full rotary only).")
    scaling.pop("partial_rotary_factor", None)
    return float(theta), tuple(sorted(scaling.items()))


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32") -> tf.TransformerConfig:
    """A :class:`TransformerConfig` from a Hugging Face ``config.json`` of the Llama, Qwen2 or Qwen3 family."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        arch = ", ".join(hf.get("architectures") or []) or "none named"
        raise ValueError(
            f"model_type {family!r} (architectures: {arch}) is not supported; supported: {', '.join(FAMILIES)} "
            f"({', '.join(FAMILIES.values())})."
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported: the MLP is SwiGLU (silu).")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (every layer here attends to the whole context).")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor={hf['partial_rotary_factor']} is not supported (full rotary only).")
    theta, scaling = _rope(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    dim = int(hf["hidden_size"])
    return tf.TransformerConfig(
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        depth=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        mlp_dim=int(hf["intermediate_size"]),
        max_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        dtype=dtype,
        head_dim=None if head_dim is None or int(head_dim) * heads == dim else int(head_dim),
        qkv_bias=family == "qwen2" or attention_bias,
        out_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        rope_scaling=scaling,
    )


def is_hf_dir(path) -> bool:
    """Whether ``path`` is a Hugging Face model directory (``config.json`` and safetensors)."""
    path = Path(path)
    return (path / CONFIG).is_file() and ((path / SINGLE).is_file() or (path / INDEX).is_file())


def model_config(config: tf.TransformerConfig) -> dict:
    """``config`` as the training core's ``config.model`` dict (``name="transformer"`` and the fields)."""
    out = {"name": "transformer"}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = [list(pair) for pair in value] if field.name == "rope_scaling" and value else value
    return out


def family_of(config: tf.TransformerConfig) -> str:
    """The Hugging Face family that holds ``config``: qwen3 (q/k norm), qwen2 (q/k/v biases only), else llama."""
    if config.qk_norm:
        if config.qkv_bias != config.out_bias:
            raise ValueError("a Qwen3 model has q/k/v and output biases together (attention_bias) or neither.")
        return "qwen3"
    if config.qkv_bias and not config.out_bias and not config.mlp_bias:
        return "qwen2"
    if config.qkv_bias != config.out_bias:
        raise ValueError("a Llama model has q/k/v and output biases together (attention_bias) or neither.")
    return "llama"


def config_to_hf(config: tf.TransformerConfig, *, dtype: str = "float32", base: Mapping[str, Any] | None = None) -> dict:
    """The ``config.json`` of ``config`` (keys of ``base``, e.g. token ids, are kept unless they describe the model)."""
    family = family_of(config)
    out = dict(base or {})
    for key in ("rope_scaling", "rope_parameters", "rope_theta", "head_dim", "attention_bias", "mlp_bias"):
        out.pop(key, None)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta} | dict(config.rope_scaling or ())
    out |= {
        "architectures": [FAMILIES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "intermediate_size": config.mlp_dim,
        "max_position_embeddings": config.max_len,
        "tie_word_embeddings": config.tie_embeddings,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "head_dim": config.head_size,
        "rope_theta": config.rope_theta,  # older transformers read this key ...
        "rope_parameters": rope,  # ... and 5.x this one
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if config.rope_scaling:
        out["rope_scaling"] = dict(config.rope_scaling)
    if family in ("llama", "qwen3"):
        out["attention_bias"] = config.out_bias
    if family == "llama":
        out["mlp_bias"] = config.mlp_bias
    if family in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    return out


# ----------------------------------------------------------------------------- tensor names


def tensor_map(config: tf.TransformerConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Hugging Face tensor name -> (path in our params, whether the matrix is transposed)."""
    out: dict[str, tuple[tuple[str, ...], bool]] = {"model.embed_tokens.weight": (("embed", "embedding"), False),
                                                     "model.norm.weight": (("final_norm", "scale"), False)}
    if not config.tie_embeddings:
        out["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(config.depth):
        hf, ours = f"model.layers.{i}.", f"block_{i}"
        out[hf + "input_layernorm.weight"] = ((ours, "attn_norm", "scale"), False)
        out[hf + "post_attention_layernorm.weight"] = ((ours, "mlp_norm", "scale"), False)
        for proj, bias in (("q", config.qkv_bias), ("k", config.qkv_bias), ("v", config.qkv_bias), ("o", config.out_bias)):
            out[hf + f"self_attn.{proj}_proj.weight"] = ((ours, "attn", proj, "kernel"), True)
            if bias:
                out[hf + f"self_attn.{proj}_proj.bias"] = ((ours, "attn", proj, "bias"), False)
        if config.qk_norm:
            out[hf + "self_attn.q_norm.weight"] = ((ours, "attn", "q_norm", "scale"), False)
            out[hf + "self_attn.k_norm.weight"] = ((ours, "attn", "k_norm", "scale"), False)
        for proj in ("gate", "up", "down"):
            out[hf + f"mlp.{proj}_proj.weight"] = ((ours, "mlp", proj, "kernel"), True)
            if config.mlp_bias:
                out[hf + f"mlp.{proj}_proj.bias"] = ((ours, "mlp", proj, "bias"), False)
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------- load / save


def load(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules: str | list | None = None,
) -> tuple[tf.TransformerConfig, PyTree]:
    """Reads a Hugging Face Llama / Qwen2 / Qwen3 directory into ``(TransformerConfig, params)``.

    Args:
      path: the model directory (``config.json`` and safetensors).
      dtype: the dtype of the returned params, and the config's compute dtype.
      mesh: place each parameter on this mesh, read shard by shard from the
        memory-mapped file (no full host copy of a tensor per device).
      rules: the partition rules with ``mesh``: a strategy of
        :data:`distill_jax.models.transformer.LOGICAL_AXIS_RULES` (default
        ``"fsdp"``) or ``(regex, PartitionSpec)`` pairs as
        :func:`distill_jax.sharding.param_shardings` takes.

    Raises ``ValueError`` for an unsupported architecture or setting, for a
    tensor the model does not have or one it misses (named), and for a shape
    that does not match the config.
    """
    path = Path(path)
    config = config_from_hf(read_config(path), dtype=dtype)
    tensors = _checkpoint_tensors(path)
    if config.tie_embeddings and "lm_head.weight" in tensors:
        # Some tied checkpoints store the head anyway; it must be the embedding.
        if not np.array_equal(np.asarray(tensors["lm_head.weight"]), np.asarray(tensors["model.embed_tokens.weight"])):
            raise ValueError(f"{path}: tie_word_embeddings is true but lm_head.weight differs from the embedding.")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    # A buffer older exports include.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    return config, place_tensors(tensors, config, dtype=dtype, mesh=mesh, rules=rules,
                                 source=f"{path}", described_by="its config.json")


def check_tensor_names(names, config: tf.TransformerConfig, *, source: str, described_by: str,
                       rename=lambda name: name) -> None:
    """Raises one ``ValueError`` listing the tensors ``config`` needs but ``names`` lacks, and those it does not expect.

    ``rename`` spells a Hugging Face name as the file does (the GGUF loader's names).
    """
    expected = {rename(n) for n in tensor_map(config)}
    names = set(names)
    missing = sorted(expected - names, key=_natural)
    extra = sorted(names - expected, key=_natural)
    if missing or extra:
        raise ValueError(
            f"{source}: the tensors do not match {described_by} (a {family_of(config)} model of depth "
            f"{config.depth}, tied embeddings={config.tie_embeddings}): "
            + "; ".join(part for part in (f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "",
                                          f"not expected {extra[:8]}{' ...' if len(extra) > 8 else ''}" if extra else "") if part)
        )


def place_tensors(
    tensors: Mapping[str, Any],
    config: tf.TransformerConfig,
    *,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules: str | list | None = None,
    source: str = "checkpoint",
    described_by: str = "its config",
) -> PyTree:
    """Params of ``config`` from Hugging Face-named tensors (numpy-like: ``.shape``, ``.ndim``, slicing).

    The one placement path of :func:`load` and :func:`distill_jax.models.gguf.load`: names and
    shapes are checked against ``config`` before anything is copied; with ``mesh``, each device's
    shard is sliced from the source (a memory map, or a tensor dequantized on first access), so no
    full copy per device is made. A source with a ``release()`` method is released once placed.
    """
    check_tensor_names(tensors, config, source=source, described_by=described_by)
    names = tensor_map(config)
    expected = jax.eval_shape(lambda: tf.init_params(config, jax.random.key(0)))
    for name, (ours, transposed) in names.items():
        shape = tuple(_get(expected, ours).shape)
        file_shape = tuple(reversed(shape)) if transposed else shape
        if tuple(tensors[name].shape) != file_shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, the config needs "
                             f"{file_shape}.")
    target = np.dtype(jnp.dtype(dtype))
    shardings = None
    if mesh is not None:
        from distill_jax import sharding as sharding_lib

        rules = rules or "fsdp"
        if isinstance(rules, str):
            rules = tf.partition_rules(config, rules)
        shardings = sharding_lib.param_shardings(expected, rules, mesh)
    params: dict = {}
    for name, (ours, transposed) in names.items():
        source_tensor = tensors[name]
        shape = tuple(_get(expected, ours).shape)

        def read(index=None, source_tensor=source_tensor, transposed=transposed):
            index = tuple(index) if index is not None else (slice(None),) * source_tensor.ndim
            block = source_tensor[tuple(reversed(index))].T if transposed else source_tensor[index]
            return np.ascontiguousarray(block, dtype=target)

        if shardings is None:
            value = jnp.asarray(read())
        else:
            value = jax.make_array_from_callback(shape, _get(shardings, ours), read)
        _set(params, ours, value)
        if hasattr(source_tensor, "release"):
            source_tensor.release()
    return params


def save(
    path: str | os.PathLike,
    config: tf.TransformerConfig,
    params: PyTree,
    *,
    dtype: str = "float32",
    hf_config: Mapping[str, Any] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Writes ``params`` as a Hugging Face directory that ``transformers`` (and :func:`load`) read.

    ``dtype`` is the stored dtype (``"bfloat16"`` halves the files; float32
    params loaded from a bfloat16 checkpoint are written back bit for bit).
    ``hf_config`` supplies the keys the config does not describe (token ids,
    generation settings), e.g. the teacher's ``read_config``. Tensors are
    split into files of at most ``max_shard_bytes`` with an index, as
    ``transformers`` does. Sharded params are fetched one tensor at a time.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    target = np.dtype(jnp.dtype(dtype))
    names = tensor_map(config)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(names, key=_natural):
        ours, transposed = names[name]
        value = np.asarray(jax.device_get(_get(params, ours)))
        value = np.ascontiguousarray(value.T if transposed else value).astype(target)
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    for stale in [SINGLE, INDEX, *(p.name for p in path.glob("model-*-of-*.safetensors"))]:
        (path / stale).unlink(missing_ok=True)
    if len(shards) == 1:
        write_safetensors(path / SINGLE, shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(path / file, shard)
            weight_map |= {name: file for name in shard}
        total = sum(v.nbytes for shard in shards for v in shard.values())
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / CONFIG).write_text(json.dumps(config_to_hf(config, dtype=dtype, base=hf_config), indent=2, sort_keys=True))
    return path


def device_bytes(params: PyTree, device=None) -> int:
    """Bytes of ``params`` held on ``device`` (default: the first device)."""
    device = device or jax.devices()[0]
    return int(sum(shard.data.nbytes for leaf in jax.tree_util.tree_leaves(params)
                   for shard in leaf.addressable_shards if shard.device == device))

