"""Shared pieces of the side-by-side benchmarks: building the same weights for HF and for us, timing."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from qwen35_jax.hf_reference import build_hf_model, save_hf_model  # noqa: E402


def same_weights(config: str, seed: int = 0):
    """(HF model, folder holding its safetensors) for a config path or preset name."""
    model = build_hf_model(config, seed=seed)
    folder = Path(tempfile.mkdtemp(prefix="qwen35-bench-"))
    save_hf_model(model, folder)
    return model, folder


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
