"""Dense SwiGLU feed-forward (the dense models' MLP and the MoE shared expert)."""

import jax
import jax.numpy as jnp
from flax import nnx

from qwen35_jax.nn.params import param
from qwen35_jax.ops.moe import swiglu


class MLP(nnx.Module):
    """`down(silu(gate(x)) * up(x))`; gate and up stored together as gate_up [H, 2, I]."""

    def __init__(self, hidden: int, intermediate: int, dtype, rngs: nnx.Rngs, std: float):
        self.gate_up = param(rngs, (hidden, 2, intermediate), ("embed", None, "mlp"), dtype, std=std)
        self.down = param(rngs, (intermediate, hidden), ("mlp", "embed"), dtype, std=std)

    @jax.named_scope("mlp")
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., H] -> [..., H]."""
        h = jnp.einsum("...h,hgi->...gi", x, self.gate_up[...])
        return swiglu(h) @ self.down[...]
