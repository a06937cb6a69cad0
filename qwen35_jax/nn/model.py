"""The Qwen3.5 text model: embeddings, scanned decoder, final norm, lm_head (optionally tied)."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.decoder import Decoder, config_rope, sequence_context, state_context
from qwen35_jax.nn.mtp import MTP
from qwen35_jax.nn.norms import RMSNorm
from qwen35_jax.nn.params import param
from qwen35_jax.precision import under_precision_policy as _under_precision_policy  # (vision.encoder uses it)


def state_max_len(state: dict) -> int:
    """The decode state's capacity: its KV cache length (1 if no layer attends; GDN state has no limit)."""
    return next((layer["k"].shape[-3] for layer in state["layers"] if "k" in layer), 1)


class Qwen35(nnx.Module):
    """`model(input_ids)`: int32 [batch, seq] -> logits [batch, seq, vocab] in the model dtype.

    `model.mtp`: the multi-token-prediction block (`nn.mtp.MTP`) when the config has one
    (`mtp_num_hidden_layers`), else None; the loaders turn it off for a checkpoint without `mtp.*` tensors.
    """

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        std = cfg.initializer_range
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, std=std)
        self.decoder = Decoder(cfg, dtype, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype, std=std)
        self.mtp = MTP(cfg, dtype, rngs) if cfg.mtp_num_hidden_layers else None

    @classmethod
    def abstract(cls, cfg: ModelConfig, dtype=jnp.float32) -> "Qwen35":
        """The model with `jax.ShapeDtypeStruct` values: shapes, dtypes, axis names and the graph, with nothing
        allocated or computed (for loaders, dry-runs and rebuilding a graph around existing parameters)."""
        return nnx.eval_shape(lambda: cls(cfg, dtype, nnx.Rngs(0)))

    @property
    def compute_dtype(self):
        """The dtype the model computes in: its parameters' dtype at call time (a trainer may cast float32
        master weights to bfloat16 for the forward)."""
        return self.embed_tokens[...].dtype

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """positions: int [B, L] or [3, B, L] -> cos, sin [B, L, rotary_dim] float32."""
        return config_rope(self.config, positions)

    @_under_precision_policy
    def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None,
                      moe_backend: str = "auto", embeds: jax.Array | None = None) -> jax.Array:
        """input_ids: int [B, L] -> final-normed hidden states [B, L, H] (no decode state).
        moe_backend: the grouped matmul of MoE layers (`ops.moe.MOE_BACKENDS`; "auto": blocked on CPU);
        embeds: [B, L, H] input embeddings in place of the token embeddings (multimodal)."""
        return self.train_hidden_states(input_ids, positions, moe_backend=moe_backend, embeds=embeds)[0]

    @_under_precision_policy
    def train_hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None,
                            segment_ids: jax.Array | None = None, router_stats: bool = False,
                            remat: str = "none", moe_backend: str = "auto", period_transform=None,
                            period_extra=None, embeds: jax.Array | None = None):
        """The training forward. input_ids: int [B, L]; positions: int [B, L] or [3, B, L] (default 0..L-1);
        segment_ids: int [B, L] or None: packed documents (attention stays within a segment, GDN conv and
        recurrent states restart at each segment start; id 0 marks padding, which no router stat counts).
        remat: "none", "full" or "dots" (`nn.decoder.REMAT_POLICIES`), applied to each decoder period;
        moe_backend: the grouped matmul of MoE layers (`ops.moe.MOE_BACKENDS`); period_transform, period_extra:
        a per-period parameter transform run inside the layer scan (`nn.decoder.Decoder.__call__`; a trainer's
        cast / LoRA merge), the embeddings, final norm and lm_head being used as they are; embeds: [B, L, H]
        input embeddings in place of the token embeddings (multimodal: vision features scattered in).

        Returns (final-normed hidden states [B, L, H], router stats summed over MoE layers or None): see
        `ops.moe.router_stats`; requested by router_stats=True and only for MoE models.
        """
        token_mask = None
        if router_stats:
            token_mask = jnp.ones(input_ids.shape) if segment_ids is None else (segment_ids != 0)
        ctx = sequence_context(self.config, input_ids.shape, positions, segment_ids, token_mask, moe_backend)
        x = self.embed(input_ids) if embeds is None else embeds
        x, _, stats = self.decoder(x, ctx, remat=remat, period_transform=period_transform,
                                   period_extra=period_extra)
        return self.norm(x), stats

    @_under_precision_policy
    def forward_with_state(self, input_ids: jax.Array, state: dict, n_valid: jax.Array | None = None,
                           moe_backend: str = "auto", embeds: jax.Array | None = None,
                           positions: jax.Array | None = None, keep_steps: bool = False) -> tuple[jax.Array, dict]:
        """Continues a decode state (qwen35_jax.cache) with new tokens.

        input_ids: int [B, T], row b holding n_valid[b] real tokens then right padding (n_valid None: all
        real). Token t of row b sits at cache index state["lengths"][b] + t and, unless `positions` is given,
        at rotary position that index + state["rope_deltas"][b]. Returns (final-normed hidden states
        [B, T, H], new state with lengths += n_valid, its other entries (the MTP cache "mtp") as they were);
        padding never enters the state. moe_backend: the grouped matmul of MoE layers (`ops.moe.MOE_BACKENDS`);
        embeds: [B, T, H] input embeddings in place of the token embeddings (a multimodal prefill's, vision
        features scattered in); positions: int [3, B, T] mRoPE positions (qwen35_jax.vision.rope_index) in
        place of the default ones. keep_steps (speculative verification): the Gated DeltaNet layers run the
        tokens one by one and keep their state after each (`nn.gated_deltanet.GatedDeltaNet`);
        `infer.speculative.state_after_tokens` then picks a decode state.
        """
        ctx = state_context(self.config, input_ids.shape, state["lengths"], state_max_len(state), n_valid,
                            state["rope_deltas"], positions, moe_backend)._replace(keep_steps=keep_steps)
        x = self.embed(input_ids) if embeds is None else embeds
        x, layers, _ = self.decoder(x, ctx, state["layers"])
        return self.norm(x), {**state, "lengths": ctx.starts + ctx.n_valid, "layers": layers}

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], input_ids, axis=0)

    @_under_precision_policy
    @jax.named_scope("lm_head")
    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [..., H] -> [..., vocab]."""
        if self.config.tie_word_embeddings:
            return jnp.einsum("...h,vh->...v", hidden, self.embed_tokens[...])
        return hidden @ self.lm_head[...]

    @_under_precision_policy
    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 moe_backend: str = "auto", embeds: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, positions, moe_backend, embeds))


def unstack_layers(model: Qwen35) -> Qwen35:
    """The same model with one module per layer instead of period-stacked parameters (for decoding).

    Layer i of the result holds slice [i // period] of the stacked slot i % period (a copy of each slice)."""
    cfg = model.config
    if cfg.num_periods == 1:
        return model
    flat_cfg = dataclasses.replace(cfg, scan_layers=False)
    graphdef, state = nnx.split(Qwen35.abstract(flat_cfg, model.dtype))
    source = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    period, stack_prefix = len(cfg.period), ("decoder", "periods", "layers")
    for path, variable in nnx.to_flat_state(state):
        path = tuple(path)
        if path[:3] == stack_prefix:
            layer = path[3]
            value = source[stack_prefix + (layer % period,) + path[4:]][layer // period]
        else:
            value = source[path]
        variable.set_value(value)
    return nnx.merge(graphdef, state)
