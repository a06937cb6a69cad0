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
        std = cfg.initializer_range
        self.q_proj = param(rngs, (h, nq, 2 * d), ("embed", "heads", "head_dim"), dtype, std=std)
        self.k_proj = param(rngs, (h, nkv, d), ("embed", "kv_heads", "head_dim"), dtype, std=std)
        self.v_proj = param(rngs, (h, nkv, d), ("embed", "kv_heads", "head_dim"), dtype, std=std)
        self.o_proj = param(rngs, (nq, d, h), ("heads", "head_dim", "embed"), dtype, std=std)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs, axis_name="head_dim")
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs, axis_name="head_dim")
        self.head_dim = d

    @jax.named_scope("attention")
    def __call__(self, x: jax.Array, ctx, cache: dict | None = None) -> tuple[jax.Array, dict | None]:
        """x: [B, L, H]; ctx: the layer Context (cos/sin [B, L, rot], mask [B|1, L, S], starts [B]).

        Without a cache, keys are this call's own (S = L). With cache {"k", "v": [B, S, kv_heads, D]},
        the new keys/values are written at positions starts[b] + t and queries attend over the cache.
        Returns ([B, L, H], new cache or None).
        """
        qg = jnp.einsum("blh,hnd->blnd", x, self.q_proj[...])
        q, gate = qg[..., :self.head_dim], qg[..., self.head_dim:]
        q = apply_rope(self.q_norm(q), ctx.cos, ctx.sin)
        k = apply_rope(self.k_norm(jnp.einsum("blh,hnd->blnd", x, self.k_proj[...])), ctx.cos, ctx.sin)
        v = jnp.einsum("blh,hnd->blnd", x, self.v_proj[...])
        if cache is not None:
            rows = jnp.arange(x.shape[0])[:, None]
            cols = ctx.starts[:, None] + jnp.arange(x.shape[1])[None, :]
            cache = {"k": cache["k"].at[rows, cols].set(k.astype(cache["k"].dtype), mode="drop"),
                     "v": cache["v"].at[rows, cols].set(v.astype(cache["v"].dtype), mode="drop")}
            k, v = cache["k"], cache["v"]
        out = attention(q, k, v, ctx.mask) * jax.nn.sigmoid(gate)
        return jnp.einsum("blnd,ndh->blh", out, self.o_proj[...]), cache
