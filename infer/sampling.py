"""Sampling parameters and the jitted per-row sampler (greedy, temperature, top-k/p, min-p, penalties).

Every row of a batch carries its own parameters as arrays, so one compiled sampler serves any mix of
requests. Randomness is per request: row r at decode step s uses `fold_in(PRNGKey(seed_r), s)`, so the same
seed gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy. Penalties follow vLLM's definitions:
    presence/frequency apply to generated tokens, repetition to prompt and generated tokens."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0                 # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1"),
            (self.temperature >= 0, "temperature", ">= 0 (0 means greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0 (0 means off)"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 means off)"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: expected {expected}")
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams.stop: stop strings must be non-empty")

    @classmethod
    def thinking(cls, **overrides) -> SamplingParams:
        """Qwen3.5's recommendation for thinking mode."""
        return cls(**{"temperature": 0.6, "top_p": 0.95, "top_k": 20, **overrides})

    @classmethod
    def non_thinking(cls, **overrides) -> SamplingParams:
        """Qwen3.5's recommendation for non-thinking (instruct) mode."""
        return cls(**{"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5, **overrides})

    @classmethod
    def greedy(cls, **overrides) -> SamplingParams:
        return cls(**{"temperature": 0.0, **overrides})


def batch_arrays(params: list[SamplingParams], seeds: list[int]) -> dict[str, jax.Array]:
    """Per-row parameter arrays for `sample` ([B] each; `key` is [B, 2] uint32)."""
    def col(name, dtype):
        return jnp.asarray(np.array([getattr(p, name) for p in params], dtype))
    return {
        "temperature": col("temperature", np.float32), "top_k": col("top_k", np.int32),
        "top_p": col("top_p", np.float32), "min_p": col("min_p", np.float32),
        "presence_penalty": col("presence_penalty", np.float32),
        "frequency_penalty": col("frequency_penalty", np.float32),
        "repetition_penalty": col("repetition_penalty", np.float32),
        "key": jnp.stack([jax.random.key_data(jax.random.PRNGKey(s)) for s in seeds]),
    }


def apply_penalties(logits, output_counts, seen_mask, p):
    """logits [B, V] float32; output_counts int [B, V] (generated tokens); seen_mask bool [B, V]
    (prompt or generated). Repetition: positive logits / r, negative * r; then
    logits -= frequency * count + presence * (count > 0)."""
    r = p["repetition_penalty"][:, None]
    penalised = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where(seen_mask, penalised, logits)
    counts = output_counts.astype(jnp.float32)
    return logits - p["frequency_penalty"][:, None] * counts - p["presence_penalty"][:, None] * (counts > 0)


def filter_logits(logits, p):
    """Temperature, then top-k, top-p and min-p as -inf masks. logits [B, V] float32 -> [B, V]."""
    vocab = logits.shape[-1]
    temperature = jnp.where(p["temperature"] > 0, p["temperature"], 1.0)[:, None]
    logits = logits / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    top_k = jnp.where(p["top_k"] > 0, p["top_k"], vocab)[:, None]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (rank < top_k) & (mass_before < p["top_p"][:, None])
    keep &= probs >= p["min_p"][:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)  # the most likely token always survives
    keep_unsorted = jnp.zeros_like(keep).at[jnp.arange(keep.shape[0])[:, None], order].set(keep)
    return jnp.where(keep_unsorted, logits, -jnp.inf)


def sample(logits, output_counts, seen_mask, p, step):
    """One token per row. logits [B, V]; step: int scalar or [B] (each row's decode step, folded into its key).

    Returns int32 [B]: argmax where temperature == 0, else a draw from the filtered distribution.
    """
    logits = apply_penalties(logits.astype(jnp.float32), output_counts, seen_mask, p)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), p["key"].shape[:1])
        keys = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(p["key"], steps)
        drawn = jax.vmap(jax.random.categorical)(keys, filter_logits(logits, p))
        return jnp.where(p["temperature"] > 0, drawn, greedy).astype(jnp.int32)

    # An all-greedy batch skips the sort over the vocabulary (~5 ms per step for 32K entries on CPU).
    return jax.lax.cond(jnp.any(p["temperature"] > 0), draw, lambda _: greedy, logits)
