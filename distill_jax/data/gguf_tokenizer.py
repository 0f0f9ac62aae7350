"""Tokenizers from GGUF files, and the vocabulary fields a GGUF file needs from a tokenizer.

A GGUF file (llama.cpp's model format) has no ``tokenizer.json``. It stores
the vocabulary as metadata under llama.cpp's key names, and
:func:`tokenizer_from_gguf` rebuilds the project's
:class:`~distill_jax.data.text.Tokenizer` from them::

    tok = tokenizer_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.encode("Hello world")                      # [19556, 905]

and :func:`gguf_vocab` / :func:`write_vocab` go the other way, for a model
writer::

    writer = gguf.GGUFWriter(path, arch="llama")
    write_vocab(writer, tok)                        # tokenizer.ggml.* and tokenizer.chat_template

Only byte-level BPE vocabularies (``tokenizer.ggml.model = 'gpt2'``: GPT-2,
SmolLM, Llama 3, Qwen2, ...) are supported; SentencePiece ones ('llama',
'gemma', ...) raise a ValueError.

**The pre-tokenizer trap.** The vocabulary and the merges are not enough to
encode text: the text is first split into pieces by a regular expression, and
the merges never cross a piece boundary. A GGUF file does not store that
regex; it stores a *name*, ``tokenizer.ggml.pre``, and llama.cpp's
``llama-vocab.cpp`` maps each name to its regexes. SmolLM2's name is
``'smollm'``, which llama.cpp splits with ``\\p{N}`` first (every digit its own
piece) and then with GPT-2's regex, exactly as SmolLM2's own
``tokenizer.json`` does (``Digits(individual_digits=True)`` then
``ByteLevel``). ``transformers``' GGUF converter does not know ``'smollm'``
and falls back to GPT-2's regex alone, which keeps a digit run whole and lets
it take a space: ``"x  1"`` splits as ``"x" " " " 1"`` there, but as
``"x" "  " "1"`` in llama.cpp, and the ids differ. This module looks the name
up in a table that follows llama.cpp (:data:`PRE_TOKENIZERS`) and raises on a
name it does not know rather than guessing.

Supported names, by the splitting llama.cpp applies (first the canonical name
:func:`gguf_vocab` writes):

* ``'smollm'`` (also ``'starcoder'``, ``'refact'``, ``'command-r'``,
  ``'codeshell'``, ``'exaone'``, ``'minerva-7b'``, ``'mellum2'``):
  ``\\p{N}``, then GPT-2's regex.
* ``'gpt-2'`` (also ``'phi-2'``, ``'mpt'``, ``'olmo'``, ``'jais'``,
  ``'trillion'``, ``'gigachat'``, ``'exaone4'``): GPT-2's regex.
* ``'llama-bpe'`` (also ``'llama3'``, ``'llama-v3'``, ``'falcon3'``,
  ``'falcon-h1'``, ``'pixtral'``, ``'midm-2.0'``, ``'lfm2'``): Llama 3's regex
  (digits in runs of at most three) and ``ignore_merges`` (a piece that is
  itself a token is not merged); BOS is added unless the file says otherwise.
* ``'smaug-bpe'`` (also ``'dbrx'``): Llama 3's regex, merges not ignored.
* ``'qwen2'`` (also ``'deepseek-r1-qwen'``, ``'kormo'``, ``'f2llmv2'``,
  ``'megrez'``, ``'stablelm2'``, ``'hunyuan'``, ``'solar-open'``): Qwen2's
  regex (every digit its own piece).
* ``'default'`` (and a file without ``tokenizer.ggml.pre``, with a warning,
  as llama.cpp): punctuation runs, GPT-2's regex, digit runs, then runs of
  three ASCII digits. This is *not* plain GPT-2.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from distill_jax.data.text import Tokenizer

if TYPE_CHECKING:  # gguf is imported where it is used: distill_jax imports without it.
    import gguf

__all__ = ["PRE_TOKENIZERS", "gguf_vocab", "tokenizer_from_gguf", "write_vocab"]

# llama.cpp's token types (gguf.TokenType): what each vocabulary entry is.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# --------------------------------------------------------------------------- pre-tokenizers

# GPT-2's split, as llama.cpp writes it. tokenizers' ByteLevel(use_regex=True) adds a final "|\s+", which
# only matches the single whitespace characters this one leaves unmatched, and those become pieces either way.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp spells the contractions case by case ('[sS]) where tokenizer.json files say (?i:'s): std::regex
# has no (?i:...). The two differ only on Unicode case folds such as "'ſ", so both are recognised below,
# and the builder uses llama.cpp's, which is the one that decides what a GGUF file means.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_CONTRACTIONS_HF = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_TAIL = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_TAIL = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# canonical name -> (the names llama.cpp treats the same, the splitting, ignore_merges, add_bos when the file
# has no tokenizer.ggml.add_bos_token). From llama.cpp's llama-vocab.cpp (llama_vocab::impl::load).
_GROUPS: dict[str, tuple[tuple[str, ...], str, bool, bool]] = {
    "smollm": (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
        "digits+gpt2", False, False,
    ),
    "gpt-2": (("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "gigachat", "exaone4"), "gpt2", False, False),
    "llama-bpe": (
        ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        "llama3", True, True,
    ),
    "smaug-bpe": (("smaug-bpe", "dbrx"), "llama3", False, False),
    "qwen2": (
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
        "qwen2", False, False,
    ),
    "default": (("default",), "default", False, False),
}

#: Every ``tokenizer.ggml.pre`` name this module reads, mapped to the canonical name of its group.
PRE_TOKENIZERS: dict[str, str] = {name: canon for canon, (names, *_) in _GROUPS.items() for name in names}


def _pre_tokenizer(splitting: str, hf_spelling: bool = False) -> pre_tokenizers.PreTokenizer:
    """The ``tokenizers`` pre-tokenizer that splits text as llama.cpp does for ``splitting``."""
    # ByteLevel last, always: it spells each byte of a piece as the character the vocabulary uses.
    if splitting == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if splitting == "digits+gpt2":
        # Digits splits on char::is_numeric (categories Nd, Nl, No): llama.cpp's \p{N}.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    if splitting in ("llama3", "qwen2"):
        head = _CONTRACTIONS_HF if hf_spelling else _CONTRACTIONS
        regexes = (head + (_LLAMA3_TAIL if splitting == "llama3" else _QWEN2_TAIL),)
    elif splitting == "default":
        regexes = _DEFAULT
    else:
        raise AssertionError(splitting)
    # llama.cpp applies its regexes one after another to the pieces of the previous one, keeping the text
    # between matches as pieces too: tokenizers' Split with behavior="isolated".
    return pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


def _canonical_json(value: Any) -> Any:
    """A pre-tokenizer's JSON with what does not change the split removed, for comparing two of them."""
    if isinstance(value, list):
        return [_canonical_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if value.get("type") == "Sequence" and len(value.get("pretokenizers", ())) == 1:
        return _canonical_json(value["pretokenizers"][0])
    # trim_offsets only moves the reported character offsets, never the pieces.
    drop = "trim_offsets" if value.get("type") == "ByteLevel" else None
    return {k: _canonical_json(v) for k, v in value.items() if k != drop}


@functools.cache
def _signatures() -> tuple[tuple[str, str, bool], ...]:
    """(canonical pre-tokenizer JSON, canonical name, ignore_merges) for each group, in preference order."""
    out = []
    for canon, (_, splitting, ignore_merges, _) in _GROUPS.items():
        for hf_spelling in (False, True):
            probe = tokenizers.Tokenizer(models.BPE())
            probe.pre_tokenizer = _pre_tokenizer(splitting, hf_spelling)
            text = json.dumps(_canonical_json(json.loads(probe.to_str())["pre_tokenizer"]), sort_keys=True)
            if (text, canon, ignore_merges) not in out:
                out.append((text, canon, ignore_merges))
    return tuple(out)


# --------------------------------------------------------------------------- GGUF -> Tokenizer


def tokenizer_from_gguf(path_or_reader: str | os.PathLike | gguf.GGUFReader) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes, encoding text as llama.cpp does.

    Reads the ``tokenizer.ggml.*`` keys: ``model`` (must be ``'gpt2'``,
    byte-level BPE), ``pre`` (the pre-tokenizer, see :data:`PRE_TOKENIZERS`
    and the module docstring), ``tokens``, ``token_type``, ``merges``,
    ``bos_token_id``/``eos_token_id``/``padding_token_id``/``unknown_token_id``,
    ``add_bos_token``/``add_eos_token``, and ``tokenizer.chat_template``.
    CONTROL (and UNKNOWN) tokens become special added tokens and
    USER_DEFINED tokens plain added tokens, each at its own id, so that their
    text in the input encodes to that one id as in llama.cpp.
    ``add_bos_token`` (``add_eos_token``) becomes a post-processor, so
    ``encode(text, add_special_tokens=True)`` adds BOS (EOS) as
    ``llama_tokenize(..., add_special=true)`` does; ``add_bos_token`` is also
    the tokenizer's ``add_bos_token`` (SmolLM2's is false: its BOS,
    ``<|im_start|>``, is written by the chat template, not before every
    sequence). Where the file has no ``add_bos_token``, llama.cpp's default
    for the pre-tokenizer applies (true for the Llama 3 names).

    The result is a plain :class:`~distill_jax.data.text.Tokenizer`: its
    ``fingerprint`` is the sha256 of the ``tokenizer.json`` built here, the
    same for every read of one vocabulary, and :meth:`Tokenizer.save` writes
    a directory that ``transformers`` reads.

    Args:
      path_or_reader: a ``.gguf`` path, or a ``gguf.GGUFReader`` already open on
        one (opening a large file takes seconds; a model loader passes its own).

    Returns:
      The tokenizer, its ``source`` the file's path.

    Raises:
      ValueError: a required key is missing, the model is not ``'gpt2'``, the
        pre-tokenizer name is unknown, or the vocabulary is inconsistent
        (duplicate tokens, an id out of range).
      FileNotFoundError: ``path_or_reader`` is a path to no file.

    A round trip through a GGUF file written with :func:`write_vocab`:

    >>> import tempfile, gguf, numpy as np
    >>> from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers
    >>> backend = Backend(models.BPE({"<s>": 0, "1": 1, "2": 2, "Ġ": 3, "a": 4, "b": 5, "ab": 6}, [("a", "b")]))
    >>> backend.pre_tokenizer = pre_tokenizers.Sequence(
    ...     [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    >>> backend.decoder = decoders.ByteLevel()
    >>> tok = Tokenizer.from_backend(backend, bos_token="<s>")
    >>> path = Path(tempfile.mkdtemp()) / "tiny.gguf"
    >>> writer = gguf.GGUFWriter(path, arch="llama")
    >>> write_vocab(writer, tok)["pre"]  # digits, then GPT-2: llama.cpp's 'smollm'
    'smollm'
    >>> writer.add_tensor("w", np.zeros(1, np.float32))
    >>> writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    >>> back = tokenizer_from_gguf(path)
    >>> back.encode("ab 12"), back.encode("ab 12", add_special_tokens=True), back.add_bos_token
    ([6, 3, 1, 2], [0, 6, 3, 1, 2], True)
    """
    reader, source = _open(path_or_reader)
    fields = {key: _contents(field) for key, field in reader.fields.items() if key.startswith("tokenizer.")}

    def require(key: str) -> Any:
        if fields.get(key) is None:
            raise ValueError(f"{source} has no {key!r}: it does not describe a tokenizer that can be rebuilt.")
        return fields[key]

    model = require("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model {model!r} is not supported; supported: ['gpt2'] (byte-level BPE)."
        )
    pre = fields.get("tokenizer.ggml.pre")
    if pre is None:
        # llama.cpp's own fallback for a file converted before tokenizer.ggml.pre existed.
        warnings.warn(f"{source} has no 'tokenizer.ggml.pre'; using llama.cpp's fallback, 'default'.", stacklevel=2)
        pre = "default"
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: {sorted(PRE_TOKENIZERS)}."
        )
    _, _, _, default_add_bos = _GROUPS[PRE_TOKENIZERS[pre]]
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}
    ids = {role: fields.get(f"tokenizer.ggml.{key}") for role, key in keys.items()}
    tokens = require("tokenizer.ggml.tokens")
    vocab = {
        "model": model,
        "pre": pre,
        "tokens": tokens,
        # llama.cpp reads a missing token_type array as all NORMAL.
        "token_types": fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens),
        "merges": require("tokenizer.ggml.merges"),
        **{f"{role}_id": i for role, i in ids.items()},
        "add_bos": bool(fields.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        "add_eos": bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": fields.get("tokenizer.chat_template"),
    }
    backend = _backend(vocab, source)
    role_tokens = {f"{role}_token": None if i is None else tokens[i] for role, i in ids.items()}
    return Tokenizer.from_backend(
        backend, chat_template=vocab["chat_template"], source=source, add_bos_token=vocab["add_bos"], **role_tokens
    )


def _open(path_or_reader: Any) -> tuple[gguf.GGUFReader, str]:
    gguf = _import_gguf()
    if isinstance(path_or_reader, gguf.GGUFReader):
        # The reader keeps the file as a numpy memmap, which knows its path.
        return path_or_reader, str(getattr(path_or_reader.data, "filename", None) or "<GGUFReader>")
    if not isinstance(path_or_reader, (str, os.PathLike)):
        raise TypeError(f"expected a GGUF path or a gguf.GGUFReader, got {type(path_or_reader).__name__}.")
    path = Path(path_or_reader)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file.")
    return gguf.GGUFReader(path), str(path)


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading and writing GGUF files needs the gguf package (pip install gguf).") from e
    return gguf


def _contents(field: Any) -> Any:
    """A reader field's value: str, int, float, bool, or a list of them for an array."""
    return field.contents()  # gguf >= 0.10: strings decoded, arrays as lists


def _backend(vocab: Mapping[str, Any], source: str) -> tokenizers.Tokenizer:
    """Build the ``tokenizers.Tokenizer`` of a :func:`gguf_vocab`-style record."""
    tokens, types, merges = list(vocab["tokens"]), list(vocab["token_types"]), list(vocab["merges"])
    n = len(tokens)
    if len(types) != n:
        raise ValueError(f"{source}: {n} tokens but {len(types)} token types.")
    index: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if not isinstance(token, str):
            raise ValueError(f"{source}: token {i} is {type(token).__name__}, not a str.")
        if token in index:
            # A tokenizer maps each string to one id; llama.cpp would silently keep the later one.
            raise ValueError(
                f"{source}: token {token!r} appears twice (ids {index[token]} and {i}); tokens must be unique."
            )
        index[token] = i
    for role in ("bos", "eos", "pad", "unk"):
        i = vocab.get(f"{role}_id")
        if i is not None and not 0 <= i < n:
            raise ValueError(f"{source}: the {role} token id {i} is outside the vocabulary of {n} tokens.")
    pairs = []
    for k, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2:
            raise ValueError(f"{source}: merge {k} ({merge!r}) is not two tokens separated by one space.")
        pairs.append((parts[0], parts[1]))
    _, splitting, ignore_merges, _ = _GROUPS[PRE_TOKENIZERS[vocab["pre"]]]
    backend = tokenizers.Tokenizer(models.BPE(vocab=index, merges=pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer = _pre_tokenizer(splitting)
    backend.decoder = decoders.ByteLevel()
    # CONTROL (and UNKNOWN) tokens are the ones llama.cpp cuts out of the text and never decodes as text;
    # USER_DEFINED ones are cut out too but decode as text: special vs plain added tokens.
    # normalized=False: matched on the raw text, as llama.cpp does.
    special = [AddedToken(tokens[i], special=True, normalized=False) for i in _where(types, CONTROL, UNKNOWN)]
    plain = [AddedToken(tokens[i], special=False, normalized=False) for i in _where(types, USER_DEFINED)]
    backend.add_special_tokens(special)
    backend.add_tokens(plain)
    for added in (*special, *plain):
        # They are in the BPE vocabulary already, so adding them keeps their ids; a changed id would shift
        # every embedding row after it, so check rather than trust.
        if backend.token_to_id(added.content) != index[added.content]:
            raise ValueError(
                f"{source}: added token {added.content!r} got id {backend.token_to_id(added.content)}, "
                f"not its GGUF id {index[added.content]}."
            )
    if vocab.get("add_bos") or vocab.get("add_eos"):
        backend.post_processor = _template(vocab, tokens, source)
    return backend


def _where(types: list[int], *wanted: int) -> list[int]:
    return [i for i, t in enumerate(types) if t in wanted]


def _template(vocab: Mapping[str, Any], tokens: list[str], source: str) -> processors.TemplateProcessing:
    ends = {}
    for role in ("bos", "eos"):
        if vocab.get(f"add_{role}"):
            if vocab.get(f"{role}_id") is None:
                raise ValueError(f"{source}: add_{role}_token is true but there is no {role} token id.")
            ends[role] = tokens[vocab[f"{role}_id"]]
    head = [ends["bos"]] if "bos" in ends else []
    tail = [ends["eos"]] if "eos" in ends else []
    return processors.TemplateProcessing(
        single=[*head, "$A:0", *tail],
        pair=[*head, "$A:0", *tail, *(f"{t}:1" for t in head), "$B:1", *(f"{t}:1" for t in tail)],
        special_tokens=[(tokens[vocab[f"{r}_id"]], vocab[f"{r}_id"]) for r in ends],
    )


# --------------------------------------------------------------------------- Tokenizer -> GGUF


def gguf_vocab(tokenizer: Tokenizer) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values a GGUF writer needs to describe ``tokenizer``.

    The reverse of :func:`tokenizer_from_gguf`: writing these values and
    reading the file back gives a tokenizer with the same ids (and, for a
    tokenizer that came from a GGUF file, the same fingerprint). Read from
    ``tokenizer.tokenizer_json``, which must describe a byte-level BPE
    tokenizer (a ``BPE`` model without byte fallback, dropout or subword
    affixes, a ``ByteLevel`` decoder) whose pre-tokenizer is one llama.cpp
    knows by name: the name is found by comparing the pre-tokenizer (and
    ``ignore_merges``) with the ones :func:`tokenizer_from_gguf` builds for
    each supported name, so SmolLM2's ``tokenizer.json`` is written as
    ``'smollm'``, GPT-2's as ``'gpt-2'``, Llama 3's as ``'llama-bpe'`` and
    Qwen2's as ``'qwen2'``. A Unicode normalizer is refused, except NFC
    (Qwen2's), which llama.cpp does not apply: text already in NFC, as
    nearly all text is, encodes the same.

    ``add_bos`` is whether sequences start with BOS as the project trains
    them (:attr:`~distill_jax.data.text.Tokenizer.bos_prefix`: a BOS token
    and ``add_bos_token``), so that llama.cpp prompts the model as it was
    trained; ``add_eos`` is whether the post-processor appends EOS. A
    post-processor that adds anything else is refused.

    Returns:
      ``{"model": "gpt2", "pre": str, "tokens": [str] (id order),
      "token_types": [int] (1 normal, 3 control for special added tokens,
      4 user-defined for other added tokens), "merges": ["a b", ...],
      "bos_id", "eos_id", "pad_id", "unk_id": int | None, "add_bos": bool,
      "add_eos": bool, "chat_template": str | None}``.

    Raises:
      ValueError: the tokenizer cannot be written to GGUF (not byte-level
        BPE, ids with gaps, an unknown pre-tokenizer, a post-processor other
        than adding BOS/EOS), saying which.

    >>> from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers
    >>> backend = Backend(models.BPE({"a": 0, "b": 1, "ab": 2, "<eos>": 3}, [("a", "b")]))
    >>> backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    >>> backend.decoder = decoders.ByteLevel()
    >>> v = gguf_vocab(Tokenizer.from_backend(backend, eos_token="<eos>"))
    >>> v["pre"], v["tokens"], v["merges"], v["eos_id"], v["add_bos"]
    ('gpt-2', ['a', 'b', 'ab', '<eos>'], ['a b'], 3, False)
    """
    spec = json.loads(tokenizer.tokenizer_json)
    where = tokenizer.source

    def refuse(what: str) -> ValueError:
        return ValueError(f"the tokenizer from {where} {what}; such a tokenizer cannot be written to GGUF.")

    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise refuse(f"has a {model.get('type')!r} model, not byte-level BPE")
    # Options llama.cpp's BPE has no equivalent for; empty or false means unused.
    for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise refuse(f"has a BPE model with {key}={model.get(key)!r}, which llama.cpp's BPE does not support")
    decoder = spec.get("decoder") or {}
    if _canonical_json(decoder).get("type") != "ByteLevel":
        raise refuse(f"has a {decoder.get('type')!r} decoder, not ByteLevel (it is not byte-level BPE)")
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise refuse(f"has a {normalizer.get('type')!r} normalizer, which llama.cpp does not apply")

    pre_json = json.dumps(_canonical_json(spec.get("pre_tokenizer")), sort_keys=True)
    ignore_merges = bool(model.get("ignore_merges", False))
    names = [(canon, im) for text, canon, im in _signatures() if text == pre_json]
    pre = next((canon for canon, im in names if im == ignore_merges), None)
    if pre is None:
        if names:
            raise refuse(
                f"splits text as llama.cpp's {names[0][0]!r} but has ignore_merges={ignore_merges}, "
                f"where llama.cpp uses {names[0][1]}"
            )
        found = json.dumps(spec.get("pre_tokenizer"))
        raise refuse(f"has a pre-tokenizer that matches none of llama.cpp's {sorted(_GROUPS)}: {found}")

    by_id: dict[int, str] = {}
    for token, i in model.get("vocab", {}).items():
        by_id[i] = token
    types: dict[int, int] = {}
    for added in spec.get("added_tokens", []):
        i, content = added["id"], added["content"]
        if by_id.get(i, content) != content:
            raise refuse(f"gives id {i} to both {by_id[i]!r} (vocabulary) and {content!r} (added token)")
        by_id[i] = content
        types[i] = CONTROL if added.get("special") else USER_DEFINED
    n = max(by_id, default=-1) + 1
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise refuse(f"has no token for {len(missing)} ids below {n} (first {missing[:5]}): GGUF ids have no gaps")

    merges = []
    for merge in model.get("merges", []):
        if isinstance(merge, str):
            merges.append(merge)
        elif any(" " in part for part in merge):
            raise refuse(f"has merge {merge!r} with a space in a token, which GGUF's 'a b' merges cannot hold")
        else:
            merges.append(" ".join(merge))
    # The post-processor is checked (GGUF can hold nothing but "add BOS/EOS"), but BOS follows bos_prefix: what
    # encode_examples trained with, where a tokenizer.json and a tokenizer_config.json may disagree.
    _, add_eos = _added_ends(spec.get("post_processor"), tokenizer, refuse)
    return {
        "model": "gpt2",
        "pre": pre,
        "tokens": [by_id[i] for i in range(n)],
        "token_types": [types.get(i, NORMAL) for i in range(n)],
        "merges": merges,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "unk_id": tokenizer.unk_id,
        "add_bos": bool(tokenizer.bos_prefix),
        "add_eos": add_eos,
        "chat_template": tokenizer.chat_template,
    }


def _added_ends(post: Any, tokenizer: Tokenizer, refuse) -> tuple[bool, bool]:
    """Whether the post-processor adds BOS before and EOS after the text: all that GGUF can say about it."""
    if post is None:
        return False, False
    kind = post.get("type")
    if kind == "ByteLevel":  # offsets only
        return False, False
    if kind == "Sequence":
        found = [_added_ends(p, tokenizer, refuse) for p in post.get("processors", [])]
        return any(b for b, _ in found), any(e for _, e in found)
    if kind != "TemplateProcessing":
        raise refuse(f"has a {kind!r} post-processor; GGUF can only say whether BOS and EOS are added")
    single = post.get("single", [])
    where_a = [k for k, item in enumerate(single) if "Sequence" in item]
    if len(where_a) != 1:
        raise refuse(f"has a post-processor template {single!r} without exactly one text sequence")
    specials = post.get("special_tokens", {})

    def ids(items) -> list[int]:
        return [i for item in items for i in specials[item["SpecialToken"]["id"]]["ids"]]

    head, tail = ids(single[: where_a[0]]), ids(single[where_a[0] + 1 :])
    if head not in ([], [tokenizer.bos_id]) or tail not in ([], [tokenizer.eos_id]):
        raise refuse(f"has a post-processor that adds ids {head} before and {tail} after the text, not just BOS/EOS")
    return bool(head), bool(tail)


def write_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer) -> dict[str, Any]:
    """Add ``tokenizer``'s vocabulary (:func:`gguf_vocab`) to a ``gguf.GGUFWriter``'s metadata.

    Adds ``tokenizer.ggml.model``, ``pre``, ``tokens``, ``token_type``,
    ``merges``, the bos/eos/padding/unknown token ids the tokenizer has,
    ``add_bos_token``, ``add_eos_token`` and ``tokenizer.chat_template`` (when
    there is one). Call it before ``writer.write_header_to_file()``; the
    architecture and the tensors are the caller's.

    Returns:
      The :func:`gguf_vocab` dict that was written.
    """
    v = gguf_vocab(tokenizer)
    writer.add_tokenizer_model(v["model"])
    writer.add_tokenizer_pre(v["pre"])
    writer.add_token_list(v["tokens"])
    writer.add_token_types(v["token_types"])
    writer.add_token_merges(v["merges"])
    for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                     ("pad_id", writer.add_pad_token_id), ("unk_id", writer.add_unk_token_id)):
        if v[key] is not None:  # absent, not a sentinel: llama.cpp reads a missing id as "no such token"
            add(v[key])
    # Always written: llama.cpp's default for a missing key depends on the pre-tokenizer (Llama 3 adds BOS).
    writer.add_add_bos_token(v["add_bos"])
    writer.add_add_eos_token(v["add_eos"])
    if v["chat_template"] is not None:
        writer.add_chat_template(v["chat_template"])
    return v
