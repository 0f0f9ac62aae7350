"""Profile of the JAX KD step of benchmarks/lm_distill.py: where the time goes, part by part.

Times (median of 3 after a compile run) for the 50M -> 11M Qwen2-style pair
at batch 4 x 512 tokens: the teacher's forward pass (logits, and hidden states
only), the student's forward + backward with cross-entropy (and without the
output head), forward KL alone on [4, 512, 32768] logits (the library's
``losses.forward_kl`` against a plain two-log-softmax formula), a plain
hand-written KD step in one jit, and the training core's step with and
without a token mask. The PyTorch parts are timed in benchmarks/lm_distill.py.

    .venv/bin/python benchmarks/lm_distill_profile.py

A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lm_distill  # noqa: E402
from distill_jax import losses, objectives  # noqa: E402
from distill_jax.models import hf  # noqa: E402
from distill_jax.models import transformer as tf  # noqa: E402
from distill_jax.training.steps import create_train_state, make_train_step  # noqa: E402


def timeit(f, n: int = 3) -> float:
    jax.block_until_ready(f())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 3)


def main() -> None:
    d = Path(tempfile.mkdtemp())
    lm_distill.build(d, "50m")
    tc, tp = hf.load(d / "teacher")
    sc, sp = hf.load(d / "student")
    teacher, student = tf.Transformer(tc), tf.Transformer(sc)
    tokens = jnp.asarray(lm_distill._batch(tc.vocab_size, 4, 512)[0])
    tparams, params = {"params": tp}, {"params": sp}
    tx = optax.adamw(1e-4, weight_decay=0.01)
    rows = {}
    rows["teacher forward, logits"] = timeit(lambda: jax.jit(teacher.apply)(tparams, tokens))
    hidden = jax.jit(lambda p, x: teacher.apply(p, x, return_hidden=True))
    rows["teacher forward, hidden states only"] = timeit(lambda: hidden(tparams, tokens))

    def ce(p, x):
        return optax.losses.softmax_cross_entropy_with_integer_labels(student.apply(p, x), x).mean()

    grad_ce = jax.jit(jax.grad(ce))
    rows["student forward+backward, cross-entropy"] = timeit(lambda: grad_ce(params, tokens))
    grad_body = jax.jit(jax.grad(lambda p, x: student.apply(p, x, return_hidden=True).sum()))
    rows["student forward+backward, no output head"] = timeit(lambda: grad_body(params, tokens))
    k = jax.random.split(jax.random.key(0), 2)
    s, t = jax.random.normal(k[0], (4, 512, tc.vocab_size)), jax.random.normal(k[1], (4, 512, tc.vocab_size))
    ours = jax.jit(jax.value_and_grad(lambda s, t: losses.forward_kl(s, t).mean()))

    def plain(s, t):
        lq, lp = jax.nn.log_softmax(s), jax.nn.log_softmax(t)
        return (jnp.exp(lp) * (lp - lq)).sum(-1).mean()

    plain_kl = jax.jit(jax.value_and_grad(plain))
    rows["forward KL value+grad, losses.forward_kl"] = timeit(lambda: ours(s, t))
    rows["forward KL value+grad, plain log-softmax formula"] = timeit(lambda: plain_kl(s, t))

    @jax.jit
    def plain_step(params, opt, tparams, x):
        t = jax.lax.stop_gradient(teacher.apply(tparams, x))
        g = jax.grad(lambda p: plain(student.apply(p, x), t))(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt

    opt = tx.init(params)
    rows["KD step, plain (one jit, hand-written KL)"] = timeit(lambda: plain_step(params, opt, tparams, tokens))
    for name, with_mask in (("KD step, training core, token mask", True), ("KD step, training core, no mask", False)):
        obj = objectives.from_spec({"kd": {"loss": "forward_kl", "weight": 1.0, "temperature": 1.0}})
        step = jax.jit(make_train_step(student.apply, tx, obj, teacher_apply=teacher.apply, inputs=("inputs",)))
        state = create_train_state(params, tx, jax.random.key(0))
        batch = {"inputs": tokens, "label": tokens} | ({"mask": jnp.ones((4, 512))} if with_mask else {})
        rows[name] = timeit(lambda: step(state, tparams, batch))
    width = max(map(len, rows))
    for name, seconds in rows.items():
        print(f"{name:<{width}}  {seconds:6.3f} s")


if __name__ == "__main__":
    main()
