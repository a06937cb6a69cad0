"""Expert parallelism with tokens sharded over the expert axis: every dispatch scheme equals the unsharded MoE,
forward and gradients, on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen35_jax.ops.expert_parallel import dispatch_scheme, moe_experts_parallel, token_axes
from qwen35_jax.ops.moe import moe_experts, route
from qwen35_jax.sharding import make_mesh

HIDDEN, INTER, EXPERTS, TOP_K = 32, 16, 16, 4


def problem(tokens, seed=0, skew=False):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (tokens, HIDDEN), jnp.float32)
    router = jax.random.normal(keys[1], (HIDDEN, EXPERTS), jnp.float32)
    if skew:  # most tokens want the first shard's experts: very uneven all-to-all traffic
        router = router.at[:, :3].add(4.0)
    w1 = 0.2 * jax.random.normal(keys[2], (EXPERTS, HIDDEN, 2, INTER), jnp.float32)
    w2 = 0.2 * jax.random.normal(keys[3], (EXPERTS, INTER, HIDDEN), jnp.float32)
    with jax.default_matmul_precision("highest"):
        weights, ids = route(x @ router, TOP_K)
    return x, weights, ids, w1, w2


def sharded(mesh, batch, fn):
    """fn jitted under the mesh with tokens placed by the batch rules, experts over expert x tensor."""
    tok = NamedSharding(mesh, P(token_axes(mesh, batch) or None))
    experts = NamedSharding(mesh, P("expert", None, None, "tensor")), NamedSharding(mesh, P("expert", "tensor"))

    def run(x, weights, ids, w1, w2):
        args = jax.device_put((x, weights, ids), tok) + jax.device_put((w1, w2), experts)
        with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
            return jax.jit(fn).lower(*args).compile(), args
    return run


@pytest.mark.parametrize("spec,batch,tokens,scheme", [
    ("expert=8", 8, 256, "all_to_all"),
    ("fsdp=2,expert=2,tensor=2", 4, 192, "all_to_all"),
    ("expert=4,tensor=2", 8, 8, "gather"),           # decode: one token per row
    ("expert=4,tensor=2", 2, 64, "psum"),            # batch 2 does not split over expert=4
])
def test_schemes_equal_unsharded_forward_and_grads(spec, batch, tokens, scheme):
    mesh = make_mesh(spec)
    assert dispatch_scheme(mesh, batch, tokens) == scheme
    x, weights, ids, w1, w2 = problem(tokens, skew=True)

    def loss(fn):
        return lambda x, weights, w1, w2: jnp.sum(jnp.sin(fn(x, weights, w1, w2)))
    parallel = lambda x, weights, w1, w2: moe_experts_parallel(x, weights, ids, w1, w2, mesh, "blocked", batch)  # noqa
    single = lambda x, weights, w1, w2: moe_experts(x, weights, ids, w1, w2, "blocked")  # noqa
    with jax.default_matmul_precision("highest"):
        expected = single(x, weights, w1, w2)
        expected_grads = jax.grad(loss(single), argnums=(0, 1, 2, 3))(x, weights, w1, w2)
    compiled, args = sharded(mesh, batch, lambda x, weights, ids, w1, w2: (
        parallel(x, weights, w1, w2), jax.grad(loss(parallel), argnums=(0, 1, 2, 3))(x, weights, w1, w2)))(
        x, weights, ids, w1, w2)
    got, grads = compiled(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    for g, e in zip(grads, expected_grads):  # weight grads sum over tokens split across devices: float32
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=1e-5)  # reassociation only
    hlo = compiled.as_text()
    if scheme == "all_to_all":  # tokens travel to their experts' owners and back; nobody gathers the experts
        assert "all-to-all" in hlo
    expert_shard = [s.data.shape for s in args[3].addressable_shards]
    assert all(shape[0] == EXPERTS // mesh.shape["expert"] for shape in expert_shard)


def test_all_to_all_moves_each_token_to_its_owner_only():
    """A router that sends every token to experts of one shard: the dispatch still computes each
    (token, expert) pair exactly once (the sum of outputs equals the unsharded one)."""
    mesh = make_mesh("expert=8")
    x, weights, _, w1, w2 = problem(64, seed=2)
    ids = jnp.broadcast_to(jnp.arange(TOP_K, dtype=jnp.int32) + 4, (64, TOP_K))  # experts 4..7: shards 2 and 3
    fn = lambda x, weights, ids, w1, w2: moe_experts_parallel(x, weights, ids, w1, w2, mesh, "blocked", 64)  # noqa
    compiled, args = sharded(mesh, 64, fn)(x, weights, ids, w1, w2)
    with jax.default_matmul_precision("highest"):
        expected = moe_experts(x, weights, ids, w1, w2, "blocked")
    np.testing.assert_allclose(np.asarray(compiled(*args)), np.asarray(expected), atol=1e-5)
