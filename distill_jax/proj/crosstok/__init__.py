"""Cross-tokenizer distillation on the reasoning task: a character-level teacher, a BPE student.

:mod:`~distill_jax.proj.crosstok.study` (``make reproduce-crosstok``) compares the student on the data alone,
sequence-level KD on the teacher's verified samples, ULD and the aligned KD loss
(:mod:`distill_jax.cross_tokenizer`) against a same-tokenizer reference.
"""
