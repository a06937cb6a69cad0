"""A multimodal prompt on the text model: vision features scattered into the token embeddings, mRoPE positions.

    prompt = VisionPrompt(token_ids, images=process_images([...]), videos=process_videos([...]))
    features = vision_features(encoder, prompt)          # [F, H], computed once per request
    rows, mask = gather_features(features, feature_index(prompt, vcfg)[None])   # [1, L, H], [1, L]
    embeds = embed_multimodal(model, ids [1, L], rows, mask)
    positions, rope_delta = prompt_positions(prompt, vcfg)

`token_ids` already hold the expanded placeholders (`vision.chat.expand_vision_placeholders`, or
`vision.chat.vision_chat_prompt` from chat messages): one run of `<|image_pad|>` per image (t*h*w/4 tokens), one
run of `<|video_pad|>` per temporal group of each video, each after its `<t seconds><|vision_start|>`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax.config import VisionConfig
from qwen35_jax.vision.processing import ProcessedVision
from qwen35_jax.vision.rope_index import PlaceholderError, mrope_positions


@dataclasses.dataclass(frozen=True)
class VisionPrompt:
    """One prompt's token ids (placeholders expanded) with its processed images and videos, in prompt order."""

    token_ids: tuple[int, ...]
    images: ProcessedVision | None = None
    videos: ProcessedVision | None = None

    def __post_init__(self):
        object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))

    def __len__(self) -> int:
        return len(self.token_ids)


def grids_of(processed: ProcessedVision | None) -> np.ndarray:
    """int64 [n, 3] patch grids of processed images / videos (n = 0 for None)."""
    return np.zeros((0, 3), np.int64) if processed is None else np.reshape(processed.grid_thw, (-1, 3))


def prompt_positions(prompt: VisionPrompt, vcfg: VisionConfig) -> tuple[np.ndarray, int]:
    """(int32 [3, L] mRoPE positions, rope_delta) of the prompt (`vision.rope_index.mrope_positions`)."""
    return mrope_positions(prompt.token_ids, vcfg.image_token_id, vcfg.video_token_id, grids_of(prompt.images),
                           grids_of(prompt.videos), vcfg.spatial_merge_size)


def vision_features(encoder, prompt: VisionPrompt) -> np.ndarray | None:
    """The encoder's outputs for the prompt, computed once: float32 [F, out_hidden_size], the image tokens then
    the video tokens in prompt order (None without images or videos)."""
    parts = [np.asarray(encoder.encode(p.pixel_values, p.grid_thw), np.float32)
             for p in (prompt.images, prompt.videos) if p is not None]
    return np.concatenate(parts) if parts else None


def feature_index(prompt: VisionPrompt, vcfg: VisionConfig) -> np.ndarray:
    """int32 [L]: for each token, its row of `vision_features` (the k-th image placeholder takes image token k,
    the k-th video placeholder video token k), -1 for a text token (HF's masked scatter, per prompt)."""
    ids = np.asarray(prompt.token_ids)
    index = np.full(ids.shape, -1, np.int32)
    image, video = ids == vcfg.image_token_id, ids == vcfg.video_token_id
    index[image] = np.arange(image.sum())
    index[video] = image.sum() + np.arange(video.sum())
    return index


def gather_features(features: np.ndarray | None, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Host gather: (vision rows aligned with the tokens float32 [..., L, H], mask bool [..., L]) for a feature
    index [..., L] into features [F, H] (-1: a text token, whose row is zeros)."""
    mask = index >= 0
    if features is None:
        return np.zeros(index.shape + (0,), np.float32), mask
    return np.where(mask[..., None], features[np.maximum(index, 0)], 0).astype(np.float32), mask


def embed_multimodal(model, input_ids: jax.Array, vision_rows: jax.Array, mask: jax.Array) -> jax.Array:
    """Token embeddings [B, L, H], with vision_rows [B, L, H] in place where mask [B, L] is True."""
    embeds = model.embed(input_ids)
    return jnp.where(mask[..., None], vision_rows.astype(embeds.dtype), embeds)


def check_placeholders(prompt: VisionPrompt, vcfg: VisionConfig) -> None:
    """Raises PlaceholderError unless the prompt has exactly as many image (video) placeholder tokens as its
    images (videos) make, in runs that fit their grids."""
    ids = np.asarray(prompt.token_ids)
    unit = vcfg.spatial_merge_size ** 2
    for name, token_id, processed in (("image", vcfg.image_token_id, prompt.images),
                                      ("video", vcfg.video_token_id, prompt.videos)):
        want = int(np.prod(grids_of(processed), axis=1).sum()) // unit
        have = int(np.sum(ids == token_id))
        if have != want:
            raise PlaceholderError(f"the prompt has {have} <|{name}_pad|> tokens but its {name}s make {want} "
                                   f"({len(grids_of(processed))} {name}s given)")
    prompt_positions(prompt, vcfg)


def multimodal_logits(model, encoder, prompt: VisionPrompt) -> jax.Array:
    """The full forward of one multimodal prompt (no decode state): logits [1, L, vocab]."""
    vcfg = model.config.vision
    check_placeholders(prompt, vcfg)
    ids = jnp.asarray(np.asarray(prompt.token_ids, np.int32)[None])
    features = vision_features(encoder, prompt)
    embeds = model.embed(ids) if features is None else embed_multimodal(
        model, ids, *map(jnp.asarray, gather_features(features, feature_index(prompt, vcfg)[None])))
    positions, _ = prompt_positions(prompt, vcfg)
    return model(ids, positions=jnp.asarray(positions)[:, None, :], embeds=embeds)
