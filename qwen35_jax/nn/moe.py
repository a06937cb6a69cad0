"""Sparse MoE block: softmax top-k router, dropless routed experts, sigmoid-gated shared expert."""

import jax
from flax import nnx

from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.mlp import MLP
from qwen35_jax.nn.params import param
from qwen35_jax.ops.expert_parallel import expert_parallel_mesh, moe_experts_parallel
from qwen35_jax.ops.moe import moe_experts, route, router_logits, router_stats


class SparseMoe(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, e, i, std = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.initializer_range
        self.router = param(rngs, (h, e), ("embed", None), dtype, std=std)
        self.experts_gate_up = param(rngs, (e, h, 2, i), ("experts", "embed", None, "mlp"), dtype, std=std)
        self.experts_down = param(rngs, (e, i, h), ("experts", "mlp", "embed"), dtype, std=std)
        self.shared_expert = MLP(h, cfg.shared_expert_intermediate_size, dtype, rngs, std)
        self.shared_expert_gate = param(rngs, (h, 1), ("embed", None), dtype, std=std)
        self.top_k = cfg.num_experts_per_tok

    @jax.named_scope("moe")
    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None, backend: str = "auto"):
        """x: [batch, seq, H] -> [batch, seq, H]; backend: the grouped matmul (`ops.moe.MOE_BACKENDS`).

        With token_mask ([batch, seq], 1 = real token) it returns (output, `router_stats` of this layer),
        what the load-balancing and z losses are built from.
        """
        tokens = x.reshape(-1, x.shape[-1])
        logits = router_logits(tokens, self.router[...])
        weights, ids = route(logits, self.top_k)
        weights = weights.astype(x.dtype)  # the routing is float32; the combine runs in the activation dtype
        w1, w2 = self.experts_gate_up[...], self.experts_down[...]
        mesh = expert_parallel_mesh(w1.shape[0], w1.shape[-1])
        if mesh is None:
            routed = moe_experts(tokens, weights, ids, w1, w2, backend)
        else:
            routed = moe_experts_parallel(tokens, weights, ids, w1, w2, mesh, backend, batch=x.shape[0])
        shared = self.shared_expert(tokens) * jax.nn.sigmoid(tokens @ self.shared_expert_gate[...])
        out = (routed + shared).reshape(x.shape)
        if token_mask is None:
            return out
        return out, router_stats(logits, ids, token_mask.reshape(-1))
