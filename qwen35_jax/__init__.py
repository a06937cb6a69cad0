"""Qwen3.5 in JAX / Flax NNX."""

from qwen35_jax.config import ConfigError, ModelConfig
from qwen35_jax.loading import load_model
from qwen35_jax.nn.model import Qwen35

__all__ = ["ConfigError", "ModelConfig", "Qwen35", "load_model"]
