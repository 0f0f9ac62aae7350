"""Reasoning distillation at CPU scale: the DeepSeek-R1 recipe and its token-level, on-policy and multi-teacher variants.

``make reproduce-reasoning`` = ``python -m distill_jax reproduce-reasoning --config=experiments/reasoning_r1.py``.
Profiles (the argument after ``:``):

* ``full`` (default): 3-digit addition with carry traces, OOD on 4 digits, 3 seeds,
  two seeds at a time in single-core worker processes; sized for about an hour on a 2-core CPU.
* ``quick``: one seed of the full profile, in this process.
* ``smoke``: 1-digit problems, a few steps, one seed: the test suite's run of every row.

(The same names as the other experiments': ``smoke`` for tests, ``quick`` for less, ``full``.)

Every value can be overridden, e.g. ``--config.seeds='(0,)' --config.student.steps=500``.
"""

import ml_collections

ALL_ROWS = (
    "answer_only", "traces", "seqkd", "tokenkd", "tokenkd_topk",
    "gkd_offpolicy", "gkd_onpolicy", "multi_seqkd", "multi_tokenkd",
)


def _stage(model: dict, steps: int, batch_size: int, learning_rate: float, warmup_steps: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {"model": model, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
         "warmup_steps": warmup_steps, "weight_decay": 0.01}
    )


def get_config(profile: str = "full") -> ml_collections.ConfigDict:
    if profile not in ("full", "quick", "smoke"):
        raise ValueError(f"profile must be full, quick or smoke, got {profile!r}.")
    c = ml_collections.ConfigDict()
    c.name = f"reasoning_r1_{profile}"
    c.title = f"Reasoning distillation, arithmetic with carry traces ({profile} profile)"
    c.rows = ALL_ROWS
    c.task = ml_collections.ConfigDict(
        {"op": "add", "max_digits": 3, "ood_digits": 4, "num_train": 2000, "num_test": 300, "num_ood": 200, "data_seed": 1234}
    )
    teacher_model = {"dim": 64, "depth": 3, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 192, "tie_embeddings": True}
    student_model = {"dim": 48, "depth": 2, "num_heads": 4, "num_kv_heads": 1, "mlp_dim": 128, "tie_embeddings": True}
    # Step budgets: enough for the teacher to solve the task and for the
    # student's rows to separate (RESULTS.md, "Step budgets").
    c.teacher = _stage(teacher_model, steps=1000, batch_size=32, learning_rate=3e-3, warmup_steps=100)
    c.student = _stage(student_model, steps=1200, batch_size=32, learning_rate=3e-3, warmup_steps=50)
    c.seeds = (0, 1, 2)
    # Seeds run in parallel processes, one core each (see run_reasoning_study).
    c.workers = 2
    c.eval = ml_collections.ConfigDict({"pass_k": 4, "pass_temperature": 1.0, "batch_size": 256})
    # R1 recipe: K samples per training problem at temperature, verified answers kept;
    # the accuracy-vs-samples curve refits on these fractions of the kept pool.
    c.seqkd = ml_collections.ConfigDict({"num_samples": 4, "temperature": 1.0, "curve_fractions": (0.25, 0.5)})
    c.token_kd = ml_collections.ConfigDict({"temperature": 1.0, "top_k": (1, 4), "tail": "bucket"})
    c.gkd = ml_collections.ConfigDict({"beta": 0.5, "temperature": 1.0, "on_policy_fraction": 0.5})
    if profile == "quick":  # one seed of the full profile
        c.seeds = (0,)
        c.workers = 1
    if profile == "smoke":
        c.seeds = (0,)
        c.workers = 1
        c.task.update({"max_digits": 1, "ood_digits": 2, "num_train": 64, "num_test": 16, "num_ood": 8})
        c.teacher = _stage(
            {"dim": 32, "depth": 1, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 64, "tie_embeddings": False},
            steps=60, batch_size=16, learning_rate=1e-2, warmup_steps=5,
        )
        c.student = _stage(
            {"dim": 16, "depth": 1, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 32, "tie_embeddings": True},
            steps=3, batch_size=8, learning_rate=1e-2, warmup_steps=1,
        )
        c.eval.update({"pass_k": 2, "batch_size": 8})  # = the student's batch: on-policy sampling reuses the compile
        c.seqkd.update({"num_samples": 2, "curve_fractions": (0.5,)})
        c.token_kd.update({"top_k": (2,)})
    return c
