"""sdxl_jax: Stable Diffusion XL training and sampling in JAX/Flax."""

__version__ = "0.1.0"
