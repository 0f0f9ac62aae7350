"""A transformer teacher distilled into a smaller one on the arithmetic task, through the training core.

Profiles: ``teacher`` (trained on the ground-truth traces), ``distill``
(token-level forward KL to the teacher run in the loop, plus the traces'
cross-entropy) and ``top_k`` (KD from a cached top-k of the teacher). Each
runs on any mesh, checkpoints every epoch and resumes::

  python -m distill_jax train-teacher --config=experiments/lm_arithmetic.py:teacher --workdir=runs/lm_teacher
  python -m distill_jax distill --config=experiments/lm_arithmetic.py:distill \\
      --config.teacher.checkpoint=runs/lm_teacher --workdir=runs/lm_student --config.mesh=fsdp=4,data=2

A ``,smoke`` suffix (``distill,smoke``) gives a tiny version for tests.
"""

import ml_collections

from distill_jax.proj.reasoning import task
from distill_jax.training import default_config


def get_config(arg: str = "teacher") -> ml_collections.ConfigDict:
    profile, _, size = arg.partition(",")
    if profile not in ("teacher", "distill", "top_k") or size not in ("", "smoke"):
        raise ValueError(f"profile must be teacher|distill|top_k, optionally ',smoke'; got {arg!r}.")
    smoke = size == "smoke"
    c = default_config()
    c.dataset = "distill_jax.proj.reasoning.task:token_splits"
    c.task = ml_collections.ConfigDict(
        {"num_train": 64 if smoke else 4000, "num_val": 16 if smoke else 500, "num_test": 16 if smoke else 500,
         "max_digits": 2 if smoke else 3, "op": "add", "fmt": "trace"}
    )
    vocab = task.TOKENIZER.vocab_size
    width = {"teacher": (64, 2), "distill": (32, 2), "top_k": (32, 2)}[profile]
    if smoke:
        width = (16, 1)
    c.model = ml_collections.ConfigDict(
        {"name": "transformer", "vocab_size": vocab, "dim": width[0], "depth": width[1], "num_heads": 4,
         "num_kv_heads": 2, "mlp_dim": 2 * width[0], "max_len": 64}
    )
    c.optimizer = ml_collections.ConfigDict(
        {"name": "adamw", "learning_rate": 3e-3, "schedule": "cosine", "warmup_epochs": 0.5,
         "final_lr_fraction": 0.1, "weight_decay": 0.01}
    )
    c.batch_size = 16 if smoke else 64
    c.num_epochs = 2 if smoke else 20
    c.eval_batch_size = 64
    if profile == "teacher":
        c.objective = ml_collections.ConfigDict({"sft": {"loss": "cross_entropy", "weight": 1.0}})
    elif profile == "distill":
        c.objective = ml_collections.ConfigDict(
            {"sft": {"loss": "cross_entropy", "weight": 0.5}, "kd": {"loss": "forward_kl", "weight": 1.0, "temperature": 1.0}}
        )
    else:
        c.objective = ml_collections.ConfigDict(
            {"kd": {"loss": "top_k_kd", "weight": 1.0, "temperature": 1.0, "tail": "bucket"}}
        )
    c.teacher = ml_collections.ConfigDict({"checkpoint": "", "top_k": 4 if profile == "top_k" else 0})
    if profile == "top_k":  # or a cache on disk (distill_jax.data.teacher_cache) instead of the teacher checkpoint
        c.teacher.cache_dir = ""
    return c
