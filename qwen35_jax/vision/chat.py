"""Chat messages with images and videos -> a `VisionPrompt`, as HF's `Qwen3VLProcessor` builds `input_ids`.

    prompt = vision_chat_prompt(tokenizer, [{"role": "user", "content": [
        {"type": "image", "image": "cat.png"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "video", "video": frames, "source_fps": 30.0},
        {"type": "text", "text": "What happens?"}]}], model.config.vision)

Images and videos are collected in message order and processed (`process_images`, `load_video` +
`process_videos`); the messages are rendered by the checkpoint's chat template with each part reduced to what
Qwen's template reads (`{"type": "image"}`, `{"type": "video"}`, `{"type": "text", "text": ...}`), which writes
`<|vision_start|><|image_pad|><|vision_end|>` per image and `<|vision_start|><|video_pad|><|vision_end|>` per video.
`expand_vision_placeholders` then replaces, in order, each `<|image_pad|>` by t*h*w/merge**2 copies and each
`<|video_pad|>` by `video_prompt_text` (per temporal group `<t seconds><|vision_start|>pads<|vision_end|>`),
exactly as HF's processor does, and the text is encoded. Remote URLs are never fetched. A video part's
`source_fps` is the frame rate of its source (default: a file's own rate, 24 for arrays and frame lists, as HF
assumes); frames are then sampled at the processor's fps (2), unlike qwen-vl-utils' `fps`, which is that rate.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from qwen35_jax.config import VisionConfig
from qwen35_jax.vision.multimodal import VisionPrompt, check_placeholders, grids_of
from qwen35_jax.vision.processing import (
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    ImageProcessorConfig,
    ProcessedVision,
    VideoClip,
    VideoProcessorConfig,
    VisionInputError,
    load_video,
    process_images,
    process_videos,
    video_prompt_text,
)
from qwen35_jax.vision.rope_index import PlaceholderError

_PAD_PATTERN = re.compile(f"{re.escape(IMAGE_PAD)}|{re.escape(VIDEO_PAD)}")
_PART_KINDS = ("text", "image", "image_url", "video")


# ------------------------------------------------------------------------------------------------------- expansion

def _image_replacements(images: ProcessedVision | None, merge_size: int) -> list[str]:
    """Per image, `<|image_pad|>` * (t * h * w / merge_size**2), HF's `replace_image_token`."""
    return [IMAGE_PAD * (int(np.prod(grid)) // merge_size**2) for grid in grids_of(images)]


def _video_replacements(videos: ProcessedVision | None, merge_size: int) -> list[str]:
    """Per video, `video_prompt_text` of its group timestamps and grid, HF's `replace_video_token`."""
    if videos is None:
        return []
    if videos.timestamps is None or len(videos.timestamps) != len(grids_of(videos)):
        raise ValueError("videos need one list of group timestamps per video (ProcessedVision from process_videos)")
    return [video_prompt_text(times, grid, merge_size) for times, grid in zip(videos.timestamps, grids_of(videos))]


def _check_counts(text: str, pad: str, replacements: list[str], name: str) -> None:
    have = text.count(pad)
    if have != len(replacements):
        raise PlaceholderError(f"the prompt text has {have} {pad} placeholder(s) but {len(replacements)} {name}(s) "
                               f"were given: expected one <|vision_start|>{pad}<|vision_end|> per {name}")


def expand_vision_placeholders(text: str, images: ProcessedVision | None, videos: ProcessedVision | None,
                               merge_size: int = 2) -> str:
    """Replaces, in order, the i-th `<|image_pad|>` of `text` by image i's placeholder run and the i-th
    `<|video_pad|>` by video i's `video_prompt_text`, as HF's `Qwen3VLProcessor` does. Raises PlaceholderError
    (naming both counts) when the text's pads and the images / videos differ in number."""
    return expand_placeholders_in_pieces([text], images, videos, merge_size)[0]


def expand_placeholders_in_pieces(texts: Sequence[str], images: ProcessedVision | None,
                                  videos: ProcessedVision | None, merge_size: int = 2) -> list[str]:
    """`expand_vision_placeholders` over consecutive pieces of one text (e.g. a conversation cut into
    loss-masked pieces): the pads are numbered across the pieces, in order."""
    replacements = {IMAGE_PAD: _image_replacements(images, merge_size),
                    VIDEO_PAD: _video_replacements(videos, merge_size)}
    whole = "".join(texts)
    _check_counts(whole, IMAGE_PAD, replacements[IMAGE_PAD], "image")
    _check_counts(whole, VIDEO_PAD, replacements[VIDEO_PAD], "video")
    pending = {pad: iter(runs) for pad, runs in replacements.items()}
    return [_PAD_PATTERN.sub(lambda match: next(pending[match.group()]), text) for text in texts]


# ---------------------------------------------------------------------------------------------------------- images

def _decode_data_url(url: str, name: str) -> np.ndarray:
    """A `data:image/...;base64,...` URL -> uint8 [H, W, 3], read as HF's `load_image` reads it (EXIF orientation,
    `convert("RGB")`)."""
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise VisionInputError(f"{name}: expected a data URL of the form data:image/<format>;base64,<data>, got "
                               f"{url[:40]!r}...")
    try:
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as image:
            image.load()
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (binascii.Error, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise VisionInputError(f"{name}: the data URL holds no readable image ({type(e).__name__}: {e})") from e


def _image_from_url(url: Any, name: str) -> str | np.ndarray:
    """An OpenAI `image_url` value (`{"url": ...}` or the URL itself) -> a file path or decoded pixels. Accepts
    data URLs, file:// URLs and plain paths; http(s) and other schemes raise VisionInputError (no fetches)."""
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url:
        raise VisionInputError(f"{name}: expected image_url {{'url': <data URL, file:// URL or path>}}, got {url!r}")
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme == "data":
        return _decode_data_url(url, name)
    if scheme == "file":
        return urllib.request.url2pathname(parsed.path)
    if scheme in ("http", "https"):
        raise VisionInputError(f"{name}: remote image URL {url!r} is not fetched (no network access): download it "
                               "and pass a file path or a data:image/...;base64 URL")
    if scheme:
        raise VisionInputError(f"{name}: unsupported URL scheme {scheme!r} in {url!r}: expected a data URL, a "
                               "file:// URL or a path")
    return url


# ----------------------------------------------------------------------------------------------------- message parts

def _part_kind(part: Any, name: str) -> str:
    """The part's `type`, or (as Qwen's template does) the first media / text key it carries."""
    if not isinstance(part, dict):
        raise VisionInputError(f"{name}: expected a content part dict such as {{'type': 'text', 'text': ...}}, "
                               f"got {type(part).__name__}")
    kind = part.get("type") or next((key for key in ("image", "image_url", "video", "text") if key in part), None)
    if kind not in _PART_KINDS:
        raise VisionInputError(f"{name}: unsupported content part type {kind!r}: expected one of "
                               f"{', '.join(_PART_KINDS)}")
    if kind not in part:
        raise VisionInputError(f"{name}: a {kind!r} part needs a {kind!r} field")
    return kind


class _Media:
    """Images (sources for `process_images`) and videos (VideoClips) in message order."""

    def __init__(self, video_cfg: VideoProcessorConfig):
        self.video_cfg = video_cfg
        self.images: list[Any] = []
        self.videos: list[VideoClip] = []

    def add(self, kind: str, part: dict, name: str) -> dict:
        """Collects the part's image / video; returns the part as Qwen's template reads it."""
        if kind == "text":
            return {"type": "text", "text": part["text"]}
        if kind == "video":
            clip = load_video(part["video"], self.video_cfg, fps=part.get("source_fps"), name=name)
            self.videos.append(clip)
            return {"type": "video"}
        self.images.append(part["image"] if kind == "image" else _image_from_url(part["image_url"], name))
        return {"type": "image"}


def _normalise_messages(messages: Sequence[dict], media: _Media) -> list[dict]:
    """Messages with list contents reduced to template parts (media collected into `media`); other messages and
    fields pass through unchanged."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            names = [f"message {i} part {j}" for j in range(len(content))]
            content = [media.add(_part_kind(part, name), part, name) for part, name in zip(content, names)]
            message = {**message, "content": content}
        out.append(message)
    return out


def collect_media(messages: Sequence[dict], video_cfg: VideoProcessorConfig = VideoProcessorConfig()
                  ) -> tuple[list[dict], list[Any], list[VideoClip]]:
    """(the messages as the chat template reads them, image sources, video clips), media in message order.
    Raises VisionInputError naming the message and part of an unusable one."""
    media = _Media(video_cfg)
    return _normalise_messages(messages, media), media.images, media.videos


def has_media(messages: Any) -> bool:
    """Whether any message's content list holds an image, image_url or video part."""
    return isinstance(messages, (list, tuple)) and any(
        isinstance(part, dict) and (part.get("type") in _PART_KINDS[1:] or
                                    (not part.get("type") and any(k in part for k in _PART_KINDS[1:])))
        for message in messages if isinstance(message, dict) and isinstance(message.get("content"), (list, tuple))
        for part in message["content"])


# -------------------------------------------------------------------------------------------------------------- API

def _check_merge_sizes(vcfg: VisionConfig, *cfgs: ImageProcessorConfig) -> None:
    for cfg in cfgs:
        if cfg.merge_size != vcfg.spatial_merge_size:
            raise ValueError(f"{type(cfg).__name__}.merge_size {cfg.merge_size} differs from the vision tower's "
                             f"spatial_merge_size {vcfg.spatial_merge_size}")


def vision_chat_prompt(tokenizer, messages: Sequence[dict], vcfg: VisionConfig,
                       image_cfg: ImageProcessorConfig = ImageProcessorConfig(),
                       video_cfg: VideoProcessorConfig = VideoProcessorConfig(), add_generation_prompt: bool = True,
                       **template_kwargs) -> VisionPrompt:
    """Chat messages (contents: strings or lists of text / image / image_url / video parts, see the module doc)
    -> VisionPrompt(token ids with expanded placeholders, processed images or None, processed videos or None).
    `template_kwargs` (enable_thinking, tools, ...) go to `tokenizer.apply_chat_template`. Raises
    VisionInputError for unusable parts or media, PlaceholderError when the rendered template's pads do not
    match the media (e.g. a template that ignores content lists)."""
    _check_merge_sizes(vcfg, image_cfg, video_cfg)
    media = _Media(video_cfg)
    rendered = tokenizer.apply_chat_template(_normalise_messages(messages, media),
                                             add_generation_prompt=add_generation_prompt, **template_kwargs)
    return _prompt_from_text(tokenizer, rendered, media, vcfg, image_cfg)


def vision_text_prompt(tokenizer, text: str, vcfg: VisionConfig, images: Sequence = (), videos: Sequence = (),
                       image_cfg: ImageProcessorConfig = ImageProcessorConfig(),
                       video_cfg: VideoProcessorConfig = VideoProcessorConfig(), video_fps: float | None = None
                       ) -> VisionPrompt:
    """A plain (non-chat) prompt: each image, then each video (sources as in an image / video part; `video_fps`:
    their source frame rate, as a video part's `source_fps`), as `<|vision_start|><|image_pad|><|vision_end|>`
    (`<|video_pad|>` for a video) before `text`, placeholders expanded."""
    _check_merge_sizes(vcfg, image_cfg, video_cfg)
    media = _Media(video_cfg)
    parts = [media.add("image", {"image": image}, f"image {i}") for i, image in enumerate(images)]
    parts += [media.add("video", {"video": video, "source_fps": video_fps}, f"video {i}") for i, video in enumerate(videos)]
    pads = "".join(f"{VISION_START}{IMAGE_PAD if p['type'] == 'image' else VIDEO_PAD}{VISION_END}" for p in parts)
    return _prompt_from_text(tokenizer, pads + text, media, vcfg, image_cfg)


def _prompt_from_text(tokenizer, text: str, media: _Media, vcfg: VisionConfig,
                      image_cfg: ImageProcessorConfig) -> VisionPrompt:
    """The collected media processed, the text's pads expanded, the whole encoded and checked."""
    images = process_images(media.images, image_cfg) if media.images else None
    videos = process_videos(media.videos, media.video_cfg) if media.videos else None
    text = expand_vision_placeholders(text, images, videos, vcfg.spatial_merge_size)
    prompt = VisionPrompt(tokenizer.encode(text), images, videos)
    check_placeholders(prompt, vcfg)
    return prompt
