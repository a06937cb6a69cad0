"""Per-request host-side geometry of the ViT input (numpy): position-table taps, RoPE ids, attention segments.

All per-patch arrays are in merge-block order (architecture notes §7.3): per temporal slice of each image or
video, patches iterate over (block_row, block_col, in_row, in_col) of shape (h/m, w/m, m, m), m the spatial
merge size, which is the order the image processor emits them in.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen35_jax.config import VisionConfig


@dataclasses.dataclass(frozen=True)
class VisionGeometry:
    """The encoder's per-patch inputs for a batch of images/videos concatenated in order (N rows, padded)."""

    interp_index: np.ndarray   # int32 [N, 4]: rows of the position table mixed into each patch
    interp_weight: np.ndarray  # float32 [N, 4]: their bilinear weights (0 on padding rows)
    rope_hw: np.ndarray        # int32 [N, 2]: (row, col) of each patch in its grid (0 on padding rows)
    segment_ids: np.ndarray    # int32 [N]: attention segment, one per temporal slice from 1 (0: padding)
    n_valid: int               # real patches (the first n_valid rows)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(interp_index, interp_weight, rope_hw, segment_ids): the encoder's geometry arguments."""
        return self.interp_index, self.interp_weight, self.rope_hw, self.segment_ids


def merge_block_coords(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) int64 [h*w] of an h x w patch grid listed in merge-block order."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    return (rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1),
            cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1))


def bilinear_taps(coord: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps and weights per target coordinate when a `side`-long axis is resampled to `size` points
    with align_corners=True: source = coord * (side-1) / max(size-1, 1), taps floor and floor+1 (clamped to
    side-1), weights 1 - |source - tap| computed in float32 as HF does. coord: [n] -> int64 [n, 2], f32 [n, 2]."""
    src = coord.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    distance = np.abs(src[:, None] - floor[:, None] - offsets)
    weights = np.clip(np.float32(1) - distance, 0, None).astype(np.float32)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
    return taps, weights


def position_table_side(vcfg: VisionConfig) -> int:
    """Side of the square learned position table (48 for 2304 entries)."""
    side = int(round(vcfg.num_position_embeddings ** 0.5))
    if side * side != vcfg.num_position_embeddings:
        raise ValueError(f"num_position_embeddings={vcfg.num_position_embeddings} is not a square")
    return side


def _one_grid(t: int, h: int, w: int, vcfg: VisionConfig):
    """interp index [h*w, 4], weight [h*w, 4], rope (row, col) [h*w, 2] of one temporal slice."""
    side = position_table_side(vcfg)
    rows, cols = merge_block_coords(h, w, vcfg.spatial_merge_size)
    row_taps, row_weights = bilinear_taps(rows, h, side)
    col_taps, col_weights = bilinear_taps(cols, w, side)
    index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    return index, weight, np.stack([rows, cols], axis=-1)


def _check_grid(grid_thw: np.ndarray, vcfg: VisionConfig) -> np.ndarray:
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    merge = vcfg.spatial_merge_size
    for t, h, w in grid.tolist():
        if t < 1 or h < merge or w < merge or h % merge or w % merge:
            raise ValueError(f"grid (t, h, w) = {(t, h, w)}: t >= 1 and h, w positive multiples of the "
                             f"spatial merge size {merge} expected")
    return grid


def vision_geometry(grid_thw: np.ndarray, vcfg: VisionConfig, pad_to: int | None = None) -> VisionGeometry:
    """The geometry of images/videos with patch grids `grid_thw` [n, 3] (t, h, w), concatenated in order.

    N = sum(t*h*w) rows, or pad_to rows (>= N, a multiple of merge_size**2) when given: padding rows take table
    row 0 with weight 0, RoPE ids (0, 0) and segment 0, so they attend only to each other and never to or
    from real patches.
    """
    indices, weights, rope, segments = [], [], [], []
    segment = 1
    for t, h, w in _check_grid(grid_thw, vcfg).tolist():
        index, weight, hw = _one_grid(t, h, w, vcfg)
        indices.append(np.tile(index, (t, 1)))
        weights.append(np.tile(weight, (t, 1)))
        rope.append(np.tile(hw, (t, 1)))
        segments.append(np.repeat(np.arange(segment, segment + t), h * w))
        segment += t
    n_valid = sum(len(s) for s in segments)
    rows = n_valid if pad_to is None else pad_to
    unit = vcfg.spatial_merge_size ** 2
    if rows < n_valid or rows % unit:
        raise ValueError(f"pad_to={pad_to}: must be >= the {n_valid} patches and a multiple of {unit}")

    def stack(parts, shape, dtype):
        out = np.zeros((rows, *shape), dtype)
        if parts:
            out[:n_valid] = np.concatenate(parts)
        return out
    return VisionGeometry(stack(indices, (4,), np.int32), stack(weights, (4,), np.float32),
                          stack(rope, (2,), np.int32), stack(segments, (), np.int32), n_valid)
