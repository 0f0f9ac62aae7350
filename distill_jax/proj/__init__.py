"""Paper studies built on the library: each composes the core (data, models, objectives, training), never the reverse.

* :mod:`distill_jax.proj.hinton`: Hinton, Vinyals & Dean (2015), section 3.
* :mod:`distill_jax.proj.reasoning`: distilling verifiable chain-of-thought (the R1 recipe and its rivals).
"""
