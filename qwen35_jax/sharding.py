"""Meshes and the one table of rules mapping logical axis names to mesh axes.

Mesh axes: `data` (batch split), `fsdp` (batch split; parameters and optimizer state sharded), `expert` (MoE
experts; outside the MoE it acts as one more fsdp axis: batch split, non-expert parameters sharded), `tensor`
(heads, MLP / expert intermediate dims, vocab). Each mesh axis shards one dim of an array at most, taken by the
first dim that asks for it: an expert weight's `experts` dim takes `expert`, so its `embed` dim gets `fsdp` only. A logical axis whose size the mesh axes do not
divide is replicated instead (the 2 KV heads of the released models on a tensor axis of 4, say).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp", "expert")),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("key_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("experts", ("expert",)),
    ("head_dim", ()),
    ("layers", ()),
)


class MeshError(ValueError):
    """A mesh spec that cannot be built or does not fit the model; the message says why."""


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """"expert=4,tensor=2" -> {"expert": 4, "tensor": 2} (unknown axes and bad sizes are errors)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES:
            raise MeshError(f"mesh axis {name!r} in {spec!r}: expected one of {MESH_AXES}")
        if not value.isdigit() or int(value) < 1:
            raise MeshError(f"mesh axis {name}={value!r} in {spec!r}: expected a positive integer")
        sizes[name] = int(value)
    return sizes


def make_mesh(spec: str | dict, devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with axes in MESH_AXES order; missing axes have size 1."""
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    if devices is None:
        initialize_multihost()
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise MeshError(f"mesh {sizes} needs {math.prod(shape)} devices but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array with logical `axes`; each mesh axis is used at most once."""
    rules = dict(RULES)
    used, spec = set(), []
    for name, size in zip(axes, shape):
        mesh_axes = tuple(a for a in rules.get(name, ()) if mesh.shape.get(a, 1) > 1 and a not in used)
        while mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes):
            mesh_axes = mesh_axes[:-1]
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def variable_sharding(variable, mesh: Mesh) -> NamedSharding:
    """NamedSharding of an nnx Variable (concrete or abstract) from its `out_sharding` axis names."""
    value = variable.get_value()
    axes = variable.get_metadata().get("out_sharding") or (None,) * len(value.shape)
    return NamedSharding(mesh, logical_spec(tuple(axes), tuple(value.shape), mesh))


def constrain_activations(x: jax.Array) -> jax.Array:
    """Pins an activation [batch, ...] to batch-over-(data, fsdp, expert), the rest replicated, when a mesh is in
    context (`jax.set_mesh`); a no-op otherwise. Applied at decoder-layer boundaries."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def initialize_multihost() -> None:
    """`jax.distributed.initialize()` when this process is one of several (a TPU pod slice, a SLURM or
    Kubernetes job, or JAX_COORDINATOR_ADDRESS set); call it before building a mesh over all hosts."""
    import os
    multi = bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or int(os.environ.get("SLURM_NTASKS", "1")) > 1 \
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()
