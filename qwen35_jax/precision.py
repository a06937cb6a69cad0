"""The precision policy, decided here and nowhere else.

* Matmul precision follows the compute dtype: a float32 model traces every matmul / einsum with HIGHEST
  precision (TPU's default runs a float32 matmul as one bfloat16 pass, recent NVIDIA GPUs as TF32, so
  float32 parity would otherwise hold on CPU only); a bfloat16 model keeps the backend's fast default.
  `Qwen35`'s and `MTP`'s public methods enter `precision_scope(model's compute dtype)`
  (`under_precision_policy`); the choice is read by JAX when it traces (`jax.default_matmul_precision`), so
  it is fixed in the jaxpr, transposes included.
* The Gated DeltaNet core and the MoE router compute in float32 with HIGHEST precision in every mode
  (`highest_precision`): errors compound through the recurrence, and a bfloat16 router flips near-ties.
* On CPU a model computes in float32 whatever its storage dtype (`compute_dtype`): XLA:CPU runs bfloat16
  dots about 10x below float32 speed, so bfloat16 weights are held as float32 copies of their bfloat16 values.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

HIGHEST = "highest"


def matmul_precision(compute_dtype) -> str | None:
    """The default matmul precision for a model computing in `compute_dtype`: HIGHEST for float32, None
    (the backend's default) for lower-precision dtypes."""
    return HIGHEST if jnp.dtype(compute_dtype) == jnp.float32 else None


@contextlib.contextmanager
def matmul_scope(precision: str | None):
    """Traces what runs inside with `precision` as the default matmul precision (None: leave it as it is)."""
    if precision is None:
        yield
    else:
        with jax.default_matmul_precision(precision):
            yield


def precision_scope(compute_dtype):
    """`matmul_scope` of the policy for `compute_dtype` (HIGHEST for float32, a no-op for bfloat16)."""
    return matmul_scope(matmul_precision(compute_dtype))


def under_precision_policy(method):
    """Decorator for a public method of a module with a `compute_dtype` property (`Qwen35`, `MTP`): the method
    traces under `precision_scope(self.compute_dtype)` (HIGHEST for float32, the backend default for bfloat16)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with precision_scope(self.compute_dtype):
            return method(self, *args, **kwargs)
    return wrapper


def highest_precision(fn):
    """Decorator: `fn` traces with HIGHEST matmul precision whatever its caller's policy."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matmul_scope(HIGHEST):
            return fn(*args, **kwargs)
    return wrapper


def current_precision() -> str | None:
    """The matmul precision in force now (set by `matmul_scope`), for custom VJPs whose backward pass is
    traced after the forward's scope has closed."""
    return jax.config.jax_default_matmul_precision


def compute_dtype(storage_dtype, platform: str | None = None):
    """The dtype a model stored in `storage_dtype` computes in on `platform` (default: JAX's backend):
    float32 on CPU, where bfloat16 dots run ~10x slower than float32; the storage dtype elsewhere."""
    storage_dtype = jnp.dtype(storage_dtype)
    platform = platform or jax.default_backend()
    return jnp.dtype(jnp.float32) if platform == "cpu" else storage_dtype
