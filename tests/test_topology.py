"""TPU slices as AOT compile targets: slice names everywhere; compiling for a v5p-8 where libtpu is installed
(Python >= 3.12, the `test` extra)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen35_jax.sharding import make_mesh
from qwen35_jax.topology import GiB, has_libtpu, parse_slice, topology_devices


@pytest.mark.parametrize("name, generation, chips, hbm_gib, topology", [
    ("v5p-8", "v5p", 4, 95, "2x2x1"),
    ("v5p-64", "v5p", 32, 95, "2x4x4"),
    ("v5p-256", "v5p", 128, 95, "4x4x8"),
    ("v5p-1024", "v5p", 512, 95, "8x8x8"),
    ("v5e-256", "v5e", 256, 16, "16x16"),
    ("v5litepod-16", "v5e", 16, 16, "4x4"),
    ("v6e-64", "v6e", 64, 32, "8x8"),
    ("v6e-256", "v6e", 256, 32, "16x16"),
])
def test_parse_slice(name, generation, chips, hbm_gib, topology):
    spec = parse_slice(name)
    assert (spec.generation, spec.chips, spec.hbm_bytes, spec.topology) == (generation, chips, hbm_gib * GiB, topology)
    assert spec.name == f"{generation}-{name.split('-')[1]}"


def test_parse_slice_libtpu_arguments():
    big, small, pod = parse_slice("v5p-256"), parse_slice("v6e-8"), parse_slice("v5e-256")
    assert (big.topology_name, big.chip_config_name, big.chips_per_host_bounds, big.wrap) == \
        ("v5p:4x4x8", "megacore", (2, 2, 1), (True, True, True))
    assert (small.topology_name, small.chip_config_name, small.chips_per_host_bounds, small.wrap) == \
        ("v6e:2x4", "default", (2, 4, 1), (False, False, False))
    assert pod.wrap == (True, True, False)


@pytest.mark.parametrize("name", ["v5p-7", "v5p-200", "v5e-512", "v6e-3", "v4-8", "tpu", "v5p256", ""])
def test_parse_slice_rejects(name):
    with pytest.raises(ValueError, match=r"unknown TPU slice .*accepted: v5p-N") as err:
        parse_slice(name)
    assert repr(name) in str(err.value)


def test_missing_libtpu_names_the_extra(monkeypatch):
    monkeypatch.setattr("qwen35_jax.topology.has_libtpu", lambda: False)
    with pytest.raises(RuntimeError, match=r'pip install "qwen35-jax\[tpu\]"'):
        topology_devices("v5p-8")


needs_libtpu = pytest.mark.skipif(not has_libtpu(), reason="libtpu not installed (Python >= 3.12: pip install "
                                                           '"qwen35-jax[tpu]")')


@needs_libtpu
def test_aot_compile_for_v5p_8():
    devices = topology_devices("v5p-8")
    assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
    assert jax.devices()[0].platform == "cpu"  # the CPU backend is untouched
    mesh = make_mesh("fsdp=4", devices=devices)
    # Tile-aligned shapes (bf16 tiles are 16 x 128 on TPU), so that no padding enters the byte counts.
    m, k, n = 512, 1024, 256
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
    w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    compiled = jax.jit(lambda a, b: a @ b).lower(x, w).compile()
    stats = compiled.memory_analysis()
    assert stats.argument_size_in_bytes == (m // 4) * k * 2 + k * n * 2
    assert stats.output_size_in_bytes == (m // 4) * n * 2
    hlo = compiled.as_text()
    assert "T(8,128)(2,1)" in hlo  # TPU tiled bf16 layouts: the TPU compiler produced this
    assert "num_partitions=4" in hlo
