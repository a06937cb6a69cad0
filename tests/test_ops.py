"""Pure ops against independent references: the token-by-token oracle, numpy, hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen35_jax.ops.attention import attention, causal_mask
from qwen35_jax.ops.conv import causal_conv1d
from qwen35_jax.ops.delta_rule import (gated_delta_rule_chunked, gated_delta_rule_recurrent, gated_delta_step,
                                       gated_delta_steps)
from qwen35_jax.ops.moe import expert_ffn_rows, moe_experts, route
from qwen35_jax.ops.norm import l2_normalize
from qwen35_jax.ops.rope import mrope_axis_of_slot


def delta_inputs(b, seq, h, dk, dv, max_decay, seed=0):
    r = np.random.default_rng(seed)
    q = l2_normalize(jnp.asarray(r.normal(size=(b, seq, h, dk)), jnp.float32)) * dk**-0.5
    k = l2_normalize(jnp.asarray(r.normal(size=(b, seq, h, dk)), jnp.float32))
    v = jnp.asarray(r.normal(size=(b, seq, h, dv)), jnp.float32)
    g = -jnp.asarray(r.uniform(0, max_decay, size=(b, seq, h)), jnp.float32)
    beta = jnp.asarray(r.uniform(size=(b, seq, h)), jnp.float32)
    state = jnp.asarray(r.normal(size=(b, h, dk, dv)), jnp.float32)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("seq", [1, 5, 63, 64, 65, 150, 200])
@pytest.mark.parametrize("max_decay", [0.1, 20.0])  # 20: exp(g) down to 2e-9, the strong-decay regime
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_delta_rule_equals_oracle(seq, max_decay, with_state):
    q, k, v, g, beta, state = delta_inputs(2, seq, 3, 16, 8, max_decay, seed=seq)
    init = state if with_state else None
    out_ref, state_ref = gated_delta_rule_recurrent(q, k, v, g, beta, init)
    out, final = jax.jit(gated_delta_rule_chunked)(q, k, v, g, beta, init)
    assert out.shape == (2, seq, 3, 8) and final.shape == (2, 3, 16, 8)
    np.testing.assert_allclose(out, out_ref, atol=2e-5)
    np.testing.assert_allclose(final, state_ref, atol=2e-5)


@pytest.mark.parametrize("chunk", [16, 64])
def test_packed_segments_restart_the_delta_rule_state(chunk):
    """Segment starts at 1, 63, 64, 65 (chunk edges), 128 and mid-chunk, plus padding (id 0) at the end, with an
    initial state (it flows into the first segment only): chunked == oracle == each document run alone."""
    q, k, v, g, beta, state = delta_inputs(2, 200, 3, 16, 8, 2.0, seed=7)
    bounds = [0, 1, 63, 64, 65, 128, 150, 190, 200]
    ids = np.zeros(200, np.int32)
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:-1] + [190])):
        ids[a:b] = n + 1
    segments = jnp.asarray(np.stack([ids, np.where(ids > 0, 1, 0)]))  # row 1: one document, then padding
    out_ref, state_ref = gated_delta_rule_recurrent(q, k, v, g, beta, state, segments)
    out, final = jax.jit(gated_delta_rule_chunked, static_argnames="chunk_size")(
        q, k, v, g, beta, state, chunk_size=chunk, segment_ids=segments)
    np.testing.assert_allclose(out, out_ref, atol=2e-5)
    np.testing.assert_allclose(final, state_ref, atol=2e-5)
    for a, b in zip(bounds[1:-2], bounds[2:-1]):  # documents after the first start from a zero state
        alone, _ = gated_delta_rule_recurrent(*(t[:1, a:b] for t in (q, k, v, g, beta)))
        np.testing.assert_allclose(out[:1, a:b], alone, atol=2e-5)


def test_delta_rule_continues_from_carried_state():
    """Running A then B from A's final state equals running A+B; also for a smaller chunk size."""
    q, k, v, g, beta, _ = delta_inputs(1, 100, 2, 8, 8, 2.0)
    out_all, state_all = gated_delta_rule_chunked(q, k, v, g, beta)
    first = [t[:, :70] for t in (q, k, v, g, beta)]
    second = [t[:, 70:] for t in (q, k, v, g, beta)]
    out_a, state_a = gated_delta_rule_chunked(*first, chunk_size=16)
    out_b, state_b = gated_delta_rule_chunked(*second, initial_state=state_a)
    np.testing.assert_allclose(jnp.concatenate([out_a, out_b], 1), out_all, atol=2e-5)
    np.testing.assert_allclose(state_b, state_all, atol=2e-5)


@pytest.mark.parametrize("steps", [1, 2, 4, 5])
@pytest.mark.parametrize("max_decay", [0.1, 20.0])
def test_delta_steps_keep_the_oracle_state_after_every_token(steps, max_decay):
    """The speculative verify's few-token recurrence (`gated_delta_steps`): outputs and the state after each token
    equal the token-by-token oracle run on the first t tokens; padding tokens (g = beta = 0, row 1's last two) leave
    the state as it was."""
    q, k, v, g, beta, state = delta_inputs(2, steps, 3, 16, 8, max_decay, seed=steps)
    if steps > 2:
        g, beta = g.at[1, -2:].set(0.0), beta.at[1, -2:].set(0.0)
    out, states = jax.jit(gated_delta_steps)(q, k, v, g, beta, state)
    assert out.shape == (2, steps, 3, 8) and states.shape == (2, steps + 1, 3, 16, 8)
    out_ref, _ = gated_delta_rule_recurrent(q, k, v, g, beta, state)
    np.testing.assert_allclose(out, out_ref, atol=2e-5)
    np.testing.assert_array_equal(states[:, 0], state)
    for t in range(1, steps + 1):
        _, after = gated_delta_rule_recurrent(*(x[:, :t] for x in (q, k, v, g, beta)), state)
        np.testing.assert_allclose(states[:, t], after, atol=2e-5)
    if steps > 2:
        np.testing.assert_array_equal(states[1, -1], states[1, -3])


def test_delta_step_hand_computed():
    """One step from a zero state: S = beta * k v^T, o = S^T q = beta * (k.q) v."""
    q, k = jnp.array([[[1.0, 0.0]]]), jnp.array([[[0.6, 0.8]]])
    v, g, beta = jnp.array([[[2.0, -1.0, 0.5]]]), jnp.array([[-0.3]]), jnp.array([[0.5]])
    out, state = gated_delta_step(jnp.zeros((1, 1, 2, 3)), q, k, v, g, beta)
    np.testing.assert_allclose(state[0, 0], 0.5 * np.outer([0.6, 0.8], [2.0, -1.0, 0.5]), atol=1e-7)
    np.testing.assert_allclose(out[0, 0], 0.5 * 0.6 * np.array([2.0, -1.0, 0.5]), atol=1e-7)


def test_causal_conv_matches_numpy_and_carries_state():
    r = np.random.default_rng(0)
    x = r.normal(size=(2, 11, 3, 5)).astype(np.float32)
    w = r.normal(size=(4, 3, 5)).astype(np.float32)
    padded = np.concatenate([np.zeros((2, 3, 3, 5), np.float32), x], axis=1)
    ref = sum(w[j] * padded[:, j:j + 11] for j in range(4))
    y, state = causal_conv1d(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(y, ref, atol=1e-5)
    np.testing.assert_array_equal(state, x[:, -3:])
    y1, s1 = causal_conv1d(jnp.asarray(x[:, :6]), jnp.asarray(w))
    y2, _ = causal_conv1d(jnp.asarray(x[:, 6:]), jnp.asarray(w), s1)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), ref, atol=1e-5)


def test_mrope_slot_layout_of_released_models():
    """[11, 11, 10] over 32 slots: T = {0, 3, ..., 30}, H = {1, 4, ..., 31}, W = {2, 5, ..., 29} (the spec)."""
    axis = mrope_axis_of_slot(64, (11, 11, 10))
    assert set(np.flatnonzero(axis == 0)) == set(range(0, 31, 3))
    assert set(np.flatnonzero(axis == 1)) == set(range(1, 32, 3))
    assert set(np.flatnonzero(axis == 2)) == set(range(2, 30, 3))


def test_attention_matches_numpy_gqa():
    r = np.random.default_rng(0)
    q = r.normal(size=(2, 7, 4, 8)).astype(np.float32)
    k = r.normal(size=(2, 7, 2, 8)).astype(np.float32)
    v = r.normal(size=(2, 7, 2, 8)).astype(np.float32)
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal_mask(7)[None])
    kk, vv = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # query head h uses kv head h // 2
    s = np.einsum("blhd,bshd->bhls", q, kk) / np.sqrt(8)
    s = np.where(np.tril(np.ones((7, 7), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bhls,bshd->blhd", p, vv), atol=1e-5)


def moe_reference(x, weights, ids, w_gate_up, w_down):
    """Naive per-(token, slot) gather of the expert weights."""
    h = np.einsum("th,tkhgi->tkgi", x, w_gate_up[ids])
    act = h[..., 0, :] / (1 + np.exp(-h[..., 0, :])) * h[..., 1, :]
    return np.einsum("tk,tki,tkih->th", weights, act, w_down[ids])


@pytest.mark.parametrize("platform,expected", [("tpu", "ragged"), ("gpu", "blocked"), ("cpu", "blocked")])
def test_auto_moe_backend_by_platform(monkeypatch, platform, expected):
    """auto takes ragged_dot on TPU only: XLA:GPU expands it into dense per-expert work (measured on an H200:
    110x the analytic FLOPs, 1.6 TiB of temporaries for the 35B-A3B LoRA step; qwen35_jax.ops.moe)."""
    import qwen35_jax.ops.moe as moe
    monkeypatch.setattr(moe, "target_platform", lambda: platform)
    assert moe.default_backend() == expected


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (37, 8, 2), (300, 16, 4), (64, 4, 4)])
def test_moe_backends_match_reference(tokens, experts, top_k):
    r = np.random.default_rng(tokens)
    x = r.normal(size=(tokens, 32)).astype(np.float32)
    logits = (r.normal(size=(tokens, experts)) + np.linspace(0, 3, experts)).astype(np.float32)  # imbalanced
    w1 = (0.1 * r.normal(size=(experts, 32, 2, 24))).astype(np.float32)
    w2 = (0.1 * r.normal(size=(experts, 24, 32))).astype(np.float32)
    weights, ids = route(jnp.asarray(logits), top_k)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.sort(p, -1)[:, ::-1][:, :top_k]
    np.testing.assert_allclose(weights, top / top.sum(-1, keepdims=True), atol=1e-6)
    ref = moe_reference(x, np.asarray(weights), np.asarray(ids), w1, w2)
    for backend in ("blocked", "ragged", "gather"):
        got = jax.jit(moe_experts, static_argnames="backend")(x, weights, ids, w1, w2, backend=backend)
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=backend)


@pytest.mark.parametrize("platform,rows,expected", [("cpu", 2, "gather"), ("cpu", 8, "gather"),
                                                    ("cpu", 9, "blocked"), ("gpu", 4, "gather"), ("tpu", 2, "ragged")])
def test_auto_moe_backend_by_rows(monkeypatch, platform, rows, expected):
    """auto gathers the rows' expert weights off TPU while there are no more rows than experts (8 here), and the
    gathered weights fit GATHER_MAX_BYTES."""
    import qwen35_jax.ops.moe as moe
    monkeypatch.setattr(moe, "target_platform", lambda: platform)
    w1, w2 = jnp.zeros((8, 32, 2, 24)), jnp.zeros((8, 24, 32))
    assert moe.auto_backend(rows, w1, w2) == expected
    monkeypatch.setattr(moe, "GATHER_MAX_BYTES", rows * (w1[0].size + w2[0].size) * 4 - 1)
    assert moe.auto_backend(rows, w1, w2) == ("ragged" if platform == "tpu" else "blocked")


def test_moe_gather_skips_foreign_rows():
    """An id equal to E (an expert elsewhere, or padding) gives a zero row with every backend."""
    r = np.random.default_rng(1)
    rows = jnp.asarray(r.normal(size=(5, 16)), jnp.float32)
    w1 = jnp.asarray(0.1 * r.normal(size=(4, 16, 2, 8)), jnp.float32)
    w2 = jnp.asarray(0.1 * r.normal(size=(4, 8, 16)), jnp.float32)
    ids = jnp.asarray([0, 4, 3, 4, 1])
    got = {b: np.asarray(expert_ffn_rows(rows, ids, w1, w2, b)) for b in ("blocked", "gather")}
    np.testing.assert_array_equal(got["gather"][[1, 3]], 0)
    np.testing.assert_allclose(got["gather"], got["blocked"], atol=1e-6)
    assert np.abs(got["gather"][[0, 2, 4]]).min() > 0


def test_moe_blocked_gradients_match_ragged():
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(50, 16)), jnp.float32)
    w1 = jnp.asarray(0.1 * r.normal(size=(6, 16, 2, 8)), jnp.float32)
    w2 = jnp.asarray(0.1 * r.normal(size=(6, 8, 16)), jnp.float32)
    weights, ids = route(jnp.asarray(r.normal(size=(50, 6)), jnp.float32), 2)

    def loss(backend):
        return lambda x, w1, w2, wt: jnp.sum(jnp.sin(moe_experts(x, wt, ids, w1, w2, backend)))
    grads = {b: jax.grad(loss(b), argnums=(0, 1, 2, 3))(x, w1, w2, weights) for b in ("blocked", "ragged", "gather")}
    for other in ("ragged", "gather"):
        for a, b in zip(grads["blocked"], grads[other]):
            np.testing.assert_allclose(a, b, atol=2e-5, err_msg=other)
