"""Training-step transformations that must not change the numbers: remat policies, sharding + accumulation.

The model is the tiny MoE preset with two stacked periods, so the layer scan, its remat and the period axis
of the parameters are all exercised."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.model import Qwen35
from qwen35_jax.sharding import make_mesh
from train.config import TrainConfig
from train.data import pack_documents
from train.step import Trainer


TWO_PERIODS = {"num_hidden_layers": 4, "layer_types": ["linear_attention", "full_attention"] * 2}


def tiny_moe(layers=TWO_PERIODS) -> Qwen35:
    """The tiny MoE preset with two stacked periods (of 1 Gated DeltaNet + 1 attention layer by default: the
    released 3 + 1 period costs twice the compile time and exercises nothing more here)."""
    model = Qwen35(ModelConfig.from_hf("tiny-moe", **layers), jnp.float32, nnx.Rngs(0))
    assert model.config.num_periods == 2
    return model


def packed_batch(rows: int, seq_len: int, seed: int) -> dict:
    """Documents of uneven lengths packed into rows (segment restarts, padding, documents across the delta
    rule's 64-token chunk edges)."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < rows * seq_len - 40:
        n = int(rng.integers(10, 90))
        docs.append((rng.integers(1, 256, n).astype(np.int32), np.ones(n, bool)))
        total += n
    batch = pack_documents(docs, seq_len)
    assert len(batch["input_ids"]) >= rows
    return {k: v[:rows] for k, v in batch.items()}


def checkpoint_policies(jaxpr) -> list:
    """The `policy` parameter of every checkpoint (remat) equation in a jaxpr, nested ones included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("checkpoint", "remat2"):
                found.append(eqn.params.get("policy"))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jaxpr.jaxpr)
    return found


# One optimizer step of 8 rows in 2 micro-batches (so the accumulation scan runs). Adam's first update is
# ~lr * sign(g): for near-zero gradients it amplifies rounding, so a small lr keeps the parameter comparison
# about the gradients; the optimizer's first moments (0.1 x the clipped gradients) compare them directly.
TC = TrainConfig(batch_size=8, grad_accum=2, warmup_steps=0, learning_rate=1e-4, loss_chunk=0)


def assert_trees_close(got, expected, rel: float, what: str):
    """Every leaf within rel x (the largest magnitude in `expected`'s tree) of `expected`."""
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(expected))
    assert scale > 0, what
    chex.assert_trees_all_close(got, expected, atol=rel * scale, rtol=0, custom_message=what)


@pytest.fixture(scope="module")
def reference_step():
    """(host batch, initial params, state after one unsharded remat="none" step, its metrics)."""
    batch = packed_batch(rows=TC.batch_size, seq_len=80, seed=0)
    trainer = Trainer(tiny_moe(), TC)
    state = trainer.init_state()
    initial = jax.tree.map(np.asarray, state["params"])
    state, metrics = trainer.train_step(state, trainer.put_batch(batch))
    assert float(metrics["loss"]) > 1.0 and float(metrics["aux_loss"]) > 0 and int(state["step"]) == 1
    return batch, initial, state, metrics


def check_step_equals_reference(state, metrics, reference, rel):
    _, initial, ref_state, ref_metrics = reference
    chex.assert_trees_all_close({k: metrics[k] for k in ref_metrics}, ref_metrics, rtol=rel, atol=0)
    for moment in ("mu", "nu"):  # Adam's moments: 0.1 x the clipped gradients and 0.05 x their squares
        assert_trees_close(optax.tree.get(state["opt_state"], moment), optax.tree.get(ref_state["opt_state"], moment),
                           rel, moment)
    assert_trees_close(state["params"], ref_state["params"], rel, "updated parameters")
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), ref_state["params"], initial)
    assert min(jax.tree.leaves(moved)) > 0  # every parameter was updated: the comparison covers real updates


# two more compilations of the train step (~25 s of CPU each)
def test_remat_policies_give_the_same_step(reference_step):
    """remat="full" and "dots" recompute the forward in the backward pass: the same float32 ops in another
    schedule, so loss, gradients and updated parameters equal remat="none"'s to rounding (measured: metrics
    identical, moments ~1e-8 and parameters ~2e-7 of their largest entry; bound 1e-5). The traced program
    must really hold the checkpoint with the requested policy, so the comparison is not between identical
    programs."""
    batch = reference_step[0]
    for remat in ("none", "full", "dots"):
        trainer = Trainer(tiny_moe(), dataclasses.replace(TC, remat=remat))
        state = trainer.init_state()
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, state["params"]), reference_step[1])
        device_batch = trainer.put_batch(batch)
        policies = checkpoint_policies(jax.jit(trainer.grads).trace(state["params"], device_batch).jaxpr)
        if remat == "none":  # the reference
            assert policies == []
            continue
        expected = None if remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        assert policies and all(p is expected for p in policies), (remat, policies)
        state, metrics = trainer.train_step(state, device_batch)
        check_step_equals_reference(state, metrics, reference_step, rel=1e-5)


def test_sharded_step_with_accumulation_equals_single_device(reference_step):
    """FSDP=2 x expert=2 x tensor=2 over 8 devices (tokens split over fsdp x expert, dispatched to their experts
    by all-to-all), two stacked periods, 2 micro-batches: loss, grad norm,
    gradient moments and updated parameters equal the single-device step's. Only the order of the sharded
    reductions differs (measured: moments ~2e-8 and parameters ~2e-7 of their largest entry); bound 1e-5."""
    trainer = Trainer(tiny_moe(), TC, make_mesh("fsdp=2,expert=2,tensor=2"))
    state = trainer.init_state()
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state["params"]), reference_step[1])
    experts = state["params"]["decoder"]["periods"]["layers"][0]["mlp"]["experts_gate_up"]
    chex.assert_shape(experts, (2, 8, None, None, None))  # [periods, experts, embed, 2, mlp]
    assert experts.sharding.shard_shape(experts.shape)[1] == 8 // 2  # really expert-sharded
    batch = trainer.put_batch(reference_step[0])
    rows = batch["input_ids"].sharding.shard_shape(batch["input_ids"].shape)[0]
    assert rows == TC.batch_size // 4  # split over fsdp x expert: the MoE moves tokens with an all-to-all
    state, metrics = trainer.train_step(state, batch)
    check_step_equals_reference(state, metrics, reference_step, rel=1e-5)
