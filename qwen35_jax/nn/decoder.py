"""Decoder layers, grouped into the repeating period that the model scans over."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.attention import GatedAttention
from qwen35_jax.nn.gated_deltanet import GatedDeltaNet
from qwen35_jax.nn.mlp import MLP
from qwen35_jax.nn.moe import SparseMoe
from qwen35_jax.nn.norms import RMSNorm
from qwen35_jax.ops.attention import causal_mask
from qwen35_jax.ops.moe import MOE_BACKENDS
from qwen35_jax.ops.rope import rope_cos_sin
from qwen35_jax.sharding import constrain_activations


class Context(NamedTuple):
    """What every layer of one forward call shares."""

    cos: jax.Array                  # [B, L, rotary_dim] float32
    sin: jax.Array                  # [B, L, rotary_dim] float32
    mask: jax.Array                 # bool [B or 1, L, S]: query t may see key s
    starts: jax.Array | None = None   # int [B]: tokens already in the decode state (None: no state)
    n_valid: jax.Array | None = None  # int [B]: real tokens of this call per row (rest: right padding)
    segment_ids: jax.Array | None = None  # int [B, L]: packed documents (GDN state restarts at each start)
    token_mask: jax.Array | None = None   # [B, L] 1 = real token: MoE layers return router stats (training)
    moe_backend: str = "auto"             # the grouped matmul of MoE layers: ops.moe.MOE_BACKENDS
    keep_steps: bool = False              # GDN layers keep their state after each token (speculative verify)


def config_rope(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions: int [B, L] or [3, B, L] -> cos, sin [B, L, rotary_dim] float32, by the config's RoPE."""
    return rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section)


def sequence_context(cfg: ModelConfig, shape: tuple[int, int], positions: jax.Array | None = None,
                     segment_ids: jax.Array | None = None, token_mask: jax.Array | None = None,
                     moe_backend: str = "auto") -> Context:
    """The Context of a forward over whole sequences of `shape` (batch, seq), without a decode state: causal
    attention, kept within each segment when segment_ids [B, L] are given (packed documents); positions int
    [B, L] or [3, B, L], default 0..L-1."""
    batch, seq = shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    cos, sin = config_rope(cfg, positions)
    mask = causal_mask(seq)[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return Context(cos, sin, mask, segment_ids=segment_ids, token_mask=token_mask, moe_backend=moe_backend)


def state_context(cfg: ModelConfig, shape: tuple[int, int], starts: jax.Array, max_len: int,
                  n_valid: jax.Array | None = None, rope_deltas: jax.Array | None = None,
                  positions: jax.Array | None = None, moe_backend: str = "auto") -> Context:
    """The Context of a call continuing a KV cache of `max_len` entries with `shape` (batch, seq) new tokens.

    Token t of row b goes to cache index starts[b] + t and sees the cache entries up to its own index; its
    rotary position is that index + rope_deltas[b] unless `positions` (int [3, B, L] or [B, L]) are given.
    n_valid: int [B], real tokens per row (the rest right padding); None: all seq real (ctx.n_valid holds it)."""
    batch, seq = shape
    index = starts[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
    if positions is None:
        positions = index if rope_deltas is None else index + rope_deltas[:, None]
    cos, sin = config_rope(cfg, positions)
    mask = jnp.arange(max_len)[None, None, :] <= index[:, :, None]
    n_valid = jnp.full((batch,), seq, jnp.int32) if n_valid is None else n_valid.astype(jnp.int32)
    return Context(cos, sin, mask, starts, n_valid, moe_backend=moe_backend)


def add_stats(total: dict | None, stats: dict | None) -> dict | None:
    """Sums two router-stats dicts (`ops.moe.router_stats`); None is the empty sum."""
    if total is None or stats is None:
        return stats if total is None else total
    return jax.tree.map(lambda a, b: a + b, total, stats)


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
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype, rngs, cfg.initializer_range)

    @jax.named_scope("decoder_layer")
    def __call__(self, x: jax.Array, ctx: Context, state: dict | None = None):
        """x: [B, L, H] -> ([B, L, H], the layer's new decode state or None, router stats or None)."""
        h = self.input_layernorm(x)
        if self.layer_type == "full_attention":
            h, state = self.self_attn(h, ctx, state)
        else:
            h, new_state = self.linear_attn(h, state, ctx.n_valid, ctx.segment_ids, ctx.keep_steps)
            state = None if state is None else new_state  # without a decode state, nothing is carried
        x = x + h
        h = self.post_attention_layernorm(x)
        stats = None
        if ctx.token_mask is not None and isinstance(self.mlp, SparseMoe):
            h, stats = self.mlp(h, ctx.token_mask, ctx.moe_backend)
        elif isinstance(self.mlp, SparseMoe):
            h = self.mlp(h, backend=ctx.moe_backend)
        else:
            h = self.mlp(h)
        return constrain_activations(x + h), state, stats


class DecoderPeriod(nnx.Module):
    """One period of layer types (3 x Gated DeltaNet + 1 attention in every released model)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, t, dtype, rngs) for t in cfg.period])

    def __call__(self, x, ctx: Context, states: list | None = None):
        """states: one decode state per layer of the period, or None.

        Returns (x, new states or None, the period's summed router stats or None)."""
        new_states, total = [], None
        for j, layer in enumerate(self.layers):
            x, state, stats = layer(x, ctx, None if states is None else states[j])
            new_states.append(state)
            total = add_stats(total, stats)
        return x, (None if states is None else new_states), total


REMAT_POLICIES = {  # remat name -> the `nnx.remat` policy of each period ("none": no remat)
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ("none", *REMAT_POLICIES)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raises ValueError naming the option, its value and the choices."""
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")


class Decoder(nnx.Module):
    """All layers: periods stacked on a leading `layers` axis and run with `nnx.scan`.

    A config whose layer_types do not repeat (or `scan_layers=False`) is one period: a plain loop. Scanning
    suits training and prefill (compile time independent of depth); one-token decoding wants unstacked
    layers (`nn.model.unstack_layers`), since a scan copies each period's weights out of the stack on
    every step (measured 198 vs 41 ms/token on the small-moe benchmark config).
    """

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.num_periods = cfg.num_periods
        if self.num_periods == 1:
            self.periods = DecoderPeriod(cfg, dtype, rngs)
            return

        @nnx.split_rngs(splits=self.num_periods)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(rngs):
            return DecoderPeriod(cfg, dtype, rngs)

        self.periods = create(rngs)

    def __call__(self, x: jax.Array, ctx: Context, states: list | None = None, remat: str = "none",
                 period_transform=None, period_extra=None):
        """x: [B, L, H]; states: the decode state's "layers" (stacked per period) or None; remat: "none",
        "full" (recompute each period's forward in the backward pass) or "dots" (keep its matmul outputs).

        period_transform: None or a callable (period_state, extra) -> the period's parameters, applied to each
        period inside the scan (and inside the remat'd function, so under remat it is recomputed in the backward
        pass instead of saved): the period runs as `nnx.merge(graphdef, period_transform(period_state, extra))`,
        period_state being `nnx.split(period)[1]` (one period's slice of the stacked parameters, paths relative
        to the period: ("layers", slot, ...)). A trainer casts or merges adapters here, so only one period's
        transformed weights are live at a time. period_extra: a pytree handed to the transform, its leaves
        with a leading [num_periods] axis scanned with the periods (extra = its slice); with one period (an
        unscanned model) it has no leading axis and is passed as it is.

        Returns (x, new states or None, router stats summed over all MoE layers or None: present when
        ctx.token_mask is set and the model is MoE)."""
        check_choice("remat", remat, REMAT_CHOICES)
        check_choice("moe_backend", ctx.moe_backend, MOE_BACKENDS)

        def run(period, x, states, extra):
            if period_transform is not None:
                graphdef, params = nnx.split(period)
                period = nnx.merge(graphdef, period_transform(params, extra))
            return period(x, ctx, states)

        if remat != "none":
            run = nnx.remat(run, policy=REMAT_POLICIES[remat])
        if self.num_periods == 1:
            return run(self.periods, x, states, period_extra)
        if states is None:
            @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            def scan_plain(period, x, extra):
                x, _, stats = run(period, x, None, extra)
                return x, stats
            x, stats = scan_plain(self.periods, x, period_extra)
            return x, None, jax.tree.map(lambda a: a.sum(0), stats)

        @nnx.scan(in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
        def scan_with_state(period, x, states, extra):
            x, states, _ = run(period, x, states, extra)
            return x, states
        x, states = scan_with_state(self.periods, x, states, period_extra)
        return x, states, None
