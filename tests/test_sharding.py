"""Sharded execution on 8 fake CPU devices equals the single-device run."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen35_jax import load_model
from qwen35_jax.cache import init_decode_state
from qwen35_jax.hf_reference import random_tokens
from qwen35_jax.hlo_cost import shape_bytes
from qwen35_jax.sharding import MeshError, logical_spec, make_mesh, parse_mesh_spec

# tensor=8 (pure tensor parallelism) is the slowest; the default run keeps the two meshes that shard tensor with
# expert (and fsdp) axes, `-m slow` adds it
MESHES = [pytest.param("tensor=8", marks=pytest.mark.slow), "expert=4,tensor=2", "fsdp=2,expert=2,tensor=2"]


def run_on(model, mesh, fn, *args):
    """(result, compiled HLO text) of fn(model, *args) jitted, traced with the mesh in context."""
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))
    if mesh is None:
        return jitted(state, *args), None
    with jax.set_mesh(mesh):
        compiled = jitted.lower(state, *args).compile()
        return compiled(state, *args), compiled.as_text()


@pytest.fixture(scope="module")
def single(hf_checkpoint):
    _, folder = hf_checkpoint("tiny-moe")
    return folder, load_model(folder, scan_layers=False)


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_forward_and_decode_equal_single_device(single, spec):
    folder, reference = single
    mesh = make_mesh(spec)
    model = load_model(folder, mesh=mesh, scan_layers=False)
    tokens = jnp.asarray(random_tokens(256, 8, 24, seed=1))  # 8 rows: split over expert too
    expected, _ = run_on(reference, None, lambda m, t: m(t), tokens)
    got, hlo = run_on(model, mesh, lambda m, t: m(t), tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    if mesh.shape["expert"] > 1:  # tokens split over the expert axis travel to their experts' owners
        assert "all-to-all" in hlo

    def steps(m, t):  # prefill 21 tokens, then 3 one-token decode steps
        state = init_decode_state(m.config, 8, 32, jnp.float32)
        h, state = m.forward_with_state(t[:, :21], state)
        out = [m.logits(h[:, -1])]
        for i in range(21, 24):
            h, state = m.forward_with_state(t[:, i:i + 1], state)
            out.append(m.logits(h[:, 0]))
        return jnp.stack(out)
    expected, _ = run_on(reference, None, steps, tokens)
    got, _ = run_on(model, mesh, steps, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)

    experts = model.decoder.periods.layers[0].mlp.experts_gate_up[...]
    expert_axis = mesh.shape["expert"]
    assert max(s.data.nbytes for s in experts.addressable_shards) <= experts.nbytes // expert_axis
    # FSDP gathers parameters' hidden dims (over fsdp, and over expert for non-expert weights), but no device
    # ever gathers other shards' experts: every all-gather result is smaller than one tensor slice of all experts
    gathered = [shape_bytes(line.split("=", 1)[1].split(" all-gather(")[0]) for line in hlo.splitlines()
                if " all-gather(" in line]
    assert max(gathered, default=0) < experts.nbytes // mesh.shape["tensor"]


def test_logical_rules_replicate_what_does_not_divide():
    mesh = make_mesh("expert=2,tensor=4")
    assert tuple(logical_spec(("embed", "kv_heads", "head_dim"), (64, 2, 32), mesh)) == ("expert", None, None)
    assert tuple(logical_spec(("embed", "heads", "head_dim"), (64, 8, 32), mesh)) == ("expert", "tensor", None)
    assert tuple(logical_spec(("experts", "embed", None, "mlp"), (8, 64, 2, 32), mesh)) == \
        ("expert", None, None, "tensor")


def test_bad_mesh_specs():
    with pytest.raises(MeshError, match="mesh axis 'model'"):
        parse_mesh_spec("model=2")
    with pytest.raises(MeshError, match="tensor='x'"):
        parse_mesh_spec("tensor=x")
    with pytest.raises(MeshError, match="needs 16 devices but 8"):
        make_mesh("expert=4,tensor=4")
