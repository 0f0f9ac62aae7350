"""Shared test settings.

Hypothesis profiles: ``distill`` (the default, 25 examples per property,
derandomized so that a run is reproducible) and ``mutation`` (8 examples, for
`make mutation`, which runs the tests once per mutant). Choose with
``HYPOTHESIS_PROFILE``.

Traced argument checks (``distill_jax.checks``) are on in tests, and in the
commands the tests start.
"""

import os

from hypothesis import settings

# Traced checks on: an invalid traced value raises at its source in tests (distill_jax.checks).
os.environ.setdefault("DISTILL_JAX_CHECKS", "1")

settings.register_profile("distill", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("mutation", max_examples=8, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "distill"))
