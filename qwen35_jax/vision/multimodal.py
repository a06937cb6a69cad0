"""A multimodal prompt on the text model: vision features scattered into the token embeddings, mRoPE positions.

    prompt = VisionPrompt(token_ids, images=process_images([...]), videos=process_videos([...]))
    features = vision_features(encoder, prompt)          # computed once per request
    embeds = scatter_features(model, ids [1, L], features, vcfg)
    positions, rope_delta = prompt_positions(prompt, vcfg)

`token_ids` already hold the expanded placeholders (`expand_placeholders`, or a chat template's image / video
content parts followed by `expand_placeholders`): one run of `<|image_pad|>` per image (t*h*w/4 tokens), one run
of `<|video_pad|>` per temporal group of each video, each after its `<t seconds><|vision_start|>`.
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


@dataclasses.dataclass(frozen=True)
class VisionFeatures:
    """The encoder's outputs of one prompt: image and video tokens [n, out_hidden_size] (None when absent)."""

    images: jax.Array | None
    videos: jax.Array | None


def _grid(processed: ProcessedVision | None) -> np.ndarray:
    return np.zeros((0, 3), np.int64) if processed is None else np.reshape(processed.grid_thw, (-1, 3))


def prompt_positions(prompt: VisionPrompt, vcfg: VisionConfig) -> tuple[np.ndarray, int]:
    """(int32 [3, L] mRoPE positions, rope_delta) of the prompt (`vision.rope_index.mrope_positions`)."""
    return mrope_positions(prompt.token_ids, vcfg.image_token_id, vcfg.video_token_id, _grid(prompt.images),
                           _grid(prompt.videos), vcfg.spatial_merge_size)


def vision_features(encoder, prompt: VisionPrompt) -> VisionFeatures:
    """Runs the encoder once over the prompt's images and once over its videos."""
    def encode(processed):
        return None if processed is None else encoder.encode(processed.pixel_values, processed.grid_thw)
    return VisionFeatures(encode(prompt.images), encode(prompt.videos))


def _scatter(embeds: jax.Array, mask: jax.Array, features: jax.Array) -> jax.Array:
    """embeds [B, L, H] with the rows where mask [B, L] is True replaced, in row-major order, by features [N, H]."""
    flat = mask.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1)
    gathered = jnp.take(features.astype(embeds.dtype), index, axis=0).reshape(embeds.shape)
    return jnp.where(mask[..., None], gathered, embeds)


def scatter_features(embeds: jax.Array, input_ids: jax.Array, features: VisionFeatures,
                     vcfg: VisionConfig) -> jax.Array:
    """HF's masked scatter: image (video) features replace, in order, the embeddings of the image (video)
    placeholder tokens. embeds [B, L, H]; input_ids int [B, L]. The counts are checked by the caller
    (`check_placeholders`); inside jit a short feature array repeats its last row."""
    for token_id, rows in ((vcfg.image_token_id, features.images), (vcfg.video_token_id, features.videos)):
        if rows is not None:
            embeds = _scatter(embeds, input_ids == token_id, rows)
    return embeds


def check_placeholders(prompt: VisionPrompt, vcfg: VisionConfig) -> None:
    """Raises PlaceholderError unless the prompt has exactly as many image (video) placeholder tokens as its
    images (videos) make, in runs that fit their grids."""
    ids = np.asarray(prompt.token_ids)
    unit = vcfg.spatial_merge_size ** 2
    for name, token_id, processed in (("image", vcfg.image_token_id, prompt.images),
                                      ("video", vcfg.video_token_id, prompt.videos)):
        want = int(np.prod(_grid(processed), axis=1).sum()) // unit
        have = int(np.sum(ids == token_id))
        if have != want:
            raise PlaceholderError(f"the prompt has {have} <|{name}_pad|> tokens but its {name}s make {want} "
                                   f"({len(_grid(processed))} {name}s given)")
    prompt_positions(prompt, vcfg)


def multimodal_logits(model, encoder, prompt: VisionPrompt) -> jax.Array:
    """The full forward of one multimodal prompt (no decode state): logits [1, L, vocab]."""
    vcfg = model.config.vision
    check_placeholders(prompt, vcfg)
    ids = jnp.asarray(np.asarray(prompt.token_ids, np.int32)[None])
    embeds = scatter_features(model.embed(ids), ids, vision_features(encoder, prompt), vcfg)
    positions, _ = prompt_positions(prompt, vcfg)
    return model(ids, positions=jnp.asarray(positions)[:, None, :], embeds=embeds)
