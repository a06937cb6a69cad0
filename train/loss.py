"""Training losses: next-token cross-entropy (chunked over tokens), the MTP block's targets, the MoE router losses."""

import jax
import jax.numpy as jnp

from qwen35_jax.precision import precision_scope


def cross_entropy_sum(hidden: jax.Array, head, targets: jax.Array, mask: jax.Array, chunk: int = 0) -> jax.Array:
    """Sum over counted tokens of -log softmax(head(hidden))[target], float32.

    hidden: [B, L, H]; head: callable [..., H] -> [..., vocab] logits; targets: int [B, L]; mask: [B, L] (1 =
    counted). chunk > 0 computes the logits of at most `chunk` tokens at a time (blocks of chunk // B positions
    of every row) under remat, so the [tokens, vocab] logits (and their gradient) never exist at once (what
    248K-vocabulary models need); 0 = in one go.
    Traced under the precision policy of hidden's dtype (qwen35_jax.precision).
    """
    with precision_scope(hidden.dtype):
        return _cross_entropy_sum(hidden, head, targets, mask, chunk)


def _cross_entropy_sum(hidden, head, targets, mask, chunk):
    mask = mask.astype(jnp.float32)

    def block_loss(h, t, m):
        logits = head(h).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * m)

    batch, seq = targets.shape
    if chunk <= 0 or chunk >= batch * seq:
        return block_loss(hidden, targets, mask)
    # Blocks along the sequence, every row in each: the rows keep their sharding over the mesh's batch axes
    # (a block of whole rows would sit on one device and the scan would gather it everywhere).
    length = max(1, chunk // batch)
    blocks = -(-seq // length)
    pad = blocks * length - seq

    def split(x):
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, blocks, length, *x.shape[2:]), 1, 0)
    step = jax.checkpoint(lambda total, xs: (total + block_loss(*xs), None))
    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (split(hidden), split(targets), split(mask)))
    return total


def mtp_targets(batch: dict) -> tuple[jax.Array, jax.Array]:
    """The MTP block's (targets, mask) [B, L] from a batch's targets, loss_mask and segment_ids (`train.data`).

    Row i of the MTP (hidden_i, token i+1) predicts token i+2 = targets[i+1]. It counts where tokens i, i+1 and i+2
    are in one segment (never across a document boundary, never into or from padding, segment 0) and loss_mask[i+1]
    is set (token i+2 is learned). The last two positions count nothing. A document split into pieces
    (`overflow: split`) loses the one MTP target that spans each cut."""
    segments, mask = batch["segment_ids"], batch["loss_mask"]
    here, following, after = segments[:, :-2], segments[:, 1:-1], segments[:, 2:]
    same = (here == following) & (following == after) & (here != 0)
    counted = jnp.pad(jnp.where(same, mask[:, 1:-1], 0).astype(mask.dtype), ((0, 0), (0, 2)))
    return jnp.pad(batch["targets"][:, 1:], ((0, 0), (0, 1))), counted


def mtp_chain_masks(batch: dict, steps: int) -> list[jax.Array]:
    """The target masks [B, L] of the MTP's chained steps 1..steps (`mtp_draft_steps`). Step 1 is `mtp_targets`'.
    Step s at position j predicts the same token j+2, but its hidden input is step s-1's output at j-1 (as
    speculative decoding's draft s runs), so the chain starts from the trunk's hidden state at j-(s-1): it counts
    where step 1 counts and token j-(s-1) is in j's segment."""
    first, segments = mtp_targets(batch)[1], batch["segment_ids"]
    masks = [first]
    for shift in range(1, steps):
        same = jnp.pad(segments[:, :-shift] == segments[:, shift:], ((0, 0), (shift, 0)))
        masks.append(first * same.astype(first.dtype))
    return masks


def load_balancing_loss(stats: dict, num_experts: int) -> jax.Array:
    """Switch-style auxiliary loss as HF's `load_balancing_loss_func`, from router stats summed over all
    MoE layers (`ops.moe.router_stats`): E * sum_e (load_e / N) * (prob_e / N), N = real tokens x layers."""
    n = stats["tokens"]
    return num_experts * jnp.sum((stats["load"] / n) * (stats["prob"] / n))


def router_z_loss(stats: dict) -> jax.Array:
    """ST-MoE router z-loss: mean over real tokens and MoE layers of logsumexp(router logits)^2."""
    return stats["z"] / stats["tokens"]
