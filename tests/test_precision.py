"""The precision policy (qwen35_jax.precision), read off the traced programs.

On CPU every matmul precision gives the same numbers, so these tests inspect the jaxprs instead: a float32
model must ask for HIGHEST on every dot (TPU/GPU would otherwise run one bf16 pass / TF32), a bfloat16 one
for the backend default everywhere except the Gated DeltaNet core and the router, which are float32 and
HIGHEST in every mode. Sub-jaxprs (scan, cond, while, pjit, remat, custom_vjp, shard_map) are walked, and
backward passes are traced too, since a custom VJP's backward is traced after the forward's scope closed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer.engine import Engine
from qwen35_jax import ModelConfig, load_model
from qwen35_jax.cache import init_decode_state
from qwen35_jax.nn.model import Qwen35, unstack_layers
from qwen35_jax.nn.moe import SparseMoe
from qwen35_jax.ops.delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent
from qwen35_jax.ops.moe import route, router_logits
from qwen35_jax.precision import compute_dtype
from train.config import TrainConfig
from train.data import unpacked_batch
from train.step import Trainer

DOTS = ("dot_general", "ragged_dot_general")
FLOAT32_CORE = ("gated_delta_rule", "router")  # named scopes that are float32 + HIGHEST in every mode


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def dots(closed) -> list[tuple[str, str, tuple]]:
    """Every matmul in a jaxpr and its sub-jaxprs: (precision name, full name-stack path, operand dtypes)."""
    found = []

    def walk(jaxpr, prefix):
        for eqn in jaxpr.eqns:
            path = f"{prefix}/{eqn.source_info.name_stack}"
            if eqn.primitive.name in DOTS:
                precision = eqn.params["precision"]
                name = "DEFAULT" if precision is None else str(precision[0] if isinstance(precision, tuple)
                                                              else precision).split(".")[-1]
                found.append((name, path, tuple(str(v.aval.dtype) for v in eqn.invars[:2])))
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    walk(sub, path)
    walk(closed.jaxpr, "")
    return found


def model(preset: str, dtype, **overrides) -> Qwen35:
    return Qwen35(ModelConfig.from_hf(preset, **overrides), dtype, nnx.Rngs(0))


def forward_jaxpr(m: Qwen35, seq: int = 70):
    graphdef, state = nnx.split(m)
    tokens = jnp.zeros((2, seq), jnp.int32)
    return jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)


def decode_jaxpr(m: Qwen35, seq: int):
    """One `forward_with_state` call of `seq` tokens (1: a decode step) plus the lm head."""
    m = unstack_layers(m)
    graphdef, params = nnx.split(m)
    state = init_decode_state(m.config, 2, 32, m.compute_dtype)

    def step(params, state, tokens):
        model = nnx.merge(graphdef, params)
        hidden, state = model.forward_with_state(tokens, state)
        return model.logits(hidden), state
    return jax.make_jaxpr(step)(params, state, jnp.zeros((2, seq), jnp.int32))


def grads_jaxpr(m: Qwen35, **train_overrides):
    trainer = Trainer(m, TrainConfig(loss_chunk=16, **train_overrides))
    batch = trainer.put_batch(unpacked_batch(np.zeros((2, 40), np.int32)))
    return jax.make_jaxpr(trainer.grads)(trainer._params, batch)


def assert_all_highest(closed):
    found = dots(closed)
    assert found, "no matmul found: the walk is broken"
    loose = [(p, path) for p, path, _ in found if p != "HIGHEST"]
    assert not loose, f"{len(loose)} of {len(found)} matmuls are not HIGHEST, e.g. {loose[:3]}"


def assert_float32_core_only(closed):
    """bf16 compute: the float32 core (delta rule, router) is HIGHEST and float32, everything else default."""
    found = dots(closed)
    core = [(p, dt) for p, path, dt in found if any(s in path for s in FLOAT32_CORE)]
    rest = [(p, path, dt) for p, path, dt in found if not any(s in path for s in FLOAT32_CORE)]
    assert core and rest
    assert all(p == "HIGHEST" and dt == ("float32", "float32") for p, dt in core), core
    assert all(p == "DEFAULT" for p, _, _ in rest), [r for r in rest if r[0] != "DEFAULT"][:3]
    assert any(dt == ("bfloat16", "bfloat16") for _, _, dt in rest)  # the model does compute in bf16


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_float32_forward_prefill_and_decode_are_highest(preset):
    m = model(preset, jnp.float32)
    assert m.config.num_periods == 2  # the scanned decoder is walked
    assert_all_highest(forward_jaxpr(m))
    assert_all_highest(decode_jaxpr(m, 1))   # the one-token GDN step and the KV-cache attention
    assert_all_highest(decode_jaxpr(m, 70))  # chunked prefill continuing a state


@pytest.mark.parametrize("preset,remat", [("tiny-moe", "none"), ("tiny-moe", "full"), ("tiny-dense", "dots")])
def test_float32_loss_and_gradients_are_highest(preset, remat):
    """The backward passes too: transposed dots, the delta rule's and the CPU grouped MoE's custom VJPs."""
    assert_all_highest(grads_jaxpr(model(preset, jnp.float32), remat=remat))


def test_bfloat16_keeps_the_default_outside_the_float32_core():
    m = model("tiny-moe", jnp.bfloat16)
    assert_float32_core_only(forward_jaxpr(m))
    assert_float32_core_only(decode_jaxpr(m, 1))


def test_bfloat16_compute_training_keeps_the_default_outside_the_float32_core():
    """float32 master weights cast to bf16 for the forward/backward: the policy follows the compute dtype."""
    assert_float32_core_only(grads_jaxpr(model("tiny-moe", jnp.float32), compute_dtype="bfloat16"))


def test_delta_rule_is_highest_under_a_caller_default():
    """Called directly, under an explicit default-precision context, with gradients."""
    r = np.random.default_rng(0)
    b, seq, h, d = 1, 70, 2, 8
    q, k, v = (jnp.asarray(r.normal(size=(b, seq, h, d)), jnp.float32) for _ in range(3))
    g, beta = -jnp.ones((b, seq, h)), 0.5 * jnp.ones((b, seq, h))
    for rule in (gated_delta_rule_chunked, gated_delta_rule_recurrent):
        with jax.default_matmul_precision("default"):
            closed = jax.make_jaxpr(jax.grad(lambda q: rule(q, k, v, g, beta)[0].sum()))(q)
        assert_all_highest(closed)


def near_tie_router(hidden: int, num_experts: int, top_k: int, seed: int):
    """(x [1, H], router [H, E]), both exact bf16 values: experts 2.. top_k are clear winners, and expert 1 beats
    expert 0 for the last slot by one bf16 ulp of one weight (a logit gap of 1e-4..1e-3: far above float32
    rounding, below the bf16 spacing of the logits); the other experts lose."""
    r = np.random.default_rng(seed)
    bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    x, base = bf16(r.normal(size=(1, hidden))), bf16(r.normal(size=hidden))
    up = np.asarray(jnp.nextafter(jnp.asarray(base, jnp.bfloat16),
                                  jnp.asarray(np.sign(x[0]) * np.inf, jnp.bfloat16)).astype(jnp.float32))
    gaps = np.abs((up - base) * x[0])
    j = int(np.argmin(np.where(gaps > 1e-4, gaps, np.inf)))
    nudged = base.copy()
    nudged[j] = up[j]
    step = np.sign(x[0]) / np.abs(x[0]).sum()  # moves a logit by ~1: winners stay within softmax range
    w = bf16(np.stack([base, nudged] + [base + step] * (top_k - 1) + [base - step] * (num_experts - top_k - 1), 1))
    exact = x.astype(np.float64) @ w.astype(np.float64)
    assert 1e-4 < exact[0, 1] - exact[0, 0] < 1e-3 and exact[0, 2:top_k + 1].min() > exact[0, 1] + 0.5
    return x, w


def test_router_keeps_a_near_tie_that_bfloat16_flips():
    """A bf16 SparseMoe routes as float32: with the old bf16 logits (tokens @ router in bf16) the near-tie
    goes to expert 0; the layer's router statistics show expert 1 chosen."""
    cfg = ModelConfig.from_hf("tiny-moe")
    top_k = cfg.num_experts_per_tok
    for seed in range(20):  # the first construction whose bf16 logits tie (about half of them do)
        x, w = near_tie_router(cfg.hidden_size, cfg.num_experts, top_k, seed)
        x16, w16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
        old_ids = np.asarray(route(x16 @ w16, top_k)[1][0])
        if 0 in old_ids and 1 not in old_ids:
            break
    assert 0 in old_ids and 1 not in old_ids, "no tie flips in bf16: the test would prove nothing"
    assert set(np.asarray(route(router_logits(x16, w16), top_k)[1][0]).tolist()) == {1, *range(2, top_k + 1)}
    moe = SparseMoe(cfg, jnp.bfloat16, nnx.Rngs(0))
    moe.router.set_value(w16)
    _, stats = moe(x16[None], token_mask=jnp.ones((1, 1)))
    load = np.asarray(stats["load"])
    assert load[1] == 1 and load[0] == 0 and load[2:top_k + 1].sum() == top_k - 1


def test_cpu_computes_in_float32_whatever_the_storage():
    assert compute_dtype(jnp.bfloat16, "cpu") == jnp.float32
    assert compute_dtype(jnp.bfloat16, "tpu") == jnp.bfloat16
    assert compute_dtype(jnp.bfloat16, "gpu") == jnp.bfloat16
    assert compute_dtype(jnp.float32, "gpu") == jnp.float32


def test_bfloat16_load_on_cpu_holds_float32_copies_of_the_bfloat16_values(hf_checkpoint):
    """load_model / Engine.load(dtype="bfloat16") on CPU: float32 parameters whose values are the bfloat16
    weights exactly (and a float32 decode state); compute_dtype="bfloat16" keeps genuine bfloat16."""
    _, folder = hf_checkpoint("tiny-moe")
    weights = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))  # noqa: E731
    stored = load_model(folder, dtype="bfloat16", compute_dtype="bfloat16")
    held = load_model(folder, dtype="bfloat16")
    assert jnp.dtype(stored.dtype) == jnp.bfloat16 and jnp.dtype(held.dtype) == jnp.float32
    assert all(w.dtype == jnp.bfloat16 for w in weights(stored))
    assert all(w.dtype == jnp.float32 for w in weights(held))
    for a, b in zip(weights(stored), weights(held)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b))
    full = weights(load_model(folder, dtype="float32"))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(full, weights(held)))
    engine = Engine.load(folder, dtype="bfloat16", max_len=16)
    forced = Engine.load(folder, dtype="bfloat16", max_len=16, compute_dtype="bfloat16")
    state_dtypes = lambda e: {x.dtype for x in jax.tree.leaves(  # noqa: E731
        init_decode_state(e.config, 1, 16, e.model.dtype)["layers"])}
    assert state_dtypes(engine) == {jnp.dtype(jnp.float32)}
    assert state_dtypes(forced) == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}  # GDN state stays float32


def test_cast_model_leaves_its_input_unchanged():
    from qwen35_jax.loading import cast_model
    original = Qwen35(ModelConfig.from_hf("tiny-dense"), jnp.float32, nnx.Rngs(0))
    cast = cast_model(original, jnp.bfloat16)
    assert original.dtype == jnp.float32 and original.embed_tokens[...].dtype == jnp.float32
    assert cast.dtype == jnp.bfloat16 and cast.embed_tokens[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(cast.embed_tokens[...].astype(jnp.float32)),
                                  np.asarray(original.embed_tokens[...].astype(jnp.bfloat16).astype(jnp.float32)))
