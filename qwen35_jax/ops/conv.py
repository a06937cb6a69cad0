"""Causal depthwise convolution along time, with an optional carried state."""

import jax
import jax.numpy as jnp


def causal_conv1d(x: jax.Array, weight: jax.Array, state: jax.Array | None = None,
                  n_valid: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  keep_window: bool = False) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal cross-correlation: `y[t] = sum_j w[j] * x[t - (K-1) + j]` per channel.

    x: [batch, seq, *channels]; weight: [K, *channels] (w[K-1] multiplies the current token);
    state: [batch, K-1, *channels], the previous K-1 inputs (zeros when None);
    n_valid: int [batch], how many leading positions of each row are real (the rest is right padding).
    segment_ids: int [batch, seq] or None: packed documents; a token never sees inputs of an earlier segment
    (nor the carried state, once its row has started a new segment).
    Returns y: [batch, seq, *channels] in x's dtype (accumulated in float32) and the new state
    [batch, K-1, *channels]: the last K-1 real inputs of each row (padding never enters it). keep_window: return
    instead the whole window [batch, K-1+seq, *channels] (the state then the inputs), from which the state after
    any number n of the inputs is rows n..n+K-2 (`conv_state_after`).
    """
    kernel = weight.shape[0]
    batch, seq = x.shape[:2]
    if state is None:
        state = jnp.zeros((batch, kernel - 1, *x.shape[2:]), x.dtype)
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    w = weight.astype(jnp.float32)
    taps = [padded[:, j:j + seq].astype(jnp.float32) * w[j] for j in range(kernel)]
    if segment_ids is not None:
        ids = jnp.pad(segment_ids, ((0, 0), (kernel - 1, 0)), mode="edge")
        expand = (slice(None), slice(None)) + (None,) * (x.ndim - 2)
        taps = [jnp.where((ids[:, j:j + seq] == segment_ids)[expand], tap, 0.0) for j, tap in enumerate(taps)]
    y = sum(taps)
    if keep_window:
        return y.astype(x.dtype), padded
    if n_valid is None:
        return y.astype(x.dtype), padded[:, seq:]
    return y.astype(x.dtype), conv_state_after(padded, n_valid, kernel)


def conv_state_after(window: jax.Array, n: jax.Array, kernel: int) -> jax.Array:
    """The conv state after the first n[b] inputs of a window [batch, K-1+seq, *channels] (`causal_conv1d`'s
    keep_window): rows n..n+K-2 of each row -> [batch, K-1, *channels]."""
    batch = window.shape[0]
    rows = n[:, None] + jnp.arange(kernel - 1)[None, :]  # [batch, K-1] indices into the window
    return jnp.take_along_axis(window, rows.reshape(batch, kernel - 1, *([1] * (window.ndim - 2))), axis=1)
