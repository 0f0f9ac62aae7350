"""Text data for distilling Hugging Face language models: tokenizers, JSONL files, encoding and packing.

Four steps turn a prompt/completion file into the arrays the training core
trains token models on (``distill_jax.training.loop``)::

    tok = load_tokenizer("path/to/hf_model")       # tokenizer.json (+ tokenizer_config.json, chat_template.jinja)
    rows = read_jsonl("train.jsonl")                # {"prompt", "completion"} or {"messages": [...]} per line
    arrays = encode_examples(tok, rows, max_len=1024, chat=True)
    packed = pack_examples(arrays, max_len=4096)    # optional: several examples per row

**Tokenizer.** :func:`load_tokenizer` reads a Hugging Face tokenizer
directory with the ``tokenizers`` library alone (``transformers`` is not
needed): the vocabulary from ``tokenizer.json``, the special tokens from
``tokenizer_config.json`` (else ``special_tokens_map.json``) and the chat
template from ``chat_template.jinja`` (else the config's ``chat_template``),
the same precedence as ``transformers``. :func:`tokenizer_from_tiktoken`
builds the same kind of tokenizer from a tiktoken rank file (Qwen's
``qwen.tiktoken``, OpenAI's ``cl100k_base.tiktoken``), and
:meth:`Tokenizer.save` writes either as a directory that
:func:`load_tokenizer` and ``transformers.AutoTokenizer`` both read.

**Encoded arrays** (:func:`encode_examples`), for ``N`` examples right-padded
to ``L = max_len``; example ``i`` is the ``n`` ids
``[bos] + prompt + completion + [eos]``:

* ``inputs`` int32 ``[N, L]``: the ids; ``pad_id`` (or 0) after them.
* ``valid`` bool ``[N, L]``: True on the ``n`` real tokens.
* ``label`` int32 ``[N, L]``: the next token, ``label[i, t] = inputs[i, t + 1]``
  for ``t < n - 1``; 0 at the last token and on padding.
* ``mask`` float32 ``[N, L]``: 1.0 exactly where ``label`` is a completion
  token (the end token included), so the loss is on the completion only.

**Packed arrays** (:func:`pack_examples`) hold several examples per row and
add two arrays, both int32 ``[N', L]``:

* ``segments``: 0 on padding, then 1, 2, 3, ... for the first, second, third
  example of the row, each a contiguous run of its own tokens.
* ``positions``: the position within the token's own example, restarting at
  0 at each segment (what rotary embeddings need); 0 on padding.

Each example's ``inputs``/``label``/``mask`` are copied unchanged, so the last
token of an example has label 0 and mask 0: no label crosses into the next
segment. A token may attend only to earlier tokens of its own segment
(:func:`packed_attention_mask`).

Example, with a word-level tokenizer built in memory:

>>> from tokenizers import Tokenizer as Backend, models, pre_tokenizers
>>> words = ["<pad>", "<s>", "</s>", "two", "plus", "two", "is", "four"]
>>> backend = Backend(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<pad>"))
>>> backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
>>> tok = Tokenizer.from_backend(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
>>> arrays = encode_examples(tok, [{"prompt": "two plus two is", "completion": "four"}], max_len=8)
>>> arrays["inputs"].tolist()
[[1, 3, 4, 3, 5, 6, 2, 0]]
>>> arrays["label"].tolist()
[[3, 4, 3, 5, 6, 2, 0, 0]]
>>> arrays["mask"].tolist()  # predicts "four" (after "is") and "</s>" (after "four")
[[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]
>>> packed = pack_examples({k: v.repeat(2, axis=0) for k, v in arrays.items()}, max_len=16)
>>> packed["segments"].tolist()
[[1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0, 0]]
>>> packed["positions"].tolist()
[[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0, 0]]
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import tokenizers

__all__ = [
    "EncodedExamples",
    "Tokenizer",
    "encode_examples",
    "encode_examples_with_report",
    "load_tokenizer",
    "pack_examples",
    "packed_attention_mask",
    "read_jsonl",
    "tokenizer_from_tiktoken",
]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# The special-token roles a tokenizer_config.json names, and that chat templates see as variables.
ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
ARRAY_KEYS = ("inputs", "valid", "label", "mask")

Truncate = Literal["error", "left", "drop"]


# --------------------------------------------------------------------------- tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """A ``tokenizers`` tokenizer with the Hugging Face metadata around it.

    Build one with :func:`load_tokenizer`, :func:`tokenizer_from_tiktoken` or
    :meth:`Tokenizer.from_backend`, not directly.

    ``vocab_size`` is one more than the largest id (``len(hf_tokenizer)``
    when the ids have no gaps), added tokens included: every id lies in
    ``[0, vocab_size)``. A model's embedding table may be larger (Qwen pads
    it to a multiple of 128). ``bos_id``/``eos_id``/``pad_id``/``unk_id`` are
    None when the tokenizer has no such token (Qwen has no BOS).
    ``special_ids`` holds the ids of the added tokens marked special and of
    those four. ``fingerprint`` is the sha256 of the ``tokenizer.json`` text
    (vocabulary, merges, normalization, added tokens): record it next to a
    cache or checkpoint. It does not cover the chat template or the choice
    of special tokens; record those too if they vary.

    Text is encoded as ``transformers`` encodes it: special-token strings in
    the text (``"<|im_end|>"``) become their single ids.

    >>> from tokenizers import Tokenizer as Backend, models, pre_tokenizers
    >>> backend = Backend(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2, "<eos>": 3}, unk_token="<unk>"))
    >>> backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    >>> tok = Tokenizer.from_backend(backend, eos_token="<eos>", unk_token="<unk>")
    >>> tok.encode("hello world <eos>")
    [1, 2, 3]
    >>> tok.decode([1, 2, 3], skip_special_tokens=True)
    'hello world'
    >>> tok.vocab_size, tok.eos_id, tok.bos_id, sorted(tok.special_ids)
    (4, 3, None, [0, 3])
    """

    backend: tokenizers.Tokenizer = dataclasses.field(repr=False)
    tokenizer_json: str = dataclasses.field(repr=False)
    source: str
    fingerprint: str
    vocab_size: int
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    special_ids: frozenset[int] = dataclasses.field(repr=False)
    chat_template: str | None = dataclasses.field(repr=False)
    # Whether a sequence starts with bos_id. False where the model was trained without one: SmolLM2's GGUF
    # says tokenizer.ggml.add_bos_token=false (its BOS is <|im_start|>, which the chat template writes itself).
    add_bos_token: bool = dataclasses.field(default=True, repr=False)

    @property
    def bos_prefix(self) -> list[int]:
        """``[bos_id]`` when sequences start with BOS (there is one, and ``add_bos_token``), else ``[]``."""
        return [self.bos_id] if self.bos_id is not None and self.add_bos_token else []

    def _repr_pretty_(self, printer, cycle) -> None:
        # Pretty-printers (IPython, hypothesis) would otherwise list every field, the whole vocabulary included.
        printer.text(repr(self))

    @classmethod
    def from_backend(
        cls,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        source: str = "<in memory>",
        add_bos_token: bool = True,
    ) -> Tokenizer:
        """Wrap a ``tokenizers.Tokenizer`` built in memory (its fingerprint: the sha256 of ``backend.to_str()``)."""
        tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        return _build(backend, backend.to_str(), source, tokens, {role: "the arguments" for role in ROLES}, chat_template,
                      add_bos_token=add_bos_token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The ids of ``text``; ``add_special_tokens`` runs the tokenizer.json post-processor (e.g. Llama's BOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}.")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """:meth:`encode` of each text; the ``tokenizers`` library spreads the work over the CPU cores."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch takes strs, got {type(text).__name__} at index {i}.")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (a list or a 1-D array)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if skip_special_tokens:
            # As transformers: the bos/eos/pad/unk tokens are skipped even when tokenizer.json does not mark them special.
            ids = [i for i in ids if i not in self.special_ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, **variables: Any
    ) -> str:
        """Render ``messages`` with the chat template, as ``transformers``' ``apply_chat_template(..., tokenize=False)``.

        The template runs in a sandboxed Jinja environment (``trim_blocks``,
        ``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a ``tojson``
        that keeps non-ASCII text) and sees ``messages``,
        ``add_generation_prompt``, the special-token strings (``bos_token``,
        ``eos_token``, ...), ``tools=None``, ``documents=None`` and
        ``variables`` (e.g. ``enable_thinking=False`` for Qwen3). Message keys
        whose value is None are dropped first, as ``transformers`` does.

        >>> from tokenizers import Tokenizer as Backend, models
        >>> template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\\n{% endfor %}"
        >>> template += "{% if add_generation_prompt %}[assistant] {% endif %}"
        >>> tok = Tokenizer.from_backend(Backend(models.BPE()), chat_template=template)
        >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        '[user] hi\\n[assistant] '
        """
        if self.chat_template is None:
            raise ValueError(
                f"the tokenizer from {self.source} has no chat template (no {CHAT_TEMPLATE_FILE}, no 'chat_template' "
                f"in {CONFIG_FILE}). Pass one: load_tokenizer(path, chat_template=...), or encode prompt/completion "
                "rows with chat=False."
            )
        chat = _check_messages(messages)
        special = {role: getattr(self, role) for role in ROLES if getattr(self, role) is not None}
        # As transformers: the caller's variables win over the special-token strings.
        context = {**special, **variables}
        return _compile_template(self.chat_template).render(
            messages=chat, add_generation_prompt=add_generation_prompt, **{"tools": None, "documents": None, **context}
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` (if any) to ``directory``.

        ``tokenizer.json`` is written byte for byte as fingerprinted, so
        ``load_tokenizer(directory)`` has the same ``fingerprint``; a stale
        ``chat_template.jinja`` is removed when there is no template, so the
        directory describes this tokenizer alone. ``transformers.AutoTokenizer``
        reads the directory too. Returns the directory.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / TOKENIZER_FILE).write_bytes(self.tokenizer_json.encode("utf-8"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **{role: getattr(self, role) for role in ROLES}}
        if not self.add_bos_token:
            config["add_bos_token"] = False
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        template = out / CHAT_TEMPLATE_FILE
        if self.chat_template is not None:
            template.write_text(self.chat_template, encoding="utf-8")
        elif template.exists():
            template.unlink()
        return out


def load_tokenizer(
    path: str | Path,
    *,
    special_tokens: Mapping[str, str | None] | None = None,
    chat_template: str | None = None,
) -> Tokenizer:
    """Load a Hugging Face tokenizer directory, or a lone ``tokenizer.json`` file, with the ``tokenizers`` library.

    A ``.gguf`` model file gives the tokenizer in its metadata
    (:func:`distill_jax.data.gguf_tokenizer.tokenizer_from_gguf`).
    A directory must hold ``tokenizer.json``; ``tokenizer_config.json``
    (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``: strings, or
    dicts with ``"content"``; ``chat_template``), ``special_tokens_map.json``
    (the roles the config does not name) and ``chat_template.jinja`` (wins
    over the config's template) are read when present. A file path reads
    that file alone: no special tokens, no template, unless given here.

    ``special_tokens`` overrides roles, e.g. ``{"eos_token": "<|im_end|>"}``
    to end completions with the end-of-turn token of a base model's chat
    format (None: the tokenizer has no such token). ``chat_template``
    overrides the template.

    >>> import tempfile
    >>> from tokenizers import Tokenizer as Backend, models
    >>> d = Path(tempfile.mkdtemp())
    >>> Backend(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>")).save(str(d / "tokenizer.json"))
    >>> _ = (d / "tokenizer_config.json").write_text('{"eos_token": {"content": "</s>"}}')
    >>> tok = load_tokenizer(d)
    >>> tok.eos_token, tok.eos_id, tok.pad_id, tok.chat_template
    ('</s>', 1, None, None)
    >>> tok.fingerprint == hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest()
    True
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer directory or {TOKENIZER_FILE} file.")
    if path.is_file() and path.suffix == ".gguf":  # a GGUF model file: the tokenizer in its metadata
        from distill_jax.data import gguf_tokenizer

        if special_tokens is not None or chat_template is not None:
            raise ValueError(f"{path}: a GGUF file's tokenizer takes no special_tokens/chat_template overrides.")
        return gguf_tokenizer.tokenizer_from_gguf(path)
    if path.is_file():
        if path.suffix == ".tiktoken":
            raise ValueError(
                f"{path} is a tiktoken rank file, not a {TOKENIZER_FILE}: load it with tokenizer_from_tiktoken."
            )
        tokenizer_file, config, token_map, template = path, {}, {}, None
    else:
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(_missing_tokenizer_json(path))
        config = _read_json_object(path / CONFIG_FILE)
        token_map = _read_json_object(path / SPECIAL_TOKENS_MAP_FILE)
        template = _config_template(path, config)
    raw = tokenizer_file.read_bytes()
    try:
        text = raw.decode("utf-8")
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(
            f"{tokenizer_file} is not a {TOKENIZER_FILE} that tokenizers {tokenizers.__version__} can read: {e}"
        ) from e

    tokens, origin = {}, {}
    for role in ROLES:
        if special_tokens is not None and role in special_tokens:
            tokens[role], origin[role] = special_tokens[role], "special_tokens="
        elif role in config:  # present and null means "none": the map does not fill it in
            tokens[role], origin[role] = _token_content(config[role], role, path / CONFIG_FILE), CONFIG_FILE
        elif role in token_map:
            tokens[role] = _token_content(token_map[role], role, path / SPECIAL_TOKENS_MAP_FILE)
            origin[role] = SPECIAL_TOKENS_MAP_FILE
        else:
            tokens[role], origin[role] = None, ""
    if special_tokens is not None:
        unknown = sorted(set(special_tokens) - set(ROLES))
        if unknown:
            raise ValueError(f"special_tokens keys must be among {list(ROLES)}, got {unknown}.")
    if chat_template is not None:
        template = chat_template
    add_bos = config.get("add_bos_token", True)
    return _build(backend, text, str(path), tokens, origin, template, add_bos_token=add_bos if isinstance(add_bos, bool) else True)


def tokenizer_from_tiktoken(
    rank_file: str | Path,
    *,
    pattern: str,
    special_tokens: Mapping[str, int],
    normalization: Literal["NFC", "NFKC", "NFD", "NFKD"] | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    chat_template: str | None = None,
) -> Tokenizer:
    """A byte-level BPE tokenizer from a tiktoken rank file, encoding exactly as tiktoken does.

    The file has one ``<base64 token bytes> <rank>`` per line; a token's id
    is its rank. It does not hold the pre-tokenization regex or the special
    tokens, so they are arguments: ``pattern`` (the split regex),
    ``special_tokens`` (``{"<|endoftext|>": 151643, ...}``) and
    ``normalization`` (Qwen's tokenizers apply "NFC" first; OpenAI's none).
    The pattern should match every character, as real tiktoken patterns
    do: text no alternative matches is dropped by tiktoken but encoded here.

    The BPE merges are rebuilt from the ranks: tiktoken joins the adjacent
    pair whose joined bytes have the lowest rank, so every split of a token
    into two tokens becomes a merge with that token's priority, and whole
    pre-tokens found in the vocabulary are kept as one token
    (``ignore_merges``), as tiktoken does. Save the result with
    :meth:`Tokenizer.save` to reuse it without rebuilding (seconds for
    150k tokens).

    >>> import tempfile
    >>> ranks = [bytes([b]) for b in range(256)] + [b"ab", b" ab"]  # every byte, then two merges
    >>> f = Path(tempfile.mkdtemp()) / "toy.tiktoken"
    >>> _ = f.write_text("".join(f"{base64.b64encode(t).decode()} {r}\\n" for r, t in enumerate(ranks)))
    >>> tok = tokenizer_from_tiktoken(f, pattern=r" ?[a-z]+", special_tokens={"<end>": 258}, eos_token="<end>")
    >>> tok.encode("ab abba<end>"), tok.vocab_size  # ab, " ab", b, a, <end>
    ([256, 257, 98, 97, 258], 259)
    >>> tok.decode(tok.encode("ab abba<end>"))
    'ab abba<end>'
    """
    rank_file = Path(rank_file)
    ranks = _read_tiktoken(rank_file)
    by_id = {rank: token for token, rank in ranks.items()}
    for token, id_ in special_tokens.items():
        if not isinstance(token, str) or not token or isinstance(id_, bool) or not isinstance(id_, int) or id_ < 0:
            raise ValueError(f"special_tokens must map non-empty strings to ids >= 0, got {token!r}: {id_!r}.")
        if id_ in by_id:
            raise ValueError(f"special token {token!r} has id {id_}, which {rank_file} already gives to {by_id[id_]!r}.")
    if len(set(special_tokens.values())) != len(special_tokens):
        raise ValueError(f"special_tokens gives two tokens one id: {dict(special_tokens)}.")

    to_unicode = _byte_to_unicode()

    def spell(b: bytes) -> str:  # byte-level BPE spells each byte as one printable character
        return "".join(to_unicode[x] for x in b)

    # Ties (several splits of one token) are ordered by the pieces' ranks to make the merge list deterministic.
    merges = sorted(
        (rank, ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
        for token, rank in ranks.items()
        for i in range(1, len(token))
        if token[:i] in ranks and token[i:] in ranks
    )
    vocab = {spell(token): rank for token, rank in ranks.items()}
    # Special tokens enter the vocabulary with their ids, so that adding them below keeps those ids:
    # tokenizers numbers a brand-new added token len(vocab), which collides when the ids have gaps.
    vocab.update(special_tokens)
    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab=vocab, merges=[(spell(a), spell(b)) for *_, a, b in merges], ignore_merges=True)
    )
    if normalization is not None:
        backend.normalizer = getattr(tokenizers.normalizers, normalization)()
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in special_tokens])
    for token, id_ in special_tokens.items():
        if backend.token_to_id(token) != id_ or backend.id_to_token(id_) != token:
            raise ValueError(f"special token {token!r} did not keep id {id_} (got {backend.token_to_id(token)}).")
    tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": None}
    return _build(backend, backend.to_str(), str(rank_file), tokens, {r: "the arguments" for r in ROLES}, chat_template)


def _build(
    backend: tokenizers.Tokenizer,
    text: str,
    source: str,
    tokens: Mapping[str, str | None],
    origin: Mapping[str, str],
    chat_template: str | None,
    *,
    add_bos_token: bool = True,
) -> Tokenizer:
    ids = {}
    for role in ROLES:
        token = tokens.get(role)
        if token is not None and not isinstance(token, str):
            raise ValueError(f"{source}: {role} must be a string or None, got {token!r}.")
        ids[role] = None if token is None else backend.token_to_id(token)
        if token is not None and ids[role] is None:
            raise ValueError(
                f"{source}: {role} {token!r} (from {origin.get(role) or 'the arguments'}) is not in the vocabulary "
                f"of {TOKENIZER_FILE}; fix the name, or add the token to the tokenizer."
            )
    if chat_template is not None and not isinstance(chat_template, str):
        raise ValueError(f"{source}: the chat template must be a string, got {type(chat_template).__name__}.")
    vocab = backend.get_vocab(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    special = {i for i, t in added.items() if t.special} | {i for i in ids.values() if i is not None}
    return Tokenizer(
        backend=backend,
        tokenizer_json=text,
        source=source,
        fingerprint=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        vocab_size=max(vocab.values(), default=-1) + 1,
        bos_token=tokens.get("bos_token"),
        eos_token=tokens.get("eos_token"),
        pad_token=tokens.get("pad_token"),
        unk_token=tokens.get("unk_token"),
        bos_id=ids["bos_token"],
        eos_id=ids["eos_token"],
        pad_id=ids["pad_token"],
        unk_id=ids["unk_token"],
        special_ids=frozenset(special),
        chat_template=chat_template,
        add_bos_token=bool(add_bos_token),
    )


def _missing_tokenizer_json(directory: Path) -> str:
    names = sorted(p.name for p in directory.iterdir())
    hint = ""
    if any(n.endswith(".tiktoken") for n in names):
        hint = " It holds a tiktoken rank file: load that with tokenizer_from_tiktoken."
    elif {"vocab.json", "merges.txt"} <= set(names) or any(n.endswith(".model") for n in names):
        hint = (" It holds a slow tokenizer's files: write tokenizer.json once with transformers, "
                "AutoTokenizer.from_pretrained(d).save_pretrained(d).")
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") or "nothing"
    return f"{directory} has no {TOKENIZER_FILE} (it holds: {shown}).{hint}"


def _read_json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}.")
    return value


def _token_content(value: Any, role: str, where: Path) -> str | None:
    # transformers writes special tokens as strings or as AddedToken dicts ({"content": ..., "lstrip": ...}).
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: {role} must be a string, a dict with a 'content' string, or null; got {value!r}.")


def _config_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = directory / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    # The older format for several templates: [{"name": ..., "template": ...}, ...]; "default" is the chat one.
    if isinstance(template, list) and all(isinstance(t, dict) and {"name", "template"} <= set(t) for t in template):
        named = {t["name"]: t["template"] for t in template}
        if "default" in named:
            return named["default"]
        raise ValueError(
            f"{directory / CONFIG_FILE} has chat templates {sorted(named)} but none named 'default'; "
            "pass the one to use: load_tokenizer(path, chat_template=...)."
        )
    raise ValueError(f"{directory / CONFIG_FILE}: chat_template must be a string or a list of named templates.")


def _read_tiktoken(path: Path) -> dict[bytes, int]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tiktoken rank file.")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            if len(parts) != 2 or rank < 0:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(
                f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}."
            ) from None
        if token in ranks:
            raise ValueError(f"{path}:{lineno}: token {token!r} appears twice.")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path} holds no tokens.")
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path} gives two tokens the same rank.")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        # Byte-level BPE must be able to spell any byte; without them some text has no encoding.
        raise ValueError(f"{path} lacks {len(missing)} of the 256 single bytes (e.g. {bytes(missing[:3])!r}).")
    return ranks


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of bytes as characters: printable Latin-1 bytes stand for themselves, the rest for 256 + k."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


# --------------------------------------------------------------------------- chat templates


def _check_messages(messages: Any) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}.")
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation; give at least one message.")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}.")
        # As transformers: a None value (OpenAI's content=None) reads as a missing key to the template.
        chat.append({k: v for k, v in m.items() if v is not None})
    return chat


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("chat templates need jinja2 (pip install 'jinja2>=3.1.6').") from e

    class GenerationTag(jinja2.ext.Extension):
        # transformers marks assistant text with {% generation %}...{% endgeneration %}; rendering keeps the body.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the rendered prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


# --------------------------------------------------------------------------- JSONL rows


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a prompt/completion JSONL file, checked; blank lines are skipped.

    Each line is ``{"prompt": str, "completion": str}`` or, chat style,
    ``{"messages": [{"role": str, "content": str}, ...]}`` whose last message
    is the assistant's reply (the completion), after at least one other.
    Other keys are kept. Errors name the file, the line and what is wrong.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> _ = f.write_text('{"prompt": "2+2=", "completion": "4"}\\n\\n{"prompt": "3+3="}\\n')
    >>> read_jsonl(f)
    Traceback (most recent call last):
    ValueError: .../rows.jsonl:3: has 'prompt' but no 'completion'.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file.")
    rows = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{where}: bad JSON ({e.msg} at column {e.colno}); each line must be one JSON object."
            ) from None
        _split_row(row, where)
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows.")
    return rows


def _split_row(row: Any, where: str) -> tuple[str | list[dict], str]:
    """(prompt text or prompt messages, completion text) of a checked row."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    if "messages" in row:
        if "prompt" in row or "completion" in row:
            raise ValueError(f"{where}: has both 'messages' and 'prompt'/'completion'; keep one style.")
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError(
                f"{where}: 'messages' must be a list of at least two messages (the prompt, then the assistant's "
                f"reply), got {messages!r:.80}."
            )
        for k, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"{where}: message {k} must be an object, got {type(m).__name__}.")
            for key in ("role", "content"):
                if key not in m:
                    raise ValueError(f"{where}: message {k} has no {key!r}.")
                if not isinstance(m[key], str):
                    raise ValueError(f"{where}: message {k}'s {key!r} must be a string, got {type(m[key]).__name__}.")
        if messages[-1]["role"] != "assistant":
            raise ValueError(
                f"{where}: the last message must be the assistant's reply (the completion), "
                f"got role {messages[-1]['role']!r}."
            )
        return [dict(m) for m in messages[:-1]], messages[-1]["content"]
    for key, other in (("prompt", "completion"), ("completion", "prompt")):
        if key in row and other not in row:
            raise ValueError(f"{where}: has {key!r} but no {other!r}.")
    if "prompt" not in row:
        raise ValueError(
            f"{where}: a row needs 'prompt' and 'completion' strings, or a 'messages' list; got keys {sorted(row)}."
        )
    for key in ("prompt", "completion"):
        if not isinstance(row[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}.")
    return row["prompt"], row["completion"]


# --------------------------------------------------------------------------- encoding


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedExamples:
    """What :func:`encode_examples_with_report` returns.

    ``arrays``: the encoded arrays (see the module docstring). ``rows``:
    int64 ``[N]``, the index in the input rows of each array row.
    ``dropped``: the rows skipped as too long (``truncate="drop"``).
    ``truncated``: the rows whose prompt was cut (``truncate="left"``).
    """

    arrays: dict[str, np.ndarray]
    rows: np.ndarray
    dropped: tuple[int, ...]
    truncated: tuple[int, ...]


def encode_examples(
    tokenizer: Tokenizer,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_len: int,
    chat: bool = False,
    add_bos: bool = True,
    add_eos: bool = True,
    truncate: Truncate = "error",
) -> dict[str, np.ndarray]:
    """Prompt/completion rows as the training core's token arrays ``inputs``, ``valid``, ``label``, ``mask``.

    The arrays of :func:`encode_examples_with_report` (which see for the
    arguments); with ``truncate="drop"`` a warning says how many rows were
    dropped, and the report says which.

    >>> from tokenizers import Tokenizer as Backend, models, pre_tokenizers
    >>> backend = Backend(models.WordLevel({"<pad>": 0, "a": 1, "b": 2, "c": 3, "<eos>": 4}, unk_token="<pad>"))
    >>> backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    >>> tok = Tokenizer.from_backend(backend, eos_token="<eos>")
    >>> out = encode_examples(tok, [{"prompt": "a b", "completion": "c"}], max_len=5)
    >>> out["inputs"].tolist(), out["valid"].tolist()
    ([[1, 2, 3, 4, 0]], [[True, True, True, True, False]])
    >>> out["label"].tolist(), out["mask"].tolist()  # mask: where "c" and "<eos>" are predicted
    ([[2, 3, 4, 0, 0]], [[0.0, 1.0, 1.0, 0.0, 0.0]])
    """
    report = encode_examples_with_report(
        tokenizer, rows, max_len=max_len, chat=chat, add_bos=add_bos, add_eos=add_eos, truncate=truncate
    )
    if report.dropped:
        warnings.warn(
            f"encode_examples dropped {len(report.dropped)} of {len(rows)} rows longer than max_len={max_len} "
            f"(the first: {list(report.dropped[:5])}); encode_examples_with_report lists them all.",
            stacklevel=2,
        )
    return report.arrays


def encode_examples_with_report(
    tokenizer: Tokenizer,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_len: int,
    chat: bool = False,
    add_bos: bool = True,
    add_eos: bool = True,
    truncate: Truncate = "error",
) -> EncodedExamples:
    """Encode rows (as :func:`read_jsonl` returns) to right-padded ``[N, max_len]`` arrays, and say what was dropped.

    Example ``i`` is ``[bos] + prompt + completion + [eos]``. The prompt and
    the completion are encoded separately, so the completion's tokens are
    exactly ``tokenizer.encode(completion)``, what the model emits after the
    prompt. ``add_bos`` prepends ``bos_id`` when the tokenizer has one and
    uses it (:attr:`Tokenizer.bos_prefix`; Qwen has none); ``add_eos`` appends ``eos_id`` (an error when it has none).

    With ``chat=True`` the rows are ``{"messages": [...]}``: the prompt is
    the chat template applied to all but the last message, with the
    generation prompt, and the completion is the last (assistant) message's
    content, then ``eos_id``; no BOS is added when the template already
    starts with it. For ChatML models the end token should be
    ``<|im_end|>``: Qwen instruct tokenizers set it as ``eos_token``; for
    others pass ``load_tokenizer(path, special_tokens={"eos_token": ...})``.

    ``truncate`` decides for an example longer than ``max_len``: "error"
    (list them), "left" (cut the start of the prompt, keeping BOS and the
    whole completion; an error when the completion itself does not fit) or
    "drop" (skip it; the report lists it). When the prompt is empty and
    there is no BOS, the first completion token has nothing before it and is
    not in the mask.

    >>> from tokenizers import Tokenizer as Backend, models, pre_tokenizers
    >>> backend = Backend(models.WordLevel({"<pad>": 0, "a": 1, "b": 2, "c": 3, "<eos>": 4}, unk_token="<pad>"))
    >>> backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    >>> tok = Tokenizer.from_backend(backend, eos_token="<eos>")
    >>> rows = [{"prompt": "b b a b", "completion": "c"}, {"prompt": "a", "completion": "c"}]
    >>> encode_examples_with_report(tok, rows, max_len=4, truncate="left").arrays["inputs"].tolist()
    [[1, 2, 3, 4], [1, 3, 4, 0]]
    >>> r = encode_examples_with_report(tok, rows, max_len=4, truncate="drop")
    >>> r.arrays["inputs"].tolist(), r.rows.tolist(), r.dropped
    ([[1, 3, 4, 0]], [1], (0,))
    """
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (a token and the one it predicts), got {max_len!r}.")
    if truncate not in ("error", "left", "drop"):
        raise ValueError(f"truncate must be 'error', 'left' or 'drop', got {truncate!r}.")
    if add_eos and tokenizer.eos_id is None:
        raise ValueError(
            f"add_eos=True but the tokenizer from {tokenizer.source} has no eos_token; name one "
            "(load_tokenizer(path, special_tokens={'eos_token': ...})) or pass add_eos=False."
        )
    prompts, completions = _texts(tokenizer, rows, chat)
    bos = tokenizer.bos_prefix if add_bos else []
    eos = [tokenizer.eos_id] if add_eos else []
    prompt_ids, completion_ids = tokenizer.encode_batch(prompts), tokenizer.encode_batch(completions)

    sequences, prompt_lens, kept, dropped, truncated, too_long = [], [], [], [], [], []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        head = [] if chat and p[:1] == bos else bos
        completion = c + eos
        if not completion:
            raise ValueError(f"row {i} has no completion tokens (an empty completion and add_eos=False): nothing to learn.")
        n = len(head) + len(p) + len(completion)
        if n > max_len:
            if truncate == "drop":
                dropped.append(i)
                continue
            keep = max_len - len(head) - len(completion)
            # Every completion token must have a token before it to predict it from.
            if truncate == "error" or keep < 0 or len(head) + keep < 1:
                too_long.append((i, len(head) + len(p), len(completion)))
                continue
            p = p[len(p) - keep:]
            truncated.append(i)
        sequences.append(head + p + completion)
        prompt_lens.append(len(head) + len(p))
        kept.append(i)
    if too_long:
        shown = ", ".join(f"row {i} has {a + b} (prompt {a} + completion {b})" for i, a, b in too_long[:5])
        more = f", and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        if truncate == "left":
            raise ValueError(
                f"{len(too_long)} rows' completions do not fit in max_len={max_len} even with the prompt cut to "
                f"{'BOS' if bos else 'one token'}: {shown}{more}. Raise max_len, or pass truncate='drop'."
            )
        raise ValueError(
            f"{len(too_long)} of {len(rows)} rows are longer than max_len={max_len} tokens: {shown}{more}. "
            "Raise max_len, or pass truncate='left' (cut the start of the prompt) or truncate='drop' (skip them)."
        )
    return EncodedExamples(
        arrays=_pad(sequences, prompt_lens, max_len, 0 if tokenizer.pad_id is None else tokenizer.pad_id),
        rows=np.asarray(kept, np.int64),
        dropped=tuple(dropped),
        truncated=tuple(truncated),
    )


def _texts(tokenizer: Tokenizer, rows: Sequence[Mapping[str, Any]], chat: bool) -> tuple[list[str], list[str]]:
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a list of dicts (as read_jsonl returns), got {type(rows).__name__}.")
    prompts, completions = [], []
    for i, row in enumerate(rows):
        prompt, completion = _split_row(row, f"row {i}")
        if chat and isinstance(prompt, str):
            raise ValueError(f"row {i} has 'prompt'/'completion', not 'messages': pass chat=False, or give it as messages.")
        if not chat and not isinstance(prompt, str):
            raise ValueError(f"row {i} is chat style ('messages'): pass chat=True to render it with the chat template.")
        prompts.append(tokenizer.apply_chat_template(prompt, add_generation_prompt=True) if chat else prompt)
        completions.append(completion)
    return prompts, completions


def _pad(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], length: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(sequences)
    out = {
        "inputs": np.full((n, length), pad_id, np.int32),
        "valid": np.zeros((n, length), bool),
        "label": np.zeros((n, length), np.int32),
        "mask": np.zeros((n, length), np.float32),
    }
    for r, (seq, p) in enumerate(zip(sequences, prompt_lens)):
        k = len(seq)
        out["inputs"][r, :k] = seq
        out["valid"][r, :k] = True
        out["label"][r, : k - 1] = seq[1:]
        # Position t predicts token t + 1: the completion's tokens p .. k-1 are predicted at p-1 .. k-2.
        out["mask"][r, max(p - 1, 0) : k - 1] = 1.0
    return out


# --------------------------------------------------------------------------- packing


def pack_examples(arrays: Mapping[str, np.ndarray], *, max_len: int) -> dict[str, np.ndarray]:
    """Pack right-padded examples several to a row of ``max_len``, adding ``segments`` and ``positions``.

    First fit, in order: each example goes into the first row that still
    has room for all of it, else a new row, so the result depends only on
    the input. Every array ``[N, L, ...]`` of ``arrays`` (``inputs``,
    ``valid``, ``label``, ``mask`` and, say, cached teacher logits) is
    packed the same way, each example's first ``n`` positions (``n`` = its
    ``valid`` count) copied unchanged; the rest is 0 (False). See the module
    docstring for ``segments`` and ``positions``.

    >>> ex = {"inputs": np.array([[5, 6, 7], [8, 9, 0], [4, 0, 0]]),
    ...       "valid": np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]], bool),
    ...       "label": np.array([[6, 7, 0], [9, 0, 0], [0, 0, 0]]),
    ...       "mask": np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)}
    >>> p = pack_examples(ex, max_len=4)
    >>> p["inputs"].tolist(), p["segments"].tolist(), p["positions"].tolist()
    ([[5, 6, 7, 4], [8, 9, 0, 0]], [[1, 1, 1, 2], [1, 1, 0, 0]], [[0, 1, 2, 0], [0, 1, 0, 0]])
    >>> p["label"].tolist()
    [[6, 7, 0, 0], [9, 0, 0, 0]]
    """
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}.")
    missing = [k for k in ARRAY_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"pack_examples needs the arrays {list(ARRAY_KEYS)} (encode_examples' output); missing {missing}.")
    if "segments" in arrays or "positions" in arrays:
        raise ValueError("these arrays are already packed (they have 'segments'/'positions'); pack the unpacked ones.")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    valid = arrays["valid"].astype(bool)
    if valid.ndim != 2:
        raise ValueError(f"'valid' must be [N, L], got shape {valid.shape}.")
    n_rows, width = valid.shape
    for k, v in arrays.items():
        if v.shape[:2] != (n_rows, width):
            raise ValueError(
                f"every array must start with [N, L] = {[n_rows, width]} like 'valid'; {k!r} has shape {list(v.shape)}."
            )
    lengths = valid.sum(axis=1)
    not_prefix = (valid != (np.arange(width)[None, :] < lengths[:, None])).any(axis=1)
    bad = np.flatnonzero(not_prefix | (lengths == 0) | (lengths > max_len))
    if bad.size:
        i = int(bad[0])
        what = ("has no valid tokens" if lengths[i] == 0 else f"has {lengths[i]} tokens, more than max_len={max_len}"
                if lengths[i] > max_len else "is not right-padded (valid must be True on a prefix of the row)")
        raise ValueError(f"{bad.size} examples cannot be packed; row {i} {what}.")

    row_of, offset_of = _first_fit(lengths, max_len)
    n_packed = int(row_of.max()) + 1 if n_rows else 0
    out = {k: np.zeros((n_packed, max_len, *v.shape[2:]), v.dtype) for k, v in arrays.items()}
    out["segments"] = np.zeros((n_packed, max_len), np.int32)
    out["positions"] = np.zeros((n_packed, max_len), np.int32)
    count = np.zeros(n_packed, np.int32)
    for i, (row, start, n) in enumerate(zip(row_of, offset_of, lengths)):
        span = slice(start, start + n)
        for k, v in arrays.items():
            out[k][row, span] = v[i, :n]
        count[row] += 1
        out["segments"][row, span] = count[row]
        out["positions"][row, span] = np.arange(n)
    return out


def _first_fit(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """The row and the start offset of each example, placed first-fit in order."""
    free = np.full(len(lengths), capacity, np.int64)  # never more rows than examples
    rows, offsets, used = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64), 0
    for i, n in enumerate(lengths):
        fits = free[:used] >= n
        row = int(np.argmax(fits)) if fits.any() else used
        used = max(used, row + 1)
        rows[i], offsets[i] = row, capacity - free[row]
        free[row] -= n
    return rows, offsets


def packed_attention_mask(segments):
    """Which keys each query may attend to in packed rows: bool ``[N, L, L]``, ``mask[b, q, k]``.

    True when key ``k`` is not after query ``q`` and both are in the same
    example (same non-zero segment). A padding query attends to itself only,
    so that a softmax over its row stays finite; its output is never used.
    Works on numpy and jax arrays (under ``jit`` too).

    >>> packed_attention_mask(np.array([[1, 1, 2, 0]])).astype(int)[0].tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    """
    length = segments.shape[-1]
    q, k = np.arange(length)[:, None], np.arange(length)[None, :]
    same = (segments[..., :, None] == segments[..., None, :]) & (segments[..., None, :] > 0)
    return (same & (k <= q)) | (k == q)
