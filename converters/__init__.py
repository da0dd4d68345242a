"""Produce Core ML models from other worlds: JAX functions and Flax NNX modules."""
from converters.jax import convert, to_program

__all__ = ["convert", "to_program"]
