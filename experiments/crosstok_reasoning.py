"""Cross-tokenizer distillation on the reasoning task (issue 19): a character-level teacher, a BPE student.

``make reproduce-crosstok`` = ``python -m distill_jax reproduce-crosstok --config=experiments/crosstok_reasoning.py``.
The design is in :mod:`distill_jax.proj.crosstok.study`. Profiles (the argument after ``:``):

* ``full`` (default): 1-3 digit additions with carry traces; teachers on 3,000 problems, students on a
  transfer set of 1,000, 2,000 steps each, 1,000 test problems, 5 paired seeds (1-5: seed 0 was the probe
  that sized the student, see RESULTS.md).
* ``smoke``: tiny models and sets, 2 seeds: the test suite's run of every row.

Every value can be overridden, e.g. ``--config.seeds='(0,1,2)' --config.student.num_epochs=40``.
"""

import ml_collections

ROWS = ("data", "seqkd", "uld", "aligned", "aligned_bucket", "same_tok")


def _stage(model: dict, batch_size: int, learning_rate: float, warmup_epochs: float, **length) -> ml_collections.ConfigDict:
    """A training stage; ``length``: ``num_epochs`` (teachers) or ``steps`` (students: the same for every row)."""
    return ml_collections.ConfigDict({"model": model, "batch_size": batch_size, "learning_rate": learning_rate,
                                      "warmup_epochs": warmup_epochs, **length})


def get_config(profile: str = "full") -> ml_collections.ConfigDict:
    if profile not in ("full", "smoke"):
        raise ValueError(f"profile must be full or smoke, got {profile!r}.")
    c = ml_collections.ConfigDict()
    c.name = f"crosstok_reasoning_{profile}"
    c.title = f"Cross-tokenizer distillation on the reasoning task ({profile} profile)"
    c.command = "make reproduce-crosstok" if profile == "full" else \
        f"python -m distill_jax reproduce-crosstok --config=experiments/crosstok_reasoning.py:{profile}"
    c.rows = ROWS
    c.seeds = (1, 2, 3, 4, 5)
    c.task = ml_collections.ConfigDict({"max_digits": 3, "num_teacher": 3000, "num_transfer": 1000, "num_val": 300,
                                        "num_test": 1000, "data_seed": 2026})
    # Tokenizer B: 22 characters and special tokens + merges learned from the teacher set's text.
    c.tokenizer_b_size = 96
    teacher_model = {"dim": 64, "depth": 3, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 192}
    student_model = {"dim": 48, "depth": 2, "num_heads": 4, "num_kv_heads": 1, "mlp_dim": 128}
    c.teacher = _stage(teacher_model, num_epochs=20, batch_size=32, learning_rate=3e-3, warmup_epochs=1.0)
    c.student = _stage(student_model, steps=2000, batch_size=32, learning_rate=3e-3, warmup_epochs=2.0)
    # The KD term beside the cross-entropy (weight 1 each, T = 1), fixed before any run: nothing tuned on test.
    c.kd = ml_collections.ConfigDict({"weight": 1.0, "temperature": 1.0})
    # Sequence-level KD: K samples of T_A per transfer prompt at this temperature, answer-verified.
    c.seqkd = ml_collections.ConfigDict({"num_samples": 4, "temperature": 1.0, "seed": 0})
    c.eval_batch_size = 250
    if profile == "smoke":
        c.seeds = (0, 1)
        c.task.update({"max_digits": 2, "num_teacher": 256, "num_transfer": 32, "num_val": 16, "num_test": 32})
        c.tokenizer_b_size = 48
        tiny = {"dim": 16, "depth": 1, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 32}
        c.teacher = _stage({"dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 64},
                           num_epochs=30, batch_size=16, learning_rate=1e-2, warmup_epochs=0.5)
        c.student = _stage(tiny, steps=32, batch_size=2, learning_rate=1e-2, warmup_epochs=0.0)
        c.seqkd.update({"num_samples": 2})
        c.eval_batch_size = 32
    return c
