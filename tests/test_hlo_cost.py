"""hlo_cost against hand-computed counts: loop trip counts, collectives on 8 CPU devices, sharded matmuls,
hand-written HLO for constructs the CPU backend does not emit; analytic model FLOPs of the presets."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen35_jax.config import ModelConfig
from qwen35_jax.hlo_cost import CHIPS, active_params, estimate_step, hlo_cost, mfu, model_flops, shape_bytes
from qwen35_jax.sharding import make_mesh


def compiled(f, *args):
    return jax.jit(f).lower(*args).compile()


def test_scan_body_counts_once_per_step():
    w = jnp.ones((128, 256))

    def scan(xs):
        return lax.scan(lambda c, x: (c, x @ w), 0.0, xs)[1]

    c = compiled(scan, jnp.ones((7, 64, 128)))
    cost = hlo_cost(c.as_text())
    expected = 7 * 2 * 64 * 128 * 256
    assert cost.flops == pytest.approx(expected, rel=0.01)
    assert cost.unknown_trip_counts == []
    xla = c.cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert cost.flops / xla["flops"] == pytest.approx(7, rel=0.01)  # XLA counts the body once


def test_nested_fori_loops_multiply():
    def nested(x, w):
        inner = lambda i, c: jnp.tanh(c @ w)
        return lax.fori_loop(0, 3, lambda i, c: lax.fori_loop(0, 5, inner, c), x)

    cost = hlo_cost(compiled(nested, jnp.ones((64, 128)), jnp.ones((128, 128))).as_text())
    assert cost.flops == pytest.approx(15 * 2 * 64 * 128 * 128, rel=0.01)


def test_unknown_trip_count_is_listed_and_counted_once():
    def loop(n, x, w):
        return lax.while_loop(lambda s: s[0] < n, lambda s: (s[0] + 1, jnp.tanh(s[1] @ w)), (0, x))[1]

    cost = hlo_cost(compiled(loop, 4, jnp.ones((64, 128)), jnp.ones((128, 128))).as_text())
    assert cost.flops == 2 * 64 * 128 * 128
    assert len(cost.unknown_trip_counts) == 1


def test_trip_count_inferred_from_the_condition_without_backend_config():
    w = jnp.ones((128, 256))
    text = compiled(lambda xs: lax.scan(lambda c, x: (c, x @ w), 0.0, xs)[1], jnp.ones((7, 64, 128))).as_text()
    stripped = "\n".join(line.split(", backend_config=")[0] if " while(" in line else line
                         for line in text.splitlines())
    assert "known_trip_count" not in stripped
    cost = hlo_cost(stripped)
    assert cost.flops == 7 * 2 * 64 * 128 * 256 and cost.unknown_trip_counts == []


def test_conditional_takes_the_most_expensive_branch():
    def cond(p, x, w):
        return lax.cond(p, lambda: x @ w, lambda: jnp.broadcast_to(x[:, :1], (64, 256)))

    cost = hlo_cost(compiled(cond, True, jnp.ones((64, 128)), jnp.ones((128, 256))).as_text())
    assert cost.flops == 2 * 64 * 128 * 256


def test_convolution_flops():
    conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME")  # NCHW, OIHW
    cost = hlo_cost(compiled(conv, jnp.ones((2, 3, 16, 16)), jnp.ones((8, 3, 3, 3))).as_text())
    assert cost.flops == 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)  # padding taps included


def _mesh():
    assert jax.device_count() == 8, "tests/conftest.py sets jax_num_cpu_devices to 8"
    return Mesh(np.array(jax.devices()), ("i",))


def test_psum_all_reduce_bytes():
    f = jax.shard_map(lambda a: lax.psum(a, "i"), mesh=_mesh(), in_specs=P(), out_specs=P())
    cost = hlo_cost(compiled(f, jnp.ones(1024, jnp.float32)).as_text())
    assert cost.collective_bytes == {"all-reduce": 4096} and cost.collective_counts == {"all-reduce": 1}


def test_all_gather_result_bytes():
    mesh = _mesh()
    f = jax.shard_map(lambda a: lax.all_gather(a, "i", tiled=True), mesh=mesh, in_specs=P("i"),
                      out_specs=P(), check_vma=False)
    x = jax.device_put(jnp.ones((16, 32), jnp.float32), NamedSharding(mesh, P("i")))
    cost = hlo_cost(compiled(f, x).as_text())
    assert cost.collective_bytes == {"all-gather": 16 * 32 * 4} and cost.collective_counts == {"all-gather": 1}


def test_sharded_matmul_flops_are_per_device():
    mesh = make_mesh("fsdp=8")
    rows, replicated = NamedSharding(mesh, P("fsdp", None)), NamedSharding(mesh, P())
    f = jax.jit(lambda x, w: x @ w, in_shardings=(rows, replicated), out_shardings=rows)
    cost = hlo_cost(f.lower(jnp.ones((64, 128)), jnp.ones((128, 256))).compile().as_text())
    assert cost.flops == pytest.approx(2 * 64 * 128 * 256 / 8, rel=0.01)


# Hand-written HLO in the shapes GPU / TPU backends print: async pairs, a cuBLAS gemm, reduce-scatter in an
# async wrapper, a loop bounded by `i <= 2` inside a fusion, ragged-all-to-all, ragged-dot (forward and
# weight-gradient forms).
HANDWRITTEN = """HloModule m, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%rs (p: bf16[64,32]) -> bf16[16,32] {
  %p = bf16[64,32]{1,0} parameter(0)
  ROOT %r = bf16[16,32]{1,0} reduce-scatter(%p), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
}

%cmp (x: s32[], y: s32[]) -> pred[] {
  %x = s32[] parameter(0)
  %y = s32[] parameter(1)
  ROOT %c = pred[] compare(%x, %y), direction=LE
}

%cond (t: (s32[], f32[8,16])) -> pred[] {
  %t = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(2)
  ROOT %f = pred[] fusion(%i, %n), kind=kLoop, calls=%cmp
}

%body (t.1: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %t.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  %v = f32[8,16]{1,0} get-tuple-element(%t.1), index=1
  %w = f32[16,16]{1,0} constant({...})
  %g = (f32[8,16]{1,0}, s8[1024]{0}) custom-call(%v, %w), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %o = f32[8,16]{1,0} get-tuple-element(%g), index=0
  %cps = (f32[8,16]{1,0}, f32[8,16]{1,0}, u32[], u32[]) collective-permute-start(%o), source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8,16]{1,0} collective-permute-done(%cps)
  ROOT %out = (s32[], f32[8,16]{1,0}) tuple(%i.1, %cpd)
}

ENTRY %main (x: bf16[16,32], y: bf16[64,32], z: f32[8,16], r: (bf16[100], bf16[400], s32[4], s32[4])) -> f32[] {
  %x = bf16[16,32]{1,0} parameter(0)
  %y = bf16[64,32]{1,0} parameter(1)
  %z = f32[8,16]{1,0} parameter(2)
  %ags = (bf16[16,32]{1,0}, bf16[64,32]{1,0}) all-gather-start(%x), dimensions={0}, replica_groups=[1,4]<=[4]
  %agd = bf16[64,32]{1,0} all-gather-done(%ags)
  %rss = ((bf16[64,32]{1,0}), bf16[16,32]{1,0}) async-start(%y), calls=%rs
  %rsd = bf16[16,32]{1,0} async-done(%rss), calls=%rs
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%zero, %z)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body
  %in = bf16[100]{0} parameter(3)
  %buf = bf16[400]{0} constant({...})
  %off = s32[4]{0} constant({0, 1, 2, 3})
  %ra = bf16[400]{0} ragged-all-to-all(%in, %buf, %off, %off, %off, %off), replica_groups={{0,1,2,3}}
  %gs = s32[4]{0} constant({8, 8, 8, 8})
  %e = bf16[4,32,48]{2,1,0} constant({...})
  %xt = bf16[32,32]{1,0} constant({...})
  %rd = bf16[32,48]{1,0} ragged-dot(%xt, %e, %gs), lhs_contracting_dims={1}, rhs_contracting_dims={1}, lhs_ragged_dims={0}, rhs_group_dims={0}
  %dy = bf16[32,48]{1,0} constant({...})
  %rdw = bf16[4,32,48]{2,1,0} ragged-dot(%xt, %dy, %gs), lhs_contracting_dims={1}, rhs_contracting_dims={0}, lhs_ragged_dims={1}
  ROOT %c0 = f32[] constant(0)
}
"""


def test_handwritten_hlo_constructs():
    cost = hlo_cost(HANDWRITTEN)
    assert cost.unknown_trip_counts == []
    gemms = 3 * 2 * 8 * 16 * 16  # i = 0, 1, 2: three gemms
    ragged = 2 * 32 * 32 * 48 * 2  # forward [32, 32] x [32, 48] per row's group; weight gradient likewise
    assert cost.flops == gemms + ragged
    assert cost.collective_bytes == {"all-gather": 64 * 32 * 2, "reduce-scatter": 64 * 32 * 2,
                                     "collective-permute": 3 * 8 * 16 * 4, "ragged-all-to-all": 400 * 2}
    assert cost.collective_counts == {"all-gather": 1, "reduce-scatter": 1, "collective-permute": 3,
                                      "ragged-all-to-all": 1}


def test_shape_bytes():
    assert shape_bytes("bf16[4,128]{1,0}") == 4 * 128 * 2
    assert shape_bytes("f32[]") == 4
    assert shape_bytes("(f32[2], s32[])") == 12
    assert shape_bytes("((pred[3], c64[2]{0}), f64[1,1], u8[5])") == 3 + 16 + 8 + 5


def test_large_module_parses_quickly():
    """~10 MB of HLO (a loop body of 20k dots with metadata) in a few seconds."""
    dots = "\n".join(f'  %d{i} = f32[8,8]{{1,0}} dot(%p, %p), lhs_contracting_dims={{1}}, rhs_contracting_dims='
                     f'{{0}}, metadata={{op_name="jit(step)/while/body/layer_{i}/dot_general" '
                     f'source_file="/a/long/path/to/some/module.py" source_line={i}}}' + " " * 250
                     for i in range(20000))
    text = (f"HloModule big\n\n%body (p: f32[8,8]) -> f32[8,8] {{\n  %p = f32[8,8]{{1,0}} parameter(0)\n{dots}\n"
            "  ROOT %r = f32[8,8]{1,0} copy(%p)\n}\n\n%cond (q: f32[8,8]) -> pred[] {\n"
            "  %q = f32[8,8]{1,0} parameter(0)\n  ROOT %k = pred[] constant(true)\n}\n\n"
            "ENTRY %main (a: f32[8,8]) -> f32[8,8] {\n  %a = f32[8,8]{1,0} parameter(0)\n"
            '  ROOT %w = f32[8,8]{1,0} while(%a), condition=%cond, body=%body, '
            'backend_config={"known_trip_count":{"n":"10"}}\n}\n')
    assert len(text) > 9_000_000
    start = time.perf_counter()
    cost = hlo_cost(text)
    elapsed = time.perf_counter() - start
    print(f"{len(text) / 1e6:.1f} MB parsed in {elapsed:.2f} s")
    assert cost.flops == 10 * 20000 * 2 * 8 * 8 * 8
    assert elapsed < 20  # a few seconds on an idle core; generous for shared CI machines


@pytest.mark.parametrize("preset, released", [("qwen3.5-35b-a3b", 3e9), ("qwen3.5-122b-a10b", 10e9),
                                              ("qwen3.5-397b-a17b", 17e9)])
def test_active_parameters_match_the_released_counts(preset, released):
    cfg = ModelConfig.from_hf(preset)
    active = active_params(cfg)
    print(f"{preset}: {active / 1e9:.2f}B active (released: {released / 1e9:.0f}B)")
    assert active == pytest.approx(released, rel=0.15)
    forward = model_flops(cfg, batch=2, seq=4096, training=False)
    assert model_flops(cfg, batch=2, seq=4096) == pytest.approx(3 * forward)
    assert forward > 2 * 2 * 4096 * active  # attention and the delta rule add to 2 * params per token


def test_estimate_step_and_mfu():
    cost = hlo_cost(HANDWRITTEN)
    chip = CHIPS["v5p"]
    estimate = estimate_step(cost, chip)
    assert estimate["compute_s"] == pytest.approx(cost.flops / 459e12)
    assert estimate["collective_s"] == pytest.approx(cost.total_collective_bytes / 600e9)
    assert estimate["step_s"] == pytest.approx(estimate["compute_s"] + estimate["collective_s"])
    assert mfu(459e12 * 4 * 0.5, devices=4, step_seconds=1.0, chip=chip) == pytest.approx(0.5)
    assert set(CHIPS) == {"v5p", "v5e", "v6e", "h100", "h200"}
