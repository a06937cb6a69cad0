"""RMS norms as pure functions (the math of `Qwen3_5RMSNorm` and `Qwen3_5RMSNormGated`)."""

import jax
import jax.numpy as jnp


def _normalize(x32: jax.Array, eps: float) -> jax.Array:
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Zero-centred RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + w)` in float32, cast to x's dtype.

    x: [..., dim]; weight: [dim] (stored as the offset from 1).
    """
    y = _normalize(x.astype(jnp.float32), eps) * (1.0 + weight.astype(jnp.float32))
    return y.astype(x.dtype)


def gated_rms_norm(x: jax.Array, gate: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gated RMSNorm of Gated DeltaNet: `w * norm(x) * silu(gate)`, plain (not 1 + w) weight.

    x, gate: [..., dim]; weight: [dim]. The normalised value is rounded to x's dtype before the weight
    multiply and the gate multiply happens in float32, as in HF.
    """
    xn = _normalize(x.astype(jnp.float32), eps).astype(x.dtype)
    t = weight * xn
    return (t.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """`x * rsqrt(sum(x^2) + eps)` over the last axis (eps added to the sum of squares, as in FLA/HF)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
