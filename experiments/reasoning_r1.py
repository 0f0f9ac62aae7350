"""The reasoning-distillation study: can a student beat its teacher, what does the verifier buy, does on-policy help.

``make reproduce-reasoning`` = ``python -m distill_jax reproduce-reasoning --config=experiments/reasoning_r1.py``.
The design is in :mod:`distill_jax.proj.reasoning.study`. Profiles (the argument after ``:``):

* ``full`` (default): 3-digit addition with carry traces, 2,000 training / 500 validation /
  1,000 test problems, OOD = problems whose units digits are 3+8, 8+3 or 6+6 (held out), 4 paired seeds, two at a
  time in single-core worker processes (4 seeds rather than 5: see the seeds line).
* ``quick``: the full design with 2 seeds, fewer steps and a smaller test set (a first look, not the result).
* ``smoke``: 1- and 2-digit problems, a few steps, one seed: the test suite's run of every row.

Every value can be overridden, e.g. ``--config.seeds='(0,1)' --config.student.steps=1200``.
"""

import ml_collections

ALL_ROWS = ("gt_answers", "gt_traces", "greedy", "answer", "trace", "tokenkd", "gkd", "sft_more", "curve")


def _stage(model: dict, steps: int, batch_size: int, learning_rate: float, warmup_steps: int, eval_every: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {"model": model, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
         "warmup_steps": warmup_steps, "weight_decay": 0.01, "eval_every": eval_every}
    )


def get_config(profile: str = "full") -> ml_collections.ConfigDict:
    if profile not in ("full", "quick", "smoke"):
        raise ValueError(f"profile must be full, quick or smoke, got {profile!r}.")
    c = ml_collections.ConfigDict()
    c.name = f"reasoning_r1_{profile}"
    c.title = f"Reasoning distillation: can a student beat its teacher? ({profile} profile)"
    c.rows = ALL_ROWS
    c.task = ml_collections.ConfigDict(
        {"max_digits": 3, "held_out": (), "held_out_units": ((3, 8), (8, 3), (6, 6)), "num_train": 2000, "num_val": 500, "num_test": 1000,
         "num_ood": 500, "data_seed": 1234}
    )
    teacher_model = {"dim": 64, "depth": 3, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 192, "tie_embeddings": True}
    student_model = {"dim": 48, "depth": 2, "num_heads": 4, "num_kv_heads": 1, "mlp_dim": 128, "tie_embeddings": True}
    # One teacher run; its weak and strong checkpoints are picked on validation greedy accuracy.
    # Checked every 25 steps: the validation curve climbs from 40 % to 85 % within 100 steps (quick profile).
    c.teacher = _stage(teacher_model, steps=2000, batch_size=32, learning_rate=3e-3, warmup_steps=100, eval_every=25)
    c.teacher.seed = 0
    c.teacher.weak_range = (0.5, 0.7)
    # Every student row: the same budget, checkpoint chosen on validation.
    # Quick profile: at 1,200 steps most rows still peak at their last checkpoint, so the full one runs 3,000.
    c.student = _stage(student_model, steps=3000, batch_size=32, learning_rate=3e-3, warmup_steps=50, eval_every=300)
    # GKD and its compute-matched SFT control: extra steps from the SFT'd student.
    c.finetune = _stage(student_model, steps=600, batch_size=32, learning_rate=1e-3, warmup_steps=20, eval_every=100)
    # 4 seeds, not 5: two rounds of two workers fit the hour (a fifth seed would be a third round).
    c.seeds = (0, 1, 2, 3)
    c.workers = 2  # seeds in parallel processes, one core each
    c.eval = ml_collections.ConfigDict({"pass_k": 4, "pass_temperature": 1.0, "batch_size": 256})
    # K teacher samples per training problem at this temperature, filtered by each verifier.
    c.samples = ml_collections.ConfigDict({"num_samples": 4, "temperature": 1.0, "curve_fractions": (0.25, 0.5)})
    c.token_kd = ml_collections.ConfigDict({"temperature": 1.0})
    c.gkd = ml_collections.ConfigDict({"beta": 0.5, "temperature": 1.0, "on_policy_fraction": 0.5, "sample_temperature": 1.0})
    if profile == "quick":
        c.seeds = (0, 1)
        c.task.update({"num_test": 500, "num_ood": 200, "num_val": 300})
        c.teacher.update({"steps": 1500})
        c.teacher.update({"eval_every": 100})
        c.student.update({"steps": 1200, "eval_every": 300})
        c.finetune.update({"steps": 200, "eval_every": 100})
        c.samples.update({"curve_fractions": (0.25,)})
    if profile == "smoke":
        c.seeds = (0,)
        c.workers = 1
        c.task.update({"max_digits": 2, "held_out": ((1, 2),), "num_train": 200, "num_val": 8, "num_test": 16, "num_ood": 8})  # both kinds of OOD
        tiny = {"dim": 16, "depth": 1, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 32, "tie_embeddings": True}
        # Enough steps for a teacher with some verified samples, so that every row's code runs.
        c.teacher = _stage({"dim": 64, "depth": 2, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 64, "tie_embeddings": False},
                           steps=400, batch_size=16, learning_rate=1e-2, warmup_steps=5, eval_every=50)
        c.teacher.seed = 0
        c.teacher.weak_range = (0.0, 0.5)
        c.student = _stage(tiny, steps=4, batch_size=8, learning_rate=1e-2, warmup_steps=1, eval_every=2)
        c.finetune = _stage(tiny, steps=2, batch_size=8, learning_rate=1e-2, warmup_steps=0, eval_every=1)
        # eval batch = the student's batch: on-policy sampling reuses the evaluation's compiled loop.
        c.eval.update({"pass_k": 2, "batch_size": 8})
        c.samples.update({"num_samples": 2, "curve_fractions": (0.5,)})
    return c
