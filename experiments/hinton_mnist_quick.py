"""Hinton, Vinyals & Dean (2015) section 3, MNIST, quick profile (`make reproduce`).

Teacher 2x1200 (dropout + max-norm + 2-px jitter), student 2x800 on hard labels,
student 2x800 distilled at T=20: soft targets plus 0.1 x the hard-label loss
(the paper's "weighted average of the two objectives", section 2).
Argument "smoke" gives a tiny version for tests:
  python -m distill_jax reproduce --config=experiments/hinton_mnist_quick.py:smoke
"""

import ml_collections

from distill_jax.proj.hinton import recipes


def get_config(profile: str = "quick") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "hinton_mnist_quick" if profile == "quick" else f"hinton_mnist_{profile}"
    c.title = f"Hinton et al. 2015, MNIST ({profile} profile)"
    teacher_epochs, student_epochs = {"quick": (30, 20), "smoke": (1, 1)}[profile]
    stages = {
        "teacher": recipes.hinton_teacher(teacher_epochs),
        "hard": recipes.hinton_student(student_epochs),
        "distilled": recipes.hinton_student(
            student_epochs, temperature=20.0, hard_weight=0.1, teacher_checkpoint="@teacher"
        ),
    }
    if profile == "smoke":
        for stage in stages.values():
            stage.transfer.subset = 2000
    c.stages = ml_collections.ConfigDict(stages)
    c.stage_order = ("teacher", "hard", "distilled")
    c.labels = {
        "teacher": "teacher 2x1200, dropout + jitter",
        "hard": "student 2x800, hard labels",
        "distilled": "student 2x800, soft targets T=20 (+0.1 x hard)",
    }
    c.paper = {"teacher": 67, "hard": 146, "distilled": 74}
    return c
