"""The multi-token-prediction (MTP) block (`mtp.*` in the checkpoints; spec section 8).

For sequence index i, with h_i the main model's FINAL-NORMED hidden state (the lm_head input) and e the
embedding of token i+1 (the model's own `embed_tokens`, shared):

    u = concat([pre_fc_norm_embedding(e), pre_fc_norm_hidden(h_i)]) @ fc       # fc: 2H -> H, no bias
    u = DecoderLayer_full_attention(u, position i)                             # the model's layer type
    mtp_hidden_i = norm(u);  model.logits(mtp_hidden_i) predicts token i+2       # lm_head shared too

The order [embedding, hidden] and the single full-attention layer with the model's MLP / MoE are vLLM's
`Qwen3_5MultiTokenPredictor.forward` (vllm/model_executor/models/qwen3_5_mtp.py: `torch.cat([inputs_embeds,
hidden_states])` after the two pre-fc norms, `fc` a bias-free 2H -> H `ColumnParallelLinear`, then the layer
and `norm`); the main model's output fed to it is its final-normed hidden state. All four norms are the
model's zero-centred RMSNorm. The layer attends at the target's own (unshifted) positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.decoder import Context, DecoderLayer, sequence_context, state_context
from qwen35_jax.nn.norms import RMSNorm
from qwen35_jax.nn.params import param
from qwen35_jax.precision import under_precision_policy


class MTP(nnx.Module):
    """`mtp(hidden, next_embeds)`: the MTP hidden states [B, T, H] (whose logits predict token t+2).

    Parameters: pre_fc_norm_embedding, pre_fc_norm_hidden, norm (RMSNorm [H]); fc [2H, H] (rows: the
    embedding's H, then the hidden state's H); layer (a full-attention `DecoderLayer`).
    """

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.config = cfg
        self.pre_fc_norm_embedding = RMSNorm(h, eps, dtype, rngs)
        self.pre_fc_norm_hidden = RMSNorm(h, eps, dtype, rngs)
        self.fc = param(rngs, (2 * h, h), (None, "embed"), dtype, std=cfg.initializer_range)
        self.layer = DecoderLayer(cfg, "full_attention", dtype, rngs)
        self.norm = RMSNorm(h, eps, dtype, rngs)

    @property
    def compute_dtype(self):
        return self.fc[...].dtype

    @jax.named_scope("mtp")
    def _forward(self, hidden: jax.Array, next_embeds: jax.Array, ctx: Context, cache: dict | None = None):
        """hidden, next_embeds: [B, T, H] -> (MTP hidden [B, T, H], the layer's new {"k", "v"} or None, its router
        stats or None: present for an MoE layer when ctx.token_mask is set)."""
        x = jnp.concatenate([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], axis=-1)
        x, cache, stats = self.layer(x @ self.fc[...], ctx, cache)
        return self.norm(x), cache, stats

    @under_precision_policy
    def __call__(self, hidden: jax.Array, next_embeds: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, moe_backend: str = "auto") -> jax.Array:
        """The full-sequence (training) forward, no decode state.

        hidden: [B, T, H] the main model's final-normed hidden states (`Qwen35.hidden_states` /
        `train_hidden_states`); next_embeds: [B, T, H] the embeddings of the tokens that follow
        (`model.embed(input_ids[:, 1:])`, padded); positions: int [B, T] or [3, B, T] of index t (unshifted;
        default 0..T-1); segment_ids: int [B, T] packed documents (attention stays within a segment).
        Returns the MTP hidden states [B, T, H]: `model.logits(...)[:, t]` predicts token t+2.
        """
        return self.train_forward(hidden, next_embeds, positions, segment_ids, moe_backend=moe_backend)[0]

    @under_precision_policy
    def train_forward(self, hidden: jax.Array, next_embeds: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None, token_mask: jax.Array | None = None,
                      moe_backend: str = "auto") -> tuple[jax.Array, dict | None]:
        """`__call__` with the router stats of an MoE layer (`ops.moe.router_stats`) over the positions token_mask
        [B, T] marks (those whose MTP output is trained): (MTP hidden [B, T, H], stats; None for a dense MLP or
        without token_mask)."""
        ctx = sequence_context(self.config, hidden.shape[:2], positions, segment_ids, token_mask, moe_backend)
        out, _, stats = self._forward(hidden, next_embeds, ctx)
        return out, stats

    @under_precision_policy
    def forward_with_state(self, hidden: jax.Array, next_embeds: jax.Array, state: dict,
                           n_valid: jax.Array | None = None, positions: jax.Array | None = None,
                           moe_backend: str = "auto") -> tuple[jax.Array, dict]:
        """Continues the MTP cache of a decode state (`state["mtp"]`, `qwen35_jax.cache`, built with mtp=True).

        hidden, next_embeds: [B, T, H] as in `__call__`, row b holding n_valid[b] real rows then right padding
        (None: all real). Row t of row b sits at MTP cache index state["mtp"]["lengths"][b] + t and, unless
        `positions` is given, at rotary position that index + state["rope_deltas"][b]. Returns (MTP hidden
        states [B, T, H], the state with "mtp" advanced: lengths += n_valid, keys / values written; every
        other entry as it was).
        """
        cache = state["mtp"]
        ctx = state_context(self.config, hidden.shape[:2], cache["lengths"], cache["k"].shape[1], n_valid,
                            state["rope_deltas"], positions, moe_backend)
        out, kv, _ = self._forward(hidden, next_embeds, ctx, cache)
        return out, {**state, "mtp": {**kv, "lengths": ctx.starts + ctx.n_valid}}
