"""Evaluation of generated samples (`python -m sdxl_jax.eval.shapes WORKDIR`)."""
