"""Dropless MoE: route, sort assignments by expert, grouped SwiGLU matmuls, unsort, combine.

The grouped matmul has two backends with identical results: `jax.lax.ragged_dot` (TPU/GPU) and a
block-padded loop for CPU, where `ragged_dot` runs ~50x below matmul speed (see `grouped_cpu.py`).
"""

import jax
import jax.numpy as jnp

from qwen35_jax.ops.grouped_cpu import grouped_swiglu_blocked
from qwen35_jax.precision import highest_precision


@highest_precision
@jax.named_scope("router")
def router_logits(tokens: jax.Array, router: jax.Array) -> jax.Array:
    """tokens: [T, H]; router: [H, E] -> float32 logits [T, E], computed as float32 x float32 with HIGHEST
    precision in every mode (bfloat16 logits flip experts at near-ties; qwen35_jax.precision)."""
    return tokens.astype(jnp.float32) @ router.astype(jnp.float32)


@jax.named_scope("router")
def route(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Softmax (float32) -> top-k -> renormalise. logits: [tokens, experts].

    Returns float32 weights [tokens, top_k] and expert ids int32 [tokens, top_k].
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


@highest_precision
@jax.named_scope("router")
def router_stats(logits: jax.Array, ids: jax.Array, token_mask: jax.Array) -> dict:
    """Sums over the real tokens that the MoE auxiliary losses are built from (one layer).

    logits: [tokens, E] router logits; ids: int [tokens, top_k] chosen experts; token_mask: [tokens] (1 =
    real token, 0 = padding). Returns float32 {"load": [E] top-k assignments per expert, "prob": [E] summed
    softmax probabilities, "z": sum of logsumexp(logits)^2, "tokens": number of real tokens}.
    """
    logits = logits.astype(jnp.float32)
    mask = token_mask.astype(jnp.float32)
    one_hot = jax.nn.one_hot(ids, logits.shape[-1], dtype=jnp.float32).sum(axis=1)
    return {"load": mask @ one_hot, "prob": mask @ jax.nn.softmax(logits, axis=-1),
            "z": mask @ jnp.square(jax.nn.logsumexp(logits, axis=-1)), "tokens": jnp.sum(mask)}


def swiglu(h: jax.Array) -> jax.Array:
    """h: [..., 2, I] (gate, up) -> silu(gate) * up: [..., I]."""
    return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


def grouped_swiglu_ragged(x_sorted, group_sizes, w_gate_up, w_down):
    """`ragged_dot` backend. x_sorted: [N, H] rows grouped by expert; group_sizes: int32 [E];
    w_gate_up: [E, H, 2, I]; w_down: [E, I, H]. Returns [N, H]."""
    e, hidden, _, inter = w_gate_up.shape
    h = jax.lax.ragged_dot(x_sorted, w_gate_up.reshape(e, hidden, 2 * inter), group_sizes)
    act = swiglu(h.reshape(-1, 2, inter))
    return jax.lax.ragged_dot(act, w_down, group_sizes)


MOE_BACKENDS = ("auto", "ragged", "blocked")  # auto: blocked on CPU, ragged_dot elsewhere


def default_backend() -> str:
    return "blocked" if jax.default_backend() == "cpu" else "ragged"


def moe_experts(x, weights, ids, w_gate_up, w_down, backend: str = "auto"):
    """Routed expert output `sum_j weights[t, j] * FFN_{ids[t, j]}(x[t])`.

    x: [tokens, H]; weights, ids: [tokens, top_k]; w_gate_up: [E, H, 2, I]; w_down: [E, I, H].
    An id equal to E means "not one of these experts" (expert parallelism): it sorts last, is never
    computed and contributes nothing. Returns [tokens, H] in x's dtype (the k products summed in float32).
    """
    tokens, top_k = ids.shape
    num_experts = w_gate_up.shape[0]
    backend = default_backend() if backend == "auto" else backend
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    x_sorted = x[order // top_k]
    group_sizes = jnp.bincount(flat_ids, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    if backend == "ragged":
        y_sorted = grouped_swiglu_ragged(x_sorted, group_sizes, w_gate_up, w_down)
    else:
        y_sorted = grouped_swiglu_blocked(x_sorted, group_sizes, w_gate_up, w_down)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(tokens, top_k, -1)
    y = jnp.where((ids < num_experts)[..., None], y, 0)
    return jnp.einsum("tkh,tk->th", y, weights, preferred_element_type=jnp.float32).astype(x.dtype)


def moe_experts_parallel(x, weights, ids, w_gate_up, w_down, mesh, backend: str = "auto"):
    """`moe_experts` with experts on the mesh's `expert` axis and the intermediate dim on `tensor`.

    Under `shard_map`, each device routes its tokens to its own experts only (others map to the "not here"
    id), runs its slice of the intermediate dim, and the partial sums are reduced over expert x tensor:
    no device ever holds all experts. Tokens stay split over `data`/`fsdp` when those divide them.
    """
    from jax.sharding import PartitionSpec as P
    sizes = dict(mesh.shape)
    batch_axes = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    split = 1
    for a in batch_axes:
        split *= sizes[a]
    tok = P(batch_axes) if batch_axes and x.shape[0] % split == 0 else P()

    def local(x, weights, ids, w1, w2):
        n_local = w1.shape[0]
        local_ids = ids - jax.lax.axis_index("expert") * n_local
        local_ids = jnp.where((local_ids >= 0) & (local_ids < n_local), local_ids, n_local)
        partial = moe_experts(x, weights, local_ids, w1, w2, backend)
        return jax.lax.psum(partial.astype(jnp.float32), ("expert", "tensor")).astype(x.dtype)

    return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, P("expert", None, None, "tensor"),
                                                    P("expert", "tensor", None)),
                         out_specs=tok, check_vma=False)(x, weights, ids, w_gate_up, w_down)


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
