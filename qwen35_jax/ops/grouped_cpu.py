"""Grouped SwiGLU FFN for CPU, where `jax.lax.ragged_dot` runs ~50x below matmul speed.

Rows arrive sorted by expert, unpadded. A loop with a dynamic trip count visits only the experts that
received rows, slices each expert's weights once, and runs its rows as dense matmuls: full blocks of
BLOCK rows, then one conditional block of each size BLOCK/2 ... MIN_BLOCK, then one MIN_BLOCK tail. A
block may run past its expert's last row into the next expert's rows; experts run in increasing order,
so those rows are overwritten later (BLOCK slack rows at the end keep slices in bounds). Fewer than
MIN_BLOCK rows are wasted per expert. `while_loop` has no reverse mode, so a custom VJP replays the
same schedule backwards, masking the overrun rows out of the weight gradients, under the matmul precision
the forward was traced with (qwen35_jax.precision).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from qwen35_jax.precision import current_precision, matmul_scope

BLOCK, MIN_BLOCK = 64, 4  # chosen by benchmark on a 2-core x86 CPU (64..128 and 4..8 were equal)


def _schedule(starts, counts, experts, n_experts, ctx_init, block_fn, ctx_done, carry):
    """Runs `block_fn(carry, ctx, expert, row, end, size=...)` over every block of every non-empty expert."""
    def skip(carry, ctx, e, row, end):
        return carry, ctx

    def one_expert(n, carry):
        e = experts[n]
        start, count = starts[e], counts[e]
        end = start + count
        ctx = ctx_init(e)
        n_full = count // BLOCK
        carry, ctx = lax.fori_loop(
            0, n_full, lambda i, cc: block_fn(*cc, e, start + i * BLOCK, end, size=BLOCK), (carry, ctx))
        row, rest, size = start + n_full * BLOCK, count - n_full * BLOCK, BLOCK // 2
        while size >= MIN_BLOCK:  # static unroll over BLOCK/2, ..., MIN_BLOCK
            carry, ctx = lax.cond(rest >= size, functools.partial(block_fn, size=size), skip,
                                  carry, ctx, e, row, end)
            taken = jnp.where(rest >= size, size, 0)
            row, rest, size = row + taken, rest - taken, size // 2
        carry, ctx = lax.cond(rest > 0, functools.partial(block_fn, size=MIN_BLOCK), skip,
                              carry, ctx, e, row, end)
        return ctx_done(carry, ctx, e)

    return lax.fori_loop(0, n_experts, one_expert, carry)


def _expert_gate_up(w1, e):
    """Expert e's [H, 2, I] gate/up weights as one [H, 2I] matrix (sliced from the unreshaped parameter, so
    the custom VJP keeps the parameter itself as its residual, not a reshaped copy of every expert)."""
    w = w1[e]
    return w.reshape(w.shape[0], -1)


def _forward_block(inter):
    def block_fn(ys, ctx, e, row, end, size):
        gate_up, down, xs = ctx
        h = lax.dynamic_slice_in_dim(xs, row, size) @ gate_up
        y = (jax.nn.silu(h[:, :inter]) * h[:, inter:]) @ down
        return lax.dynamic_update_slice_in_dim(ys, y.astype(ys.dtype), row, 0), ctx
    return block_fn


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _grouped(xs, w1, w2, starts, counts, experts, n_experts, precision):
    """xs: [N + BLOCK, H] sorted rows; w1: [E, H, 2, I]; w2: [E, I, H] -> [N + BLOCK, H].

    precision: the matmul precision in force when the call was traced; the forward and backward passes
    (which JAX may trace later, outside the caller's scope) run under it."""
    with matmul_scope(precision):
        return _schedule(starts, counts, experts, n_experts, lambda e: (_expert_gate_up(w1, e), w2[e], xs),
                         _forward_block(w2.shape[1]), lambda ys, ctx, e: ys, jnp.zeros_like(xs))


def _grouped_fwd(xs, w1, w2, starts, counts, experts, n_experts, precision):
    out = _grouped(xs, w1, w2, starts, counts, experts, n_experts, precision)
    return out, (xs, w1, w2, starts, counts, experts, n_experts)


def _grouped_bwd(precision, res, dys):
    with matmul_scope(precision):
        return _grouped_grads(res, dys)


def _grouped_grads(res, dys):
    xs, w1, w2, starts, counts, experts, n_experts = res
    inter = w2.shape[1]

    def block_fn(carry, ctx, e, row, end, size):
        dxs, dw1, dw2 = carry
        w1e, w2e, dw1e, dw2e = ctx
        xb = lax.dynamic_slice_in_dim(xs, row, size)
        valid = (row + jnp.arange(size) < end)[:, None]  # overrun rows belong to the next expert
        dy = jnp.where(valid, lax.dynamic_slice_in_dim(dys, row, size), 0)
        h = xb @ w1e
        hg, hu = h[:, :inter], h[:, inter:]
        sg = jax.nn.sigmoid(hg)
        da = dy @ w2e.T
        dh = jnp.concatenate([da * hu * sg * (1 + hg * (1 - sg)), da * hg * sg], axis=1)
        dxs = lax.dynamic_update_slice_in_dim(dxs, (dh @ w1e.T).astype(dxs.dtype), row, 0)
        return (dxs, dw1, dw2), (w1e, w2e, dw1e + xb.T @ dh, dw2e + (hg * sg * hu).T @ dy)

    def done(carry, ctx, e):
        dxs, dw1, dw2 = carry
        dw1e = ctx[2].reshape(dw1.shape[1:]).astype(dw1.dtype)
        return (dxs, lax.dynamic_update_index_in_dim(dw1, dw1e, e, 0),
                lax.dynamic_update_index_in_dim(dw2, ctx[3].astype(dw2.dtype), e, 0))

    def init(e):
        w1e = _expert_gate_up(w1, e)
        return w1e, w2[e], jnp.zeros(w1e.shape, jnp.float32), jnp.zeros(w2.shape[1:], jnp.float32)

    dxs, dw1, dw2 = _schedule(starts, counts, experts, n_experts, init, block_fn, done,
                              (jnp.zeros_like(xs), jnp.zeros_like(w1), jnp.zeros_like(w2)))
    return dxs, dw1, dw2, None, None, None, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_swiglu_blocked(x_sorted, group_sizes, w_gate_up, w_down):
    """x_sorted: [N, H] rows grouped by expert (ascending); group_sizes: int32 [E];
    w_gate_up: [E, H, 2, I]; w_down: [E, I, H]. Returns [N, H]: each row through its expert's
    `(silu(x Wg) * x Wu) Wd`."""
    n, hidden = x_sorted.shape
    starts = (jnp.cumsum(group_sizes) - group_sizes).astype(jnp.int32)
    experts = jnp.argsort(group_sizes == 0, stable=True).astype(jnp.int32)  # non-empty experts first
    n_experts = jnp.sum(group_sizes > 0)
    xs = jnp.concatenate([x_sorted, jnp.zeros((BLOCK, hidden), x_sorted.dtype)])
    ys = _grouped(xs, w_gate_up, w_down, starts, group_sizes, experts, n_experts, current_precision())
    return ys[:n]
