"""The engine core's jitted device steps over a fixed number of decode slots (static shapes, no recompiles).

    slots = {"state": decode state [S rows], "token": int32 [S] (each slot's last sampled token, fed next),
             "counts": int32 [S, V], "seen": bool [S, V] (penalty bookkeeping), "sampling": batch_arrays [S],
             "step": int32 [S] (each row's sampling step), "remaining": int32 [S] (tokens it may still make),
             "stop_ids": int32 [S, MAX_STOP_IDS] (EOS + stop ids, -1 padded),
             speculative decoding only: "carry": {"hidden" [S, K+1, H], "tokens" int32 [S, K+1], "n" int32 [S]}
             (`infer.speculative.speculative_step`'s MTP carry; the state then holds the MTP cache too)}

`insert` writes one prefilled request into a slot; the block runs up to `num_steps` steps for every active slot
in one `lax.while_loop` with the stop checks on device (EOS / stop ids, max tokens, a full cache), so the host
sees several tokens per round trip. Each step is `decode_step` (one token per slot) or, when the engine has
`num_speculative_tokens` K > 0, `speculative_decode_step` (one draft-verify-accept step: 1..K+1 tokens per slot);
the block returns [steps, S, T] outputs (T = 1 or K+1) with `valid` flags; the host emits the valid ones in
order. Stop strings are the host's (`infer.engine._Row`), which is authoritative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from infer.sampling import sample
from infer.speculative import last_emitted, speculative_step
from qwen35_jax.nn.model import state_max_len

MAX_STOP_IDS = 8    # stop ids checked on device per slot (more are checked on the host only)
MAX_TOP_LOGPROBS = 20


def batch_axis(cfg, mtp: bool = False) -> dict:
    """The decode state's structure with each leaf's row axis (layer leaves are period-stacked when scanned)."""
    from qwen35_jax.cache import decode_state_axes
    return jax.tree.map(lambda axes: axes.index("batch"), decode_state_axes(cfg, mtp),
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


def token_log_probs(logits, tokens, want_top):
    """`log_probs` of tokens [S, T] under logits [S, T, V] -> (chosen [S, T], top ids / values [S, T, N])."""
    s, t, v = logits.shape
    chosen, ids, values = log_probs(logits.reshape(s * t, v), tokens.reshape(s * t), want_top)
    return chosen.reshape(s, t), ids.reshape(s, t, -1), values.reshape(s, t, -1)


def make_steps(engine, num_steps: int):
    """(insert, block, traces) jitted for `engine`'s model and mesh: the block's steps are speculative when the
    engine has num_speculative_tokens K > 0; traces counts each one's tracing."""
    traces = {"insert": 0, "decode_block": 0}
    cfg, k = engine.config, engine.num_speculative_tokens
    width = k + 1  # tokens per slot per step
    axes = batch_axis(cfg, mtp=k > 0)
    n_top = min(MAX_TOP_LOGPROBS, cfg.vocab_size)

    def insert(slots, row_state, token, counts, seen, sampling, remaining, stop_ids, slot, hidden=None):
        """Slot `slot` takes a prefilled request: its one-row state, first token and bookkeeping; with speculative
        decoding also `hidden` [1, H], the final-normed hidden state at the prompt's last token, which with the
        first token starts the MTP carry."""
        traces["insert"] += 1
        row = {"state": row_state, "token": token, "counts": counts, "seen": seen, "sampling": sampling,
               "step": jnp.ones((1,), jnp.int32), "remaining": remaining, "stop_ids": stop_ids}
        row_axes = {"state": axes, "token": 0, "counts": 0, "seen": 0, "step": 0, "remaining": 0, "stop_ids": 0,
                    "sampling": jax.tree.map(lambda _: 0, sampling)}
        if hidden is not None:
            like = slots["carry"]["hidden"]
            row["carry"] = {"hidden": jnp.zeros((1,) + like.shape[1:], like.dtype).at[:, 0].set(hidden),
                            "tokens": jnp.zeros((1, width), jnp.int32).at[:, 0].set(token),
                            "n": jnp.ones((1,), jnp.int32)}
            row_axes["carry"] = {"hidden": 0, "tokens": 0, "n": 0}
        slots = put_row(slots, row, slot, row_axes)
        return {**slots, "state": engine._placed(slots["state"])}

    def decode_step(model, slots, active, want_logprobs):
        """One token for every active slot: (slots, stopped [S], outputs with [S, 1] leaves)."""
        state = slots["state"]
        hidden, state = model.forward_with_state(slots["token"][:, None], state, active.astype(jnp.int32),
                                                 moe_backend=engine.moe_backend)
        state = engine._placed(state)
        logits = model.logits(hidden[:, 0]).astype(jnp.float32)
        # idle slots count as greedy, so an all-greedy batch skips the sampler's sort (`sample`)
        sampling = {**slots["sampling"], "temperature": jnp.where(active, slots["sampling"]["temperature"], 0.0)}
        token = sample(logits, slots["counts"], slots["seen"], sampling, slots["step"])
        token = jnp.where(active, token, slots["token"])
        r = jnp.arange(active.shape[0])
        counts = slots["counts"].at[r, token].add(active.astype(jnp.int32))
        seen = slots["seen"].at[r, token].set(slots["seen"][r, token] | active)
        remaining = slots["remaining"] - active
        stopped = jnp.any(token[:, None] == slots["stop_ids"], axis=-1) | (remaining <= 0) \
            | (state["lengths"] >= state_max_len(state))
        chosen, top_ids, top_values = token_log_probs(logits[:, None], token[:, None], want_logprobs & jnp.any(active))
        out = {"token": token[:, None], "valid": active[:, None], "logprob": chosen, "top_ids": top_ids,
               "top_logprobs": top_values}
        slots = {**slots, "state": state, "token": token, "counts": counts, "seen": seen,
                 "step": slots["step"] + active, "remaining": remaining}
        return slots, stopped, out

    def speculative_decode_step(model, slots, active, want_logprobs):
        """One draft-verify-accept step (`infer.speculative.speculative_step`) for every active slot, limited to
        its remaining tokens and the cache room: (slots, stopped [S], outputs with [S, K+1] leaves, valid for
        the emitted ones, and "accepted" [S], the accepted drafts). Logprobs are the target model's (raw
        log-softmax of the verify logits at each emitted token)."""
        state = slots["state"]
        limit = jnp.where(active, jnp.minimum(slots["remaining"], engine.max_len - state["lengths"]), 0)
        carry = {**slots["carry"], "n": slots["carry"]["n"] * active}  # idle slots leave their MTP cache alone
        # idle slots count as greedy, so an all-greedy batch skips the random draws (`infer.speculative`)
        sampling = {**slots["sampling"], "temperature": jnp.where(active, slots["sampling"]["temperature"], 0.0)}
        tokens, emitted, accepted, state, carry, counts, seen = speculative_step(
            model, state, slots["token"], carry, slots["counts"], slots["seen"], sampling, slots["step"], limit,
            slots["stop_ids"], k, engine.moe_backend)
        state = engine._placed(state)
        token = last_emitted(tokens, emitted, slots["token"])
        remaining = slots["remaining"] - emitted
        stopped = jnp.any(token[:, None] == slots["stop_ids"], axis=-1) | (remaining <= 0) \
            | (state["lengths"] >= engine.max_len)

        def target_log_probs():  # carry["hidden"]: the verify forward's final-normed hidden states
            return token_log_probs(model.logits(carry["hidden"]).astype(jnp.float32), tokens, jnp.bool_(True))
        chosen, top_ids, top_values = jax.lax.cond(want_logprobs & jnp.any(active), target_log_probs,
                                                   lambda: empty_outputs(active.shape[0])[1:4])
        out = {"token": tokens, "valid": jnp.arange(width)[None] < emitted[:, None], "logprob": chosen,
               "top_ids": top_ids, "top_logprobs": top_values, "accepted": accepted}
        carry = {**carry, "hidden": carry["hidden"].astype(slots["carry"]["hidden"].dtype)}
        slots = {**slots, "state": state, "token": token, "counts": counts, "seen": seen, "carry": carry,
                 "step": slots["step"] + active, "remaining": remaining}
        return slots, stopped, out

    def empty_outputs(rows, steps=()):
        """(token, logprob, top_ids, top_logprobs) zeros shaped [*steps, S, T(, N)]."""
        lead = tuple(steps) + (rows, width)
        return (jnp.zeros(lead, jnp.int32), jnp.zeros(lead, jnp.float32), jnp.zeros(lead + (n_top,), jnp.int32),
                jnp.zeros(lead + (n_top,), jnp.float32))

    def block(params, slots, active, want_logprobs):
        """Up to `num_steps` steps of every active slot (active: bool [S]). Returns (slots, outputs): outputs =
        {"token", "valid", "logprob": [steps, S, T], "top_ids", "top_logprobs": [steps, S, T, N], "active": [S]}
        and with speculative decoding "accepted" [steps, S] (T: tokens per step, 1 or K+1; valid: that token
        was made, in order within a slot's step)."""
        traces["decode_block"] += 1
        model = nnx.merge(engine.graphdef, params)
        rows = active.shape[0]
        token, logprob, top_ids, top_values = empty_outputs(rows, (num_steps,))
        outputs = {"token": token, "valid": jnp.zeros(token.shape, bool), "logprob": logprob, "top_ids": top_ids,
                   "top_logprobs": top_values}
        if k:
            outputs["accepted"] = jnp.zeros((num_steps, rows), jnp.int32)
        one_step = speculative_decode_step if k else decode_step

        def body(carry):
            i, slots, active, out = carry
            slots, stopped, row = one_step(model, slots, active, want_logprobs)
            out = jax.tree.map(lambda o, r: o.at[i].set(r), out, row)
            return i + 1, slots, active & ~stopped, out

        def cond(carry):
            i, _, active, _ = carry
            return (i < num_steps) & jnp.any(active)

        _, slots, active, outputs = jax.lax.while_loop(cond, body, (0, slots, active, outputs))
        return slots, {**outputs, "active": active}

    insert_jit = engine._in_mesh(jax.jit(insert, donate_argnums=(0,)))
    block_jit = engine._in_mesh(jax.jit(block, donate_argnums=(1,)))
    return insert_jit, block_jit, traces
