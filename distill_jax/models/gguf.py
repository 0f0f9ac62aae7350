"""GGUF files (llama.cpp's format) in and out of :class:`~distill_jax.models.transformer.Transformer`.

A GGUF file holds a model's hyperparameters, its tokenizer and chat template
as metadata (``llama.block_count``, ``tokenizer.ggml.tokens``, ...) and its
tensors, often quantized (Q4_1: 32 weights share a float16 scale and
minimum). :func:`load` reads a file of the ``llama`` (SmolLM2, Llama),
``qwen2`` or ``qwen3`` architecture into ``(TransformerConfig, params)``;
:func:`save` writes a model and its tokenizer as a GGUF file that llama.cpp
based tools, ``transformers`` (``from_pretrained(dir, gguf_file=name)``) and
:func:`load` read back.

What the file format changes, and what this module does about it:

* **Quantized tensors** are dequantized to float32 by the ``gguf`` package
  itself (``gguf.quants.dequantize``, the reference implementation of every
  block format), never by a decoder written here. A type it cannot
  dequantize is refused naming the tensor and the type, before any tensor
  is read. A quantized model is a teacher of its own: its logits are the
  dequantized weights', not those of the float checkpoint it was made from.
* **Llama's query/key rows are permuted** by llama.cpp's converter (it
  rotates interleaved pairs, Hugging Face rotates halves); the permutation
  is undone on load and redone on save. The key projection uses the number
  of *key/value* heads. Qwen2/Qwen3 files are not permuted.
* **Hyperparameters** come from the metadata (``<arch>.rope.freq_base``,
  ``...layer_norm_rms_epsilon``, ``context_length``, head counts, the key
  length); tied embeddings are a file without ``output.weight``.

Tensors are named as in llama.cpp (``blk.3.attn_q.weight``); internally they
are renamed to Hugging Face's names and go through the placement of
:func:`distill_jax.models.hf.place_tensors`, so with a ``mesh`` each device
receives its shard, and a tensor is dequantized once, when first needed.

Example::

    config, params = gguf.load("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = gguf_tokenizer.tokenizer_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    gguf.save("student.gguf", student_config, student_params, tok, dtype="float16")
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from distill_jax.models import hf
from distill_jax.models import transformer as tf

PyTree = Any

__all__ = ["ARCHITECTURES", "GGUFError", "open_reader", "metadata", "config_from_gguf", "load", "save", "hf_token_ids",
           "is_gguf_file"]

ARCHITECTURES = ("llama", "qwen2", "qwen3")
MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A GGUF file this library cannot use, said in one line: what is wrong, and where (the CLI prints it as is)."""

# llama.cpp tensor names <-> Hugging Face names (per block; "{}" is the block index).
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_HF_BLOCK_NAMES = {v: k for k, v in _BLOCK_NAMES.items()}
_HF_GLOBAL_NAMES = {v: k for k, v in _GLOBAL_NAMES.items()}


def to_hf_name(name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name (None: a tensor this model does not have)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    return None


def to_gguf_name(name: str) -> str:
    """The llama.cpp name of a Hugging Face tensor name."""
    if name in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not match or match.group(2) not in _HF_BLOCK_NAMES:
        raise GGUFError(f"no GGUF name for the tensor {name!r}.")
    return f"blk.{match.group(1)}.{_HF_BLOCK_NAMES[match.group(2)]}"


# ----------------------------------------------------------------------------- reading


def is_gguf_file(path) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def open_reader(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` of ``path`` (memory-mapped; cached while the file is unchanged).

    A file that is not GGUF, or is truncated, is one ``ValueError`` line.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file.")
    stat = path.stat()
    return _open_reader(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _open_reader(path: str, mtime_ns: int, size: int):
    del mtime_ns, size  # cache keys: a rewritten file is read anew
    import gguf

    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r}).")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors, ... on a damaged file
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or damaged?): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _value(field) -> Any:
    value = field.contents()
    return value


def metadata(reader, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The metadata of a reader as a dict (the long tokenizer arrays are left out unless named in ``keys``)."""
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if keys is not None and name not in keys:
            continue
        if keys is None and name in skip:
            out[name] = f"<{len(field.data)} values>"
            continue
        out[name] = _value(field)
    return out


def _field(reader, key: str, default=None, *, required: bool = False, source: str = ""):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise GGUFError(f"{source}: the GGUF metadata has no {key!r}.")
        return default
    value = _value(field)
    if isinstance(value, list):
        if len(set(value)) == 1:
            return value[0]
        raise GGUFError(f"{source}: {key} differs between layers ({value[:6]}...); only uniform layers are supported.")
    return value


def config_from_gguf(reader, *, dtype: str = "float32", source: str = "") -> tf.TransformerConfig:
    """A :class:`TransformerConfig` from a GGUF file's metadata and tensor names (no tensor is read)."""
    source = source or "GGUF file"
    arch = _field(reader, "general.architecture", required=True, source=source)
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{source}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}.")

    def key(name, default=None, required=False):
        return _field(reader, f"{arch}.{name}", default, required=required, source=source)

    names = {t.name for t in reader.tensors}
    dim = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_size = int(key("attention.key_length", dim // heads))
    if int(key("attention.value_length", head_size)) != head_size:
        raise GGUFError(f"{source}: attention.value_length differs from key_length; not supported.")
    rope_dims = int(key("rope.dimension_count", head_size))
    if rope_dims != head_size:
        raise GGUFError(f"{source}: rope.dimension_count={rope_dims} < head size {head_size} (partial rotary) "
                         "is not supported.")
    if key("attention.sliding_window") is not None:
        raise GGUFError(f"{source}: sliding-window attention is not supported (every layer attends to the whole "
                         "context).")
    if "rope_freqs.weight" in names:
        raise GGUFError(f"{source}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1's scaling) are not "
                         "supported.")
    scaling = None
    kind = key("rope.scaling.type", "none")
    if kind in ("linear", "yarn"):
        scaling = {"rope_type": kind, "factor": float(key("rope.scaling.factor", required=True))}
        if kind == "yarn":
            scaling["original_max_position_embeddings"] = int(key("rope.scaling.original_context_length",
                                                                  required=True))
    elif kind != "none":
        raise GGUFError(f"{source}: rope.scaling.type={kind!r} is not supported (none, linear, yarn).")
    vocab = key("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = len(tokens.data) if tokens is not None else (int(embed.shape[-1]) if embed is not None else None)
        if vocab is None:
            raise GGUFError(f"{source}: no vocabulary size ({arch}.vocab_size, tokenizer.ggml.tokens or "
                             "token_embd.weight).")
    return tf.TransformerConfig(
        vocab_size=int(vocab),
        dim=dim,
        depth=int(key("block_count", required=True)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        mlp_dim=int(key("feed_forward_length", required=True)),
        max_len=int(key("context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        rope_theta=float(key("rope.freq_base", 10_000.0)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        dtype=dtype,
        head_dim=None if head_size * heads == dim else head_size,
        qkv_bias="blk.0.attn_q.bias" in names,
        out_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        qk_norm=arch == "qwen3",
        rope_scaling=scaling,
    )


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a query/key projection: each head's halves interleaved (HF -> GGUF)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`_permute` (GGUF -> HF)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantizable() -> set:
    import gguf

    types = gguf.GGMLQuantizationType
    # gguf.quants registers one class per block format it can dequantize; float types are views.
    return {types.F32, types.F16, *getattr(gguf.quants, "_type_traits", {})}


class _Dequantized:
    """A GGUF tensor in Hugging Face layout, dequantized to float32 on first access (then cached until released)."""

    def __init__(self, tensor, heads: int | None):
        self.tensor, self.heads = tensor, heads
        self.shape = tuple(int(d) for d in reversed(tensor.shape))
        self.ndim = len(self.shape)
        self._array = None

    def array(self) -> np.ndarray:
        if self._array is None:
            import gguf

            array = gguf.quants.dequantize(self.tensor.data, self.tensor.tensor_type)
            array = np.asarray(array, np.float32).reshape(self.shape)
            self._array = _unpermute(array, self.heads) if self.heads else array
        return self._array

    def __getitem__(self, index):
        return self.array()[index]

    def __array__(self, dtype=None, copy=None):
        return self.array() if dtype is None else self.array().astype(dtype)

    def release(self) -> None:
        self._array = None


def _hf_tensors(reader, config: tf.TransformerConfig, arch: str, source: str) -> dict[str, _Dequantized]:
    """Hugging Face name -> lazily dequantized tensor; names, types and byte sizes checked first."""
    supported = _dequantizable()
    names = [t.name for t in reader.tensors]
    try:
        hf.check_tensor_names(names, config, source=source, described_by="its metadata", rename=to_gguf_name)
        hf.family_of(config)
    except ValueError as e:
        raise GGUFError(str(e)) from None
    out = {}
    for tensor in reader.tensors:
        if tensor.tensor_type not in supported:
            raise GGUFError(f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf "
                             "package cannot dequantize; convert the file to F16, Q8_0 or a K-quant.")
        heads = None
        if arch == "llama" and re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", tensor.name):
            heads = config.num_heads
        elif arch == "llama" and re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", tensor.name):
            heads = config.num_kv_heads  # llama.cpp permutes K by its own (key/value) head count
        out[to_hf_name(tensor.name)] = _Dequantized(tensor, heads)
    return out


def load(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules: str | list | None = None,
) -> tuple[tf.TransformerConfig, PyTree]:
    """Reads a GGUF file of the llama / qwen2 / qwen3 architecture into ``(TransformerConfig, params)``.

    Args:
      path: the ``.gguf`` file.
      dtype: the dtype of the returned params, and the config's compute dtype.
      mesh: place each parameter on this mesh (each device gets its shard).
      rules: the partition rules with ``mesh``, as :func:`distill_jax.models.hf.load` takes them.

    Raises ``ValueError`` (one line each, before any tensor is dequantized)
    for another architecture, a setting the transformer does not have, a
    tensor type the ``gguf`` package cannot dequantize, and missing or
    unexpected tensors (listed).
    """
    path = Path(path)
    reader = open_reader(path)
    config = config_from_gguf(reader, dtype=dtype, source=str(path))
    arch = _field(reader, "general.architecture")
    tensors = _hf_tensors(reader, config, arch, str(path))
    params = hf.place_tensors(tensors, config, dtype=dtype, mesh=mesh, rules=rules, source=str(path),
                              described_by="its metadata")
    return config, params


def hf_token_ids(reader) -> dict[str, int]:
    """The ``bos_token_id``/``eos_token_id``/``pad_token_id`` a Hugging Face ``config.json`` of this model carries."""
    out = {}
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            out[hf_key] = int(value)
    return out


# ----------------------------------------------------------------------------- writing


def save(
    path: str | os.PathLike,
    config: tf.TransformerConfig,
    params: PyTree,
    tokenizer,
    *,
    dtype: str = "float32",
    name: str = "distill-jax model",
) -> Path:
    """Writes ``params`` and ``tokenizer`` as one GGUF file (atomically: a temporary file, then a rename).

    ``dtype`` is ``"float32"`` (every tensor F32: read back bit for bit) or
    ``"float16"`` (matrices F16, norms and biases F32, as llama.cpp's
    converter writes them). The tokenizer must be a byte-level BPE one
    (:func:`distill_jax.data.gguf_tokenizer.gguf_vocab` says why not
    otherwise); an embedding table larger than the tokenizer is padded with
    unused ``[PAD<id>]`` tokens, as llama.cpp's converter does.
    """
    import gguf

    from distill_jax.data import gguf_tokenizer

    if dtype not in ("float32", "float16"):
        raise GGUFError(f"GGUF export writes float32 or float16 tensors, got dtype={dtype!r}.")
    arch = hf.family_of(config)
    if config.rope_scaling and dict(config.rope_scaling).get("rope_type") not in ("linear", "yarn"):
        raise GGUFError(f"rope scaling {dict(config.rope_scaling).get('rope_type')!r} cannot be written to GGUF "
                         "(linear and yarn can).")
    vocab = gguf_tokenizer.gguf_vocab(tokenizer)
    if len(vocab["tokens"]) > config.vocab_size:
        raise GGUFError(f"the tokenizer has {len(vocab['tokens'])} tokens, the model predicts {config.vocab_size}.")
    pad = config.vocab_size - len(vocab["tokens"])
    tokens = list(vocab["tokens"]) + [f"[PAD{len(vocab['tokens']) + i}]" for i in range(pad)]
    token_types = list(vocab["token_types"]) + [int(gguf.TokenType.UNUSED)] * pad

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name)
        writer.add_context_length(config.max_len)
        writer.add_embedding_length(config.dim)
        writer.add_block_count(config.depth)
        writer.add_feed_forward_length(config.mlp_dim)
        writer.add_head_count(config.num_heads)
        writer.add_head_count_kv(config.num_kv_heads)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(config.head_size)
        if config.head_dim is not None:
            writer.add_key_length(config.head_size)
            writer.add_value_length(config.head_size)
        if config.rope_scaling:
            scaling = dict(config.rope_scaling)
            writer.add_rope_scaling_type(gguf.RopeScalingType(scaling["rope_type"]))
            writer.add_rope_scaling_factor(float(scaling["factor"]))
            if "original_max_position_embeddings" in scaling:
                writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_tokenizer_model(vocab["model"])
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(vocab["merges"])
        for role, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                          ("pad_id", writer.add_pad_token_id), ("unk_id", writer.add_unk_token_id)):
            if vocab.get(role) is not None:
                add(int(vocab[role]))
        writer.add_add_bos_token(bool(vocab.get("add_bos", False)))
        writer.add_add_eos_token(bool(vocab.get("add_eos", False)))
        if vocab.get("chat_template"):
            writer.add_chat_template(vocab["chat_template"])
        names = hf.tensor_map(config)
        for hf_name in sorted(names, key=hf._natural):
            ours, transposed = names[hf_name]
            value = np.asarray(jax.device_get(hf._get(params, ours)), np.float32)
            value = np.ascontiguousarray(value.T if transposed else value)
            gguf_name = to_gguf_name(hf_name)
            if arch == "llama" and re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", gguf_name):
                value = _permute(value, config.num_heads)
            elif arch == "llama" and re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", gguf_name):
                value = _permute(value, config.num_kv_heads)
            if dtype == "float16" and value.ndim == 2:
                value = value.astype(np.float16)
            writer.add_tensor(gguf_name, np.ascontiguousarray(value))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def describe(path: str | os.PathLike) -> Mapping[str, Any]:
    """A short summary of a GGUF file: architecture, name, tensor types and counts (for error messages and logs)."""
    reader = open_reader(path)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"architecture": _field(reader, "general.architecture"), "name": _field(reader, "general.name"),
            "tensor_types": types, "tensors": len(reader.tensors)}
