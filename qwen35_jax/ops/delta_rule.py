"""The gated delta rule (Gated DeltaNet's recurrence) in three forms, all float32.

Per value head, with state S [dk, dv]:
    S_t = exp(g_t) * S_{t-1} + k_t (beta_t * (v_t - (exp(g_t) * S_{t-1})^T k_t))^T,    o_t = S_t^T q_t.
Inputs use the layout q, k: [batch, seq, heads, dk]; v: [batch, seq, heads, dv]; g (log-decay, <= 0) and
beta: [batch, seq, heads]; state: [batch, heads, dk, dv]. q and k arrive already L2-normalised and q
already scaled; the functions compute in float32 with HIGHEST matmul precision in every mode (the policy of
qwen35_jax.precision) and return float32 outputs [batch, seq, heads, dv].
"""

import jax
import jax.numpy as jnp

from qwen35_jax.precision import highest_precision

CHUNK_SIZE = 64


@highest_precision
@jax.named_scope("gated_delta_rule")
def gated_delta_step(state, q, k, v, g, beta):
    """One token. state [B, H, dk, dv]; q, k [B, H, dk]; v [B, H, dv]; g, beta [B, H].

    Returns (out [B, H, dv], new state [B, H, dk, dv]), float32.
    """
    f32 = jnp.float32
    q, k, v, g, beta = (t.astype(f32) for t in (q, k, v, g, beta))
    state = state.astype(f32) * jnp.exp(g)[..., None, None]
    remembered = jnp.einsum("bhkv,bhk->bhv", state, k)
    delta = (v - remembered) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return jnp.einsum("bhkv,bhk->bhv", state, q), state


@highest_precision
@jax.named_scope("gated_delta_rule")
def gated_delta_steps(q, k, v, g, beta, initial_state):
    """A few tokens one by one (`gated_delta_step`, exactly as plain decoding runs them), keeping the state
    after each: speculative verification picks the one of the last accepted token.

    Returns (out [B, T, H, dv], states [B, T+1, H, dk, dv]: the initial state, then the state after each
    token), float32."""
    def step(s, inputs):
        out, s = gated_delta_step(s, *inputs)
        return s, (out, s)

    time_major = [jnp.moveaxis(t, 1, 0) for t in (q, k, v, g, beta)]
    initial_state = initial_state.astype(jnp.float32)
    _, (out, states) = jax.lax.scan(step, initial_state, time_major, unroll=True)  # a few tokens: unrolled
    return jnp.moveaxis(out, 0, 1), jnp.concatenate([initial_state[:, None], jnp.moveaxis(states, 0, 1)], axis=1)


def _zero_state(q, v):
    b, _, h, dk = q.shape
    return jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """segment_ids: int [B, L] -> bool [B, L], True where a token starts a new segment (never at t = 0)."""
    return jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))


@highest_precision
@jax.named_scope("gated_delta_rule")
def gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=None, segment_ids=None):
    """Token-by-token `lax.scan` over the sequence (the test oracle). Returns (out, final_state).

    segment_ids: int [B, L] or None; the state restarts from zero at each token whose id differs from the
    previous token's (packed documents).
    """
    state = _zero_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)
    keep = jnp.ones(q.shape[:2], jnp.float32) if segment_ids is None else 1.0 - segment_starts(segment_ids)
    time_major = [jnp.moveaxis(t, 1, 0) for t in (q, k, v, g, beta, keep)]

    def step(s, inputs):
        *inputs, keep_t = inputs
        out, s = gated_delta_step(s * keep_t[:, None, None, None], *inputs)
        return s, out

    state, out = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(out, 0, 1), state


def _to_chunks(x, n_chunks, chunk):
    """[B, L, H, ...] float32, right-padded with zeros to n_chunks*chunk -> [B, H, N, C, ...]."""
    pad = n_chunks * chunk - x.shape[1]
    x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape(x.shape[0], x.shape[1], n_chunks, chunk, *x.shape[3:])


def _unit_lower_inverse_blocks(a, base=16):
    """(I + a)^-1 for strictly lower-triangular a: [..., n, n] (n = base * 2^k), by batched matmuls.

    Forward substitution on base x base diagonal blocks, merged pairwise: [[T1, 0], [-T2 A21 T1, T2]].
    """
    n = a.shape[-1]
    if n <= base or n % 2:
        t = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape)
        for i in range(1, n):  # row i = e_i - a[i, :i] T[:i]
            t = t.at[..., i, :].add(-jnp.einsum("...j,...jk->...k", a[..., i, :i], t[..., :i, :]))
        return t
    h = n // 2
    inv = _unit_lower_inverse_blocks(jnp.stack([a[..., :h, :h], a[..., h:, h:]]), base)
    t11, t22 = inv[0], inv[1]
    t21 = -(t22 @ a[..., h:, :h]) @ t11
    top = jnp.concatenate([t11, jnp.zeros_like(t11)], -1)
    return jnp.concatenate([top, jnp.concatenate([t21, t22], -1)], -2)


@jax.custom_vjp
@highest_precision  # each piece of a custom VJP may be traced after its caller's scope has closed
def _unit_lower_inverse(a):
    """(I + a)^-1 for strictly lower-triangular a: [..., n, n]; see `_unit_lower_inverse_blocks`.

    Its own VJP: with T = (I + a)^-1, dA = -T^T dT T^T restricted to the strictly lower part (two batched
    matmuls instead of differentiating the substitution loop op by op)."""
    return _unit_lower_inverse_blocks(a)


@highest_precision
def _unit_lower_inverse_fwd(a):
    t = _unit_lower_inverse_blocks(a)
    return t, t


@highest_precision
@jax.named_scope("gated_delta_rule")
def _unit_lower_inverse_bwd(t, dt):
    t_transposed = jnp.swapaxes(t, -1, -2)
    da = -(t_transposed @ dt @ t_transposed)
    return (jnp.tril(da, -1),)


_unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _segment_masks(segment_ids, n_chunks, chunk):
    """segment_ids [B, L] -> (same [B, 1, N, C, C]: tokens i, j of a chunk share a segment;
    carry [B, 1, N, C]: token i continues the segment the previous chunk ended in), float32.

    The first chunk "continues" its first token's segment, so an initial state flows into it.
    """
    pad = n_chunks * chunk - segment_ids.shape[1]
    ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), mode="edge").reshape(-1, 1, n_chunks, chunk)
    previous = jnp.concatenate([ids[:, :, :1, :1], ids[:, :, :-1, -1:]], axis=2)  # [B, 1, N, 1]
    same = ids[..., :, None] == ids[..., None, :]
    return same.astype(jnp.float32), (ids == previous).astype(jnp.float32)


@highest_precision
@jax.named_scope("gated_delta_rule")
def gated_delta_rule_chunked(q, k, v, g, beta, initial_state=None, chunk_size=CHUNK_SIZE, segment_ids=None):
    """Chunkwise-parallel form (UT transform per chunk, `lax.scan` over chunks). Returns (out, final_state).

    Within a chunk, with gamma = cumsum(g) and Gamma[i, j] = exp(gamma_i - gamma_j) (j <= i):
    M = I + strict_lower((k*beta) k^T * Gamma); U = M^-1 (v*beta); W = M^-1 (k*beta*exp(gamma)).
    Across chunks: V' = U - W S; O = (q*exp(gamma)) S + tril(q k^T * Gamma) V'; S <- exp(gamma_C) S + k~^T V'.
    Zero padding to a multiple of the chunk size changes neither outputs nor the final state.
    segment_ids: int [B, L] or None: packed documents; every decay factor spanning a segment start is
    zeroed (Gamma by `same`, decays from the chunk start by `carry`), which restarts the state there.
    """
    b, seq, heads, _ = q.shape
    chunk = chunk_size
    n_chunks = max(1, -(-seq // chunk))
    q, k, v, g, beta = (_to_chunks(t, n_chunks, chunk) for t in (q, k, v, g, beta))
    gamma = jnp.cumsum(g, axis=-1)  # [B, H, N, C]
    lower = jnp.tril(jnp.ones((chunk, chunk), bool))
    decay = jnp.exp(jnp.where(lower, gamma[..., :, None] - gamma[..., None, :], -jnp.inf))
    from_start = jnp.exp(gamma)  # [B, H, N, C]: decay since the chunk's start
    gamma_last = gamma[..., -1]
    to_end = jnp.exp(gamma_last[..., None] - gamma)  # decay from each token to the chunk's end
    chunk_decay = jnp.exp(gamma_last)
    if segment_ids is not None:
        same, carry = _segment_masks(segment_ids, n_chunks, chunk)
        decay, from_start = decay * same, from_start * carry
        to_end, chunk_decay = to_end * same[..., -1, :], chunk_decay * carry[..., -1]
    k_beta = k * beta[..., None]
    strict = jnp.einsum("...id,...jd->...ij", k_beta, k) * decay * (1.0 - jnp.eye(chunk))
    rhs = jnp.concatenate([v * beta[..., None], k_beta * from_start[..., None]], axis=-1)
    solved = _unit_lower_inverse(strict) @ rhs
    dv = v.shape[-1]
    new_values, decayed_keys = solved[..., :dv], solved[..., dv:]
    intra = jnp.einsum("...id,...jd->...ij", q, k) * decay
    q_decayed = q * from_start[..., None]
    k_decayed = k * to_end[..., None]

    def step(state, xs):
        u, w, qd, kd, p, lam = xs
        v_new = u - w @ state
        out = qd @ state + p @ v_new
        state = lam[..., None, None] * state + jnp.swapaxes(kd, -1, -2) @ v_new
        return state, out

    state = jnp.zeros((b, heads, q.shape[-1], v.shape[-1]), jnp.float32) if initial_state is None \
        else initial_state.astype(jnp.float32)
    xs = [jnp.moveaxis(t, 2, 0) for t in (new_values, decayed_keys, q_decayed, k_decayed, intra, chunk_decay)]
    state, out = jax.lax.scan(step, state, xs)  # out: [N, B, H, C, dv]
    out = jnp.moveaxis(out, 0, 2).reshape(b, heads, n_chunks * chunk, dv)[:, :, :seq]
    return jnp.moveaxis(out, 1, 2), state
