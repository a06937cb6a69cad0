"""The Qwen3.5 text model: embeddings, scanned decoder, final norm, lm_head (optionally tied)."""

import jax
import jax.numpy as jnp
from flax import nnx

from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.decoder import Decoder
from qwen35_jax.nn.norms import RMSNorm
from qwen35_jax.nn.params import param
from qwen35_jax.ops.attention import causal_mask
from qwen35_jax.ops.rope import rope_cos_sin


class Qwen35(nnx.Module):
    """`model(input_ids)`: int32 [batch, seq] -> logits [batch, seq, vocab] in the model dtype."""

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.decoder = Decoder(cfg, dtype, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """positions: int [B, L] or [3, B, L] -> cos, sin [B, L, rotary_dim] float32."""
        c = self.config
        return rope_cos_sin(positions, c.rotary_dim, c.rope_theta, c.mrope_section)

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """input_ids: int [B, L] -> final-normed hidden states [B, L, H]."""
        batch, seq = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        cos, sin = self.rope(positions)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0)
        x = self.decoder(x, cos, sin, causal_mask(seq)[None])
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [..., H] -> [..., vocab]."""
        if self.config.tie_word_embeddings:
            return jnp.einsum("...h,vh->...v", hidden, self.embed_tokens[...])
        return hidden @ self.lm_head[...]

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, positions))
