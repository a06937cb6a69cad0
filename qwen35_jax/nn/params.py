"""Parameter creation with HF's initialisers and logical axis names (mapped to mesh axes by sharding.py)."""

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype,
          init: str = "normal", std: float = 0.02) -> nnx.Param:
    """An `nnx.Param` of `shape` carrying logical `axes` (one name or None per dimension).

    init: "normal" (N(0, std), HF's Linear/Embedding/expert init with std = the config's initializer_range),
    "zeros", "ones", or "a_log" (log U(0.01, 16), Gated DeltaNet's A_log).
    """
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "a_log":
        value = jnp.log(jax.random.uniform(rngs.params(), shape, jnp.float32, 0.01, 16.0))
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)
