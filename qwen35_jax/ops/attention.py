"""Grouped-query softmax attention (causal, with optional extra masking)."""

import jax
import jax.numpy as jnp


def causal_mask(q_len: int, kv_len: int | None = None, q_offset: int = 0) -> jax.Array:
    """bool [q_len, kv_len]: query i (at absolute position q_offset + i) sees keys at positions <= its own."""
    kv_len = q_len if kv_len is None else kv_len
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    return jnp.arange(kv_len)[None, :] <= q_pos


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v with grouped KV heads; scores and softmax in float32.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    mask: bool, broadcastable to [batch, q_len, kv_len] (True = attend). Query head h uses KV head
    h // (heads / kv_heads). Returns [batch, q_len, heads, head_dim] in q's dtype.
    """
    b, q_len, heads, dim = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, q_len, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=jnp.float32) * dim**-0.5
    mask = jnp.broadcast_to(mask, (b, q_len, k.shape[1]))[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, q_len, heads, dim).astype(q.dtype)
