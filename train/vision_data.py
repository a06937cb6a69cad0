"""Training documents with images and videos: chat `messages` whose contents hold image / image_url / video parts
(the parts `qwen35_jax.vision.chat` reads) -> token ids with expanded placeholders, loss flags, mRoPE positions and
the processed pixels -> packed rows -> batches carrying the encoder's inputs.

The loss mask is the text one (`train.data`: only assistant replies are learned); placeholder tokens are never
learned, wherever they sit. A document with images or videos is never split (its placeholders and positions
belong together): one longer than seq_len is an error naming it.

A vision batch adds to the text fields (`positions` then is int32 [B, 3, L], the mRoPE T/H/W positions):
    vision_index int32 [B, L]: each token's row of the batch's encoder output, -1 for text;
    pixel_values float32 [P, C*T*p*p]: the batch's images and videos in row order, padded to a patch bucket
        (`vision.encoder.patch_bucket`, so a new total compiles the step only at a new bucket);
    interp_index, interp_weight, rope_hw, vision_segments: their geometry (`vision.geometry.vision_geometry`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen35_jax.config import VisionConfig
from qwen35_jax.vision.chat import collect_media, expand_placeholders_in_pieces
from qwen35_jax.vision.encoder import patch_bucket
from qwen35_jax.vision.geometry import vision_geometry
from qwen35_jax.vision.multimodal import VisionPrompt, check_placeholders, feature_index, grids_of, prompt_positions
from qwen35_jax.vision.processing import (ImageProcessorConfig, VideoProcessorConfig, VisionInputError,
                                          process_images, process_videos)
from qwen35_jax.vision.rope_index import PlaceholderError
from train.data import DataError, place_pieces

VISION_BATCH_KEYS = ("vision_index", "pixel_values", "interp_index", "interp_weight", "rope_hw", "vision_segments")


@dataclasses.dataclass(frozen=True)
class VisionData:
    """What turning images and videos into training rows needs: the tower's config and the processors'."""

    config: VisionConfig
    image: ImageProcessorConfig = ImageProcessorConfig()
    video: VideoProcessorConfig = VideoProcessorConfig()


@dataclasses.dataclass
class VisionDocument:
    """One tokenized document with its images and videos (n tokens, F vision features, N patches)."""

    ids: np.ndarray            # int32 [n]
    learn: np.ndarray          # bool [n]
    positions: np.ndarray      # int32 [3, n] mRoPE positions
    features: np.ndarray       # int32 [n]: the token's row of this document's encoder output, -1 for text
    pixel_values: np.ndarray   # float32 [N, C*T*p*p]: its images, then its videos
    grids: np.ndarray          # int64 [items, 3]

    @classmethod
    def text(cls, ids: np.ndarray, learn: np.ndarray, patch_dim: int) -> "VisionDocument":
        """A text-only document (positions 0..n-1 on all three axes)."""
        n = len(ids)
        return cls(np.asarray(ids, np.int32), np.asarray(learn, bool), np.tile(np.arange(n, dtype=np.int32), (3, 1)),
                   np.full(n, -1, np.int32), np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int64))


def patch_dim(vcfg: VisionConfig) -> int:
    """Values per patch vector: C * T * p * p."""
    return vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2


def tokenize_vision_chat(messages: list[dict], tokenizer, vision: VisionData, chat_pieces, where: str
                         ) -> VisionDocument:
    """A conversation with media -> VisionDocument. `chat_pieces(messages) -> [(text, learn), ...]` cuts the
    template's render into loss-masked pieces (`train.data`); the pads in them are expanded across the pieces in
    order and the pieces encoded one by one, so the mask stays exact. Errors raise DataError naming `where`."""
    at = f"{where}: " if where else ""
    vcfg = vision.config
    try:
        template_messages, image_sources, clips = collect_media(messages, vision.video)
        images = process_images(image_sources, vision.image) if image_sources else None
        videos = process_videos(clips, vision.video) if clips else None
        pieces = chat_pieces(template_messages)
        texts = expand_placeholders_in_pieces([text for text, _ in pieces], images, videos, vcfg.spatial_merge_size)
        encoded = [(tokenizer.encode(text), learn) for text, (_, learn) in zip(texts, pieces) if text]
        ids = np.asarray([i for piece, _ in encoded for i in piece], np.int32)
        learn = np.asarray([flag for piece, flag in encoded for _ in piece], bool)
        prompt = VisionPrompt(ids, images, videos)
        check_placeholders(prompt, vcfg)
    except (VisionInputError, PlaceholderError) as e:
        raise DataError(f"{at}{e}") from None
    learn &= (ids != vcfg.image_token_id) & (ids != vcfg.video_token_id)
    positions, _ = prompt_positions(prompt, vcfg)
    pixels = [p.pixel_values for p in (images, videos) if p is not None]
    return VisionDocument(ids, learn, np.asarray(positions, np.int32), feature_index(prompt, vcfg),
                          np.concatenate(pixels).astype(np.float32),
                          np.concatenate([grids_of(images), grids_of(videos)]))


def pack_vision_documents(docs: list[VisionDocument], seq_len: int, where: list[str]
                          ) -> tuple[dict[str, np.ndarray], list[list[VisionDocument]]]:
    """Documents packed as `train.data.pack_documents` packs them (first-fit in order), plus mRoPE positions
    [rows, 3, seq_len] and `vision_index` [rows, seq_len] (row-local: the documents' features in placement order).
    Returns (rows, per row its documents with media, in placement order)."""
    for doc, name in zip(docs, where):
        if len(doc.ids) > seq_len:
            raise DataError(f"{name}: {len(doc.ids)} tokens with images or videos, longer than seq_len {seq_len} (a "
                            "document with media is never split: use a larger seq_len or smaller images)")
    docs = [doc for doc in docs if len(doc.ids) >= 2]
    rows, places = place_pieces([(doc.ids, doc.learn) for doc in docs], seq_len)
    num_rows = len(rows["input_ids"])
    rows["positions"] = np.zeros((num_rows, 3, seq_len), np.int32)
    rows["vision_index"] = np.full((num_rows, seq_len), -1, np.int32)
    media: list[list[VisionDocument]] = [[] for _ in range(num_rows)]
    features = np.zeros(num_rows, np.int32)
    for doc, (row, offset) in zip(docs, places):
        span = slice(offset, offset + len(doc.ids))
        rows["positions"][row, :, span] = doc.positions
        rows["vision_index"][row, span] = np.where(doc.features >= 0, doc.features + features[row], -1)
        if len(doc.grids):
            media[row].append(doc)
            features[row] += int(np.sum(doc.features >= 0))
    return rows, media


def vision_batch(media: list[list[VisionDocument]], vision_index: np.ndarray, vcfg: VisionConfig
                 ) -> dict[str, np.ndarray]:
    """The encoder inputs of a batch of rows: `media` (per row of the batch, its documents with media) and the
    rows' row-local `vision_index` [B, L] -> the VISION_BATCH_KEYS arrays (see the module doc)."""
    docs = [doc for row in media for doc in row]
    per_row = np.asarray([sum(int(np.sum(d.features >= 0)) for d in row) for row in media], np.int32)
    offsets = np.concatenate([[0], np.cumsum(per_row)[:-1]]).astype(np.int32)
    index = np.where(vision_index >= 0, vision_index + offsets[:, None], -1).astype(np.int32)
    grids = np.concatenate([d.grids for d in docs]) if docs else np.zeros((0, 3), np.int64)
    n_patches = int(np.prod(grids, axis=1).sum())
    bucket = patch_bucket(n_patches)
    pixels = np.zeros((bucket, patch_dim(vcfg)), np.float32)
    if docs:
        pixels[:n_patches] = np.concatenate([d.pixel_values for d in docs])
    geometry = vision_geometry(grids, vcfg, pad_to=bucket)
    interp_index, interp_weight, rope_hw, segments = geometry.arrays()
    return {"vision_index": index, "pixel_values": pixels, "interp_index": interp_index,
            "interp_weight": interp_weight, "rope_hw": rope_hw, "vision_segments": segments}
