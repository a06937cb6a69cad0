"""Qwen3.5 image and video processors in numpy + Pillow (no torch at run time), exact against HF transformers 5.24.

Images match HF's PIL backend, `Qwen2VLImageProcessorPil` (models/qwen2_vl/image_processing_pil_qwen2_vl.py), bit for
bit: the same `smart_resize`, Pillow's bicubic on uint8, `x.astype(float64) * rescale -> float32`, `(x - mean) / std`
in float32, then HF's merge-block patch order. (HF's default torchvision image backend differs from its own PIL one by
up to one uint8 level after the resize, 2/255 after normalisation.)

Videos match `Qwen3VLVideoProcessor` (models/qwen3_vl/video_processing_qwen3_vl.py), which exists only on the
torchvision backend. Its resize is torchvision's `resize` on uint8 frames, i.e. torch's native uint8 antialiased bicubic
on CPU; `_resample_uint8` re-derives that kernel (Pillow's separable convolution, but with int16 weights whose
fixed-point precision depends on the largest weight) and is bit-exact against torch's x86 (AVX2/AVX512) kernel.
Normalisation is HF's fused one, `(x.float32() - mean/rescale) / (std/rescale)`. Frame sampling (`fps`, `min_frames`,
`max_frames`), padding to the temporal patch by repeating the last frame, and the per-group timestamps follow
`Qwen3VLVideoProcessor` and `Qwen3VLProcessor._calculate_timestamps`.

Inputs: file paths are read as HF's `load_image` reads them (EXIF orientation applied, `convert("RGB")`, so alpha is
dropped); PIL images and arrays are converted as the processors' `convert_to_rgb` does (alpha composited onto white).
Float arrays must hold values in [0, 1] and are scaled by 255 and rounded (HF would rescale them a second time).

Pins: defaults are the released Qwen3.5 `preprocessor_config.json` / `video_preprocessor_config.json` values (HF's class
defaults are Qwen2-VL's: patch 14, CLIP mean/std, other sizes), plus HF's class defaults for the video keys the release
leaves out (fps 2, min_frames 4, max_frames 768, max_video_tokens 768). `VideoProcessorConfig.cap_pixels_per_frame` is
pinned to False: HF 5.24 leaves it unset, warns that the default "will change to True" and applies no cap; True gives
HF's (qwen-vl-utils') per-frame cap. Arrays and frame lists carry no frame rate, so `load_video` assumes 24 fps for them
unless told, as HF does (its `sample_frames` and `Qwen3VLProcessor` both fall back to 24).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

PathLike = str | os.PathLike
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the only resample the released configs use
ASPECT_RATIO_LIMIT = 200
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"  # the multimodal special tokens' text
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"


class VisionInputError(ValueError):
    """An image or video that cannot be processed; the message names the input and what was expected."""


# ----------------------------------------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class ImageProcessorConfig:
    """`Qwen2VLImageProcessor` settings; defaults are the released Qwen3.5 `preprocessor_config.json`."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536  # size["shortest_edge"]
    max_pixels: int = 16777216  # size["longest_edge"]
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        """Side lengths are rounded to multiples of this (patch_size * merge_size)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_json(cls, source: PathLike | Mapping[str, Any]):
        """Reads a (video_)preprocessor_config.json path or dict. Unknown keys are ignored; bad values raise
        ValueError naming the field."""
        return cls(**_fields_from_json(cls, _read_json(source)))


@dataclass(frozen=True)
class VideoProcessorConfig(ImageProcessorConfig):
    """`Qwen3VLVideoProcessor` settings; defaults are the released `video_preprocessor_config.json` plus HF's class
    defaults for the keys it leaves out (fps, min/max frames, sampling on, per-frame cap off: see the module doc)."""

    min_pixels: int = 4096  # over all frames: t * h * w
    max_pixels: int = 25165824
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    do_sample_frames: bool = True
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768


def processor_configs(*folders: PathLike) -> tuple[ImageProcessorConfig, VideoProcessorConfig]:
    """The first `preprocessor_config.json` / `video_preprocessor_config.json` found in `folders` (e.g. a
    checkpoint and its assets), else the released Qwen3.5 values."""
    def read(cls, name):
        found = [Path(d) / name for d in folders if (Path(d) / name).is_file()]
        return cls.from_json(found[0]) if found else cls()
    return (read(ImageProcessorConfig, "preprocessor_config.json"),
            read(VideoProcessorConfig, "video_preprocessor_config.json"))


# JSON keys that must hold these values: the processors implement only the released settings for them.
_FIXED_KEYS = {"resample": BICUBIC, "do_resize": True, "do_rescale": True, "do_normalize": True,
               "do_convert_rgb": True, "num_frames": None}


def _read_json(source: PathLike | Mapping[str, Any]) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    with open(source, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(source)}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_type(key: str, value: Any, kind: type) -> Any:
    """Returns `value` converted to `kind` (int, float, bool or a 3-tuple of floats); ValueError names `key`."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and is_number and float(value).is_integer() and value > 0:
        return int(value)
    if kind is float and is_number and value > 0:
        return float(value)
    if kind is tuple and isinstance(value, (list, tuple)) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return tuple(float(v) for v in value)
    wanted = {int: "a positive integer", float: "a positive number", bool: "true or false",
              tuple: "a list of 3 numbers"}[kind]
    raise ValueError(f"preprocessor config field {key!r}: expected {wanted}, got {value!r}")


def _fields_from_json(cls, data: dict) -> dict:
    for key, wanted in _FIXED_KEYS.items():
        if key in data and data[key] != wanted:
            raise ValueError(f"preprocessor config field {key!r}: only {wanted!r} is supported, got {data[key]!r}")
    data = dict(data)
    size = data.pop("size", None)
    if size is not None:
        if not isinstance(size, Mapping) or not {"shortest_edge", "longest_edge"} <= set(size):
            raise ValueError(f"preprocessor config field 'size': expected {{'shortest_edge', 'longest_edge'}}, "
                             f"got {size!r}")
        # HF: explicit min_pixels / max_pixels keys override size
        data.setdefault("min_pixels", size["shortest_edge"])
        data.setdefault("max_pixels", size["longest_edge"])
    if data.get("cap_pixels_per_frame", False) is None:
        data.pop("cap_pixels_per_frame")  # HF's "unset" means no cap, our pinned default
    kinds = {"image_mean": tuple, "image_std": tuple, "rescale_factor": float, "fps": float}
    out = {}
    for field in dataclasses.fields(cls):
        if field.name in data:
            kind = kinds.get(field.name, bool if isinstance(field.default, bool) else int)
            out[field.name] = _check_type(field.name, data[field.name], kind)
    return out


# ------------------------------------------------------------------------------------------------------ smart_resize

def _check_nonempty(height: int, width: int) -> None:
    if min(height, width) <= 0:
        raise VisionInputError(f"zero-size input {height}x{width}: expected height and width >= 1")


def _check_aspect_ratio(height: int, width: int) -> None:
    ratio = max(height, width) / min(height, width)
    if ratio > ASPECT_RATIO_LIMIT:
        raise VisionInputError(f"aspect ratio {ratio:.1f} ({height}x{width}) exceeds {ASPECT_RATIO_LIMIT}")


def _round_to_budget(height: int, width: int, frames: int, t_bar: int, factor: int, min_pixels: int,
                     max_pixels: int) -> tuple[int, int]:
    """Sides rounded to multiples of `factor`, then rescaled (keeping the aspect ratio) if `t_bar * h * w` falls
    outside [min_pixels, max_pixels]; the rescale uses the exact `frames * height * width` (HF's formula)."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
    """HF's `qwen2_vl` `smart_resize` (used by the image processor): the (h, w) to resize to, both multiples of
    `factor`, with h * w in [min_pixels, max_pixels] and the aspect ratio nearly kept."""
    _check_nonempty(height, width)
    _check_aspect_ratio(height, width)
    return _round_to_budget(height, width, 1, 1, factor, min_pixels, max_pixels)


def video_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = 4096, max_pixels: int = 25165824) -> tuple[int, int]:
    """HF's `qwen3_vl` video `smart_resize`: like `smart_resize`, but the pixel budget counts frames (t rounded to
    the temporal patch), and sides under `factor` are first scaled up (truncating) so the smaller one reaches it."""
    if num_frames < temporal_factor:
        raise VisionInputError(f"{num_frames} frame(s): expected at least {temporal_factor} (one temporal patch)")
    _check_nonempty(height, width)
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect_ratio(height, width)
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    return _round_to_budget(height, width, num_frames, t_bar, factor, min_pixels, max_pixels)


# ------------------------------------------------------------------------------------------------------------ images

@dataclass(frozen=True)
class ProcessedVision:
    """Processor output. pixel_values: float32 [N_patches, C * temporal_patch * patch**2] (HF's `pixel_values`, or
    `pixel_values_videos` for videos); grid_thw: int64 [n_items, 3] in patches; timestamps (videos only): per video,
    the mean timestamp in seconds of each temporal group (grid_t of them)."""

    pixel_values: np.ndarray
    grid_thw: np.ndarray
    timestamps: list[list[float]] | None = None


def _source_name(source: Any, name: str) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else name


def _open_image(path: PathLike) -> np.ndarray:
    """A file as HF's `load_image` reads it: EXIF orientation applied, then `convert("RGB")` (alpha dropped)."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so that truncated or corrupt files fail here
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise VisionInputError(f"{os.fspath(path)}: cannot read an image from it ({type(e).__name__}: {e})") from e


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """HF's `convert_to_rgb` for PIL images: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """[H, W], [H, W, 1|3|4] uint8, or float in [0, 1] (scaled by 255 and rounded) -> uint8 [H, W, 3]. Alpha is
    composited onto white as HF's `convert_to_rgb` does for arrays."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise VisionInputError(f"{name}: expected an array [H, W], or [H, W, C] with C in 1, 3, 4 (channels last), "
                               f"got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise VisionInputError(f"{name}: float pixels must be finite and in [0, 1], got [{array.min()}, "
                                   f"{array.max()}]")
        array = np.round(array.astype(np.float64) * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise VisionInputError(f"{name}: expected uint8 or float pixels, got dtype {array.dtype}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return array


def load_image(source: PathLike | Image.Image | np.ndarray, name: str = "image") -> np.ndarray:
    """An image file path, PIL image or array -> uint8 [H, W, 3] RGB. `name` labels the input in errors (paths are
    named by themselves). Raises VisionInputError for unreadable files and empty images."""
    name = _source_name(source, name)
    if isinstance(source, (str, os.PathLike)):
        rgb = _open_image(source)
    elif isinstance(source, Image.Image):
        rgb = _pil_to_rgb(source)
    elif isinstance(source, np.ndarray):
        rgb = _array_to_rgb(source, name)
    else:
        raise VisionInputError(f"{name}: expected a file path, PIL image or numpy array, got {type(source).__name__}")
    if min(rgb.shape[:2]) == 0:
        raise VisionInputError(f"{name}: zero-size image {rgb.shape[0]}x{rgb.shape[1]}: expected height and "
                               "width >= 1")
    return np.ascontiguousarray(rgb)


def _resized_size(name: str, resize) -> tuple[int, int]:
    """Runs a smart_resize closure, naming the input in its errors."""
    try:
        return resize()
    except VisionInputError as e:
        raise VisionInputError(f"{name}: {e}") from None


def _normalize(pixels: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 as HF's PIL backend: x.astype(float64) * rescale -> float32; (x - mean) / std."""
    scaled = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    return (scaled - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)


def _patchify(frames: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """float32 [T, H, W, C] -> [T' * (H/p) * (W/p), C * tp * p * p] with T' = ceil(T / tp): frames padded to the
    temporal patch tp by repeating the last one; rows in HF's order (t, h-block, w-block, h-in-block, w-in-block),
    columns (C, tp, p, p)."""
    t, h, w, c = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if pad := -t % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    gt, gh, gw = (t + pad) // tp, h // p, w // p
    x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # gt, gh/m, gw/m, m, m, C, tp, p, p
    return x.reshape(gt * gh * gw, c * tp * p * p)


def process_images(images: Sequence, cfg: ImageProcessorConfig = ImageProcessorConfig()) -> ProcessedVision:
    """Images (paths, PIL images or arrays, see `load_image`) -> ProcessedVision with pixel_values float32
    [sum(h * w), C * tp * p * p] and grid_thw int64 [n_images, 3] = (1, h, w) in patches, exactly as HF's
    `Qwen2VLImageProcessorPil`."""
    if len(images) == 0:
        raise VisionInputError("no images: expected at least one")
    patches, grids = [], []
    for i, source in enumerate(images):
        name = _source_name(source, f"image {i}")
        rgb = load_image(source, name)
        h, w = _resized_size(name, lambda: smart_resize(*rgb.shape[:2], cfg.factor, cfg.min_pixels, cfg.max_pixels))
        resized = np.asarray(Image.fromarray(rgb).resize((w, h), resample=BICUBIC))
        patches.append(_patchify(_normalize(resized, cfg)[None], cfg))
        grids.append((1, h // cfg.patch_size, w // cfg.patch_size))
    return ProcessedVision(np.concatenate(patches), np.asarray(grids, np.int64))


# ------------------------------------------------------------------------------------------------------------ videos

def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """torch's antialiasing bicubic filter (Keys, a = -0.5), written as torch's cubic_convolution1/2 write it."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _resample_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's uint8 antialiased bicubic weights along one axis: (first input index int64 [out], int16-valued
    weights int32 [out, K], precision bits). Pillow's support and normalisation; weights are then quantised to int16
    with the most precision bits the largest weight allows (torch's `_compute_index_ranges_int16_weights`)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - first, 0, taps)
    offsets = np.arange(taps)
    weights = _keys_cubic((offsets + first[:, None] - center[:, None] + 0.5) * invscale)
    weights[offsets >= count[:, None]] = 0.0
    total = np.zeros(out_size)
    for k in range(taps):  # sequential, as torch sums
        total += weights[:, k]
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0)
    w_max = weights.max()
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    quantised = np.trunc(weights * (1 << precision) + np.where(weights < 0, -0.5, 0.5)).astype(np.int32)
    return first, quantised, precision


def _resample_axis(pixels: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One separable pass of torch's uint8 kernel: integer weighted sum, +half, >> precision, clamp to uint8."""
    in_size = pixels.shape[axis]
    if in_size == out_size:
        return pixels
    first, weights, precision = _resample_weights(in_size, out_size)
    shape = [1] * pixels.ndim
    shape[axis] = out_size
    acc = np.full(pixels.shape[:axis] + (out_size,) + pixels.shape[axis + 1:], 1 << precision >> 1, np.int32)
    for k in range(weights.shape[1]):
        taps = np.take(pixels, np.minimum(first + k, in_size - 1), axis=axis).astype(np.int32)
        acc += weights[:, k].reshape(shape) * taps
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def _resample_uint8(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] -> [height, width, C], bit-exact with torch's CPU (AVX2/AVX512) uint8 antialiased bicubic,
    the kernel behind torchvision's `resize` in HF's video processor: horizontal pass, then vertical."""
    return _resample_axis(_resample_axis(frame, 1, width), 0, height)


@dataclass(frozen=True)
class VideoClip:
    """Sampled frames of one video. frames: uint8 [T, H, W, 3]; frame_indices: int64 [T] into the source;
    timestamps: float64 [T] seconds (index / source_fps, as HF); total_frames: frames in the source."""

    frames: np.ndarray
    frame_indices: np.ndarray
    timestamps: np.ndarray
    source_fps: float
    total_frames: int
    name: str


def sample_frame_indices(total_frames: int, source_fps: float, cfg: VideoProcessorConfig) -> np.ndarray:
    """HF's `Qwen3VLVideoProcessor.sample_frames` with fps sampling: n = int(total / source_fps * fps) clamped to
    [min_frames, max_frames] and to total_frames, spread evenly over the clip -> int64 [n]."""
    if not cfg.do_sample_frames:
        return np.arange(total_frames)
    n = int(total_frames / source_fps * cfg.fps)
    n = min(max(n, cfg.min_frames), cfg.max_frames, total_frames)
    return np.linspace(0, total_frames - 1, n).round().astype(np.int64)


def _check_fps(fps: Any, name: str) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise VisionInputError(f"{name}: expected a positive frame rate, got fps={fps!r}")
    return float(fps)


def _import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError("reading video files needs PyAV: pip install qwen35-jax[video]") from e
    return av


def _decode_frames(path: PathLike, fps: float | None, cfg: VideoProcessorConfig) -> tuple[np.ndarray, np.ndarray,
                                                                                         float, int]:
    """Decodes only the sampled frames of a file with PyAV, as HF's `read_video_pyav` does (frame count from the
    stream header, counted by decoding when the header has none) -> (uint8 [T, H, W, 3], indices, fps, total)."""
    av = _import_av()
    name = os.fspath(path)
    try:
        with av.open(name) as container:
            if not container.streams.video:
                raise VisionInputError(f"{name}: no video stream")
            stream = container.streams.video[0]
            total = stream.frames or sum(1 for _ in container.decode(stream))
            if total == 0:
                raise VisionInputError(f"{name}: the video has no frames")
            rate = _check_fps(fps if fps is not None else float(stream.average_rate or 0), name)
            indices = sample_frame_indices(total, rate, cfg)
            container.seek(0)
            wanted, frames, decoded = set(indices.tolist()), {}, 0
            for decoded, frame in enumerate(container.decode(stream), start=1):
                if decoded - 1 in wanted:
                    frames[decoded - 1] = frame.to_ndarray(format="rgb24")
                if decoded > indices[-1]:
                    break
    except (av.FFmpegError, OSError) as e:
        raise VisionInputError(f"{name}: cannot decode the video ({type(e).__name__}: {e})") from e
    if decoded <= indices[-1]:
        raise VisionInputError(f"{name}: the stream header says {total} frames but only {decoded} decoded; "
                               f"expected frame {indices[-1]}")
    return np.stack([frames[i] for i in indices.tolist()]), indices, rate, total


def _stack_frames(frames: list[np.ndarray], name: str) -> np.ndarray:
    shapes = {frame.shape for frame in frames}
    if len(shapes) > 1:
        raise VisionInputError(f"{name}: frames differ in size {sorted(shapes)}: expected one size")
    return np.stack(frames)


def load_video(source: PathLike | np.ndarray | Sequence, cfg: VideoProcessorConfig = VideoProcessorConfig(), *,
               fps: float | None = None, name: str = "video") -> VideoClip:
    """A video file (via PyAV, the `video` extra), an array [T, H, W, C] or a list of frames (PIL images / arrays)
    -> its sampled frames (`sample_frame_indices`) as a VideoClip. `fps` is the source frame rate: for files it
    defaults to the stream's average rate, for arrays and frame lists to 24, HF's assumption when a video comes
    without metadata. Raises VisionInputError for empty or unreadable videos."""
    name = _source_name(source, name)
    if isinstance(source, (str, os.PathLike)):
        frames, indices, rate, total = _decode_frames(source, None if fps is None else _check_fps(fps, name), cfg)
    else:
        if isinstance(source, np.ndarray) and source.ndim not in (3, 4):
            raise VisionInputError(f"{name}: expected an array [T, H, W] or [T, H, W, C], got shape {source.shape}")
        rate = _check_fps(24.0 if fps is None else fps, name)
        total = len(source)
        if total == 0:
            raise VisionInputError(f"{name}: the video has no frames")
        indices = sample_frame_indices(total, rate, cfg)
        frames = _stack_frames([load_image(source[i], f"{name} frame {i}") for i in indices.tolist()], name)
    return VideoClip(frames, indices, indices / rate, rate, total, name)


def _group_timestamps(clip: VideoClip, temporal_patch: int) -> list[float]:
    """Mean timestamp of the first and last frame of each temporal group, the frame list padded with its last frame
    (HF's `Qwen3VLProcessor._calculate_timestamps`)."""
    times = clip.timestamps.tolist()
    times += times[-1:] * (-len(times) % temporal_patch)
    return [(times[i] + times[i + temporal_patch - 1]) / 2 for i in range(0, len(times), temporal_patch)]


def _video_max_pixels(num_frames: int, cfg: VideoProcessorConfig) -> int:
    """The pixel budget over all frames; with `cap_pixels_per_frame`, HF's per-frame cap (qwen-vl-utils')."""
    if not cfg.cap_pixels_per_frame:
        return cfg.max_pixels
    frame_cap = cfg.max_video_tokens * cfg.factor * cfg.factor
    per_frame = max(min(frame_cap, cfg.max_pixels // num_frames), int(cfg.min_pixels * 1.05))
    return per_frame * num_frames


def _normalize_fused(pixels: np.ndarray, cfg: VideoProcessorConfig) -> np.ndarray:
    """uint8 -> float32 as HF's torchvision backend: (x - mean * (1/rescale)) / (std * (1/rescale)) in float32."""
    inverse = np.float32(1.0 / cfg.rescale_factor)
    mean = np.asarray(cfg.image_mean, np.float32) * inverse
    std = np.asarray(cfg.image_std, np.float32) * inverse
    return (pixels.astype(np.float32) - mean) / std


def process_videos(videos: Sequence, cfg: VideoProcessorConfig = VideoProcessorConfig()) -> ProcessedVision:
    """Videos (VideoClips from `load_video`, or anything `load_video` takes, read with its defaults) ->
    ProcessedVision with pixel_values float32 [sum(t * h * w), C * tp * p * p] (HF's `pixel_values_videos`),
    grid_thw int64 [n_videos, 3] (`video_grid_thw`) and per-group timestamps, as HF's `Qwen3VLVideoProcessor`."""
    if len(videos) == 0:
        raise VisionInputError("no videos: expected at least one")
    patches, grids, timestamps = [], [], []
    for i, video in enumerate(videos):
        clip = video if isinstance(video, VideoClip) else load_video(video, cfg, name=f"video {i}")
        t, height, width = clip.frames.shape[:3]
        h, w = _resized_size(clip.name, lambda: video_smart_resize(
            t, height, width, cfg.temporal_patch_size, cfg.factor, cfg.min_pixels, _video_max_pixels(t, cfg)))
        resized = np.stack([_resample_uint8(frame, h, w) for frame in clip.frames])
        patches.append(_patchify(_normalize_fused(resized, cfg), cfg))
        grids.append((-(-t // cfg.temporal_patch_size), h // cfg.patch_size, w // cfg.patch_size))
        timestamps.append(_group_timestamps(clip, cfg.temporal_patch_size))
    return ProcessedVision(np.concatenate(patches), np.asarray(grids, np.int64), timestamps)


def video_prompt_text(timestamps: Sequence[float], grid_thw: Sequence[int], merge_size: int = 2) -> str:
    """What HF's `Qwen3VLProcessor` puts in place of a video's single `<|video_pad|>`: per temporal group
    `<{t:.1f} seconds><|vision_start|>` + `<|video_pad|>` * (h * w / merge_size**2) + `<|vision_end|>`. The chat
    template's own `<|vision_start|>` / `<|vision_end|>` around that `<|video_pad|>` stay in the prompt."""
    t, h, w = (int(v) for v in grid_thw)
    if len(timestamps) != t:
        raise ValueError(f"{len(timestamps)} timestamps for grid_t {t}: expected one per temporal group")
    tokens = VIDEO_PAD * (h * w // merge_size**2)
    return "".join(f"<{time:.1f} seconds>{VISION_START}{tokens}{VISION_END}" for time in timestamps)
