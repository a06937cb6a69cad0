"""Gated full attention (`self_attn` on full_attention layers)."""

import jax
import jax.numpy as jnp
from flax import nnx

from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.norms import RMSNorm
from qwen35_jax.nn.params import param
from qwen35_jax.ops.attention import attention
from qwen35_jax.ops.rope import apply_rope


class GatedAttention(nnx.Module):
    """GQA attention with per-head q/k RMSNorm, partial mRoPE and a sigmoid output gate.

    q_proj [H, heads, 2*D] holds, per head, the query (first D channels) then its gate (next D).
    """

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, nq, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = param(rngs, (h, nq, 2 * d), ("embed", "heads", "head_dim"), dtype)
        self.k_proj = param(rngs, (h, nkv, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = param(rngs, (h, nkv, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = param(rngs, (nq, d, h), ("heads", "head_dim", "embed"), dtype)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs, axis_name="head_dim")
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs, axis_name="head_dim")
        self.head_dim = d

    def project_kv(self, x, cos, sin):
        """x: [B, L, H] -> keys (normed, rotated) and values, each [B, L, kv_heads, D]."""
        k = self.k_norm(jnp.einsum("blh,hnd->blnd", x, self.k_proj[...]))
        v = jnp.einsum("blh,hnd->blnd", x, self.v_proj[...])
        return apply_rope(k, cos, sin), v

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, L, H]; cos, sin: [B, L, rotary_dim]; mask: bool broadcastable to [B, L, L]."""
        qg = jnp.einsum("blh,hnd->blnd", x, self.q_proj[...])
        q, gate = qg[..., :self.head_dim], qg[..., self.head_dim:]
        q = apply_rope(self.q_norm(q), cos, sin)
        k, v = self.project_kv(x, cos, sin)
        out = attention(q, k, v, mask) * jax.nn.sigmoid(gate)
        return jnp.einsum("blnd,ndh->blh", out, self.o_proj[...])
