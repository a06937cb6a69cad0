"""The ViT encoder against HF's Qwen3_5VisionModel: geometry, forward (float32 and bfloat16), padding, the name
table, checkpoint errors and sharding."""

import copy
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel
from transformers.vision_utils import (get_vision_cu_seqlens, get_vision_interpolation_indices_and_weights,
                                       get_vision_position_ids)

from qwen35_jax.checkpoint.safetensors_io import CheckpointError
from qwen35_jax.config import VISION_TOKEN_FIELDS, VisionConfig
from qwen35_jax.loading import shard_model
from qwen35_jax.sharding import make_mesh, variable_sharding
from qwen35_jax.vision.geometry import vision_geometry
from qwen35_jax.vision.weights import PREFIX, load_vision, vision_to_hf

SMALL = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48)  # head dim 16
GRIDS = {"non_square": [[1, 6, 10]], "two_images": [[1, 4, 4], [1, 8, 6]], "video_t3_and_image": [[3, 4, 6], [1, 2, 2]]}


def hf_vision(num_position_embeddings: int = 2304, seed: int = 0) -> Qwen3_5VisionModel:
    """A seeded float32 HF encoder with weights large enough that attention is far from uniform (so RoPE and
    masking errors show) and random LayerNorm weights/biases (so a wrong norm shows)."""
    torch.manual_seed(seed)
    config = Qwen3_5VisionConfig(**SMALL, num_position_embeddings=num_position_embeddings)
    config._attn_implementation = "eager"
    model = Qwen3_5VisionModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif name.startswith("pos_embed"):
                p.copy_(torch.randn_like(p))
            elif name.startswith("patch_embed"):  # HF's float32 Conv3d is itself ~1e-6 relative off float64
                p.copy_(torch.randn_like(p) * 0.02)
            else:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def as_checkpoint(model: Qwen3_5VisionModel) -> dict[str, np.ndarray]:
    """The model's tensors named as in a released Qwen3.5 checkpoint."""
    return {PREFIX + name: t.float().numpy() for name, t in model.state_dict().items()}


def ours_config(model: Qwen3_5VisionModel) -> VisionConfig:
    return VisionConfig(**{f.name: getattr(model.config, f.name) for f in dataclasses.fields(VisionConfig)
                           if f.name not in VISION_TOKEN_FIELDS})


def random_pixels(grid, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values [sum t*h*w, 1536] in [-1, 1] like the processor's output, grid_thw int64 [n, 3])."""
    grid = np.asarray(grid, np.int64)
    n = int(grid.prod(axis=1).sum())
    return np.random.default_rng(seed).uniform(-1, 1, (n, 1536)).astype(np.float32), grid


def hf_forward(model, pixels, grid, dtype=torch.float32):
    """(last_hidden_state [N, Dv], pooler_output [N/4, out]) as float32 numpy."""
    with torch.no_grad():
        out = model(torch.from_numpy(pixels).to(dtype), grid_thw=torch.from_numpy(grid))
    return out.last_hidden_state.float().numpy(), out.pooler_output.float().numpy()


def ours_forward(encoder, pixels, grid, pad_to=None, pad_value=7.0):
    """(hidden [N, Dv], merged [N/4, out]) of our encoder, real rows only; padding rows hold pad_value."""
    geometry = vision_geometry(grid, encoder.config, pad_to)
    rows = geometry.interp_index.shape[0]
    padded = np.concatenate([pixels, np.full((rows - len(pixels), pixels.shape[1]), pad_value, np.float32)])
    args = [jnp.asarray(a) for a in (padded, *geometry.arrays())]
    hidden = encoder.hidden_states(*args)
    n = geometry.n_valid
    return np.asarray(hidden[:n], np.float32), np.asarray(encoder.merge(hidden)[:n // 4], np.float32)


@pytest.fixture(scope="module")
def ref():
    model = hf_vision()
    tensors = as_checkpoint(model)
    return model, tensors, load_vision(tensors, ours_config(model))


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_geometry_equals_hf_helpers(grid):
    vcfg = VisionConfig(**SMALL)
    g = torch.tensor(grid)
    geometry = vision_geometry(np.array(grid), vcfg, pad_to=int(g.prod(1).sum()) + 8)
    n = geometry.n_valid
    index, weight = get_vision_interpolation_indices_and_weights(g, 48, "bilinear", True, 2)
    np.testing.assert_array_equal(geometry.interp_index[:n], index.numpy())
    np.testing.assert_array_equal(geometry.interp_weight[:n], weight.numpy())
    np.testing.assert_array_equal(geometry.rope_hw[:n], get_vision_position_ids(g, 2).numpy())
    segment_lengths = np.diff(get_vision_cu_seqlens(g).numpy())
    np.testing.assert_array_equal(np.bincount(geometry.segment_ids)[1:], segment_lengths)
    assert (geometry.segment_ids[:n] > 0).all() and (np.diff(geometry.segment_ids[:n]) >= 0).all()
    assert not geometry.segment_ids[n:].any() and not geometry.interp_weight[n:].any()


def test_geometry_rejects_bad_grids_and_padding():
    vcfg = VisionConfig(**SMALL)
    with pytest.raises(ValueError, match="multiples of the spatial merge size"):
        vision_geometry(np.array([[1, 5, 4]]), vcfg)
    with pytest.raises(ValueError, match="pad_to=14"):
        vision_geometry(np.array([[1, 2, 4]]), vcfg, pad_to=14)
    with pytest.raises(ValueError, match="pad_to=4"):
        vision_geometry(np.array([[1, 2, 4]]), vcfg, pad_to=4)


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_forward_matches_hf(ref, grid):
    model, _, encoder = ref
    pixels, grid = random_pixels(grid)
    hf_hidden, hf_merged = hf_forward(model, pixels, grid)
    hidden, merged = ours_forward(encoder, pixels, grid)
    assert np.abs(hidden - hf_hidden).max() <= 1e-5
    assert np.abs(merged - hf_merged).max() <= 1e-5
    assert np.abs(np.asarray(encoder.encode(pixels, grid)) - hf_merged).max() <= 1e-5  # jitted path


def test_small_position_table():
    """A 16x16 table, both downsampled (h, w < 16) and upsampled (h = 20 > 16)."""
    model = hf_vision(num_position_embeddings=256, seed=1)
    encoder = load_vision(as_checkpoint(model), ours_config(model))
    pixels, grid = random_pixels([[1, 6, 10], [1, 20, 4]], seed=1)
    _, hf_merged = hf_forward(model, pixels, grid)
    assert np.abs(np.asarray(encoder.encode(pixels, grid)) - hf_merged).max() <= 1e-5


def test_padding_rows_leave_real_rows_unchanged(ref):
    """Padding contents never reach real rows (bit-equal for different contents: masked keys get exactly
    zero probability); against the unpadded run only float32 rounding differs (XLA picks matmul/reduction
    tilings per shape), well within 1e-6 of the output scale."""
    _, _, encoder = ref
    pixels, grid = random_pixels(GRIDS["video_t3_and_image"], seed=2)
    pad_to = len(pixels) + 20
    hidden, merged = ours_forward(encoder, pixels, grid)
    padded_hidden, padded_merged = ours_forward(encoder, pixels, grid, pad_to, pad_value=7.0)
    other_hidden, other_merged = ours_forward(encoder, pixels, grid, pad_to, pad_value=-300.0)
    np.testing.assert_array_equal(other_hidden, padded_hidden)
    np.testing.assert_array_equal(other_merged, padded_merged)
    assert np.abs(padded_hidden - hidden).max() <= 1e-6 * np.abs(hidden).max()
    assert np.abs(padded_merged - merged).max() <= 1e-6 * np.abs(merged).max()


def test_name_table_round_trip_is_bit_equal(ref):
    _, tensors, encoder = ref
    back = vision_to_hf(encoder)
    assert back.keys() == tensors.keys()
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    assert back[PREFIX + "patch_embed.proj.weight"].shape == (64, 3, 2, 16, 16)
    assert back[PREFIX + "blocks.1.attn.qkv.weight"].shape == (192, 64)
    assert back[PREFIX + "merger.linear_fc1.weight"].shape == (256, 256)


def test_checkpoint_errors_name_the_tensor(ref):
    _, tensors, encoder = ref
    vcfg = encoder.config
    other = {"model.language_model.embed_tokens.weight": np.zeros((4, 4), np.float32)}
    load_vision({**tensors, **other}, vcfg)  # tensors outside the vision tower are not its business

    missing = {k: v for k, v in tensors.items() if k != PREFIX + "blocks.1.norm2.bias"}
    with pytest.raises(CheckpointError, match=r"missing tensor model\.visual\.blocks\.1\.norm2\.bias"):
        load_vision(missing, vcfg)
    misshaped = {**tensors, PREFIX + "blocks.0.attn.qkv.weight": np.zeros((64, 192), np.float32)}
    with pytest.raises(CheckpointError, match=r"model\.visual\.blocks\.0\.attn\.qkv\.weight has shape \[64, 192\], "
                                              r"expected \[192, 64\]"):
        load_vision(misshaped, vcfg)
    unexpected = {**tensors, PREFIX + "blocks.2.norm1.weight": np.ones(64, np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.visual\.blocks\.2\.norm1\.weight"):
        load_vision(unexpected, vcfg)


def test_sharding_rules_and_sharded_forward(ref):
    """shard_model (the text model's) places the encoder: heads and MLP dims on `tensor`, the model dim on
    `fsdp`, the stacked layers axis unsharded; the sharded forward equals the single-device one."""
    _, _, encoder = ref
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    specs = {tuple(p): variable_sharding(v, mesh).spec for p, v in nnx.to_flat_state(nnx.state(encoder))}
    assert specs[("blocks", "attn", "qkv")] == PartitionSpec(None, "fsdp", None, "tensor", None)
    assert specs[("blocks", "attn", "proj")] == PartitionSpec(None, "tensor", None, "fsdp")
    assert specs[("blocks", "mlp", "fc1")] == PartitionSpec(None, "fsdp", "tensor")
    assert specs[("merger", "fc1")] == PartitionSpec("fsdp", "tensor")
    sharded = shard_model(encoder, mesh)
    assert sharded.blocks.attn.qkv[...].sharding.spec == specs[("blocks", "attn", "qkv")]
    pixels, grid = random_pixels(GRIDS["two_images"], seed=3)
    expected = np.asarray(encoder.encode(pixels, grid))
    assert np.abs(np.asarray(sharded.encode(pixels, grid)) - expected).max() <= 1e-5


def test_bf16_close_to_hf_bf16(ref):
    """bfloat16 has 8 mantissa bits, so no fixed tolerance is principled against HF's bfloat16 run (its
    rounding points differ: fused addmm bias, sdpa/eager internals). Instead both bfloat16 runs are scored
    against the float32 reference: ours must be no worse than 1.5x HF's own bfloat16 error, and the two
    bfloat16 runs must agree to a few bfloat16 ulps of the output scale."""
    model, tensors, _ = ref
    pixels, grid = random_pixels(GRIDS["two_images"], seed=4)
    _, exact = hf_forward(model, pixels, grid)
    hf_bf16 = hf_forward(copy.deepcopy(model).to(torch.bfloat16), pixels, grid, torch.bfloat16)[1]
    ours = np.asarray(load_vision(tensors, ours_config(model), jnp.bfloat16).encode(pixels, grid), np.float32)
    hf_err, our_err = np.abs(hf_bf16 - exact).max(), np.abs(ours - exact).max()
    assert our_err <= 1.5 * hf_err, (our_err, hf_err)
    assert np.abs(ours - hf_bf16).max() <= 4 * 2.0 ** -8 * np.abs(exact).max()
