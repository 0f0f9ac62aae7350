"""distill-jax: knowledge distillation in JAX.

Modules:
  losses      pure per-example distillation losses (optax style)
  objectives  combining losses with weights and schedules
  data        TFDS loading (offline from IDX files), transfer sets, augmentation
  models      Flax teachers and students
  training    jitted steps, scanned epochs, teacher cache, checkpoints, the run loop
  sharding    device meshes, partition rules, sharded data and epochs (docs/sharding.md)
"""

__version__ = "0.1.0"
