"""Decoder layers, grouped into the repeating period that the model scans over."""

import jax
from flax import nnx

from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.attention import GatedAttention
from qwen35_jax.nn.gated_deltanet import GatedDeltaNet
from qwen35_jax.nn.mlp import MLP
from qwen35_jax.nn.moe import SparseMoe
from qwen35_jax.nn.norms import RMSNorm


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: token mixer (GatedDeltaNet or GatedAttention), then MoE or MLP."""

    def __init__(self, cfg: ModelConfig, layer_type: str, dtype, rngs: nnx.Rngs):
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        if layer_type == "full_attention":
            self.self_attn = GatedAttention(cfg, dtype, rngs)
        else:
            self.linear_attn = GatedDeltaNet(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        if cfg.is_moe:
            self.mlp = SparseMoe(cfg, dtype, rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, L, H] -> [B, L, H]."""
        h = self.input_layernorm(x)
        if self.layer_type == "full_attention":
            h = self.self_attn(h, cos, sin, mask)
        else:
            h, _ = self.linear_attn(h)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderPeriod(nnx.Module):
    """One period of layer types (3 x Gated DeltaNet + 1 attention in every released model)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, t, dtype, rngs) for t in cfg.period])

    def __call__(self, x, cos, sin, mask):
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nnx.Module):
    """All layers: periods stacked on a leading `layers` axis and run with `nnx.scan`.

    A config whose layer_types do not repeat (or `scan_layers=False`) is one period: a plain loop.
    """

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.num_periods = cfg.num_periods
        self.remat = cfg.remat
        if self.num_periods == 1:
            self.periods = DecoderPeriod(cfg, dtype, rngs)
            return

        @nnx.split_rngs(splits=self.num_periods)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(rngs):
            return DecoderPeriod(cfg, dtype, rngs)

        self.periods = create(rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, L, H]; cos, sin: [B, L, rotary_dim]; mask: bool [B or 1, L, L]."""
        def run(period, x):
            return period(x, cos, sin, mask)

        if self.remat != "none":
            run = nnx.remat(run, policy=REMAT_POLICIES[self.remat])
        if self.num_periods == 1:
            return run(self.periods, x)

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def scan(period, x):
            return run(period, x)

        return scan(self.periods, x)
