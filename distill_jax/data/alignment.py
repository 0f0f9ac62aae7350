"""Byte-offset alignment of one text under two tokenizers, for cross-tokenizer distillation.

A teacher and a student with different tokenizers cut the same text into
different tokens, so their positions do not correspond one to one. Three
host-side pieces (numpy, no JAX) make them comparable:

* :func:`token_byte_ends`: where each token of a text ends, in bytes of its
  UTF-8 encoding, from the tokenizer's own offsets. The tokens then cover
  the text as consecutive spans, every byte exactly once (a gap the
  tokenizer skipped, such as whitespace it drops, joins the next token; the
  pieces of one character split by a byte-level tokenizer share it: the
  first piece holds it and the others are empty).
* :func:`align_groups`: given both tokenizations' byte ends, the *groups*
  of consecutive teacher tokens and student tokens that cover the same byte
  span. A group closes at every byte position where both tokenizations have
  a token boundary; so at the start of every group both models have read
  exactly the same text, and their next-token distributions there are
  distributions over the continuation of the same prefix.
* :func:`shared_vocabulary`: the pairs (student id, teacher id) of tokens
  whose byte strings are equal (the exact-match part of the vocabularies;
  special tokens are matched by role, e.g. each side's end token, then by
  content).

:func:`encode_aligned_examples` applies them to prompt/completion rows and
returns the training core's token arrays for the student, the teacher's own
tokenization of the same text (``teacher_inputs``, ...), and the alignment
as arrays in the student's positions (the keys are listed in
:data:`ALIGNED_KEYS`). :mod:`distill_jax.cross_tokenizer` holds the losses
that read them.

With identical tokenizers every group is one token on each side and the
shared vocabulary is the whole vocabulary: the alignment is the identity.
Two tokenizations of ``"abba"``, one with the merge ``ab``:

>>> from tokenizers import Tokenizer as Backend, models
>>> vocab = {"<eos>": 0, "a": 1, "b": 2, "ab": 3}
>>> backend = Backend(models.BPE(vocab, [("a", "b")]))
>>> from distill_jax.data.text import Tokenizer
>>> merged = Tokenizer.from_backend(backend, eos_token="<eos>")
>>> token_byte_ends(merged, "abba")  # "ab", "b", "a"
([3, 2, 1], [2, 3, 4])
>>> align_groups([2, 3, 4], [1, 2, 3, 4])  # "ab"|"b"|"a" against "a"|"b"|"b"|"a"
([0, 1, 2], [0, 0, 1, 2])
"""

from __future__ import annotations

import functools
import json
from typing import Any, Mapping, Sequence

import numpy as np
import tokenizers

from distill_jax.data import text

__all__ = [
    "ALIGNED_KEYS",
    "TEACHER_KEYS",
    "SharedVocabulary",
    "align_groups",
    "encode_aligned_examples",
    "shared_vocabulary",
    "token_byte_ends",
    "token_bytes",
]

#: The teacher's arrays of an aligned example (its tokenization of the same text).
TEACHER_KEYS = ("teacher_inputs", "teacher_valid", "teacher_label", "teacher_group")
#: The alignment, in the student's label positions (see :func:`encode_aligned_examples`).
ALIGNED_KEYS = ("align_start", "align_teacher_pos", "align_group")


def token_byte_ends(tokenizer: text.Tokenizer, piece: str) -> tuple[list[int], list[int]]:
    """``(ids, ends)``: the ids of ``piece`` (as ``tokenizer.encode``) and the byte offset where each token ends.

    ``ends`` is non-decreasing and its last entry is the length of
    ``piece`` in UTF-8 bytes, so token ``i`` covers bytes
    ``[ends[i - 1], ends[i])`` (``[0, ends[0])`` for the first): consecutive
    spans that cover every byte exactly once (see the module docstring for
    skipped gaps and split characters).
    """
    encoding = tokenizer.backend.encode(piece, add_special_tokens=False)
    ids = list(encoding.ids)
    if not ids:
        return [], []
    if _is_byte_level(_spec(tokenizer)):
        # Byte-level tokens spell their bytes exactly, so boundaries inside a character are kept.
        spelled = _token_bytes(tokenizer.tokenizer_json, tokenizer.vocab_size, tokenizer.fingerprint)
        pieces = [spelled[i] or b"" for i in ids]
        if b"".join(pieces) == piece.encode("utf-8"):
            return ids, np.cumsum([len(p) for p in pieces]).tolist()
    # The offsets count characters; a character's byte position is the UTF-8 length of the text before it.
    byte_at = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in piece])]).astype(np.int64)
    ends = np.maximum.accumulate(np.array([byte_at[end] for _, end in encoding.offsets], np.int64))
    ends[-1] = byte_at[-1]
    return ids, ends.tolist()


def align_groups(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> tuple[list[int], list[int]]:
    """The group of each student token and of each teacher token (0, 1, 2, ...; the same count on both sides).

    ``*_ends`` as :func:`token_byte_ends` returns them, for the same text. A
    group closes after the last token that ends at a byte position where
    both sides end a token; empty tokens stay with the group they end in
    (a leading empty token joins the first group).
    """
    s_ends, t_ends = list(map(int, student_ends)), list(map(int, teacher_ends))
    if not s_ends or not t_ends:
        if s_ends or t_ends:
            raise ValueError("one side has tokens and the other none: they cannot be the same text.")
        return [], []
    if s_ends[-1] != t_ends[-1]:
        raise ValueError(
            f"the two tokenizations cover {s_ends[-1]} and {t_ends[-1]} bytes: they are not of the same text "
            "(encode the same string with both tokenizers)."
        )
    for name, ends in (("student", s_ends), ("teacher", t_ends)):
        if any(b < a for a, b in zip(ends, ends[1:])) or ends[0] < 0:
            raise ValueError(f"the {name}'s byte ends must be non-decreasing and >= 0, got {ends}.")
    common = (set(s_ends) & set(t_ends)) - {0}

    def groups(ends: list[int]) -> list[int]:
        out, group = [], 0
        for i, end in enumerate(ends):
            out.append(group)
            if end in common and (i + 1 == len(ends) or ends[i + 1] > end):
                group += 1
        return out

    return groups(s_ends), groups(t_ends)


# ----------------------------------------------------------------------------- vocabularies


def _is_byte_level(tokenizer_json: Mapping[str, Any]) -> bool:
    """Whether tokens are spelled with GPT-2's byte-to-character map (a ByteLevel decoder)."""
    decoder = tokenizer_json.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any((p or {}).get("type") == "ByteLevel" for p in parts)


def _metaspace(tokenizer_json: Mapping[str, Any]) -> str | None:
    decoder = tokenizer_json.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    for p in parts:
        if (p or {}).get("type") == "Metaspace":
            return p.get("replacement", "\u2581")
        if (p or {}).get("type") == "Replace" and (p.get("pattern") or {}).get("String") == "\u2581":
            return "\u2581"
    return None


@functools.lru_cache(maxsize=16)
def _spec_of(tokenizer_json: str) -> dict:
    return json.loads(tokenizer_json)


def _spec(tokenizer: text.Tokenizer) -> dict:
    return _spec_of(tokenizer.tokenizer_json)


def token_bytes(tokenizer: text.Tokenizer) -> list[bytes | None]:
    """The byte string each id stands for (index: the id); None for ids with no token.

    Byte-level vocabularies (GPT-2, Llama 3, Qwen) are read through the
    byte-to-character map; SentencePiece-style ones (``▁`` for a space)
    have it replaced; added tokens are their content.
    """
    return list(_token_bytes(tokenizer.tokenizer_json, tokenizer.vocab_size, tokenizer.fingerprint))


@functools.lru_cache(maxsize=16)
def _token_bytes(tokenizer_json: str, vocab_size: int, fingerprint: str) -> tuple[bytes | None, ...]:
    del fingerprint  # part of the cache key only
    backend = tokenizers.Tokenizer.from_str(tokenizer_json)
    spec = _spec_of(tokenizer_json)
    byte_level = _is_byte_level(spec)
    space = _metaspace(spec)
    unmap = {ch: b for b, ch in text._byte_to_unicode().items()}
    added = {entry["id"]: entry["content"] for entry in spec.get("added_tokens") or []}
    out: list[bytes | None] = []
    for i in range(vocab_size):
        token = backend.id_to_token(i)
        if token is None:
            out.append(None)
        elif i in added:
            out.append(token.encode("utf-8"))
        elif byte_level:
            out.append(bytes(unmap[c] for c in token) if all(c in unmap for c in token) else token.encode("utf-8"))
        else:
            out.append((token.replace(space, " ") if space else token).encode("utf-8"))
    return tuple(out)


class SharedVocabulary:
    """The tokens two vocabularies share: ``student_ids[i]`` and ``teacher_ids[i]`` spell the same bytes.

    Attributes: ``student_ids``, ``teacher_ids`` (int32 ``[M]``, in student-id
    order), ``student_size``, ``teacher_size`` (the vocabulary sizes) and
    ``fingerprint`` (of both tokenizers).
    """

    def __init__(self, student_ids, teacher_ids, student_size: int, teacher_size: int, fingerprint: str):
        self.student_ids = np.asarray(student_ids, np.int32)
        self.teacher_ids = np.asarray(teacher_ids, np.int32)
        self.student_size, self.teacher_size, self.fingerprint = int(student_size), int(teacher_size), fingerprint

    def __len__(self) -> int:
        return int(self.student_ids.size)

    def __repr__(self) -> str:
        return f"SharedVocabulary({len(self)} of {self.student_size} student / {self.teacher_size} teacher tokens)"


def shared_vocabulary(student: text.Tokenizer, teacher: text.Tokenizer) -> SharedVocabulary:
    """The exact-match part of two vocabularies (as GOLD's hybrid loss uses it).

    Special tokens pair by role first (the student's end token with the
    teacher's, likewise BOS, pad and unk), then every other token by its
    byte string (:func:`token_bytes`); special and ordinary tokens never
    pair with each other. When several ids of one side spell the same
    bytes, the lowest id is used.
    """
    pairs: dict[int, int] = {}
    used_teacher: set[int] = set()
    for role in ("eos_id", "bos_id", "pad_id", "unk_id"):
        s, t = getattr(student, role), getattr(teacher, role)
        if s is not None and t is not None and s not in pairs and t not in used_teacher:
            pairs[s] = t
            used_teacher.add(t)
    s_bytes, t_bytes = token_bytes(student), token_bytes(teacher)
    by_bytes: dict[tuple[bool, bytes], int] = {}
    for t, b in enumerate(t_bytes):
        if b is not None and t not in used_teacher:
            by_bytes.setdefault((t in teacher.special_ids, b), t)
    for s, b in enumerate(s_bytes):
        if b is None or s in pairs:
            continue
        t = by_bytes.get((s in student.special_ids, b))
        if t is not None and t not in used_teacher:
            pairs[s] = t
            used_teacher.add(t)
    order = sorted(pairs)
    return SharedVocabulary(order, [pairs[s] for s in order], student.vocab_size, teacher.vocab_size,
                            fingerprint=f"{student.fingerprint}:{teacher.fingerprint}")


# ----------------------------------------------------------------------------- examples


def encode_aligned_examples(
    student: text.Tokenizer,
    teacher: text.Tokenizer,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_len: int,
    teacher_max_len: int | None = None,
    chat: bool = False,
) -> dict[str, np.ndarray]:
    """Prompt/completion rows as the student's token arrays, the teacher's, and their alignment.

    The student's ``inputs``/``valid``/``label``/``mask`` are exactly
    :func:`distill_jax.data.text.encode_examples`' (``[bos] prompt
    completion [eos]``, loss on the completion and the end token). The
    teacher gets its own tokenization of the same prompt and completion
    (never the student's ids), right-padded to ``teacher_max_len`` (default
    ``max_len``): ``teacher_inputs``, ``teacher_valid``, ``teacher_label``
    (its next tokens) and ``teacher_group`` (int32 ``[N, Lt]``: 1 + the
    group of the completion token that ``teacher_label`` holds, 0 where it
    is not a completion token).

    The completion is aligned with :func:`align_groups` (prompt and
    completion are encoded separately, so the prompt's end is a boundary
    of both), and the end tokens form one last group. In the student's
    label positions ``t`` (the logits at ``t`` predict ``label[t]``):

    * ``align_group`` int32 ``[N, L]``: 1 + the group of ``label[t]``, 0 where
      ``label[t]`` is not a completion token (``mask`` is 0 there);
    * ``align_start`` float32 ``[N, L]``: 1 where ``label[t]`` is the first
      token of its group: there both models have read the same text;
    * ``align_teacher_pos`` int32 ``[N, L]``: at those positions, the
      teacher's label position that predicts the first teacher token of the
      same group (0 elsewhere).

    Chat rows are rendered with each side's own chat template. Rows too
    long for either side are an error (no truncation: cut text would
    misalign the two).
    """
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2, got {max_len!r}.")
    teacher_max_len = int(max_len if teacher_max_len is None else teacher_max_len)
    for side, tok in (("student", student), ("teacher", teacher)):
        if tok.eos_id is None:
            raise ValueError(f"the {side} tokenizer ({tok.source}) has no eos_token; cross-tokenizer examples end "
                             "with each side's end token (load_tokenizer(path, special_tokens={'eos_token': ...})).")
    s_prompts, completions = text._texts(student, rows, chat)
    t_prompts, _ = text._texts(teacher, rows, chat)
    n = len(completions)
    out = {
        "inputs": np.full((n, max_len), student.pad_id or 0, np.int32),
        "valid": np.zeros((n, max_len), bool),
        "label": np.zeros((n, max_len), np.int32),
        "mask": np.zeros((n, max_len), np.float32),
        "teacher_inputs": np.full((n, teacher_max_len), teacher.pad_id or 0, np.int32),
        "teacher_valid": np.zeros((n, teacher_max_len), bool),
        "teacher_label": np.zeros((n, teacher_max_len), np.int32),
        "teacher_group": np.zeros((n, teacher_max_len), np.int32),
        "align_start": np.zeros((n, max_len), np.float32),
        "align_teacher_pos": np.zeros((n, max_len), np.int32),
        "align_group": np.zeros((n, max_len), np.int32),
    }
    too_long = []
    for r, completion in enumerate(completions):
        s_ids, s_ends = token_byte_ends(student, completion)
        t_ids, t_ends = token_byte_ends(teacher, completion)
        s_groups, t_groups = align_groups(s_ends, t_ends)
        last = (s_groups[-1] + 1) if s_groups else 0  # the end tokens: one more group
        s_groups, t_groups = s_groups + [last], t_groups + [last]
        sides = []
        for tok, prompt, ids, width in ((student, s_prompts[r], s_ids, max_len),
                                        (teacher, t_prompts[r], t_ids, teacher_max_len)):
            prompt_ids = tok.encode(prompt)
            head = [] if chat and tok.bos_id is not None and prompt_ids[:1] == [tok.bos_id] else tok.bos_prefix
            sequence = head + prompt_ids + ids + [tok.eos_id]
            start = len(head) + len(prompt_ids)
            if start < 1:
                raise ValueError(f"row {r}: the prompt is empty and the tokenizer ({tok.source}) has no BOS, so the "
                                 "first completion token has nothing to be predicted from.")
            if len(sequence) > width:
                too_long.append((r, len(sequence), width))
            sides.append((sequence, start))
        if too_long and too_long[-1][0] == r:
            continue
        (s_seq, s_start), (t_seq, t_start) = sides
        k, kt = len(s_seq), len(t_seq)
        out["inputs"][r, :k], out["valid"][r, :k], out["label"][r, : k - 1] = s_seq, True, s_seq[1:]
        out["mask"][r, s_start - 1 : k - 1] = 1.0
        out["teacher_inputs"][r, :kt], out["teacher_valid"][r, :kt] = t_seq, True
        out["teacher_label"][r, : kt - 1] = t_seq[1:]
        # Completion token i sits at input position start + i and is predicted at label position start - 1 + i.
        first_teacher = {}
        for i, g in enumerate(t_groups):
            out["teacher_group"][r, t_start - 1 + i] = g + 1
            first_teacher.setdefault(g, t_start - 1 + i)
        seen = set()
        for i, g in enumerate(s_groups):
            pos = s_start - 1 + i
            out["align_group"][r, pos] = g + 1
            if g not in seen:
                seen.add(g)
                out["align_start"][r, pos] = 1.0
                out["align_teacher_pos"][r, pos] = first_teacher[g]
    if too_long:
        shown = ", ".join(f"row {r} needs {need} > {width}" for r, need, width in too_long[:5])
        raise ValueError(f"{len(too_long)} rows do not fit (student max_len={max_len}, teacher_max_len="
                         f"{teacher_max_len}): {shown}. Raise max_len / teacher_max_len.")
    return out
