"""Gated DeltaNet (`linear_attn` on linear_attention layers)."""

import jax
import jax.numpy as jnp
from flax import nnx

from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.norms import GatedRMSNorm
from qwen35_jax.nn.params import param
from qwen35_jax.ops.conv import causal_conv1d, conv_state_after
from qwen35_jax.ops.delta_rule import gated_delta_rule_chunked, gated_delta_step, gated_delta_steps
from qwen35_jax.ops.norm import l2_normalize


class GatedDeltaNet(nnx.Module):
    """Linear attention with the gated delta rule.

    HF's fused `in_proj_qkv` and `conv1d` are stored split into q / k / v parts so each can be sharded
    by heads: in_proj_q, in_proj_k [H, key_heads, dk]; in_proj_v, in_proj_z [H, heads, dv];
    conv_q, conv_k [K, key_heads, dk]; conv_v [K, heads, dv]; in_proj_a, in_proj_b [H, heads].
    """

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, kc, std = cfg.hidden_size, cfg.linear_conv_kernel_dim, cfg.initializer_range
        nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        key_axes, value_axes = ("embed", "key_heads", "head_dim"), ("embed", "heads", "head_dim")
        self.in_proj_q = param(rngs, (h, nk, dk), key_axes, dtype, std=std)
        self.in_proj_k = param(rngs, (h, nk, dk), key_axes, dtype, std=std)
        self.in_proj_v = param(rngs, (h, nv, dv), value_axes, dtype, std=std)
        self.in_proj_z = param(rngs, (h, nv, dv), value_axes, dtype, std=std)
        self.in_proj_b = param(rngs, (h, nv), ("embed", "heads"), dtype, std=std)
        self.in_proj_a = param(rngs, (h, nv), ("embed", "heads"), dtype, std=std)
        self.conv_q = param(rngs, (kc, nk, dk), (None, "key_heads", "head_dim"), dtype, std=std)
        self.conv_k = param(rngs, (kc, nk, dk), (None, "key_heads", "head_dim"), dtype, std=std)
        self.conv_v = param(rngs, (kc, nv, dv), (None, "heads", "head_dim"), dtype, std=std)
        self.A_log = param(rngs, (nv,), ("heads",), dtype, init="a_log")
        self.dt_bias = param(rngs, (nv,), ("heads",), dtype, init="ones")
        self.norm = GatedRMSNorm(dv, cfg.rms_norm_eps, dtype, rngs)
        self.out_proj = param(rngs, (nv, dv, h), ("heads", "head_dim", "embed"), dtype, std=std)
        self.heads_per_key = nv // nk

    def _conv_silu(self, x, proj, conv, state, n_valid, segment_ids, keep_steps=False):
        """x @ proj, then causal conv + SiLU. Returns ([B, L, heads, d] in x's dtype, new conv state)."""
        y, state = causal_conv1d(jnp.einsum("blh,hnd->blnd", x, proj[...]), conv[...], state, n_valid,
                                 segment_ids, keep_window=keep_steps)
        return jax.nn.silu(y.astype(jnp.float32)).astype(x.dtype), state

    @jax.named_scope("gated_deltanet")
    def __call__(self, x: jax.Array, state: dict | None = None, n_valid: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, keep_steps: bool = False) -> tuple[jax.Array, dict]:
        """x: [B, L, H] -> ([B, L, H], new state).

        state: None (start from zeros) or {"conv_q", "conv_k", "conv_v": [B, K-1, heads, d] (x's dtype),
        "recurrent": [B, heads, dk, dv] float32}. n_valid: int [B], real tokens per row (right padding
        after them gets beta = 0 and g = 0, so it leaves the recurrent state as it was). A single token
        (L == 1) takes the one-step recurrence, longer inputs the chunked form. segment_ids: int [B, L] or
        None: packed documents; the conv and recurrent states restart at each segment start.
        keep_steps (speculative verification of a few tokens, with a state): the tokens run one by one as plain
        decoding runs them, and the new state keeps every step: conv states as their windows [B, K-1+L, ...] and
        "recurrent" [B, L+1, heads, dk, dv] (before any token, then after each); `state_after_steps` picks one.
        """
        state = state or {}
        conv_args = (n_valid, segment_ids, keep_steps)
        q, conv_q = self._conv_silu(x, self.in_proj_q, self.conv_q, state.get("conv_q"), *conv_args)
        k, conv_k = self._conv_silu(x, self.in_proj_k, self.conv_k, state.get("conv_k"), *conv_args)
        v, conv_v = self._conv_silu(x, self.in_proj_v, self.conv_v, state.get("conv_v"), *conv_args)
        z = jnp.einsum("blh,hnd->blnd", x, self.in_proj_z[...])
        beta = jax.nn.sigmoid(x @ self.in_proj_b[...])
        a = (x @ self.in_proj_a[...]).astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a + self.dt_bias[...].astype(jnp.float32))
        if n_valid is not None:
            valid = (jnp.arange(x.shape[1])[None, :] < n_valid[:, None])[..., None]
            beta, g = jnp.where(valid, beta, 0), jnp.where(valid, g, 0.0)
        q = l2_normalize(q.astype(jnp.float32)) * q.shape[-1] ** -0.5  # per key head, then shared
        k = l2_normalize(k.astype(jnp.float32))
        q = jnp.repeat(q, self.heads_per_key, axis=2)
        k = jnp.repeat(k, self.heads_per_key, axis=2)
        if keep_steps:
            out, recurrent = gated_delta_steps(q, k, v, g, beta, state["recurrent"])
        elif x.shape[1] == 1 and "recurrent" in state:
            out, recurrent = gated_delta_step(state["recurrent"], q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])
            out = out[:, None]
        else:
            out, recurrent = gated_delta_rule_chunked(q, k, v, g, beta, state.get("recurrent"),
                                                      segment_ids=segment_ids)
        out = self.norm(out.astype(x.dtype), z)
        new_state = {"conv_q": conv_q, "conv_k": conv_k, "conv_v": conv_v, "recurrent": recurrent}
        return jnp.einsum("blnd,ndh->blh", out, self.out_proj[...]), new_state


def state_after_steps(steps: dict, n: jax.Array) -> dict:
    """A GDN layer's decode state after the first n[b] of the tokens a `keep_steps` call ran (n in 0..L):
    selected from the kept steps, no recompute. steps: that call's new state; n: int [B]."""
    kernel = steps["conv_q"].shape[1] - steps["recurrent"].shape[1] + 2  # window K-1+L, steps L+1
    out = {name: conv_state_after(steps[name], n, kernel) for name in ("conv_q", "conv_k", "conv_v")}
    pick = n.reshape(-1, 1, 1, 1, 1)
    out["recurrent"] = jnp.take_along_axis(steps["recurrent"], pick, axis=1)[:, 0]
    return out
