"""Interleaved multimodal RoPE (mRoPE) with a partial rotary dimension."""

import jax
import jax.numpy as jnp
import numpy as np


def mrope_axis_of_slot(rotary_dim: int, mrope_section: tuple[int, ...]) -> np.ndarray:
    """For each frequency slot i < rotary_dim/2, which position row (0=T, 1=H, 2=W) gives its angle.

    Slot i takes H if i % 3 == 1 and i < 3*sec[1], W if i % 3 == 2 and i < 3*sec[2], otherwise T.
    """
    i = np.arange(rotary_dim // 2)
    axis = np.zeros_like(i)
    axis[(i % 3 == 1) & (i < 3 * mrope_section[1])] = 1
    axis[(i % 3 == 2) & (i < 3 * mrope_section[2])] = 2
    return axis


def rope_cos_sin(positions: jax.Array, rotary_dim: int, theta: float,
                 mrope_section: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables, float32.

    positions: int [batch, seq] (text: all three rows equal) or [3, batch, seq] (T, H, W rows).
    Returns cos, sin: [batch, seq, rotary_dim] (the half-width angles repeated twice, NeoX layout).
    """
    if positions.ndim == 2:
        positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
    inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, rot/2]
    axis = mrope_axis_of_slot(rotary_dim, mrope_section)
    picked = _pick_axis(freqs, axis)
    emb = jnp.concatenate([picked, picked], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _pick_axis(freqs: jax.Array, axis: np.ndarray) -> jax.Array:
    """freqs: [3, B, L, n]; axis: [n] in {0,1,2} -> [B, L, n] with slot i taken from row axis[i]."""
    onehot = jnp.asarray(np.eye(3, dtype=np.float32)[axis].T)  # [3, n]
    return jnp.sum(freqs * onehot[:, None, None, :], axis=0)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first rotary_dim channels of each head (rotate_half convention); the rest pass through.

    x: [batch, seq, heads, head_dim]; cos, sin: [batch, seq, rotary_dim] float32 (cast to x's dtype, as HF).
    """
    rot = cos.shape[-1]
    cos = cos.astype(x.dtype)[:, :, None, :]
    sin = sin.astype(x.dtype)[:, :, None, :]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
