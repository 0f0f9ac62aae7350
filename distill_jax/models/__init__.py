"""Flax models: Hinton's MLPs and a small CNN, built from configs.

Every model is a Flax linen module used purely:
``logits = model.apply(params, images, train=..., rngs={"dropout": key})``.
"""

from distill_jax.models.vision import CNN, MLP, create, init_params, max_norm_project, model_signature

__all__ = ["MLP", "CNN", "create", "init_params", "max_norm_project", "model_signature"]
