"""mRoPE position ids of a multimodal prompt (T/H/W), as HF's `Qwen3_5Model.get_rope_index` computes them.

Text tokens advance all three axes together. A run of image placeholders with merged grid (t, h, w) gets
T = start + frame, H = start + row, W = start + col, and the text after it continues at start + max(h, w).
A video is split per temporal group (each group's placeholders sit in their own `<t seconds>` run), every group
starting at the current text position. The decode state keeps `rope_delta` = (last position + 1) - prompt length,
so that token i after the prompt sits at position i + rope_delta on all three axes.
"""

from __future__ import annotations

import numpy as np


class PlaceholderError(ValueError):
    """The prompt's image / video placeholders do not match the images / videos given."""


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[(start, end)] of the runs of True in a bool [L] mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _vision_positions(start: int, t: int, h: int, w: int) -> np.ndarray:
    """int64 [3, t*h*w] positions of one merged grid (row-major over t, h, w) starting at `start`."""
    grid = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([g.reshape(-1) for g in grid]) + start


def _grids(image_grid_thw, video_grid_thw, merge: int) -> dict[str, list[tuple[int, int, int]]]:
    """Merged (t, h, w) per placeholder run, in order: one per image, one per temporal group of each video."""
    images = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in np.reshape(image_grid_thw, (-1, 3))]
    videos = [(1, int(h) // merge, int(w) // merge) for t, h, w in np.reshape(video_grid_thw, (-1, 3))
              for _ in range(int(t))]
    return {"image": images, "video": videos}


def mrope_positions(input_ids, image_token_id: int, video_token_id: int, image_grid_thw=(), video_grid_thw=(),
                    spatial_merge_size: int = 2) -> tuple[np.ndarray, int]:
    """One prompt's positions. input_ids: int [L]; *_grid_thw: int [n, 3] patch grids (before merging), in the
    order the placeholders appear. Returns (int32 [3, L] positions, rope_delta). Raises PlaceholderError when
    a placeholder run's length differs from its grid's token count, or runs and grids differ in number."""
    ids = np.asarray(input_ids).reshape(-1)
    grids = _grids(image_grid_thw, video_grid_thw, spatial_merge_size)
    kind = np.where(ids == image_token_id, 1, np.where(ids == video_token_id, 2, 0))
    runs = sorted([(s, e, "image") for s, e in _runs(kind == 1)] + [(s, e, "video") for s, e in _runs(kind == 2)])
    for name in ("image", "video"):
        n_runs = sum(1 for r in runs if r[2] == name)
        if n_runs != len(grids[name]):
            unit = "images" if name == "image" else "video frame groups"
            raise PlaceholderError(f"the prompt has {n_runs} runs of {name} placeholders but {len(grids[name])} "
                                   f"{unit} were given: each {name} needs exactly one run of "
                                   f"<|{name}_pad|> tokens (the chat template's {name} content part)")
    pieces, pos, cursor, used = [], 0, 0, {"image": 0, "video": 0}
    for start, end, name in runs:
        pieces.append(np.arange(start - cursor)[None].repeat(3, 0) + pos)
        pos += start - cursor
        t, h, w = grids[name][used[name]]
        if end - start != t * h * w:
            raise PlaceholderError(f"{name} {used[name]} has {end - start} placeholder tokens but its grid "
                                   f"{(t, h * spatial_merge_size, w * spatial_merge_size)} needs {t * h * w}")
        used[name] += 1
        pieces.append(_vision_positions(pos, t, h, w))
        pos += max(h, w)
        cursor = end
    pieces.append(np.arange(len(ids) - cursor)[None].repeat(3, 0) + pos)
    positions = np.concatenate(pieces, axis=1).astype(np.int32)
    return positions, int(positions.max(initial=-1)) + 1 - len(ids)
