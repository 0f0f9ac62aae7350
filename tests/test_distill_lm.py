"""End to end, offline: Hugging Face files in, Hugging Face files out, through ``distill-jax distill-lm``.

A tiny random Qwen2-style teacher (HF format, a BPE tokenizer trained here) is
first trained on two-digit additions through the CLI (``--objective=sft``),
then distilled into a smaller random Qwen2 student on a small slice of the
data; the same student trained on that slice alone is the baseline. The
distilled student must reach a lower loss on held-out problems, and the
directory it is written to must load in transformers with our logits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from distill_jax import cli  # noqa: E402
from distill_jax.data import text  # noqa: E402
from distill_jax.models import hf  # noqa: E402
from distill_jax.models import transformer as tf  # noqa: E402

SPECIALS = ["<pad>", "<|endoftext|>"]


def _problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        out.append({"prompt": f"{a}+{b}=", "completion": f"{a + b}"})
    return out


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tokenizer(directory: Path) -> text.Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character, then merges
    backend.decoder = decoders.Fuse()  # decode without spaces between tokens
    trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=SPECIALS, show_progress=False)
    backend.train_from_iterator([f"{r['prompt']}{r['completion']}" for r in _problems(500, 99)], trainer)
    tok = text.Tokenizer.from_backend(backend, eos_token="<|endoftext|>", pad_token="<pad>")
    tok.save(directory)
    return tok


def _random_qwen2(directory: Path, tok_dir: Path, vocab: int, dim: int, depth: int, seed: int) -> Path:
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim,
                                      num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32, tie_word_embeddings=True, eos_token_id=1,
                                      pad_token_id=0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    for file in tok_dir.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return directory


def _cli(*args) -> dict:
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        rc = cli.main(["distill-jax", *args, "--noprogress"])
    assert rc == 0, buffer.getvalue()
    return json.loads(buffer.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_lm")
    tok = _tokenizer(root / "tok")
    vocab = tok.vocab_size
    data = {
        "teacher_train": _write_jsonl(root / "teacher_train.jsonl", _problems(2000, 0)),
        "student_train": _write_jsonl(root / "student_train.jsonl", _problems(96, 1)),
        "val": _write_jsonl(root / "val.jsonl", _problems(200, 2)),
    }
    teacher_init = _random_qwen2(root / "teacher_init", root / "tok", vocab, 64, 2, seed=0)
    student_init = _random_qwen2(root / "student_init", root / "tok", vocab, 32, 1, seed=1)
    common = ["--max_len=16", "--config.batch_size=32", "--config.eval_batch_size=100", "--config.optimizer.learning_rate=3e-3"]
    teacher = _cli("distill-lm", f"--student={teacher_init}", f"--data={data['teacher_train']}",
                   f"--val_data={data['val']}", "--objective=sft", f"--workdir={root / 'teacher_run'}",
                   f"--out={root / 'teacher_hf'}", "--config.num_epochs=15", *common)
    return root, data, common, teacher, student_init


def test_the_teacher_trained_through_the_cli_is_a_hugging_face_model(setup):
    root, _, _, teacher, _ = setup
    print("teacher:", teacher)
    assert teacher["val_loss"] < 1.0, teacher  # from ~ln(vocab) = 3.7 at random init
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "teacher_hf").eval()
    config, params = hf.load(root / "teacher_hf")
    tokens = np.array([[3, 5, 7, 9, 11, 2]])
    ours = np.asarray(tf.Transformer(config).apply({"params": params}, jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
    assert text.load_tokenizer(root / "teacher_hf").fingerprint == text.load_tokenizer(root / "tok").fingerprint


def test_a_distilled_student_beats_the_same_student_trained_on_the_data_alone(setup):
    root, data, common, _, student_init = setup
    student_args = [f"--student={student_init}", f"--data={data['student_train']}", f"--val_data={data['val']}",
                    "--config.num_epochs=20", *common]
    alone = _cli("distill-lm", *student_args, "--objective=sft", f"--workdir={root / 'alone'}", f"--out={root / 'alone_hf'}")
    kd = _cli("distill-lm", *student_args, f"--teacher={root / 'teacher_hf'}", "--objective=forward_kl",
              "--sft_weight=0.5", f"--workdir={root / 'kd'}", f"--out={root / 'kd_hf'}")
    print(f"held-out loss: data alone {alone['val_loss']:.4f}, distilled {kd['val_loss']:.4f}")
    assert kd["val_loss"] < alone["val_loss"]
    back = transformers.AutoModelForCausalLM.from_pretrained(root / "kd_hf")
    assert back.config.num_hidden_layers == 1 and back.config.hidden_size == 32


def test_top_k_from_an_on_disk_cache_and_sequence_level_kd_from_generated_samples(setup):
    root, data, common, _, student_init = setup
    student_args = [f"--student={student_init}", f"--data={data['student_train']}", f"--val_data={data['val']}",
                    "--config.num_epochs=2", *common]
    top_k = _cli("distill-lm", *student_args, f"--teacher={root / 'teacher_hf'}", "--objective=top_k", "--top_k=4",
                 f"--cache_dir={root / 'cache'}", f"--workdir={root / 'top_k'}", f"--out={root / 'top_k_hf'}")
    assert (root / "cache" / "cache.json").exists() and np.isfinite(top_k["val_loss"])
    prompts = _write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in _problems(32, 5)])
    written = _cli("generate", f"--teacher={root / 'teacher_hf'}", f"--data={prompts}",
                   f"--out={root / 'samples.jsonl'}", "--max_new_tokens=4", "--temperature=0")
    rows = text.read_jsonl(root / "samples.jsonl")
    assert written["written"] == len(rows) == 32
    numbers = [(int(r["prompt"][:2]) + int(r["prompt"][3:5]), int(r["completion"])) for r in rows if r["completion"].isdigit()]
    error = np.mean([abs(want - got) for want, got in numbers])
    right = sum(want == got for want, got in numbers)
    print(f"teacher's greedy samples: {len(numbers)}/32 numbers, {right} exact, mean |error| {error:.1f}")
    # The teacher learned the format and roughly the sums (a sum guessed in [20, 198] is off by ~45 on average).
    assert len(numbers) >= 29 and error < 15
    seq = _cli("distill-lm", f"--student={student_init}", f"--data={root / 'samples.jsonl'}", f"--val_data={data['val']}",
               "--objective=sft", "--config.num_epochs=1", *common, f"--workdir={root / 'seq'}", f"--out={root / 'seq_hf'}")
    assert np.isfinite(seq["val_loss"])


def test_distill_lm_refuses_a_student_with_another_vocabulary(setup, tmp_path):
    root, data, common, _, _ = setup
    other = _random_qwen2(tmp_path / "other", root / "tok", 50, 32, 1, seed=3)
    with pytest.raises(ValueError, match="the teacher predicts .* tokens, the student 50"):
        cli.main(["distill-jax", "distill-lm", f"--student={other}", f"--teacher={root / 'teacher_hf'}",
                  f"--data={data['student_train']}", f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'o'}", *common])


def test_packed_training_rows_hold_several_examples_and_train(setup):
    root, data, common, _, student_init = setup
    args = [f"--student={student_init}", f"--data={data['student_train']}", f"--val_data={data['val']}",
            "--objective=sft", "--config.num_epochs=20", *common]
    packed = _cli("distill-lm", *args, "--config.task.pack=32", "--config.batch_size=8", f"--workdir={root / 'packed'}", f"--out={root / 'packed_hf'}")
    plain = _cli("distill-lm", *args, f"--workdir={root / 'plain'}", f"--out={root / 'plain_hf'}")
    print(f"packed: {packed['num_train']} rows of 32 for 96 examples, held-out loss {packed['val_loss']:.4f} "
          f"(unpacked {plain['val_loss']:.4f})")
    assert packed["num_train"] < 96 // 2 and plain["num_train"] == 96
    # Fewer, fuller batches train the same examples: the loss is of the same order, well below chance (ln 40).
    assert packed["val_loss"] < 3.0


def _merged_tokenizer(directory: Path) -> text.Tokenizer:
    """A BPE with merges across characters ("4+", "=1", ...): other tokens and other ids than the teacher's."""
    from tokenizers import Tokenizer, decoders, models, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=48, special_tokens=["<unk>", "</s>"], show_progress=False)
    backend.train_from_iterator([f"{r['prompt']}{r['completion']}" for r in _problems(500, 98)], trainer)
    tok = text.Tokenizer.from_backend(backend, eos_token="</s>", pad_token="<unk>", unk_token="<unk>")
    tok.save(directory)
    return tok


def test_cross_tokenizer_distillation_from_the_cli(setup, tmp_path):
    """A student with its own tokenizer (merged tokens) learns from the character-level teacher through aligned tokens."""
    root, data, common, _, _ = setup
    char_tok = _merged_tokenizer(tmp_path / "merged_tok")
    student_init = _random_qwen2(tmp_path / "student_init", tmp_path / "merged_tok", char_tok.vocab_size, 32, 1, seed=1)
    rows = text.read_jsonl(data["student_train"])[:50]
    assert sum(len(char_tok.encode(r["completion"])) for r in rows) < sum(len(r["completion"]) for r in rows)
    assert text.load_tokenizer(student_init).fingerprint != text.load_tokenizer(root / "teacher_hf").fingerprint
    args = [f"--student={student_init}", f"--data={data['student_train']}", f"--val_data={data['val']}",
            "--config.num_epochs=20", *common]
    with pytest.raises(ValueError, match="needs one vocabulary"):
        cli.main(["distill-jax", "distill-lm", *args, f"--teacher={root / 'teacher_hf'}", "--objective=forward_kl",
                  f"--workdir={tmp_path / 'refused'}", f"--out={tmp_path / 'refused_hf'}"])
    alone = _cli("distill-lm", *args, "--objective=sft", f"--workdir={tmp_path / 'alone'}", f"--out={tmp_path / 'alone_hf'}")
    kd = _cli("distill-lm", *args, f"--teacher={root / 'teacher_hf'}", "--objective=aligned_kd", "--sft_weight=0.5",
              f"--workdir={tmp_path / 'kd'}", f"--out={tmp_path / 'kd_hf'}")
    uld = _cli("distill-lm", *args, f"--teacher={root / 'teacher_hf'}", "--objective=uld", "--sft_weight=0.5",
               "--config.num_epochs=2", f"--workdir={tmp_path / 'uld'}", f"--out={tmp_path / 'uld_hf'}")
    epochs = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    first, last = epochs[0]["train"]["kd"], epochs[-1]["train"]["kd"]
    print(f"held-out loss (student's tokens): data alone {alone['val_loss']:.4f}, aligned KD {kd['val_loss']:.4f}; "
          f"aligned KD term {first:.3f} (epoch 1) -> {last:.3f} (epoch 20)")
    # The student moves toward the teacher's aligned distributions, and learns the task (chance: ln 48 = 3.9).
    assert last < 0.75 * first and kd["val_loss"] < 2.5 and np.isfinite(uld["val_loss"])
    config = json.loads((tmp_path / "kd" / "config.json").read_text())
    assert config["task"]["teacher_tokenizer"] == str(root / "teacher_hf")
    assert text.load_tokenizer(tmp_path / "kd_hf").fingerprint == char_tok.fingerprint
