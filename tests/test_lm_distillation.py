"""End to end, in process: a tiny teacher learns the arithmetic task by SFT, and a smaller student distilled
from it by token-level KD (forward KL, teacher in the loop) comes to predict the teacher's next tokens."""

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.proj.reasoning import task as R
from distill_jax.models import transformer as tf
from distill_jax.proj.reasoning import sequence as S

VOCAB = R.TOKENIZER.vocab_size
LENGTH = R.max_prompt_len(1) + R.max_completion_len(1)
TEACHER = tf.TransformerConfig(vocab_size=VOCAB, dim=32, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=64, max_len=LENGTH)
STUDENT = tf.TransformerConfig(vocab_size=VOCAB, dim=16, depth=1, num_heads=2, num_kv_heads=1, mlp_dim=32, max_len=LENGTH)
OPTIMIZER = S.OptimizerSpec(learning_rate=1e-2, steps=100, warmup_steps=5)


def test_token_kd_student_learns_to_predict_the_teachers_next_tokens_on_held_out_problems():
    splits = R.make_splits(0, num_train=64, num_test=32, num_ood=1, max_digits=1)
    train = R.encode_problems(splits["train"], length=LENGTH)
    test = {k: jnp.asarray(v) for k, v in R.encode_problems(splits["test"], length=LENGTH).items()}
    on_completion = np.asarray(test["loss_mask"]) > 0

    def logits(config, params):
        return np.asarray(jax.jit(tf.Transformer(config).apply)({"params": params}, test["inputs"], test["valid"]))

    teacher, _ = S.train(TEACHER, train, spec=S.LossSpec("sft"), optimizer=OPTIMIZER, batch_size=16, seed=0)
    teacher_logits = logits(TEACHER, teacher)
    teacher_next = teacher_logits.argmax(-1)
    # The teacher learned something worth distilling: most held-out completion tokens right.
    assert (teacher_next == np.asarray(test["targets"]))[on_completion].mean() > 0.6

    spec = S.LossSpec("forward_kl")
    initial = S.init_train_state(STUDENT, OPTIMIZER, 1).params  # what train() starts from with seed=1
    student, history = S.train(
        STUDENT, train, spec=spec, optimizer=OPTIMIZER, batch_size=16, seed=1, teachers=[(TEACHER, teacher)], log_every=20
    )
    # The KD loss falls, in training and on held-out problems (scored against the real teacher's logits).
    assert history["final_loss"] < 0.3 * history["loss"][0][1]
    kd = lambda params: float(S.sequence_loss(spec, jnp.asarray(logits(STUDENT, params)), test, jnp.asarray(teacher_logits)))
    assert kd(student) < 0.3 * kd(initial)
    # Greedy next-token agreement with the teacher on held-out completion positions: far above chance (1/22),
    # and not something the untrained student already has.
    agree = lambda params: (logits(STUDENT, params).argmax(-1) == teacher_next)[on_completion].mean()
    assert agree(initial) < 0.2
    assert agree(student) > 0.5, agree(student)
