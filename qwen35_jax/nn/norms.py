"""Norm modules (math in qwen35_jax.ops.norm)."""

import jax
from flax import nnx

from qwen35_jax.nn.params import param
from qwen35_jax.ops.norm import gated_rms_norm, rms_norm


class RMSNorm(nnx.Module):
    """Zero-centred RMSNorm over the last axis (weight stored as the offset from 1, init zeros)."""

    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs, axis_name: str = "embed"):
        self.weight = param(rngs, (dim,), (axis_name,), dtype, init="zeros")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class GatedRMSNorm(nnx.Module):
    """Gated DeltaNet's output norm: `w * rmsnorm(x) * silu(gate)` (plain weight, init ones)."""

    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, (dim,), ("head_dim",), dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        return gated_rms_norm(x, gate, self.weight[...], self.eps)
