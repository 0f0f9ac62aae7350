"""Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", section 3.

* :mod:`~distill_jax.proj.hinton.recipes`: the paper's teacher and student run configs;
* :mod:`~distill_jax.proj.hinton.stages`: a study of a few stages (``make reproduce``);
* :mod:`~distill_jax.proj.hinton.full`: the whole section, seeds x temperatures x widths and transfer sets
  (``make reproduce-full``), with :mod:`~distill_jax.proj.hinton.report` for its tables and plots.

Entry point: ``python -m distill_jax.proj.hinton quick|full --config=experiments/<file>.py``
(the same as ``python -m distill_jax reproduce|reproduce-full``).
"""
