"""An on-disk cache of a teacher's top-k log-probabilities per token, written in resumable shards.

Distilling from a large teacher costs one teacher forward per token per
epoch; a cache pays it once. Per token it keeps the teacher's ``k`` largest
log-probabilities at the distillation temperature, their token ids, and the
log of the mass outside them (what :func:`distill_jax.losses.top_k_kd` with
``tail="bucket"`` needs), i.e. ``k * (value bytes + 4) + 4`` bytes.

Layout of a cache directory::

    cache.json                 what it holds: k, temperature, vocabulary size,
                               rows, sequence length, the teacher and tokenizer
                               fingerprints, and the shards finished so far
    values-00000.npy           [rows, length, k] log-probs (float32 or float16)
    indices-00000.npy          [rows, length, k] int32 token ids
    tail-00000.npy             [rows, length] float32 log(1 - sum_k p)
    ...

Each shard is written to a temporary name and renamed, then recorded in
``cache.json`` (also replaced atomically), so a writer killed at any point
resumes at the first shard it had not finished (:func:`write`) and a reader
never sees half a shard. Shards are plain ``.npy`` files, read memory-mapped:
:meth:`TeacherCache.rows` gathers any rows (the training order) without
loading the rest.

A cache records the teacher (checkpoint fingerprint) and tokenizer it was
made with; :meth:`TeacherCache.check` refuses a student with another
vocabulary or tokenizer, and :func:`write` refuses to resume a cache made by
another teacher or with other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import losses

__all__ = ["write", "open_cache", "TeacherCache", "fingerprint_files", "CacheMismatchError"]

MANIFEST = "cache.json"
FORMAT = 1


class CacheMismatchError(ValueError):
    """The cache was made by another teacher, tokenizer or setting than the one asking for it."""


def fingerprint_files(paths) -> str:
    """SHA-256 over the bytes of ``paths`` (files, or every file under a directory), in sorted order."""
    files: list[Path] = []
    for path in map(Path, paths if isinstance(paths, (list, tuple)) else [paths]):
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    _write_atomic(path, write)


def _save_manifest(directory: Path, manifest: dict) -> None:
    _write_atomic(directory / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True)))


def _shard_name(kind: str, i: int) -> str:
    return f"{kind}-{i:05d}.npy"


def write(
    directory: str | os.PathLike,
    teacher_logits: Callable[[np.ndarray, np.ndarray], jax.Array],
    inputs: np.ndarray,
    valid: np.ndarray,
    *,
    k: int,
    temperature: float = 1.0,
    vocab_size: int,
    teacher: str,
    tokenizer: str,
    shard_rows: int = 1024,
    batch_size: int = 32,
    dtype: str = "float32",
    stop_after_shards: int | None = None,
) -> "TeacherCache":
    """Computes and writes (or resumes writing) the top-k cache of ``teacher_logits`` over ``inputs``.

    Args:
      directory: the cache directory (created).
      teacher_logits: ``f(inputs [B, L], valid [B, L]) -> logits [B, L, V]``,
        e.g. ``lambda x, v: model.apply({"params": p}, x, v)`` (jit it).
      inputs, valid: the token rows, as the training split holds them.
      k, temperature: what :func:`distill_jax.losses.top_k_log_probs` keeps.
      vocab_size: the teacher's vocabulary (checked against the logits).
      teacher, tokenizer: fingerprints (e.g. :func:`fingerprint_files` of the
        checkpoint, and the tokenizer's), recorded and checked on resume.
      shard_rows: rows per shard file (the unit of resumption).
      dtype: ``"float32"`` or ``"float16"`` for the stored log-probs.
      stop_after_shards: stop after writing this many new shards (tests).
    """
    directory = Path(directory)
    inputs, valid = np.asarray(inputs, np.int32), np.asarray(valid, bool)
    if inputs.ndim != 2 or valid.shape != inputs.shape:
        raise ValueError(f"inputs and valid must be [rows, length] of one shape, got {inputs.shape} and {valid.shape}.")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}.")
    if k < 1 or shard_rows < 1 or batch_size < 1:
        raise ValueError(f"k, shard_rows and batch_size must be >= 1, got {k}, {shard_rows}, {batch_size}.")
    settings = {
        "format": FORMAT, "k": int(k), "temperature": float(temperature), "vocab_size": int(vocab_size),
        "rows": int(inputs.shape[0]), "length": int(inputs.shape[1]), "shard_rows": int(shard_rows),
        "dtype": dtype, "teacher": teacher, "tokenizer": tokenizer,
        "inputs_sha256": hashlib.sha256(inputs.tobytes() + valid.tobytes()).hexdigest(),
    }
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / MANIFEST).exists():
        manifest = json.loads((directory / MANIFEST).read_text())
        differences = sorted(key for key in settings if manifest.get(key) != settings[key])
        if differences:
            details = ", ".join(f"{key}: cache {manifest.get(key)!r} vs now {settings[key]!r}" for key in differences)
            raise CacheMismatchError(
                f"{directory} holds a cache made with other settings ({details}); it is not resumed. "
                "Use another directory, or delete this one to rebuild it."
            )
    else:
        manifest = dict(settings, shards_done=[])
        _save_manifest(directory, manifest)
    num_shards = -(-settings["rows"] // shard_rows)
    done = set(manifest["shards_done"])
    store = np.dtype(dtype)

    shape = jax.eval_shape(teacher_logits, jax.ShapeDtypeStruct((batch_size, settings["length"]), jnp.int32),
                           jax.ShapeDtypeStruct((batch_size, settings["length"]), jnp.bool_)).shape
    if shape[-1] != vocab_size:
        raise ValueError(f"the teacher's logits have {shape[-1]} entries per token, but vocab_size={vocab_size} was given.")

    @jax.jit
    def top_k(x, v):
        values, ids = losses.top_k_log_probs(teacher_logits(x, v), k, temperature)
        tail = jnp.log1p(-jnp.minimum(jnp.sum(jnp.exp(values), axis=-1), 1.0))
        return values, ids, tail

    written = 0
    for shard in range(num_shards):
        if shard in done:
            continue
        if stop_after_shards is not None and written >= stop_after_shards:
            break
        lo, hi = shard * shard_rows, min((shard + 1) * shard_rows, settings["rows"])
        parts = []
        for start in range(lo, hi, batch_size):
            stop = min(start + batch_size, hi)
            x, v = inputs[start:stop], valid[start:stop]
            pad = batch_size - (stop - start)  # one compiled shape: pad the last batch with copies of row 0
            if pad:
                x, v = np.concatenate([x, np.repeat(x[:1], pad, 0)]), np.concatenate([v, np.repeat(v[:1], pad, 0)])
            values, ids, tail = top_k(x, v)
            parts.append(jax.device_get((values[: stop - start], ids[: stop - start], tail[: stop - start])))
        values = np.concatenate([p[0] for p in parts]).astype(store)
        ids = np.concatenate([p[1] for p in parts]).astype(np.int32)
        tail = np.concatenate([p[2] for p in parts]).astype(np.float32)
        for kind, array in (("values", values), ("indices", ids), ("tail", tail)):
            _save_npy(directory / _shard_name(kind, shard), array)
        manifest["shards_done"] = sorted(done | {shard})
        done.add(shard)
        _save_manifest(directory, manifest)
        written += 1
    return open_cache(directory)


@dataclass(frozen=True)
class TeacherCache:
    """A (possibly partly written) cache, read memory-mapped. See the module docstring."""

    directory: Path
    meta: Mapping[str, Any]

    @property
    def complete(self) -> bool:
        return len(self.meta["shards_done"]) == -(-self.meta["rows"] // self.meta["shard_rows"])

    @property
    def bytes_per_token(self) -> int:
        k = self.meta["k"]
        return k * (np.dtype(self.meta["dtype"]).itemsize + 4) + 4

    def check(self, *, vocab_size: int, tokenizer: str | None = None, k: int | None = None,
              temperature: float | None = None, inputs=None, valid=None) -> None:
        """Refuses a student this cache does not fit: another vocabulary, tokenizer, k, T, or other token rows."""
        problems = []
        if inputs is not None:
            inputs, valid = np.asarray(inputs, np.int32), np.asarray(valid, bool)
            if hashlib.sha256(inputs.tobytes() + valid.tobytes()).hexdigest() != self.meta["inputs_sha256"]:
                problems.append("it was made from other token rows than this training split (another data file, "
                                "tokenizer or max_len)")
        if vocab_size != self.meta["vocab_size"]:
            problems.append(f"its teacher's vocabulary has {self.meta['vocab_size']} entries, the student's {vocab_size}")
        if tokenizer is not None and tokenizer != self.meta["tokenizer"]:
            problems.append(f"it was made with tokenizer {self.meta['tokenizer'][:16]}..., the student uses {tokenizer[:16]}...")
        if k is not None and k != self.meta["k"]:
            problems.append(f"it holds the top {self.meta['k']}, the objective wants {k}")
        if temperature is not None and float(temperature) != self.meta["temperature"]:
            problems.append(f"it was made at temperature {self.meta['temperature']}, the objective uses {temperature}")
        if not self.complete:
            problems.append(f"only shards {self.meta['shards_done']} of {-(-self.meta['rows'] // self.meta['shard_rows'])} "
                            "are written (resume the writer first)")
        if problems:
            raise CacheMismatchError(f"the teacher cache {self.directory} does not fit: " + "; ".join(problems) + ".")

    def _shard(self, kind: str, i: int) -> np.ndarray:
        return np.load(self.directory / _shard_name(kind, i), mmap_mode="r")

    def rows(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(values [n, L, k], token ids [n, L, k], log tail mass [n, L])`` of the given rows, in their order."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.meta["rows"]):
            raise IndexError(f"row ids must lie in [0, {self.meta['rows']}), got [{indices.min()}, {indices.max()}].")
        per = self.meta["shard_rows"]
        shards, offsets = np.divmod(indices, per)
        missing = sorted(set(shards.tolist()) - set(self.meta["shards_done"]))
        if missing:
            raise CacheMismatchError(f"{self.directory}: shards {missing} are not written yet; resume the writer.")
        length, k = self.meta["length"], self.meta["k"]
        values = np.empty((indices.size, length, k), np.float32)
        ids = np.empty((indices.size, length, k), np.int32)
        tail = np.empty((indices.size, length), np.float32)
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            rows = offsets[where]
            values[where] = self._shard("values", int(shard))[rows]
            ids[where] = self._shard("indices", int(shard))[rows]
            tail[where] = self._shard("tail", int(shard))[rows]
        return values, ids, tail

    def all_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.rows(np.arange(self.meta["rows"]))


def open_cache(directory: str | os.PathLike) -> TeacherCache:
    """Opens a cache directory written by :func:`write`."""
    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a teacher cache (write one with teacher_cache.write).")
    meta = json.loads((directory / MANIFEST).read_text())
    if meta.get("format") != FORMAT:
        raise CacheMismatchError(f"{directory}: cache format {meta.get('format')!r}, this version reads {FORMAT}.")
    return TeacherCache(directory, meta)
