"""distill-jax: knowledge distillation in JAX.

Modules:
  losses      pure per-example distillation losses (optax style)
  objectives  combining losses with weights and schedules
  data        TFDS loading (offline from IDX files), transfer sets, augmentation
  models      Flax teachers and students: MLPs, a CNN, a Llama/Qwen-style transformer
  generation  sampling from a transformer (temperature, top-k, top-p, KV cache)
  training    the one training core: steps, scanned epochs, teacher cache, checkpoints, the run loop
  sharding    device meshes, partition rules, sharded data (docs/sharding.md)
  proj        paper studies built on the above: proj.hinton, proj.reasoning

docs/architecture.md shows how they fit together.
"""

__version__ = "0.1.0"
