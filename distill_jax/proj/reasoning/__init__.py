"""Distilling verifiable chain-of-thought on an arithmetic task: the R1 recipe and its rivals.

* :mod:`~distill_jax.proj.reasoning.task`: the task, its tokenizer and verifier, and its splits as token arrays
  (``token_splits``: a dataset the training core reads, ``config.dataset =
  "distill_jax.proj.reasoning.task:token_splits"``);
* :mod:`~distill_jax.proj.reasoning.sequence`: the study's LM training loop (on-policy batches, fused
  teachers), generation-based evaluation and rejection sampling;
* :mod:`~distill_jax.proj.reasoning.study`: the study itself (``make reproduce-reasoning``).

Entry point: ``python -m distill_jax.proj.reasoning --config=experiments/reasoning_r1.py:smoke``
(the same as ``python -m distill_jax reproduce-reasoning``).
"""
