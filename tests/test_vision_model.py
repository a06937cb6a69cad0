"""The multimodal model against HF Qwen3_5(Moe)ForConditionalGeneration: mRoPE position ids, full forward
logits, and the vision tower through loading and conversion."""

import functools
import types

import numpy as np
import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model

from qwen35_jax.checkpoint.orbax_io import convert_hf_to_orbax, export_to_hf
from qwen35_jax.checkpoint.safetensors_io import SafetensorsFolder
from qwen35_jax.hf_reference import TINY_VISION_TOKENS, build_hf_multimodal, save_hf_model
from qwen35_jax.loading import load_model, load_vision_tower
from qwen35_jax.vision.multimodal import VisionPrompt, multimodal_logits
from qwen35_jax.vision.processing import ProcessedVision
from qwen35_jax.vision.rope_index import PlaceholderError, mrope_positions

VS, VE, IMG, VID = (TINY_VISION_TOKENS[k] for k in ("vision_start_token_id", "vision_end_token_id",
                                                    "image_token_id", "video_token_id"))
IMAGE_GRIDS = [(1, 4, 6), (1, 8, 4)]   # a non-square image and a second one of another size (patches)
VIDEO_GRID = (3, 4, 4)                 # an odd number of temporal groups


def mixed_prompt(rng, image_grids=IMAGE_GRIDS, video_grid=VIDEO_GRID) -> list[int]:
    """Text, the images, more text, a video (each temporal group after its own timestamp text), text: token ids
    below the tiny vocabulary's special ids, placeholders expanded as HF's processor expands them."""
    def text(n):
        return rng.integers(0, 240, n).tolist()
    ids = text(5)
    for t, h, w in image_grids:
        ids += [VS] + [IMG] * (t * h * w // 4) + [VE] + text(3)
    if video_grid is not None:
        t, h, w = video_grid
        for _ in range(t):
            ids += text(4) + [VS] + [VID] * (h * w // 4) + [VE]
    return ids + text(6)


def random_vision(grids, seed) -> ProcessedVision | None:
    if not grids:
        return None
    grid = np.asarray(grids, np.int64)
    n = int(np.prod(grid, axis=1).sum())
    return ProcessedVision(np.random.default_rng(seed).uniform(-1, 1, (n, 1536)).astype(np.float32), grid)


def hf_rope_index(ids, image_grids, video_grids):
    """HF's get_rope_index on one row (bound to a stand-in `self` holding only the config it reads)."""
    ids_t = torch.as_tensor([ids])
    types_t = (ids_t == IMG).int() + 2 * (ids_t == VID).int()
    this = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=types.SimpleNamespace(
        spatial_merge_size=2)))
    this.get_vision_position_ids = functools.partial(Qwen3_5Model.get_vision_position_ids, this)
    grids = lambda g: torch.as_tensor(g) if g else None  # noqa: E731
    positions, delta = Qwen3_5Model.get_rope_index(this, ids_t, types_t, grids(image_grids), grids(video_grids))
    return positions[:, 0].numpy(), int(delta[0, 0])


@pytest.mark.parametrize("image_grids,video_grids", [(IMAGE_GRIDS, [VIDEO_GRID]), ([(1, 2, 2)], []),
                                                     ([], [(2, 6, 2)]), ([], [])])
def test_mrope_positions_match_hf_get_rope_index(image_grids, video_grids):
    rng = np.random.default_rng(len(image_grids))
    ids = mixed_prompt(rng, image_grids, video_grids[0] if video_grids else None)
    ours, delta = mrope_positions(ids, IMG, VID, image_grids, video_grids)
    expected, expected_delta = hf_rope_index(ids, image_grids, video_grids)
    np.testing.assert_array_equal(ours, expected)
    assert delta == expected_delta


def test_placeholder_count_mismatch_is_a_clear_error():
    ids = mixed_prompt(np.random.default_rng(0), IMAGE_GRIDS, None)
    with pytest.raises(PlaceholderError, match="2 runs of image placeholders but 1 images"):
        mrope_positions(ids, IMG, VID, IMAGE_GRIDS[:1])
    with pytest.raises(PlaceholderError, match="image 1 has 8 placeholder tokens"):
        mrope_positions(ids, IMG, VID, [IMAGE_GRIDS[0], (1, 8, 8)])


@pytest.fixture(scope="module", params=["tiny-dense", "tiny-moe"])
def multimodal_checkpoint(request, tmp_path_factory):
    hf = build_hf_multimodal(request.param, seed=3)
    return hf, save_hf_model(hf, tmp_path_factory.mktemp(f"mm-{request.param}"))


def hf_multimodal_logits(hf, prompt: VisionPrompt) -> np.ndarray:
    ids = torch.as_tensor([prompt.token_ids])
    kwargs = {"mm_token_type_ids": (ids == IMG).int() + 2 * (ids == VID).int()}
    if prompt.images is not None:
        kwargs |= {"pixel_values": torch.as_tensor(prompt.images.pixel_values),
                   "image_grid_thw": torch.as_tensor(prompt.images.grid_thw)}
    if prompt.videos is not None:
        kwargs |= {"pixel_values_videos": torch.as_tensor(prompt.videos.pixel_values),
                   "video_grid_thw": torch.as_tensor(prompt.videos.grid_thw)}
    with torch.no_grad():
        return hf(ids, **kwargs).logits[0].float().numpy()


def test_multimodal_forward_matches_hf(multimodal_checkpoint):
    """Text + 2 images of different sizes + a 3-group video: logits at every position within 1e-4 of HF."""
    hf, folder = multimodal_checkpoint
    model, encoder = load_model(folder), load_vision_tower(folder)
    prompt = VisionPrompt(mixed_prompt(np.random.default_rng(1)), random_vision(IMAGE_GRIDS, 1),
                          random_vision([VIDEO_GRID], 2))
    expected = hf_multimodal_logits(hf, prompt)
    ours = np.asarray(multimodal_logits(model, encoder, prompt))[0]
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    text_only = hf_multimodal_logits(hf, VisionPrompt(prompt.token_ids))  # the images do change the logits
    assert np.abs(text_only - expected).max() > 1e-2


def test_vision_tower_survives_conversion_round_trip(multimodal_checkpoint, tmp_path):
    """HF -> Orbax -> HF leaves every vision tensor bit-equal, and the Orbax checkpoint loads the same encoder."""
    _, folder = multimodal_checkpoint
    ckpt = convert_hf_to_orbax(folder, tmp_path / "ckpt", dtype="float32", progress=False)
    back = export_to_hf(ckpt, tmp_path / "back", progress=False)
    source, exported = SafetensorsFolder(folder), SafetensorsFolder(back)
    vision = [n for n in source.names() if n.startswith("model.visual.")]
    assert len(vision) > 10 and set(vision) <= set(exported.names())
    for name in vision:
        np.testing.assert_array_equal(exported.get(name), source.get(name), err_msg=name)
    pixels = random_vision([(1, 4, 6)], 5)
    from_hf = load_vision_tower(folder).encode(pixels.pixel_values, pixels.grid_thw)
    from_orbax = load_vision_tower(ckpt).encode(pixels.pixel_values, pixels.grid_thw)
    np.testing.assert_array_equal(np.asarray(from_orbax), np.asarray(from_hf))
