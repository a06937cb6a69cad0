"""Dropless MoE: route, sort assignments by expert, grouped SwiGLU matmuls, unsort, combine.

The grouped matmul has three backends with identical results: `jax.lax.ragged_dot` (TPU), a block-padded loop
(CPU and GPU) and, for a few rows (decode), a gather of each row's expert weights (`auto_backend`). XLA:CPU runs
`ragged_dot` ~50x below matmul speed (see `grouped_cpu.py`); XLA:GPU (jax 0.11.2,
H200) expands it into dense per-expert work: the 35B-A3B LoRA step compiled for one H200 counted 6.8e16 FLOPs and
1,656 GiB of temporaries with `ragged_dot`, 6.2e14 (the analytic 6.3e14) and 95 GiB with the blocked loop.
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


MOE_BACKENDS = ("auto", "ragged", "blocked", "gather")  # auto: `auto_backend`
# auto takes "gather" while the rows' gathered expert weights stay under this. Measured on the 2-core CPU (float32,
# us per call, blocked / gather): 8 experts of H=I=128: 2 rows 152 / 76, 8 rows 198 / 130; 64 experts of H=512,
# I=256: 2 rows (3 MiB) 346 / 242, 8 rows (12.6 MiB) 748 / 1630.
GATHER_MAX_BYTES = 4 * 2**20


def target_platform() -> str:
    """The platform being compiled for: the mesh in context's (which may be a TPU slice compiled ahead of time
    on a CPU host), else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def default_backend() -> str:
    """The grouped matmul for many rows on the target platform: ragged_dot on TPU, the blocked loop elsewhere."""
    return "ragged" if target_platform() == "tpu" else "blocked"


def auto_backend(n_rows: int, w_gate_up: jax.Array, w_down: jax.Array) -> str:
    """What "auto" runs for n_rows rows (a static shape): off TPU, "gather" when there are no more rows than
    experts and their gathered weights fit GATHER_MAX_BYTES (decode steps: a handful of rows, where the blocked
    loop's per-expert control flow costs more than the matmuls on CPU), else `default_backend()`."""
    experts = w_gate_up.shape[0]
    gathered = n_rows * (w_gate_up[0].size * w_gate_up.dtype.itemsize + w_down[0].size * w_down.dtype.itemsize)
    if target_platform() != "tpu" and n_rows <= experts and gathered <= GATHER_MAX_BYTES:
        return "gather"
    return default_backend()


def swiglu_gathered(rows, row_ids, w_gate_up, w_down):
    """`gather` backend: each row's expert weights gathered, then one batched matmul per projection (no sort, no
    loop; dtypes as the other backends). rows: [N, H]; row_ids: int [N] in [0, E) -> [N, H]. Reads N experts'
    weights (duplicates included), so it suits N <= E."""
    n, (e, hidden, _, inter) = rows.shape[0], w_gate_up.shape
    h = jnp.einsum("nh,nhi->ni", rows, w_gate_up.reshape(e, hidden, 2 * inter)[row_ids])
    return jnp.einsum("ni,nih->nh", swiglu(h.reshape(n, 2, inter)), w_down[row_ids])


def expert_ffn_rows(rows, row_ids, w_gate_up, w_down, backend: str = "auto"):
    """Each row through its own expert's SwiGLU FFN. rows: [N, H]; row_ids: int [N] in [0, E], where E means
    "no expert here" (padding, or an expert on another device): never computed, output 0.
    w_gate_up: [E, H, 2, I]; w_down: [E, I, H]. Returns [N, H] in the rows' dtype."""
    num_experts = w_gate_up.shape[0]
    backend = auto_backend(rows.shape[0], w_gate_up, w_down) if backend == "auto" else backend
    if backend == "gather":
        y = swiglu_gathered(rows, jnp.minimum(row_ids, num_experts - 1), w_gate_up, w_down)
        return jnp.where((row_ids < num_experts)[:, None], y, 0)
    order = jnp.argsort(row_ids, stable=True)
    group_sizes = jnp.bincount(row_ids, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    grouped = grouped_swiglu_ragged if backend == "ragged" else grouped_swiglu_blocked
    y_sorted = grouped(rows[order], group_sizes, w_gate_up, w_down)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    return jnp.where((row_ids < num_experts)[:, None], y, 0)


def combine(y, weights, dtype):
    """y: [tokens, top_k, H] expert outputs; weights: [tokens, top_k] -> [tokens, H] in `dtype`, the k
    products summed in float32."""
    return jnp.einsum("tkh,tk->th", y, weights, preferred_element_type=jnp.float32).astype(dtype)


def moe_experts(x, weights, ids, w_gate_up, w_down, backend: str = "auto"):
    """Routed expert output `sum_j weights[t, j] * FFN_{ids[t, j]}(x[t])`.

    x: [tokens, H]; weights, ids: [tokens, top_k]; w_gate_up: [E, H, 2, I]; w_down: [E, I, H].
    An id equal to E means "not one of these experts" (expert parallelism): it sorts last, is never
    computed and contributes nothing. Returns [tokens, H] in x's dtype (the k products summed in float32).
    """
    tokens, top_k = ids.shape
    rows = jnp.repeat(x, top_k, axis=0)  # row t*k + j: token t for its j-th expert
    y = expert_ffn_rows(rows, ids.reshape(-1), w_gate_up, w_down, backend)
    return combine(y.reshape(tokens, top_k, -1), weights, x.dtype)
