"""Gradients of the chunked gated delta rule against autodiff of the token-by-token oracle, across chunks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax.ops.delta_rule import CHUNK_SIZE, gated_delta_rule_chunked, gated_delta_rule_recurrent
from qwen35_jax.ops.norm import l2_normalize

B, L, H, DK, DV = 2, 260, 3, 16, 8  # 260 tokens: four full chunks of 64 and a partial fifth


def inputs(seed=0):
    """q, k, v, g, beta, initial state, segment ids. Per-head decay ranges: head 0 barely forgets (its state and
    gradients flow through every chunk), head 1 moderately, head 2 strongly (exp(g) down to 2e-9 per token)."""
    r = np.random.default_rng(seed)
    q = l2_normalize(jnp.asarray(r.normal(size=(B, L, H, DK)), jnp.float32)) * DK**-0.5
    k = l2_normalize(jnp.asarray(r.normal(size=(B, L, H, DK)), jnp.float32))
    v = jnp.asarray(r.normal(size=(B, L, H, DV)), jnp.float32)
    g = -jnp.asarray(r.uniform(size=(B, L, H)) * np.array([0.05, 2.0, 20.0]), jnp.float32)
    beta = jnp.asarray(r.uniform(size=(B, L, H)), jnp.float32)
    state = jnp.asarray(r.normal(size=(B, H, DK, DV)), jnp.float32)
    # Row 0: documents starting at 0, 40, 64 (a chunk edge), 65, 130 (spanning the chunks 64-127 and 128-191:
    # one document crosses two chunk edges), 200. Row 1: one document over all chunks, then padding (id 0).
    ids = np.zeros((B, L), np.int32)
    bounds = [0, 40, 64, 65, 130, 200, L]
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids[0, a:b] = n + 1
    ids[1, :250] = 1
    return (q, k, v, g, beta, state), jnp.asarray(ids)


def test_chunked_delta_rule_gradients_equal_the_oracles_across_chunks():
    """d/d(q, k, v, g, beta, initial state) of <out, W_o> + <final state, W_s>, chunked vs oracle (jax.grad of
    the plain token-by-token scan: an independent derivation, no chunking, no UT transform, no custom VJP).

    Tolerance: both run in float32; measured max errors are ~2e-6 of each gradient's largest entry (float32
    rounding through 260 steps); 2e-5 of the largest entry catches any wrong term (a missing decay factor, a
    leaked segment, a wrong VJP) which moves entries by O(1) of that scale."""
    args, segment_ids = inputs()
    assert L > 4 * CHUNK_SIZE
    r = np.random.default_rng(1)
    w_out = jnp.asarray(r.normal(size=(B, L, H, DV)), jnp.float32)
    w_state = jnp.asarray(r.normal(size=(B, H, DK, DV)), jnp.float32)

    def objective(rule):
        def f(*args):
            out, final = rule(*args, segment_ids=segment_ids)
            chex.assert_shape(out, (B, L, H, DV))
            chex.assert_shape(final, (B, H, DK, DV))
            return jnp.sum(out * w_out) + jnp.sum(final * w_state)
        return jax.jit(jax.grad(f, argnums=tuple(range(6))))

    expected = objective(gated_delta_rule_recurrent)(*args)
    got = objective(gated_delta_rule_chunked)(*args)
    names = ("q", "k", "v", "g", "beta", "initial_state")
    for name, a, e in zip(names, got, expected):
        scale = float(jnp.abs(e).max())
        assert scale > 0.1, name  # a real gradient, not two near-zero tensors
        chex.assert_trees_all_close(a, e, atol=2e-5 * scale, rtol=0, custom_message=name)
    # The reference really carries gradients across chunks and documents: the initial state reaches only row
    # 0's first document (tokens 0-39) but all of row 1; the weakly decaying head's first tokens get
    # gradients from later chunks (their outputs alone would give a different, smaller gradient).
    ds = np.asarray(expected[5])
    assert np.abs(ds[1]).max() > 0.1 and np.abs(ds[0]).max() > 0.1
    dv = np.asarray(expected[2])
    own_chunk = jax.grad(lambda v: jnp.sum(gated_delta_rule_recurrent(
        args[0][:, :64], args[1][:, :64], v, args[3][:, :64], args[4][:, :64], args[5],
        segment_ids=segment_ids[:, :64])[0] * w_out[:, :64]))(args[2][:, :64])
    assert np.abs(dv[1, :64, 0] - np.asarray(own_chunk)[1, :, 0]).max() > 1e-2  # later chunks add to it
