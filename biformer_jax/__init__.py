"""biformer-jax: BiFormer and DeBiFormer in JAX/Flax."""

__version__ = "0.1.0"
