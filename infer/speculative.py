"""Speculative decoding with the MTP block: draft K tokens, verify them in one forward, keep what the target
model would have produced.

One step (`speculative_step`, jitted, static shapes, no host round trip between drafts), per row with L tokens in
the decode state and the pending token x_L (sampled, not yet fed):
  1. the MTP block catches up on the positions verified last step (the main model's final-normed hidden states
     h_i beside the tokens x_{i+1} that followed) and drafts d_1 from its last one; then d_2..d_K, each from the
     MTP's own output fed back with the previous draft;
  2. the main model runs [x_L, d_1..d_K] (K+1 positions) in one forward, its Gated DeltaNet layers keeping the
     state after each position (`nn.gated_deltanet.state_after_steps`);
  3. acceptance: greedy rows keep drafts while they equal the target's argmax; sampled rows keep d_j with
     probability min(1, p(d_j) / q(d_j)) and on the first rejection draw from norm(max(p - q, 0)), which leaves the
     target distribution exactly as it is (Leviathan et al. 2023; Chen et al. 2023). p and q are both the
     request's distribution: penalties (with the counts the accepted drafts add) and filters applied;
  4. the state keeps exactly the accepted tokens: the GDN conv and recurrent states of the last accepted one
     (selected), attention KV past it is left to be overwritten, lengths advance by the accepted count.
The step emits a+1 tokens per row (a accepted drafts, then the target's own token), capped per row by `limit`
(tokens the request may still take: max_new_tokens and the cache) and cut after a stop / EOS token, so a
finished row's state holds what plain decoding's would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infer.sampling import apply_penalties, filter_logits
from qwen35_jax.nn.gated_deltanet import state_after_steps

MAX_SPECULATIVE_TOKENS = 4


def check_speculative(model, k: int) -> None:
    """ValueError unless k drafts per step can run on `model` (k in 0..4; k > 0 needs its MTP block)."""
    if not isinstance(k, int) or not 0 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"num_speculative_tokens={k!r}: expected an integer in 0..{MAX_SPECULATIVE_TOKENS} "
                         "(0 = plain decoding)")
    if k and getattr(model, "mtp", None) is None:
        raise ValueError(f"num_speculative_tokens={k}: the model has no MTP block (mtp_num_hidden_layers=0, or a "
                         "checkpoint without mtp.* tensors), so there is nothing to draft with")


def position_counts(counts: jax.Array, seen: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The penalty inputs at each of T positions when tokens [B, T-1] are appended one by one: counts int
    [B, T, V] and seen bool [B, T, V], position j counting tokens[:, :j]."""
    b = tokens.shape[0]
    onehot = jax.nn.one_hot(tokens, counts.shape[-1], dtype=counts.dtype)  # [B, T-1, V]
    before = jnp.concatenate([jnp.zeros((b, 1, counts.shape[-1]), counts.dtype), jnp.cumsum(onehot, axis=1)],
                             axis=1)
    return counts[:, None] + before, seen[:, None] | (before > 0)


def request_probs(logits: jax.Array, counts: jax.Array, seen: jax.Array, sampling: dict) -> jax.Array:
    """The request's distribution at each position: logits [B, T, V] float32 with penalties (counts / seen
    [B, T, V]) and filters applied, softmaxed -> [B, T, V] float32 (one-hot on the argmax for greedy rows)."""
    def one(logits_t, counts_t, seen_t):
        penalised = apply_penalties(logits_t, counts_t, seen_t, sampling)
        greedy = jax.nn.one_hot(jnp.argmax(penalised, axis=-1), penalised.shape[-1], dtype=jnp.float32)

        def mixed(penalised):
            sampled = jax.nn.softmax(filter_logits(penalised, sampling), axis=-1)
            return jnp.where((sampling["temperature"] > 0)[:, None], sampled, greedy)
        # an all-greedy batch skips the filters' sort over the vocabulary (as `infer.sampling.sample` does)
        return jax.lax.cond(jnp.any(sampling["temperature"] > 0), mixed, lambda _: greedy, penalised)
    return jax.vmap(one, in_axes=1, out_axes=1)(logits.astype(jnp.float32), counts, seen)


def draw(probs: jax.Array, keys) -> jax.Array:
    """One token per row from probs [B, V]; keys: [B] typed PRNG keys, or a function returning them (then derived
    only when drawing). A one-hot row gives its token; a batch of one-hot rows only (all greedy) takes the argmax
    without deriving keys or drawing random numbers."""
    def sampled(probs):
        return jax.vmap(jax.random.categorical)(keys() if callable(keys) else keys, jnp.log(probs)).astype(jnp.int32)
    one_hot = jnp.all(jnp.max(probs, axis=-1) == 1.0)
    return jax.lax.cond(one_hot, lambda p: jnp.argmax(p, axis=-1).astype(jnp.int32), sampled, probs)


def row_keys(sampling: dict, step: jax.Array, salt: int) -> jax.Array:
    """Per-row keys for decode step `step` ([B] or scalar), distinct per `salt` (draft k, acceptance...)."""
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), sampling["key"].shape[:1])
    return jax.vmap(lambda k, s: jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(k), s), salt))(
        sampling["key"], steps)


def accept(drafts: jax.Array, draft_probs: jax.Array, target_probs: jax.Array, keys: jax.Array,
           sampled: jax.Array | bool = True) -> tuple[jax.Array, jax.Array]:
    """Speculative acceptance. drafts int [B, K] drawn from draft_probs [B, K, V]; target_probs [B, K+1, V]; keys:
    [B] typed PRNG keys or a function returning them; sampled: whether any row samples (False: all rows greedy,
    one-hot p and q, and no keys are derived, no random numbers drawn).

    Returns (accepted int [B] in 0..K, tokens int [B, K+1]: the accepted drafts, then at index `accepted` the
    target's token: drawn from norm(max(p - q, 0)) after a rejection, from p_K when all K were accepted).
    Greedy rows (one-hot p and q) accept exactly while the draft is the target's argmax."""
    b, k = drafts.shape

    def split(index):
        return lambda: jax.vmap(lambda key: jax.random.split(key, 2)[index])(keys() if callable(keys) else keys)
    p_draft = jnp.take_along_axis(target_probs[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    # accept with probability min(1, p / q) (q(d) > 0 for a drawn d); with greedy rows only (one-hot p and q)
    # u = 0 decides the same (p(d) > 0) without drawing
    uniform = lambda: jax.vmap(lambda key: jax.random.uniform(key, (k,)))(split(0)())  # noqa: E731
    u = jax.lax.cond(jnp.asarray(sampled), uniform, lambda: jnp.zeros((b, k)))
    ok = u * q_draft < p_draft
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    padded_q = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)  # q_K = 0: plain p_K
    residual = jnp.maximum(target_probs - padded_q, 0.0)
    at = accepted[:, None, None]
    residual = jnp.take_along_axis(residual, at, axis=1)[:, 0]
    target_at = jnp.take_along_axis(target_probs, at, axis=1)[:, 0]
    # when p <= q everywhere (p == q: every draft is accepted anyway) the residual is empty: fall back to p
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    final = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), target_at)
    last = draw(final, split(1))
    tokens = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], axis=1)
    index = jnp.arange(k + 1)[None]
    tokens = jnp.where(index == accepted[:, None], last[:, None], jnp.where(index < accepted[:, None], tokens, 0))
    return accepted, tokens


def emitted_count(accepted: jax.Array, tokens: jax.Array, limit: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """How many of tokens [B, K+1] a row takes: accepted + 1, at most `limit` [B] (>= 1), ending at the first
    token in stop_ids [B, S] (-1 padded: EOS and the request's stop tokens)."""
    k1 = tokens.shape[1]
    n = jnp.minimum(accepted + 1, limit)
    is_stop = jnp.any(tokens[:, :, None] == stop_ids[:, None, :], axis=-1)
    first_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, k1)
    return jnp.minimum(n, first_stop).astype(jnp.int32)


def last_emitted(tokens: jax.Array, emitted: jax.Array, pending: jax.Array) -> jax.Array:
    """Each row's new pending token [B]: the last of the `emitted` [B] of tokens [B, K+1], or `pending` [B] as it
    was where a row emitted none (a finished or idle row)."""
    last = jnp.take_along_axis(tokens, jnp.maximum(emitted - 1, 0)[:, None], axis=1)[:, 0]
    return jnp.where(emitted > 0, last, pending)


def draft_tokens(model, state: dict, carry: dict, counts, seen, sampling, step, k: int, moe_backend: str):
    """The MTP catch-up and K drafts. carry: {"hidden" [B, T, H] final-normed main hidden states, "tokens"
    [B, T] the tokens that followed them, "n" [B] how many are real (0 for a finished row)}.

    Returns (drafts int [B, K], their distributions [B, K, V], the state with the MTP cache advanced by the
    catch-up only: the drafts' own entries lie past its length, to be overwritten)."""
    mtp = model.mtp
    hidden, state = mtp.forward_with_state(carry["hidden"], model.embed(carry["tokens"]), state, carry["n"],
                                           moe_backend=moe_backend)
    last = jnp.take_along_axis(hidden, jnp.maximum(carry["n"] - 1, 0)[:, None, None], axis=1)  # [B, 1, H]
    caught_up = state["mtp"]["lengths"]
    drafts, probs = [], []
    active = (carry["n"] > 0).astype(jnp.int32)
    for j in range(k):
        if j:
            last, state = mtp.forward_with_state(last, model.embed(drafts[-1][:, None]), state, active,
                                                 moe_backend=moe_backend)
        so_far = jnp.stack(drafts, axis=1) if drafts else jnp.zeros((hidden.shape[0], 0), jnp.int32)
        c, s = position_counts(counts, seen, so_far)
        q = request_probs(model.logits(last).astype(jnp.float32), c[:, -1:], s[:, -1:], sampling)[:, 0]
        drafts.append(draw(q, lambda j=j: row_keys(sampling, step, 1 + j)))
        probs.append(q)
    state = {**state, "mtp": {**state["mtp"], "lengths": caught_up}}
    return jnp.stack(drafts, axis=1), jnp.stack(probs, axis=1), state


def speculative_step(model, state: dict, pending, carry: dict, counts, seen, sampling, step, limit, stop_ids,
                     k: int, moe_backend: str = "auto"):
    """One draft-verify-accept step (module doc). pending int [B]: each row's sampled, unfed token; limit [B]:
    tokens each row may still take (0: a finished row, left as it is); stop_ids [B, S] (-1 padded).

    Returns (tokens [B, K+1] of which each row takes the first `emitted` [B], emitted, accepted drafts [B], the
    new state, the new carry, counts, seen): the last emitted token is the row's new pending one."""
    drafts, draft_probs, state = draft_tokens(model, state, carry, counts, seen, sampling, step, k, moe_backend)
    fed = jnp.concatenate([pending[:, None], drafts], axis=1)  # [B, K+1]
    active = (limit > 0).astype(jnp.int32)
    hidden, steps = model.forward_with_state(fed, state, active * (k + 1), moe_backend=moe_backend,
                                             keep_steps=True)
    c, s = position_counts(counts, seen, drafts)
    target = request_probs(model.logits(hidden).astype(jnp.float32), c, s, sampling)
    accepted, tokens = accept(drafts, draft_probs, target, lambda: row_keys(sampling, step, 0),
                              jnp.any(sampling["temperature"] > 0))
    emitted = emitted_count(accepted, tokens, jnp.maximum(limit, 1), stop_ids) * active
    state = state_after_tokens(steps, state["lengths"], emitted)
    taken = jnp.arange(k + 1)[None] < emitted[:, None]
    onehot = jax.nn.one_hot(tokens, counts.shape[-1], dtype=counts.dtype) * taken[..., None]
    counts = counts + jnp.sum(onehot, axis=1)
    seen = seen | (jnp.sum(onehot, axis=1) > 0)
    carry = {"hidden": hidden, "tokens": jnp.where(taken, tokens, 0), "n": emitted}
    return tokens, emitted, accepted * active, state, carry, counts, seen


def state_after_tokens(steps: dict, lengths: jax.Array, n: jax.Array) -> dict:
    """The decode state after the first n [B] tokens of a keep_steps forward (`Qwen35.forward_with_state`):
    each Gated DeltaNet layer's conv and recurrent states selected at token n (`state_after_steps`; layers
    stacked per period are selected per period), attention KV kept (entries past the length are ignored and
    later overwritten), lengths = the lengths before + n."""
    def select(layer):
        if "recurrent" not in layer:
            return layer
        if layer["recurrent"].ndim == 6:  # [periods, B, L+1, heads, dk, dv]
            return jax.vmap(state_after_steps, in_axes=(0, None))(layer, n)
        return state_after_steps(layer, n)
    return {**steps, "layers": [select(layer) for layer in steps["layers"]], "lengths": lengths + n}
