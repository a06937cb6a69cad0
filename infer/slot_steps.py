"""The engine core's jitted device steps over a fixed number of decode slots (static shapes, no recompiles).

    slots = {"state": decode state [S rows], "token": int32 [S] (each slot's last sampled token, fed next),
             "counts": int32 [S, V], "seen": bool [S, V] (penalty bookkeeping), "sampling": batch_arrays [S],
             "step": int32 [S] (each row's sampling step), "remaining": int32 [S] (tokens it may still make),
             "stop_ids": int32 [S, MAX_STOP_IDS] (EOS + stop ids, -1 padded)}

`insert` writes one prefilled request into a slot; `decode_block` runs up to K decode steps for every active slot
in one `lax.while_loop` with the stop checks on device (EOS / stop ids, max tokens, a full cache), so the host
sees K tokens per round trip. Stop strings are the host's (`infer.engine._Row`), which is authoritative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from infer.sampling import sample
from qwen35_jax.nn.model import state_max_len

MAX_STOP_IDS = 8    # stop ids checked on device per slot (more are checked on the host only)
MAX_TOP_LOGPROBS = 20


def batch_axis(cfg) -> dict:
    """The decode state's structure with each leaf's row axis (layer leaves are period-stacked when scanned)."""
    from qwen35_jax.cache import decode_state_axes
    return jax.tree.map(lambda axes: axes.index("batch"), decode_state_axes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def put_row(tree, row_tree, slot, axes):
    """tree with row `slot` (traced int) replaced by row_tree's only row, per leaf along its row axis."""
    def put(x, row, axis):
        start = [0] * x.ndim
        start[axis] = slot
        return jax.lax.dynamic_update_slice(x, row.astype(x.dtype), start)
    return jax.tree.map(put, tree, row_tree, axes)


def log_probs(logits, token, want_top: jax.Array):
    """Raw-model log-probabilities (as vLLM reports them): of `token` [B], and the MAX_TOP_LOGPROBS best
    (ids, values) [B, N], computed only when `want_top` (a bool scalar) so plain requests skip the top-k."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    n = min(MAX_TOP_LOGPROBS, logits.shape[-1])

    def top(lp):
        values, ids = jax.lax.top_k(lp, n)
        return ids.astype(jnp.int32), values
    empty = lambda lp: (jnp.zeros(lp.shape[:1] + (n,), jnp.int32), jnp.zeros(lp.shape[:1] + (n,), jnp.float32))  # noqa: E731
    ids, values = jax.lax.cond(want_top, top, empty, logp)
    return chosen, ids, values


def make_steps(engine, num_steps: int):
    """(insert, decode_block, traces) jitted for `engine`'s model and mesh; traces counts each one's tracing."""
    traces = {"insert": 0, "decode_block": 0}
    cfg = engine.config
    axes = batch_axis(cfg)

    def insert(slots, row_state, token, counts, seen, sampling, remaining, stop_ids, slot):
        """Slot `slot` takes a prefilled request: its one-row state, first token and bookkeeping."""
        traces["insert"] += 1
        row = {"state": row_state, "token": token, "counts": counts, "seen": seen, "sampling": sampling,
               "step": jnp.ones((1,), jnp.int32), "remaining": remaining, "stop_ids": stop_ids}
        row_axes = {"state": axes, "token": 0, "counts": 0, "seen": 0, "step": 0, "remaining": 0, "stop_ids": 0,
                    "sampling": jax.tree.map(lambda _: 0, sampling)}
        slots = put_row(slots, row, slot, row_axes)
        return {**slots, "state": engine._placed(slots["state"])}

    def decode_block(params, slots, active, want_logprobs):
        """Up to `num_steps` decode steps of every active slot (active: bool [S]). Returns (slots, outputs):
        outputs = {"token", "valid", "logprob": [K, S], "top_ids", "top_logprobs": [K, S, N], "active": [S]}
        (valid: the slot was active at that step, so that token is real)."""
        traces["decode_block"] += 1
        model = nnx.merge(engine.graphdef, params)
        rows = active.shape[0]
        n = min(MAX_TOP_LOGPROBS, cfg.vocab_size)
        outputs = {"token": jnp.zeros((num_steps, rows), jnp.int32), "valid": jnp.zeros((num_steps, rows), bool),
                   "logprob": jnp.zeros((num_steps, rows), jnp.float32),
                   "top_ids": jnp.zeros((num_steps, rows, n), jnp.int32),
                   "top_logprobs": jnp.zeros((num_steps, rows, n), jnp.float32)}

        def body(carry):
            i, slots, active, out = carry
            state = slots["state"]
            hidden, state = model.forward_with_state(slots["token"][:, None], state, active.astype(jnp.int32),
                                                     moe_backend=engine.moe_backend)
            state = engine._placed(state)
            logits = model.logits(hidden[:, 0]).astype(jnp.float32)
            # idle slots count as greedy, so an all-greedy batch skips the sampler's sort (`sample`)
            sampling = {**slots["sampling"], "temperature": jnp.where(active, slots["sampling"]["temperature"], 0.0)}
            token = sample(logits, slots["counts"], slots["seen"], sampling, slots["step"])
            token = jnp.where(active, token, slots["token"])
            r = jnp.arange(rows)
            counts = slots["counts"].at[r, token].add(active.astype(jnp.int32))
            seen = slots["seen"].at[r, token].set(slots["seen"][r, token] | active)
            remaining = slots["remaining"] - active
            stopped = jnp.any(token[:, None] == slots["stop_ids"], axis=-1) | (remaining <= 0) \
                | (state["lengths"] >= state_max_len(state))
            chosen, top_ids, top_values = log_probs(logits, token, want_logprobs & jnp.any(active))
            out = {"token": out["token"].at[i].set(token), "valid": out["valid"].at[i].set(active),
                   "logprob": out["logprob"].at[i].set(chosen), "top_ids": out["top_ids"].at[i].set(top_ids),
                   "top_logprobs": out["top_logprobs"].at[i].set(top_values)}
            slots = {**slots, "state": state, "token": token, "counts": counts, "seen": seen,
                     "step": slots["step"] + active, "remaining": remaining}
            return i + 1, slots, active & ~stopped, out

        def cond(carry):
            i, _, active, _ = carry
            return (i < num_steps) & jnp.any(active)

        _, slots, active, outputs = jax.lax.while_loop(cond, body, (0, slots, active, outputs))
        return slots, {**outputs, "active": active}

    insert_jit = engine._in_mesh(jax.jit(insert, donate_argnums=(0,)))
    block_jit = engine._in_mesh(jax.jit(decode_block, donate_argnums=(1,)))
    return insert_jit, block_jit, traces
