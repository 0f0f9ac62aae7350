"""Hugging Face language models through the training core: ``distill-jax distill-lm`` and ``distill-jax generate``.

``distill-lm`` distils a teacher directory (Llama / Qwen2 / Qwen3, see
:mod:`distill_jax.models.hf`) into a student on a prompt/completion JSONL
file and writes the student back as a Hugging Face directory::

    distill-jax distill-lm --teacher=qwen_teacher --student=qwen_student --data=train.jsonl \\
        --val_data=val.jsonl --objective=forward_kl --workdir=runs/kd --out=student_hf \\
        [--config.mesh=fsdp=8] [--config.num_epochs=3] [--resume]

* ``--student``: a Hugging Face directory (its weights are the start), or a
  ``config.json`` (Hugging Face's, or a dict of
  :class:`~distill_jax.models.transformer.TransformerConfig` fields) for a
  student trained from scratch.
* ``--objective``: ``forward_kl``, ``hinton_kd``, ``gkd`` (generalized JSD,
  ``--beta``), ``top_k`` (KD from the teacher's top ``--top_k`` log-probs,
  cached on disk in ``--cache_dir``, written first if missing and resumable)
  or ``sft`` (cross-entropy on the data alone, e.g. teacher samples from
  ``generate``: sequence-level KD). ``--sft_weight`` adds the data's
  cross-entropy to the KD objectives.
* The student's tokenizer is ``--student_tokenizer`` (a directory or a
  ``tokenizer.json``), else the student directory's ``tokenizer.json``,
  else the teacher's. When it differs from the teacher's, the teacher reads
  its own tokenization of every example and the two are aligned by bytes
  (:mod:`distill_jax.data.alignment`): ``--objective`` must then be
  ``aligned_kd`` (KL on the shared vocabulary, ULD on the rest, the
  chain-rule span term; :mod:`distill_jax.cross_tokenizer`), ``uld``
  (Universal Logit Distillation at the aligned positions) or ``sft``;
  the token-by-token objectives are refused, as they need one vocabulary.

Everything else is the training core's: ``--config.*`` overrides the
config of :func:`get_config` (optimizer, epochs, batch size, mesh,
partitions, checkpoint cadence), checkpoints and ``--resume``, the progress
bar, ``metrics.jsonl`` and TensorBoard events in ``--workdir``.

``generate`` samples the teacher's completions of a JSONL file's prompts and
writes them as a prompt/completion JSONL file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from distill_jax import generation
from distill_jax.data import alignment, text
from distill_jax.models import hf, pretrained
from distill_jax.models import transformer as tf

OBJECTIVES = ("forward_kl", "hinton_kd", "gkd", "top_k", "sft", "aligned_kd", "uld")
#: The objectives that work with a teacher of another tokenizer (sft: on the teacher's samples, sequence-level KD).
CROSS_TOKENIZER_OBJECTIVES = ("aligned_kd", "uld", "sft")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "generation_config.json")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The defaults of ``distill-lm`` (what ``--config.*`` overrides); the flags fill in the rest."""
    del arg
    from distill_jax.training import default_config

    c = default_config()
    c.dataset = "distill_jax.lm:jsonl_splits"
    c.task = ml_collections.ConfigDict({"tokenizer": "", "train": "", "val": "", "test": "", "max_len": 512,
                                        "chat": False, "truncate": "error", "pack": 0,
                                        # A teacher of another tokenizer: its tokenizer and tokens per example (0: max_len).
                                        "teacher_tokenizer": "", "teacher_max_len": 0})
    c.model = ml_collections.ConfigDict({"name": "transformer"})
    c.init_from = ""
    c.optimizer = ml_collections.ConfigDict(
        {"name": "adamw", "learning_rate": 3e-4, "schedule": "cosine", "warmup_epochs": 0.1,
         "final_lr_fraction": 0.1, "weight_decay": 0.01})
    c.batch_size = 8
    c.num_epochs = 1
    # > 0: logits in sequence chunks of this many tokens, never [batch, length, vocabulary] (distill_jax.chunked);
    # for real vocabularies (Qwen's 151,936) a must. 0: full logits (faster for small vocabularies).
    c.chunk_size = 0
    c.eval_batch_size = 8
    c.teacher = ml_collections.ConfigDict({"checkpoint": "", "top_k": 0, "cache_dir": ""})
    c.objective = ml_collections.ConfigDict({"sft": {"loss": "cross_entropy", "weight": 1.0}})
    return c


def jsonl_splits(split_seed: int, *, tokenizer: str, train: str, val: str = "", test: str = "", max_len: int = 512,
                 chat: bool = False, truncate: str = "error", pack: int = 0, teacher_tokenizer: str = "",
                 teacher_max_len: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """The token splits of prompt/completion JSONL files (``config.dataset="distill_jax.lm:jsonl_splits"``).

    ``pack > 0`` packs the training examples into rows of ``pack`` tokens
    (``text.pack_examples``; the model keeps the examples apart by their
    segments); evaluation splits stay one example per row. With
    ``teacher_tokenizer``, the training split also holds the teacher's
    tokenization of each example and the byte alignment of the two
    (:func:`distill_jax.data.alignment.encode_aligned_examples`; no
    truncation, no packing).
    """
    del split_seed  # the files are the splits
    if not train:
        raise ValueError("the training data is not set: pass --data=<train.jsonl> (config.task.train).")
    tok = text.load_tokenizer(tokenizer)
    out = {}
    for name, path in (("train", train), ("val", val), ("test", test)):
        if not path:
            continue
        if name == "train" and teacher_tokenizer:
            if pack:
                raise ValueError("config.task.pack > 0 is not supported with a teacher of another tokenizer; set it to 0.")
            out[name] = alignment.encode_aligned_examples(
                tok, text.load_tokenizer(teacher_tokenizer), text.read_jsonl(path), max_len=int(max_len),
                teacher_max_len=int(teacher_max_len) or int(max_len), chat=bool(chat))
        else:
            out[name] = text.encode_examples(tok, text.read_jsonl(path), max_len=int(max_len), chat=bool(chat),
                                             truncate=truncate)
    if pack:
        packed = text.pack_examples(out["train"], max_len=int(pack))
        out["train"] = {k: packed[k] for k in ("inputs", "valid", "label", "mask", "segments")}
    return out


def _student_model(student: str | Path) -> tuple[dict, str, dict]:
    """``(config.model, init_from, the Hugging Face config to carry over)`` of ``--student``."""
    student = pretrained.resolve(student)
    if pretrained.is_pretrained(student):  # a Hugging Face directory or a GGUF file: its weights are the start
        return hf.model_config(pretrained.read_config(student)), str(student), pretrained.hf_base_config(student)
    config_file = student / hf.CONFIG if student.is_dir() else student
    if not config_file.is_file():
        raise FileNotFoundError(f"--student={student}: neither a Hugging Face directory, a GGUF file nor a config.json "
                                "file.")
    values = json.loads(config_file.read_text())
    if "model_type" in values:  # a Hugging Face config without weights: trained from scratch
        return hf.model_config(hf.config_from_hf(values)), "", values
    config = tf.TransformerConfig.from_mapping({k: v for k, v in values.items() if k != "name"})
    return hf.model_config(config), "", {}


def _tokenizer_fingerprint(path: Path) -> str | None:
    return pretrained.load_tokenizer(path).fingerprint if pretrained.has_tokenizer(path) else None


def _student_tokenizer(student: str, student_tokenizer: str, teacher: str) -> Path:
    """``--student_tokenizer``, else the student directory's tokenizer, else the teacher's."""
    if student_tokenizer:
        path = Path(student_tokenizer)
        if not (path.is_file() or (path / text.TOKENIZER_FILE).exists()):
            raise FileNotFoundError(f"--student_tokenizer={path}: neither a {text.TOKENIZER_FILE} file nor a directory "
                                    "holding one.")
        return path
    if pretrained.has_tokenizer(student) and not Path(student).suffix == ".json":
        return pretrained.resolve(student)
    if teacher and pretrained.has_tokenizer(teacher):
        return pretrained.resolve(teacher)
    raise FileNotFoundError(f"no tokenizer for the student: {student} has no {text.TOKENIZER_FILE}"
                            + (f", nor has {teacher}" if teacher else "") + "; pass --student_tokenizer.")


def configure(config: ml_collections.ConfigDict, *, teacher: str, student: str, data: str, val_data: str = "",
              test_data: str = "", objective: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
              top_k: int = 0, cache_dir: str = "", sft_weight: float = 0.0, max_len: int | None = None,
              chat: bool | None = None, student_tokenizer: str = "",
              teacher_max_len: int | None = None) -> tuple[ml_collections.ConfigDict, dict]:
    """Fills ``config`` (from :func:`get_config`) from the ``distill-lm`` flags; returns it and the student's HF config."""
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}.")
    if not teacher and objective != "sft":
        raise ValueError(f"--objective={objective} needs --teacher=<Hugging Face directory or GGUF file>.")
    if teacher:
        teacher = str(pretrained.resolve(teacher))
        if not pretrained.is_pretrained(teacher):
            raise FileNotFoundError(f"--teacher={teacher} is neither a Hugging Face model directory (config.json + "
                                    f"safetensors) nor a GGUF file; short names: {', '.join(pretrained.SHORT_NAMES)}.")
    model, init_from, base = _student_model(student)
    tokenizer_dir = _student_tokenizer(student, student_tokenizer, teacher)
    cross = bool(teacher) and _tokenizer_fingerprint(tokenizer_dir) != _tokenizer_fingerprint(Path(teacher))
    if cross and objective not in CROSS_TOKENIZER_OBJECTIVES:
        raise ValueError(
            f"the student's tokenizer ({tokenizer_dir}) is not the teacher's ({teacher}), and --objective={objective} "
            "compares the two models token by token, which needs one vocabulary. Use --objective=aligned_kd or "
            "--objective=uld (cross-tokenizer KD on byte-aligned tokens), or --objective=sft on the teacher's "
            "samples (sequence-level KD)."
        )
    if teacher and not cross:
        teacher_vocab = pretrained.read_config(teacher).vocab_size
        if teacher_vocab != model["vocab_size"]:
            raise ValueError(f"the teacher predicts {teacher_vocab} tokens, the student {model['vocab_size']}: "
                             "token-level distillation needs one vocabulary.")
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = ml_collections.ConfigDict(model)
    config.init_from = init_from
    config.task.update({"tokenizer": str(tokenizer_dir), "train": str(data), "val": str(val_data), "test": str(test_data)})
    aligned = objective in ("aligned_kd", "uld")
    config.task.teacher_tokenizer = str(teacher) if aligned else ""
    if max_len is not None:
        config.task.max_len = int(max_len)
    if teacher_max_len is not None:
        config.task.teacher_max_len = int(teacher_max_len)
    if chat is not None:
        config.task.chat = bool(chat)
    terms: dict[str, Any] = {}
    if objective == "sft" or sft_weight > 0:
        terms["sft"] = {"loss": "cross_entropy", "weight": 1.0 if objective == "sft" else float(sft_weight)}
    if objective in ("forward_kl", "hinton_kd"):
        terms["kd"] = {"loss": objective, "weight": 1.0, "temperature": float(temperature)}
    elif aligned:
        terms["kd"] = {"loss": "aligned_kd" if objective == "aligned_kd" else "aligned_uld", "weight": 1.0,
                       "temperature": float(temperature), "student_tokenizer": str(tokenizer_dir),
                       "teacher_tokenizer": str(teacher)}
    elif objective == "gkd":
        terms["kd"] = {"loss": "generalized_jsd", "weight": 1.0, "temperature": float(temperature), "beta": float(beta)}
    elif objective == "top_k":
        if top_k < 1 or not cache_dir:
            raise ValueError("--objective=top_k needs --top_k=K (>= 1) and --cache_dir=<folder for the teacher cache>.")
        terms["kd"] = {"loss": "top_k_kd", "weight": 1.0, "temperature": float(temperature), "tail": "bucket"}
        config.teacher.top_k, config.teacher.cache_dir = int(top_k), str(cache_dir)
    config.objective = ml_collections.ConfigDict(terms)
    config.teacher.checkpoint = "" if objective in ("sft", "top_k") else str(teacher)
    return config, base


def ensure_cache(config: ml_collections.ConfigDict, teacher: str, *, progress: bool = True) -> None:
    """Writes (or finishes) the top-k teacher cache that ``config`` trains from."""
    from distill_jax.data import teacher_cache
    from distill_jax.training import load_datasets, load_teacher

    train = load_datasets(config.to_dict())["train"]
    apply_fn, params, _ = load_teacher(teacher)
    temperature = float(config.objective.kd.temperature)
    fingerprint = teacher_cache.fingerprint_files(pretrained.model_files(teacher))
    teacher_cache.write(config.teacher.cache_dir, lambda x, v: apply_fn(params, x, v), train["inputs"], train["valid"],
                        k=int(config.teacher.top_k), temperature=temperature, vocab_size=int(config.model.vocab_size),
                        teacher=fingerprint, tokenizer=text.load_tokenizer(config.task.tokenizer).fingerprint,
                        batch_size=int(config.eval_batch_size))


def export(out: str | Path, model: Mapping[str, Any], variables, *, base: Mapping[str, Any], tokenizer_dir: str | Path,
           dtype: str = "float32") -> Path:
    """Writes the trained student as a Hugging Face directory, or a GGUF file when ``out`` ends in ``.gguf``.

    Either way with the tokenizer it was trained with (a GGUF file carries it
    in its metadata; a directory gets the tokenizer files, or, for a
    tokenizer read from a GGUF file, its ``tokenizer.json`` and config).
    """
    config = tf.TransformerConfig.from_mapping({k: v for k, v in dict(model).items() if k != "name"})
    params = variables["params"] if "params" in variables else variables
    if str(out).endswith(".gguf"):
        from distill_jax.models import gguf

        return gguf.save(out, config, params, pretrained.load_tokenizer(tokenizer_dir), dtype=dtype,
                         name="distill-jax student")
    out = hf.save(out, config, params, dtype=dtype, hf_config=base)
    if pretrained.kind(tokenizer_dir) == "gguf":
        pretrained.load_tokenizer(tokenizer_dir).save(out)
        return out
    if Path(tokenizer_dir).is_file():  # a lone tokenizer.json
        shutil.copyfile(tokenizer_dir, out / text.TOKENIZER_FILE)
        return out
    for name in TOKENIZER_FILES:
        source = Path(tokenizer_dir) / name
        if source.is_file() and name != hf.CONFIG:
            shutil.copyfile(source, out / name)
    return out


def _read_prompts(path: str | Path) -> list:
    """The prompts of a JSONL file: a ``"prompt"`` string, or ``"messages"`` (an assistant reply at the end is dropped)."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg}).") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            messages = row["messages"]
            prompts.append(messages[:-1] if messages[-1].get("role") == "assistant" else messages)
        else:
            raise ValueError(f"{path}:{number}: a row needs a 'prompt' string or a 'messages' list.")
    if not prompts:
        raise ValueError(f"{path} holds no prompts.")
    return prompts


def _prompt_ids(tok, prompt_text: str, *, chat: bool) -> list[int]:
    """BOS (when the tokenizer uses one and a chat template has not written it already), then the prompt's ids."""
    ids = tok.encode(prompt_text)
    head = [] if chat and ids[:1] == tok.bos_prefix else tok.bos_prefix
    return head + ids


def generate_text(teacher: str | Path, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int = 0, chat: bool | None = None) -> str:
    """One completion of ``prompt`` by ``teacher`` (a directory, GGUF file or short name), as text.

    ``chat=None`` applies the tokenizer's chat template when it has one (an
    instruct model answers a user message); ``temperature=0`` is greedy.
    """
    tok = pretrained.load_tokenizer(teacher)
    config, params = pretrained.load(teacher)
    chat = tok.chat_template is not None if chat is None else bool(chat)
    prompt_text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True) \
        if chat else prompt
    ids = _prompt_ids(tok, prompt_text, chat=chat)
    sampling = generation.SamplingConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                         top_p=float(top_p), top_k=int(top_k), eos_id=tok.eos_id,
                                         pad_id=tok.pad_id if tok.pad_id is not None else 0)
    result = generation.generate(config, params, np.asarray([ids], np.int32), jax.random.key(seed), sampling)
    tokens = np.asarray(result.tokens)[0, : int(result.lengths[0])].tolist()
    return tok.decode([t for t in tokens if t != tok.eos_id], skip_special_tokens=True)


def generate_jsonl(teacher: str | Path, prompts: str | Path, out: str | Path, *, max_new_tokens: int = 128,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 16,
                   chat: bool = False, samples: int = 1) -> int:
    """Samples ``samples`` completions per prompt of ``prompts`` (JSONL) from ``teacher``; writes prompt/completion JSONL.

    Returns the number of rows written. Prompts are left-padded into
    batches; a completion ends at the tokenizer's end token.
    """
    tok = pretrained.load_tokenizer(teacher)
    config, params = pretrained.load(teacher)
    rows = _read_prompts(prompts)
    eos = tok.eos_id
    sampling = generation.SamplingConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                         top_p=float(top_p), top_k=int(top_k), eos_id=eos,
                                         pad_id=tok.pad_id if tok.pad_id is not None else 0)
    encoded = []
    for prompt in rows:
        if isinstance(prompt, str) and chat:
            prompt = [{"role": "user", "content": prompt}]
        prompt_text = prompt if isinstance(prompt, str) else tok.apply_chat_template(prompt, add_generation_prompt=True)
        ids = _prompt_ids(tok, prompt_text, chat=not isinstance(prompt, str))
        encoded.append((prompt_text, ids))
    key = jax.random.key(seed)
    written = 0
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(Path(out).with_suffix(Path(out).suffix + ".tmp"), "w") as f:
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(ids) for _, ids in batch)
            prompts_arr = np.zeros((len(batch), width), np.int32)
            valid = np.zeros((len(batch), width), bool)
            for i, (_, ids) in enumerate(batch):
                prompts_arr[i, width - len(ids):] = ids
                valid[i, width - len(ids):] = True
            for s in range(samples):
                key, sub = jax.random.split(key)
                result = generation.generate(config, params, prompts_arr, sub, sampling, prompt_valid=valid)
                tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
                for i, (prompt_text, _) in enumerate(batch):
                    ids = [t for t in tokens[i, : lengths[i]].tolist() if t != eos]
                    f.write(json.dumps({"prompt": prompt_text, "completion": tok.decode(ids, skip_special_tokens=True)}) + "\n")
                    written += 1
    Path(out).with_suffix(Path(out).suffix + ".tmp").replace(out)
    return written
