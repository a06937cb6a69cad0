"""`load_model`: one entry point for every checkpoint format."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen35_jax.checkpoint.hf_loader import load_hf
from qwen35_jax.checkpoint.orbax_io import is_orbax_checkpoint, load_extras, load_orbax, read_metadata
from qwen35_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFolder
from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.model import Qwen35
from qwen35_jax.precision import compute_dtype as policy_compute_dtype
from qwen35_jax.sharding import variable_sharding

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def load_model(path: str | Path, dtype="float32", mesh: jax.sharding.Mesh | None = None,
               scan_layers: bool = True, compute_dtype=None) -> Qwen35:
    """Loads an Orbax checkpoint (from `python -m qwen35_jax.convert`) or an HF checkpoint folder
    (config.json + safetensors) as a `Qwen35`.

    dtype: the weights' storage precision (their values are rounded to it). compute_dtype: the dtype the
    parameters are held and computed in; None follows the policy of `qwen35_jax.precision.compute_dtype`:
    float32 on CPU (a bfloat16 load holds float32 copies of the bfloat16 values: XLA:CPU bfloat16 dots run
    ~10x slower), `dtype` elsewhere. `compute_dtype="bfloat16"` forces genuine bfloat16 numerics on CPU.
    With a mesh, parameters are placed by the sharding rules (qwen35_jax.sharding); an Orbax checkpoint is
    read straight into those shardings. `scan_layers=False` gives one module per layer (what decoding wants).
    `model(input_ids)`: int32 [batch, seq] -> logits [batch, seq, vocab].
    """
    path = Path(path)
    storage, compute = _dtypes(dtype, compute_dtype, mesh)
    if is_orbax_checkpoint(path):
        cfg = ModelConfig.from_dict(read_metadata(path)["config"], where=str(path), scan_layers=scan_layers)
        return cast_model(load_orbax(path, storage, mesh, cfg), compute)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (expected an Orbax checkpoint, or config.json "
                              "and *.safetensors)")
    model = cast_model(load_hf(path, storage, ModelConfig.from_hf(path, scan_layers=scan_layers)), compute)
    return model if mesh is None else shard_model(model, mesh)


def _dtypes(dtype, compute_dtype, mesh) -> tuple:
    """(storage dtype, compute dtype) as `load_model` documents them."""
    storage = resolve_dtype(dtype)
    platform = None if mesh is None else mesh.devices.flat[0].platform
    return storage, policy_compute_dtype(storage, platform) if compute_dtype is None else resolve_dtype(compute_dtype)


def load_vision_tower(path: str | Path, dtype="float32", mesh: jax.sharding.Mesh | None = None,
                      compute_dtype=None):
    """The checkpoint's vision encoder (`qwen35_jax.vision.encoder.VisionEncoder`, from its `model.visual.*`
    tensors; every one consumed, none missing), or None when its config has no vision tower or it holds no
    vision tensors (a fine-tuned checkpoint saved by `save_model` keeps the config but only the text model's
    arrays: it then serves text, and says so once). dtype / compute_dtype / mesh as in `load_model`."""
    from qwen35_jax.vision.weights import PREFIX, load_vision
    path = Path(path)
    orbax = is_orbax_checkpoint(path)
    cfg = (ModelConfig.from_dict(read_metadata(path)["config"], where=str(path)) if orbax
           else ModelConfig.from_hf(path))
    if cfg.vision is None:
        return None
    if orbax:
        tensors = load_extras(path, PREFIX)
    else:
        folder = SafetensorsFolder(path)
        tensors = {n: folder.get(n) for n in folder.names() if n.startswith(PREFIX)}
    if not tensors:
        log.warning("%s: the config has a vision tower but the checkpoint holds no %s* tensors: text prompts only",
                    path, PREFIX)
        return None
    storage, compute = _dtypes(dtype, compute_dtype, mesh)
    tensors = {n: np.asarray(jnp.asarray(t, storage)) for n, t in tensors.items()}  # round to the storage dtype
    encoder = load_vision(tensors, cfg.vision, compute)
    return encoder if mesh is None else shard_model(encoder, mesh)


def cast_model(model: Qwen35, dtype) -> Qwen35:
    """The model with every floating-point parameter (values kept, shardings kept) and `model.dtype` in `dtype`;
    the model itself when it already is."""
    dtype = jnp.dtype(dtype)
    if jnp.dtype(model.dtype) == dtype:
        return model
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    model = nnx.merge(graphdef, state)  # new modules and variables: the model passed in is left as it was
    model.dtype = dtype
    return model


def shard_model(model: Qwen35, mesh: jax.sharding.Mesh) -> Qwen35:
    """Moves every parameter to its sharding on `mesh`."""
    graphdef, state = nnx.split(model)
    for _, variable in nnx.to_flat_state(state):
        variable.set_value(jax.device_put(variable.get_value(), variable_sharding(variable, mesh)))
    return nnx.merge(graphdef, state)
