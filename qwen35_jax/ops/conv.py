"""Causal depthwise convolution along time, with an optional carried state."""

import jax
import jax.numpy as jnp


def causal_conv1d(x: jax.Array, weight: jax.Array, state: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal cross-correlation: `y[t] = sum_j w[j] * x[t - (K-1) + j]` per channel.

    x: [batch, seq, *channels]; weight: [K, *channels] (w[K-1] multiplies the current token);
    state: [batch, K-1, *channels], the previous K-1 inputs (zeros when None).
    Returns y: [batch, seq, *channels] in x's dtype (accumulated in float32) and the new state
    [batch, K-1, *channels] (the last K-1 inputs, in x's dtype).
    """
    kernel = weight.shape[0]
    seq = x.shape[1]
    if state is None:
        state = jnp.zeros((x.shape[0], kernel - 1, *x.shape[2:]), x.dtype)
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    w = weight.astype(jnp.float32)
    y = sum(padded[:, j:j + seq].astype(jnp.float32) * w[j] for j in range(kernel))
    return y.astype(x.dtype), padded[:, seq:]
