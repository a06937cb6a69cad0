"""Qwen3.5 image / video processors (qwen35_jax.vision.processing) against HF transformers' own.

Images are compared with `Qwen2VLImageProcessorPil` and must be bit-identical. HF's video processor exists only on
the torchvision backend: the full comparison runs where torchvision imports; everywhere else the video pipeline is
checked stage by stage against HF's own pieces (frame sampling, smart_resize, patchify, timestamps, prompt text) and
torch's uint8 antialiased bicubic (the kernel torchvision's `resize` runs for uint8 frames), all bit-identical too.
"""

import json
import math
import sys
import types

import numpy as np
import pytest
from PIL import Image

from qwen35_jax.vision.processing import (
    ImageProcessorConfig,
    VideoClip,
    VideoProcessorConfig,
    VisionInputError,
    load_image,
    load_video,
    process_images,
    process_videos,
    smart_resize,
    video_prompt_text,
    video_smart_resize,
)

RELEASED_IMAGE = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                  "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                  "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                  "image_processor_type": "Qwen2VLImageProcessor"}
RELEASED_VIDEO = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
                  "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                  "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                  "video_processor_type": "Qwen3VLVideoProcessor"}


def rand_uint8(rng, *shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


def hf_image_processor(cfg: ImageProcessorConfig):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels})


def assert_images_match_hf(images, cfg=ImageProcessorConfig()):
    ours = process_images(images, cfg)
    theirs = hf_image_processor(cfg)(images, return_tensors="np")
    np.testing.assert_array_equal(ours.grid_thw, theirs["image_grid_thw"])
    assert ours.pixel_values.dtype == theirs["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(ours.pixel_values, theirs["pixel_values"])  # bit-exact: same PIL resize, same dtypes
    return ours


# ------------------------------------------------------------------------------------------------------------ images

def test_images_match_hf_pil_backend():
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rand_uint8(rng, 70, 90, 4), "RGBA")
    palette = Image.fromarray(rand_uint8(rng, 64, 80), "L").convert("P")
    images = [rand_uint8(rng, 100, 260, 3),  # non-square, both sides need rounding (and the min-pixels rescale)
              rand_uint8(rng, 300, 421, 3), rgba, palette, rand_uint8(rng, 50, 60, 4)]
    out = assert_images_match_hf(images)
    assert out.pixel_values.shape[1] == 3 * 2 * 16 * 16
    gray = rand_uint8(rng, 90, 120)  # HF takes no 2-D arrays in a batch: compare through its PIL "L" image
    assert_images_match_hf([Image.fromarray(gray, "L")])
    np.testing.assert_array_equal(load_image(gray), load_image(Image.fromarray(gray, "L")))


def test_images_below_min_and_above_max_pixels():
    rng = np.random.default_rng(1)
    cfg = ImageProcessorConfig(min_pixels=96 * 96, max_pixels=128 * 160)
    small, large = rand_uint8(rng, 20, 30, 3), rand_uint8(rng, 300, 200, 3)
    out = assert_images_match_hf([small, large], cfg)
    assert [tuple(g) for g in out.grid_thw.tolist()] == [(1, 6, 8), (1, 10, 6)]
    assert all(cfg.min_pixels <= h * w * 256 <= cfg.max_pixels for _, h, w in out.grid_thw.tolist())


def test_load_image_from_file_matches_hf(tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    rng = np.random.default_rng(2)
    path = tmp_path / "rgba.png"
    Image.fromarray(rand_uint8(rng, 33, 47, 4), "RGBA").save(path)
    np.testing.assert_array_equal(load_image(path), np.asarray(hf_load_image(str(path))))
    assert_images_match_hf([hf_load_image(str(path))])
    np.testing.assert_array_equal(process_images([path]).pixel_values,
                                  process_images([np.asarray(hf_load_image(str(path)))]).pixel_values)


def test_float_arrays_are_scaled_from_unit_range():
    rng = np.random.default_rng(3)
    pixels = rand_uint8(rng, 40, 50, 3)
    np.testing.assert_array_equal(load_image(pixels / 255.0), pixels)
    with pytest.raises(VisionInputError, match=r"image: float pixels must be finite and in \[0, 1\]"):
        load_image(pixels.astype(np.float32))


@pytest.mark.parametrize("seed", range(3))
def test_smart_resize_matches_hf(seed):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_resize

    rng = np.random.default_rng(seed)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 6000, 2))
        factor = int(rng.choice([28, 32]))
        lo = int(rng.choice([56 * 56, 65536, 256 * 256 * 4]))
        hi = int(rng.choice([lo * 4, 1 << 20, 16777216]))
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(VisionInputError, match="aspect ratio"):
                smart_resize(h, w, factor, lo, hi)
            continue
        assert smart_resize(h, w, factor, lo, hi) == hf_resize(h, w, factor, lo, hi), (h, w, factor, lo, hi)


@pytest.mark.parametrize("seed", range(3))
def test_video_smart_resize_matches_hf(seed):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_resize

    rng = np.random.default_rng(seed)
    for _ in range(2000):
        t, h, w = int(rng.integers(2, 800)), int(rng.integers(1, 3000)), int(rng.integers(1, 3000))
        lo, hi = int(rng.choice([4096, 128 * 32 * 32])), int(rng.choice([25165824, 32 * 32 * 768, 1 << 26]))
        try:
            expected = hf_resize(t, h, w, 2, 32, lo, hi)
        except ValueError:
            with pytest.raises(VisionInputError, match="aspect ratio"):
                video_smart_resize(t, h, w, 2, 32, lo, hi)
            continue
        assert video_smart_resize(t, h, w, 2, 32, lo, hi) == expected, (t, h, w, lo, hi)


# ------------------------------------------------------------------------------------------------------------ videos

def hf_sampled_indices(total, fps, cfg=VideoProcessorConfig()):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    defaults = types.SimpleNamespace(fps=cfg.fps, min_frames=cfg.min_frames, max_frames=cfg.max_frames)
    return Qwen3VLVideoProcessor.sample_frames(defaults, VideoMetadata(total_num_frames=total, fps=fps))


def hf_video_pipeline(video, fps, cfg=VideoProcessorConfig()):
    """HF's Qwen3VLVideoProcessor stage by stage, without torchvision: its sample_frames, smart_resize, patchify and
    `_calculate_timestamps`; torchvision's uint8 bicubic resize is torch's interpolate on the uint8 tensor, and the
    fused normalisation is (x.float() - mean/rescale) / (std/rescale)."""
    import torch
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_resize

    indices = hf_sampled_indices(len(video), fps, cfg)
    frames = torch.from_numpy(video[indices]).permute(0, 3, 1, 2).contiguous()
    h, w = hf_resize(len(indices), *frames.shape[-2:], cfg.temporal_patch_size, cfg.factor, cfg.min_pixels,
                     cfg.max_pixels)
    frames = torch.nn.functional.interpolate(frames, size=[h, w], mode="bicubic", align_corners=False,
                                             antialias=True)
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    frames = (frames.float() - mean[:, None, None]) / std[:, None, None]
    patches, *grid = Qwen3VLVideoProcessor.patchify(None, frames[None], cfg.patch_size, cfg.merge_size,
                                                     cfg.temporal_patch_size)
    timestamps = Qwen3VLProcessor._calculate_timestamps(None, indices, fps, cfg.temporal_patch_size)
    return indices, patches[0].numpy(), grid, timestamps


@pytest.mark.parametrize("frames,fps,height,width", [(7, 2.0, 100, 260), (31, 30.0, 90, 150), (9, 3.0, 20, 50)])
def test_video_matches_hf_stages(frames, fps, height, width):
    video = rand_uint8(np.random.default_rng(frames), frames, height, width, 3)
    indices, patches, grid, timestamps = hf_video_pipeline(video, fps)
    clip = load_video(video, fps=fps)
    out = process_videos([clip])
    np.testing.assert_array_equal(clip.frame_indices, indices)
    np.testing.assert_array_equal(clip.timestamps, indices / fps)
    np.testing.assert_array_equal(out.grid_thw, [grid])
    np.testing.assert_array_equal(out.pixel_values, patches)  # bit-exact, resize included
    assert out.timestamps == [timestamps]
    if frames == 7:  # all 7 frames kept at 2 fps: odd, padded with the last one
        assert len(clip.frames) == 7 and grid[0] == 4
        np.testing.assert_array_equal(out.pixel_values.reshape(4, -1, 3, 2, 256)[3, :, :, 0],
                                      out.pixel_values.reshape(4, -1, 3, 2, 256)[3, :, :, 1])


def test_video_matches_hf_processor():
    """The whole HF video processor (torchvision backend), where torchvision imports."""
    pytest.importorskip("torchvision")
    from transformers import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    rng = np.random.default_rng(4)
    cases = [(VideoProcessorConfig(), 7, 2.0, 100, 260),
             (VideoProcessorConfig(max_pixels=8 * 64 * 64, cap_pixels_per_frame=True, max_video_tokens=4), 12, 6.0,
              200, 300)]
    for cfg, frames, fps, height, width in cases:
        video = rand_uint8(rng, frames, height, width, 3)
        hf = Qwen3VLVideoProcessor(**RELEASED_VIDEO | {"size": {"shortest_edge": cfg.min_pixels,
                                                                "longest_edge": cfg.max_pixels}},
                                   cap_pixels_per_frame=cfg.cap_pixels_per_frame, max_video_tokens=cfg.max_video_tokens)
        theirs = hf(videos=[video], video_metadata=[VideoMetadata(total_num_frames=frames, fps=fps)],
                    return_metadata=True, return_tensors="np")
        clip = load_video(video, cfg, fps=fps)
        ours = process_videos([clip], cfg)
        np.testing.assert_array_equal(clip.frame_indices, theirs["video_metadata"][0].frames_indices)
        np.testing.assert_array_equal(ours.grid_thw, theirs["video_grid_thw"])
        np.testing.assert_array_equal(ours.pixel_values, theirs["pixel_values_videos"])


def test_video_from_frame_list_and_default_fps():
    rng = np.random.default_rng(5)
    video = rand_uint8(rng, 50, 64, 64, 3)
    clip = load_video([Image.fromarray(frame) for frame in video])  # no fps: 24, as HF assumes
    assert clip.source_fps == 24.0
    np.testing.assert_array_equal(clip.frame_indices, hf_sampled_indices(50, 24.0))
    np.testing.assert_array_equal(clip.frames, video[clip.frame_indices])


def test_video_prompt_text_matches_hf():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    clip = load_video(rand_uint8(np.random.default_rng(6), 7, 100, 260, 3), fps=2.0)
    out = process_videos([clip])
    hf = types.SimpleNamespace(
        video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2), video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
        _calculate_timestamps=lambda *args: Qwen3VLProcessor._calculate_timestamps(None, *args))
    inputs = {"video_grid_thw": out.grid_thw,
              "video_metadata": [VideoMetadata(total_num_frames=7, fps=2.0, frames_indices=clip.frame_indices)]}
    expected = Qwen3VLProcessor.replace_video_token(hf, inputs, 0)
    text = video_prompt_text(out.timestamps[0], out.grid_thw[0])
    assert text == expected
    assert text.startswith("<0.2 seconds><|vision_start|>") and text.count("<|video_pad|>") == 4 * (6 * 16 // 4)


def test_video_file_matches_hf_pyav_reader(tmp_path):
    av = pytest.importorskip("av")
    from transformers.video_utils import read_video_pyav

    path = tmp_path / "clip.mp4"
    rng = np.random.default_rng(7)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in rand_uint8(rng, 11, 48, 64, 3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    clip = load_video(path)
    frames, metadata = read_video_pyav(str(path), lambda metadata: hf_sampled_indices(metadata.total_num_frames,
                                                                                    metadata.fps))
    assert clip.source_fps == metadata.fps == 5.0 and clip.total_frames == 11
    np.testing.assert_array_equal(clip.frame_indices, metadata.frames_indices)
    np.testing.assert_array_equal(clip.frames, frames)
    assert process_videos([path]).grid_thw.tolist() == process_videos([clip]).grid_thw.tolist()


def test_video_file_without_pyav_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"pip install qwen35-jax\[video\]"):
        load_video(tmp_path / "clip.mp4")


# -------------------------------------------------------------------------------------------------------- bad inputs

def test_truncated_and_unreadable_image_files(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(rand_uint8(np.random.default_rng(8), 64, 64, 3)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(VisionInputError, match=f"{path}: cannot read an image"):
        process_images([np.zeros((32, 32, 3), np.uint8), path])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(VisionInputError, match=f"{text}: cannot read an image"):
        load_image(text)
    with pytest.raises(VisionInputError, match="missing.png: cannot read an image"):
        load_image(tmp_path / "missing.png")


def test_bad_image_arrays_are_named():
    ok = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(VisionInputError, match=r"image 2: zero-size image 0x10"):
        process_images([ok, ok, np.zeros((0, 10, 3), np.uint8)])
    with pytest.raises(VisionInputError, match=r"image 1: aspect ratio 250\.0 \(2x500\) exceeds 200"):
        process_images([ok, np.zeros((2, 500, 3), np.uint8)])
    with pytest.raises(VisionInputError, match=r"image 0: expected an array \[H, W\].*got shape \(3, 5, 7\)"):
        process_images([np.zeros((3, 5, 7), np.uint8)])
    with pytest.raises(VisionInputError, match="image 0: expected uint8 or float pixels, got dtype int64"):
        process_images([np.zeros((32, 32, 3), np.int64)])
    with pytest.raises(VisionInputError, match="image 0: zero-size image 10x0"):
        process_images([Image.new("RGB", (0, 10))])
    with pytest.raises(VisionInputError, match="no images"):
        process_images([])


def test_bad_videos_are_named():
    with pytest.raises(VisionInputError, match="video 0: the video has no frames"):
        process_videos([np.zeros((0, 32, 32, 3), np.uint8)])
    with pytest.raises(VisionInputError, match="video: the video has no frames"):
        load_video([])
    with pytest.raises(VisionInputError, match=r"video 1: 1 frame\(s\): expected at least 2"):
        process_videos([np.zeros((4, 32, 32, 3), np.uint8), np.zeros((1, 32, 32, 3), np.uint8)])
    with pytest.raises(VisionInputError, match=r"video 0 frame 2: zero-size"):
        process_videos([[np.zeros((32, 32, 3), np.uint8)] * 2 + [np.zeros((0, 32, 3), np.uint8)]])
    with pytest.raises(VisionInputError, match=r"video: frames differ in size"):
        load_video([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 40, 3), np.uint8)], fps=1)
    with pytest.raises(VisionInputError, match="video: expected a positive frame rate, got fps=0"):
        load_video(np.zeros((4, 32, 32, 3), np.uint8), fps=0)
    with pytest.raises(VisionInputError, match=r"aspect ratio 300\.0"):
        process_videos([np.zeros((4, 1, 300, 3), np.uint8)])


# ---------------------------------------------------------------------------------------------------------- configs

def test_configs_from_released_json(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(RELEASED_IMAGE | {"resample": 3, "rescale_factor": 1 / 255, "unknown_key": [1]}))
    assert ImageProcessorConfig.from_json(path) == ImageProcessorConfig()
    video = RELEASED_VIDEO | {"fps": 2, "min_frames": 4, "max_frames": 768, "do_sample_frames": True,
                              "cap_pixels_per_frame": None}
    assert VideoProcessorConfig.from_json(video) == VideoProcessorConfig()
    legacy = ImageProcessorConfig.from_json(RELEASED_IMAGE | {"min_pixels": 3136, "max_pixels": 1003520})
    assert (legacy.min_pixels, legacy.max_pixels) == (3136, 1003520)  # HF: these keys override `size`
    assert math.isclose(VideoProcessorConfig().rescale_factor, 1 / 255)


@pytest.mark.parametrize("override,field", [({"patch_size": "16"}, "patch_size"), ({"merge_size": 2.5}, "merge_size"),
                                            ({"image_mean": [0.5, 0.5]}, "image_mean"), ({"size": 4096}, "size"),
                                            ({"resample": 2}, "resample"), ({"fps": -1}, "fps"),
                                            ({"do_sample_frames": 1}, "do_sample_frames"),
                                            ({"num_frames": 16}, "num_frames")])
def test_config_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        VideoProcessorConfig.from_json(RELEASED_VIDEO | override)


def test_video_clip_is_reusable():
    clip = load_video(np.zeros((8, 32, 32, 3), np.uint8), fps=4)
    assert isinstance(clip, VideoClip) and clip.frames.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(process_videos([clip, clip]).grid_thw, [[2, 2, 2], [2, 2, 2]])
