"""`load_model`: one entry point for every checkpoint format."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from qwen35_jax.checkpoint.hf_loader import load_hf
from qwen35_jax.checkpoint.safetensors_io import CheckpointError
from qwen35_jax.nn.model import Qwen35

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def load_model(path: str | Path, dtype="float32") -> Qwen35:
    """Loads an HF checkpoint folder (config.json + safetensors) as a `Qwen35` with `dtype` parameters.

    `model(input_ids)` with int32 [batch, seq] then returns logits [batch, seq, vocab].
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (expected config.json and *.safetensors)")
    return load_hf(path, resolve_dtype(dtype))
