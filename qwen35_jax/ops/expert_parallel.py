"""Expert parallelism: experts on the mesh's `expert` axis (their intermediate dim on `tensor`), tokens moved
to their experts' owners and back. Dropless and exact: no capacity factor, no token is ever dropped.

Three schemes, chosen per call from how the tokens are sharded (`dispatch_scheme`):

- "all_to_all" (training, prefill): tokens are split over the expert axis like the rest of the model. Each
  device sorts its (token, expert) assignments by destination, sends each expert shard its rows (dispatch),
  runs the grouped matmul on its local experts, sends the results back (combine) and sums each token's k
  outputs. On TPU/GPU meshes the exchange is `jax.lax.ragged_all_to_all`, which moves only the real rows;
  XLA:CPU cannot run that op, so on CPU meshes fixed [shards, rows] blocks go through `jax.lax.all_to_all`
  (same result, padded traffic). The mesh's platform decides (`ragged_exchange`), not the grouped-matmul
  backend. The receive buffer holds shards x
  tokens x top_k rows: the worst case, all of a shard's peers routing every assignment to it.
- "gather" (decode: a handful of tokens): the expert group all-gathers its tokens, each device computes its
  own experts' share for all of them, and a reduce-scatter returns each device its tokens' sums. For tiny
  token counts two small collectives beat the all-to-all's size exchange; used when the group holds at most
  GATHER_MAX_TOKENS tokens.
- "psum": tokens are not split over the expert axis (a batch it does not divide): every device routes the
  (replicated) tokens to its own experts and the partial sums are reduced over expert x tensor.

No device ever holds another shard's experts: expert weights enter the shard_map sharded over expert (and
tensor); the only weight gather is the FSDP one of the hidden dim, as for every other layer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen35_jax.ops.moe import combine, default_backend, expert_ffn_rows, target_platform
from qwen35_jax.sharding import logical_spec

GATHER_MAX_TOKENS = 64  # tokens per expert group up to which the gather scheme replaces the all-to-all


def expert_parallel_mesh(num_experts: int, intermediate: int):
    """The mesh in context (`jax.set_mesh`) when it has expert/tensor axes dividing the experts and the
    intermediate dim, else None (then the MoE runs unsharded, or under plain GSPMD)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {"expert", "tensor"} <= set(mesh.axis_names):
        return None
    e, t = mesh.shape["expert"], mesh.shape["tensor"]
    if e * t == 1 or num_experts % e or intermediate % t:
        return None
    return mesh


def ragged_exchange() -> bool:
    """Whether the mesh in context is on a platform that runs `ragged_all_to_all` (not XLA:CPU)."""
    return target_platform() != "cpu"


def token_axes(mesh, batch: int) -> tuple[str, ...]:
    """The mesh axes a [batch, ...] activation is split over by the sharding rules."""
    entry = logical_spec(("batch",), (batch,), mesh)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def dispatch_scheme(mesh, batch: int, tokens: int) -> str:
    """"all_to_all", "gather" or "psum" for `tokens` tokens of a batch of `batch` rows (module docstring)."""
    axes = token_axes(mesh, batch)
    if "expert" not in axes:
        return "psum"
    per_device = tokens // math.prod(mesh.shape[a] for a in axes)
    return "gather" if per_device * mesh.shape["expert"] <= GATHER_MAX_TOKENS else "all_to_all"


def moe_experts_parallel(x, weights, ids, w_gate_up, w_down, mesh, backend: str = "auto", batch: int | None = None,
                         scheme: str | None = None):
    """`ops.moe.moe_experts` with experts sharded over `expert` x `tensor` (module docstring).

    x: [tokens, H], the flattened [batch, seq] tokens (batch-major); weights, ids: [tokens, top_k];
    w_gate_up: [E, H, 2, I]; w_down: [E, I, H]. batch: the leading dim the tokens were flattened from (it
    decides their sharding; default: tokens). scheme: force one of the three (default: `dispatch_scheme`).
    Returns [tokens, H] in x's dtype.
    """
    backend = default_backend() if backend == "auto" else backend
    batch = x.shape[0] if batch is None else batch
    scheme = scheme or dispatch_scheme(mesh, batch, x.shape[0])
    axes = token_axes(mesh, batch)
    if scheme == "psum":
        axes = tuple(a for a in axes if a != "expert")
    tok = P(axes or None)
    local = {"all_to_all": _all_to_all, "gather": _gather, "psum": _psum}[scheme]
    fn = lambda *a: local(*a, backend=backend)  # noqa: E731
    return jax.shard_map(fn, mesh=mesh, in_specs=(tok, tok, tok, P("expert", None, None, "tensor"),
                                                 P("expert", "tensor", None)),
                         out_specs=tok, check_vma=False)(x, weights, ids, w_gate_up, w_down)


def _local_ids(ids, n_local):
    """Global expert ids -> this device's local ids, n_local ("not here") for other shards' experts."""
    local = ids - jax.lax.axis_index("expert") * n_local
    return jnp.where((local >= 0) & (local < n_local), local, n_local)


def _psum(x, weights, ids, w1, w2, backend):
    return jax.lax.psum(_local_share(x, weights, ids, w1, w2, backend), ("expert", "tensor")).astype(x.dtype)


def _gather(x, weights, ids, w1, w2, backend):
    everyone = [jax.lax.all_gather(a, "expert", tiled=True) for a in (x, weights, ids)]
    partial = _local_share(*everyone, w1, w2, backend)
    mine = jax.lax.psum_scatter(partial, "expert", scatter_dimension=0, tiled=True)
    return jax.lax.psum(mine, "tensor").astype(x.dtype)


def _local_share(x, weights, ids, w1, w2, backend):
    """This device's experts' float32 share of every token's output (no reduction)."""
    tokens, top_k = ids.shape
    y = expert_ffn_rows(jnp.repeat(x, top_k, axis=0), _local_ids(ids, w1.shape[0]).reshape(-1), w1, w2, backend)
    return combine(y.reshape(tokens, top_k, -1), weights, jnp.float32)


def _all_to_all(x, weights, ids, w1, w2, backend):
    tokens, top_k = ids.shape
    n_local, shards = w1.shape[0], jax.lax.axis_size("expert")
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)         # assignments by expert, hence by destination shard
    dest = flat[order] // n_local
    plan = _plan(jnp.bincount(flat // n_local, length=shards).astype(jnp.int32), shards)
    exchange = _ragged_exchange if ragged_exchange() else _dense_exchange
    rows = exchange(x[order // top_k], dest, plan, back=False)
    row_ids = exchange((flat[order] - dest * n_local)[:, None], dest, plan, back=False, fill=n_local)[:, 0]
    y = expert_ffn_rows(rows, row_ids, w1, w2, backend)
    y_sorted = exchange(y, dest, plan, back=True)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(tokens, top_k, -1)
    return jax.lax.psum(combine(y, weights, jnp.float32), "tensor").astype(x.dtype)


def _plan(send_sizes, shards):
    """Row counts and offsets of the exchange. send_sizes: int32 [shards], this device's rows per destination.

    Returns {"send": [S] rows to each shard, "recv": [S] rows from each shard, "send_off": [S] where each
    destination's rows start here, "recv_off": [S] where each source's rows start in the receive buffer,
    "their_off": [S] where this device's rows start in each destination's receive buffer,
    "my_off_there": [S] where each source's rows started in that source's send order}."""
    everyone = jax.lax.all_gather(send_sizes, "expert")          # [source, destination]
    me = jax.lax.axis_index("expert")
    exclusive = lambda a, axis: jnp.cumsum(a, axis=axis) - a     # noqa: E731
    return {"send": send_sizes, "recv": everyone[:, me], "send_off": exclusive(send_sizes, 0),
            "recv_off": exclusive(everyone[:, me], 0), "their_off": exclusive(everyone, 0)[me],
            "my_off_there": exclusive(everyone, 1)[:, me]}


def _ragged_exchange(rows, dest, plan, back: bool, fill=0):
    """`ragged_all_to_all`: dispatch [A, ...] sorted rows into a [S * A, ...] receive buffer (rows from
    source s at recv_off[s]; the rest `fill`), or (back=True) return a receive buffer's rows to their senders'
    sorted order [A, ...]."""
    shards = plan["send"].shape[0]
    if not back:
        out = jnp.full((shards * rows.shape[0], *rows.shape[1:]), fill, rows.dtype)
        return jax.lax.ragged_all_to_all(rows, out, plan["send_off"], plan["send"], plan["their_off"],
                                         plan["recv"], axis_name="expert")
    out = jnp.zeros((rows.shape[0] // shards, *rows.shape[1:]), rows.dtype)
    return jax.lax.ragged_all_to_all(rows, out, plan["recv_off"], plan["recv"], plan["my_off_there"],
                                     plan["send"], axis_name="expert")


def _dense_exchange(rows, dest, plan, back: bool, fill=0):
    """The same exchange with `all_to_all` over fixed [S, A] blocks (XLA:CPU has no ragged-all-to-all): row r
    of the sorted send order sits at block dest[r], slot r - send_off[dest[r]]. The receive buffer [S * A, ...]
    holds source s's rows at s * A (rows past recv[s] are `fill`)."""
    shards = plan["send"].shape[0]
    slot = jnp.arange(dest.shape[0]) - plan["send_off"][dest]
    if not back:
        blocks = jnp.full((shards, *rows.shape), fill, rows.dtype).at[dest, slot].set(rows)
        got = jax.lax.all_to_all(blocks, "expert", 0, 0, tiled=False)
        return got.reshape(-1, *rows.shape[1:])
    got = jax.lax.all_to_all(rows.reshape(shards, -1, *rows.shape[1:]), "expert", 0, 0, tiled=False)
    return got[dest, slot]
