"""Grouped SwiGLU FFN for CPU: rows padded per expert to whole blocks, one matmul pair per block."""

import jax
import jax.numpy as jnp

BLOCK_ROWS = 64


def grouped_swiglu_blocked(x_sorted, group_sizes, w_gate_up, w_down, block=BLOCK_ROWS):
    """x_sorted: [N, H] rows grouped by expert; group_sizes: int32 [E]; w_gate_up: [E, H, 2, I];
    w_down: [E, I, H]. Returns [N, H] = per row, its expert's `(silu(x Wg) * x Wu) Wd`."""
    n, hidden = x_sorted.shape
    e, _, _, inter = w_gate_up.shape
    padded_sizes = -(-group_sizes // block) * block
    padded_ends = jnp.cumsum(padded_sizes)
    expert_of_row = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=n)
    rank = jnp.arange(n) - (jnp.cumsum(group_sizes) - group_sizes)[expert_of_row]
    dest = (padded_ends - padded_sizes)[expert_of_row] + rank
    capacity = -(-(n + e * (block - 1)) // block) * block
    xp = jnp.zeros((capacity, hidden), x_sorted.dtype).at[dest].set(x_sorted)
    n_blocks = padded_ends[-1] // block
    block_expert = jnp.searchsorted(padded_ends, jnp.arange(capacity // block) * block, side="right")
    w1 = w_gate_up.reshape(e, hidden, 2 * inter)

    def body(b, out):
        xb = jax.lax.dynamic_slice_in_dim(xp, b * block, block)
        ex = block_expert[b]
        h = (xb @ w1[ex]).reshape(block, 2, inter)
        y = (jax.nn.silu(h[:, 0]) * h[:, 1]) @ w_down[ex]
        return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), b * block, 0)

    out = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros_like(xp))
    return out[dest]
