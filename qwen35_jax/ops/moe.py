"""Dropless MoE: route, sort assignments by expert, grouped SwiGLU matmuls, unsort, combine.

The grouped matmul has two backends with identical results: `jax.lax.ragged_dot` (TPU/GPU) and a
block-padded loop for CPU, where `ragged_dot` runs ~50x below matmul speed (see `grouped_cpu.py`).
"""

import jax
import jax.numpy as jnp

from qwen35_jax.ops.grouped_cpu import grouped_swiglu_blocked


def route(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Softmax (float32) -> top-k -> renormalise. logits: [tokens, experts].

    Returns weights [tokens, top_k] in logits' dtype and expert ids int32 [tokens, top_k].
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(logits.dtype), ids.astype(jnp.int32)


def swiglu(h: jax.Array) -> jax.Array:
    """h: [..., 2, I] (gate, up) -> silu(gate) * up: [..., I]."""
    return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


def grouped_swiglu_ragged(x_sorted, group_sizes, w_gate_up, w_down):
    """`ragged_dot` backend. x_sorted: [N, H] rows grouped by expert; group_sizes: int32 [E];
    w_gate_up: [E, H, 2, I]; w_down: [E, I, H]. Returns [N, H]."""
    e, hidden, _, inter = w_gate_up.shape
    h = jax.lax.ragged_dot(x_sorted, w_gate_up.reshape(e, hidden, 2 * inter), group_sizes)
    act = swiglu(h.reshape(-1, 2, inter))
    return jax.lax.ragged_dot(act, w_down, group_sizes)


def default_backend() -> str:
    return "blocked" if jax.default_backend() == "cpu" else "ragged"


def moe_experts(x, weights, ids, w_gate_up, w_down, backend: str = "auto"):
    """Routed expert output `sum_j weights[t, j] * FFN_{ids[t, j]}(x[t])`.

    x: [tokens, H]; weights, ids: [tokens, top_k]; w_gate_up: [E, H, 2, I]; w_down: [E, I, H].
    Returns [tokens, H] in x's dtype (the k products summed in float32).
    """
    tokens, top_k = ids.shape
    num_experts = w_gate_up.shape[0]
    backend = default_backend() if backend == "auto" else backend
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    x_sorted = x[order // top_k]
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
    if backend == "ragged":
        y_sorted = grouped_swiglu_ragged(x_sorted, group_sizes, w_gate_up, w_down)
    else:
        y_sorted = grouped_swiglu_blocked(x_sorted, group_sizes, w_gate_up, w_down)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(tokens, top_k, -1)
    return jnp.einsum("tkh,tk->th", y, weights, preferred_element_type=jnp.float32).astype(x.dtype)
