"""`load_model`: one entry point for every checkpoint format."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from qwen35_jax.checkpoint.hf_loader import load_hf
from qwen35_jax.checkpoint.orbax_io import is_orbax_checkpoint, load_orbax, read_metadata
from qwen35_jax.checkpoint.safetensors_io import CheckpointError
from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.model import Qwen35
from qwen35_jax.sharding import variable_sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def load_model(path: str | Path, dtype="float32", mesh: jax.sharding.Mesh | None = None,
               scan_layers: bool = True) -> Qwen35:
    """Loads an Orbax checkpoint (from `python -m qwen35_jax.convert`) or an HF checkpoint folder
    (config.json + safetensors) as a `Qwen35` with `dtype` parameters.

    With a mesh, parameters are placed by the sharding rules (qwen35_jax.sharding); an Orbax checkpoint is
    read straight into those shardings. `scan_layers=False` gives one module per layer (what decoding wants).
    `model(input_ids)`: int32 [batch, seq] -> logits [batch, seq, vocab].
    """
    path = Path(path)
    dtype = resolve_dtype(dtype)
    if is_orbax_checkpoint(path):
        cfg = ModelConfig.from_dict(read_metadata(path)["config"], where=str(path), scan_layers=scan_layers)
        return load_orbax(path, dtype, mesh, cfg)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (expected an Orbax checkpoint, or config.json "
                              "and *.safetensors)")
    model = load_hf(path, dtype, ModelConfig.from_hf(path, scan_layers=scan_layers))
    return model if mesh is None else shard_model(model, mesh)


def shard_model(model: Qwen35, mesh: jax.sharding.Mesh) -> Qwen35:
    """Moves every parameter to its sharding on `mesh`."""
    graphdef, state = nnx.split(model)
    for _, variable in nnx.to_flat_state(state):
        variable.set_value(jax.device_put(variable.get_value(), variable_sharding(variable, mesh)))
    return nnx.merge(graphdef, state)
