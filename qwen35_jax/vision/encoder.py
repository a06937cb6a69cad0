"""The Qwen3.5 ViT encoder (`model.visual`): patch embedding, resampled learned positions, 2-D RoPE blocks
scanned over a stacked `layers` axis, and the 2x2 patch merger (architecture notes §7.1-7.4).

Attention is restricted to each temporal slice of each image/video through a dense [N, N] segment mask over one
image or video (`encode` runs them one at a time): fine for a few thousand patches; a 4096x4096 image (65,536
patches) or a long video needs a segment-blocked kernel, the next step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen35_jax.config import VisionConfig
from qwen35_jax.nn.model import _under_precision_policy
from qwen35_jax.nn.params import param
from qwen35_jax.ops.attention import attention
from qwen35_jax.vision.geometry import vision_geometry

ROPE_THETA = 10000.0  # Qwen3.5's vision rope_parameters (axial, theta 10000); not a VisionConfig field
LAYER_NORM_EPS = 1e-6
ACTIVATIONS = {
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def _activate(name: str, x: jax.Array) -> jax.Array:
    """The activation `name` computed in float32 and cast back to x's dtype (as torch does on bfloat16)."""
    return ACTIVATIONS[name](x.astype(jnp.float32)).astype(x.dtype)


def vision_rope_cos_sin(rope_hw: jax.Array, head_dim: int, theta: float = ROPE_THETA):
    """rope_hw: int [N, 2] (row, col) -> cos, sin float32 [N, head_dim].

    head_dim/4 frequencies inv = theta^-(2i / (head_dim/2)); angles [row*inv || col*inv] repeated twice."""
    half = head_dim // 2
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, half, 2, dtype=np.float32) / np.float32(half)))
    freqs = rope_hw.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq, jnp.float32)  # [N, 2, Dh/4]
    freqs = freqs.reshape(rope_hw.shape[0], half)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_vision_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """rotate_half RoPE over the whole head dim, in float32, cast back to x's dtype.
    x: [N, heads, Dh]; cos, sin: [N, Dh] float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias over the last axis, computed in float32."""

    def __init__(self, dim: int, dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, (dim,), ("embed",), dtype, init="ones")
        self.bias = param(rngs, (dim,), ("embed",), dtype, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., dim] -> [..., dim] in x's dtype."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class VisionAttention(nnx.Module):
    """Non-causal multi-head attention with 2-D RoPE; qkv [Dv, 3, heads, Dh] (+ bias), proj [heads, Dh, Dv]."""

    def __init__(self, vcfg: VisionConfig, dtype, rngs: nnx.Rngs):
        dv, heads = vcfg.hidden_size, vcfg.num_heads
        dh = dv // heads
        self.qkv = param(rngs, (dv, 3, heads, dh), ("embed", None, "heads", "head_dim"), dtype)
        self.qkv_bias = param(rngs, (3, heads, dh), (None, "heads", "head_dim"), dtype, init="zeros")
        self.proj = param(rngs, (heads, dh, dv), ("heads", "head_dim", "embed"), dtype)
        self.proj_bias = param(rngs, (dv,), ("embed",), dtype, init="zeros")

    @jax.named_scope("vision_attention")
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [N, Dv]; cos, sin: [N, Dh] float32; mask: bool [N, N] (True = attend) -> [N, Dv]."""
        qkv = jnp.einsum("nd,dshk->nshk", x, self.qkv[...]) + self.qkv_bias[...]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)
        out = attention(q[None], k[None], v[None], mask[None])[0]
        return jnp.einsum("nhk,hkd->nd", out, self.proj[...]) + self.proj_bias[...]


class VisionMLP(nnx.Module):
    """fc2(act(fc1(x))) with biases; fc1 [Dv, I], fc2 [I, Dv]."""

    def __init__(self, vcfg: VisionConfig, dtype, rngs: nnx.Rngs):
        dv, inter = vcfg.hidden_size, vcfg.intermediate_size
        self.fc1 = param(rngs, (dv, inter), ("embed", "mlp"), dtype)
        self.fc1_bias = param(rngs, (inter,), ("mlp",), dtype, init="zeros")
        self.fc2 = param(rngs, (inter, dv), ("mlp", "embed"), dtype)
        self.fc2_bias = param(rngs, (dv,), ("embed",), dtype, init="zeros")
        self.act = vcfg.hidden_act

    @jax.named_scope("vision_mlp")
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [N, Dv] -> [N, Dv]."""
        h = _activate(self.act, x @ self.fc1[...] + self.fc1_bias[...])
        return h @ self.fc2[...] + self.fc2_bias[...]


class VisionBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, vcfg: VisionConfig, dtype, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(vcfg.hidden_size, dtype, rngs)
        self.attn = VisionAttention(vcfg, dtype, rngs)
        self.norm2 = LayerNorm(vcfg.hidden_size, dtype, rngs)
        self.mlp = VisionMLP(vcfg, dtype, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [N, Dv] -> [N, Dv]."""
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """LayerNorm per patch, each m*m block of consecutive patches concatenated (U = m*m*Dv), then
    fc2(gelu_erf(fc1(.))): fc1 [U, U], fc2 [U, out_hidden_size]."""

    def __init__(self, vcfg: VisionConfig, dtype, rngs: nnx.Rngs):
        merged = vcfg.hidden_size * vcfg.spatial_merge_size ** 2
        self.norm = LayerNorm(vcfg.hidden_size, dtype, rngs)
        self.fc1 = param(rngs, (merged, merged), ("embed", "mlp"), dtype)
        self.fc1_bias = param(rngs, (merged,), ("mlp",), dtype, init="zeros")
        self.fc2 = param(rngs, (merged, vcfg.out_hidden_size), ("mlp", "embed"), dtype)
        self.fc2_bias = param(rngs, (vcfg.out_hidden_size,), ("embed",), dtype, init="zeros")

    @jax.named_scope("vision_merger")
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [N, Dv] -> [N / (m*m), out_hidden_size]."""
        x = self.norm(x).reshape(-1, self.fc1[...].shape[0])
        h = _activate("gelu", x @ self.fc1[...] + self.fc1_bias[...])
        return h @ self.fc2[...] + self.fc2_bias[...]


class VisionEncoder(nnx.Module):
    """`encoder(pixel_values, *geometry.arrays())`: [N, C*T*P*P] patches -> [N / m^2, out_hidden_size].

    Parameters: patch_embed [C*T*P*P, Dv] + patch_bias (the Conv3d with kernel = stride as a matmul over
    patch vectors flattened in (C, T, P, P) order), pos_embed [num_position_embeddings, Dv], `blocks` (depth
    VisionBlocks stacked on a leading "layers" axis, run with nnx.scan) and `merger`.
    """

    def __init__(self, vcfg: VisionConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        if vcfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision hidden_act={vcfg.hidden_act!r}: expected one of {tuple(ACTIVATIONS)}")
        if vcfg.hidden_size % vcfg.num_heads or (vcfg.hidden_size // vcfg.num_heads) % 4:
            raise ValueError(f"vision hidden_size={vcfg.hidden_size} / num_heads={vcfg.num_heads}: the head dim "
                             "must be an integer multiple of 4 (2-D RoPE)")
        rngs = rngs or nnx.Rngs(0)
        patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
        dv = vcfg.hidden_size
        self.config = vcfg
        self.dtype = dtype
        self.patch_embed = param(rngs, (patch_dim, dv), (None, "embed"), dtype)
        self.patch_bias = param(rngs, (dv,), ("embed",), dtype, init="zeros")
        self.pos_embed = param(rngs, (vcfg.num_position_embeddings, dv), (None, "embed"), dtype)

        @nnx.split_rngs(splits=vcfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(rngs):
            return VisionBlock(vcfg, dtype, rngs)

        self.blocks = create(rngs)
        self.merger = PatchMerger(vcfg, dtype, rngs)

    @classmethod
    def abstract(cls, vcfg: VisionConfig, dtype=jnp.float32) -> "VisionEncoder":
        """The encoder with `jax.ShapeDtypeStruct` values (shapes, dtypes, axis names; nothing allocated)."""
        return nnx.eval_shape(lambda: cls(vcfg, dtype, nnx.Rngs(0)))

    @property
    def compute_dtype(self):
        """The dtype the encoder computes in: its parameters' dtype at call time."""
        return self.patch_embed[...].dtype

    def embed(self, pixel_values: jax.Array, interp_index: jax.Array, interp_weight: jax.Array) -> jax.Array:
        """pixel_values [N, C*T*P*P]; interp_index int [N, 4]; interp_weight float32 [N, 4] -> [N, Dv]: the
        patch projection plus the bilinearly resampled position table (mixed in float32, then cast)."""
        x = pixel_values.astype(self.compute_dtype) @ self.patch_embed[...] + self.patch_bias[...]
        taps = jnp.take(self.pos_embed[...], interp_index, axis=0).astype(jnp.float32)  # [N, 4, Dv]
        pos = jnp.sum(taps * interp_weight.astype(jnp.float32)[:, :, None], axis=1)
        return x + pos.astype(x.dtype)

    @_under_precision_policy
    def hidden_states(self, pixel_values: jax.Array, interp_index: jax.Array, interp_weight: jax.Array,
                      rope_hw: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """The blocks' output before the merger (HF's last_hidden_state): [N, Dv].

        pixel_values [N, C*T*P*P]; the geometry arrays as `vision.geometry.VisionGeometry` holds them. Patches
        attend to patches of the same segment id only."""
        cos, sin = vision_rope_cos_sin(rope_hw, self.config.hidden_size // self.config.num_heads)
        mask = segment_ids[:, None] == segment_ids[None, :]

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(block, x):
            return block(x, cos, sin, mask)
        return run(self.blocks, self.embed(pixel_values, interp_index, interp_weight))

    @_under_precision_policy
    def merge(self, hidden: jax.Array) -> jax.Array:
        """hidden [N, Dv] (N a multiple of merge_size**2) -> [N / merge_size**2, out_hidden_size]."""
        unit = self.config.spatial_merge_size ** 2
        if hidden.shape[0] % unit:
            raise ValueError(f"{hidden.shape[0]} patches: expected a multiple of {unit} (whole merge blocks)")
        return self.merger(hidden)

    @_under_precision_policy
    def __call__(self, pixel_values: jax.Array, interp_index: jax.Array, interp_weight: jax.Array,
                 rope_hw: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """[N, C*T*P*P] -> [N / merge_size**2, out_hidden_size]; rows of padding blocks are garbage."""
        return self.merge(self.hidden_states(pixel_values, interp_index, interp_weight, rope_hw, segment_ids))

    def encode(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        """pixel_values [sum t*h*w, C*T*P*P] of images/videos with grids grid_thw [n, 3], concatenated in
        order -> host array [sum t*h*w / merge_size**2, out_hidden_size] (the encoder's dtype). Each image / video runs on its own (attention
        never crosses them, so n calls cost sum(n_i^2) rather than (sum n_i)^2), jitted on its patch count
        rounded up to a bucket (`patch_bucket`: 8 sizes per power of two), so a new image size compiles only
        when it reaches a new bucket."""
        grids = np.reshape(grid_thw, (-1, 3))
        ends = np.cumsum(np.prod(grids, axis=1))
        if pixel_values.shape[0] != (ends[-1] if len(ends) else 0):
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but grid_thw "
                             f"{grids.tolist()} has {int(ends[-1]) if len(ends) else 0} patches")
        starts = np.concatenate([[0], ends[:-1]])
        return np.concatenate([self._encode_one(pixel_values[s:e], grid) for grid, s, e in zip(grids, starts, ends)])

    def _encode_one(self, pixel_values: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """One image / video: [t*h*w, C*T*P*P] -> [t*h*w / merge_size**2, out_hidden_size], padded to its bucket."""
        n_valid = pixel_values.shape[0]
        bucket = patch_bucket(n_valid)
        geometry = vision_geometry(grid[None], self.config, pad_to=bucket)
        padded = np.zeros((bucket, pixel_values.shape[1]), np.float32)
        padded[:n_valid] = pixel_values
        graphdef, state = nnx.split(self)
        merged = _jitted_forward(graphdef, state, jax.device_put(padded), *map(jax.device_put, geometry.arrays()))
        return np.asarray(merged)[:n_valid // self.config.spatial_merge_size ** 2]  # host slice: no eager compile


def patch_bucket(n: int, smallest: int = 64, steps_per_octave: int = 8) -> int:
    """The padded patch count the encoder compiles for: n rounded up to the next of `steps_per_octave` evenly
    spaced sizes per power of two (at most 1/steps_per_octave of padding; multiples of 8), at least `smallest`."""
    n = max(n, smallest)
    step = max(8, (1 << (n.bit_length() - 1)) // steps_per_octave)
    return -(-n // step) * step


@functools.partial(jax.jit, static_argnums=0)
def _jitted_forward(graphdef, state, *inputs):
    return nnx.merge(graphdef, state)(*inputs)
