"""The decode state: a pytree stacked like the layers, with static shapes so decoding never recompiles.

    {"lengths": int32 [B],                         tokens already in the state, per row
     "rope_deltas": int32 [B],                     mRoPE position minus token index for the tokens that follow
                                                   (0 for text; set by a multimodal prefill, HF's `rope_deltas`)
     "layers": [one dict per layer of the period],  each leaf with a leading [num_periods] axis when scanned
        attention layer: {"k", "v": [B, max_len, kv_heads, head_dim]}        post-norm, post-RoPE keys
        GDN layer:       {"conv_q", "conv_k": [B, K-1, key_heads, dk], "conv_v": [B, K-1, heads, dv],
                          "recurrent": [B, heads, dk, dv] float32}
     "mtp": {"lengths": int32 [B],                 only when asked for (mtp=True, a model with an MTP block):
             "k", "v": [B, max_len, kv_heads, head_dim]}   the MTP layer's cache (`nn.mtp.MTP.forward_with_state`),
                                                   its entry i holding sequence index i, filled to its own length}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen35_jax.config import ModelConfig


def layer_state_shapes(cfg: ModelConfig, layer_type: str, batch: int, max_len: int, dtype) -> dict:
    """{name: ShapeDtypeStruct} of one layer's decode state."""
    if layer_type == "full_attention":
        kv = jax.ShapeDtypeStruct((batch, max_len, cfg.num_key_value_heads, cfg.head_dim), dtype)
        return {"k": kv, "v": kv}
    k1 = cfg.linear_conv_kernel_dim - 1
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    return {"conv_q": jax.ShapeDtypeStruct((batch, k1, nk, dk), dtype),
            "conv_k": jax.ShapeDtypeStruct((batch, k1, nk, dk), dtype),
            "conv_v": jax.ShapeDtypeStruct((batch, k1, nv, dv), dtype),
            "recurrent": jax.ShapeDtypeStruct((batch, nv, dk, dv), jnp.float32)}


def decode_state_shapes(cfg: ModelConfig, batch: int, max_len: int, dtype, mtp: bool = False) -> dict:
    """The whole decode state as ShapeDtypeStructs (for dry-runs and sharding); with mtp=True, the MTP
    block's cache too (speculative decoding; a ValueError when the model has no MTP block)."""
    stack = cfg.num_periods > 1

    def stacked(s):
        return jax.ShapeDtypeStruct((cfg.num_periods, *s.shape), s.dtype) if stack else s
    layers = [jax.tree.map(stacked, layer_state_shapes(cfg, t, batch, max_len, dtype)) for t in cfg.period]
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    state = {"lengths": rows, "rope_deltas": rows, "layers": layers}
    if _with_mtp(cfg, mtp):
        state["mtp"] = {"lengths": rows, **layer_state_shapes(cfg, "full_attention", batch, max_len, dtype)}
    return state


def _with_mtp(cfg: ModelConfig, mtp: bool) -> bool:
    if mtp and not cfg.mtp_num_hidden_layers:
        raise ValueError("mtp=True: the model has no MTP block (mtp_num_hidden_layers=0, or a checkpoint without "
                         "mtp.* tensors)")
    return mtp


STATE_AXES = {  # logical axis names of each decode-state leaf (for the sharding rules)
    "k": ("batch", None, "kv_heads", "head_dim"), "v": ("batch", None, "kv_heads", "head_dim"),
    "conv_q": ("batch", None, "key_heads", "head_dim"), "conv_k": ("batch", None, "key_heads", "head_dim"),
    "conv_v": ("batch", None, "heads", "head_dim"), "recurrent": ("batch", "heads", None, None),
    "lengths": ("batch",),
}


def decode_state_axes(cfg: ModelConfig, mtp: bool = False) -> dict:
    """The decode state's structure with a tuple of logical axis names in place of each leaf."""
    stack = ("layers",) if cfg.num_periods > 1 else ()
    layers = [{name: stack + STATE_AXES[name] for name in layer_state_shapes(cfg, t, 1, 1, jnp.float32)}
              for t in cfg.period]
    axes = {"lengths": ("batch",), "rope_deltas": ("batch",), "layers": layers}
    if _with_mtp(cfg, mtp):
        axes["mtp"] = {name: STATE_AXES[name] for name in ("lengths", "k", "v")}
    return axes


def decode_state_shardings(cfg: ModelConfig, batch: int, max_len: int, dtype, mesh, mtp: bool = False) -> dict:
    """NamedShardings of the decode state by the rules of qwen35_jax.sharding: rows like the batch (over data,
    fsdp and expert), heads over tensor, each where the axes divide the dim."""
    from jax.sharding import NamedSharding

    from qwen35_jax.sharding import logical_spec
    return jax.tree.map(lambda axes, s: NamedSharding(mesh, logical_spec(axes, s.shape, mesh)),
                        decode_state_axes(cfg, mtp), decode_state_shapes(cfg, batch, max_len, dtype, mtp),
                        is_leaf=lambda x: isinstance(x, tuple))


def abstract_decode_state(cfg: ModelConfig, batch: int, max_len: int, dtype, mesh=None, mtp: bool = False) -> dict:
    """`decode_state_shapes` with the shardings `init_decode_state` places them with on `mesh`."""
    shapes = decode_state_shapes(cfg, batch, max_len, dtype, mtp)
    if mesh is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        decode_state_shardings(cfg, batch, max_len, dtype, mesh, mtp))


def init_decode_state(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, mesh=None,
                      mtp: bool = False) -> dict:
    """An empty decode state (all zeros, lengths 0); with a mesh, created sharded (`decode_state_shardings`),
    no device ever holding the whole state. mtp=True adds the MTP block's cache (speculative decoding)."""
    shapes = decode_state_shapes(cfg, batch, max_len, dtype, mtp)
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
    if mesh is None:
        return zeros()
    return jax.jit(zeros, out_shardings=decode_state_shardings(cfg, batch, max_len, dtype, mesh, mtp))()


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
