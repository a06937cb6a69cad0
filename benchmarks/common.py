"""Shared pieces of the side-by-side benchmarks: offline HF, config lookup, timing, tables."""

from __future__ import annotations

import argparse
import importlib.resources
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONFIG_DIR = importlib.resources.files("benchmarks") / "configs"  # package data: NAME.json per benchmark config


def bench_config_names() -> tuple[str, ...]:
    """The benchmark configs, by name (`benchmarks/configs/NAME.json`: small-moe, small-dense)."""
    return tuple(sorted(p.name.removesuffix(".json") for p in CONFIG_DIR.iterdir() if p.name.endswith(".json")))


def bench_config(source: str) -> str:
    """A `--config` value as `hf_reference` and `ModelConfig.from_hf` read it: a config.json path or model preset
    name as given, or the path of the benchmark config of that name (`small-moe` -> benchmarks/configs/...)."""
    if not Path(source).exists() and source in bench_config_names():
        return str(CONFIG_DIR / f"{source}.json")
    return source


def add_config_arguments(parser: argparse.ArgumentParser, dtypes: bool = False) -> None:
    """`--config` (default small-moe) and, with `dtypes`, `--dtype float32,bfloat16` (a list, default float32)."""
    parser.add_argument("--config", type=bench_config, default="small-moe",
                        help=f"benchmark config name ({', '.join(bench_config_names())}), model preset name or "
                             "config.json path")
    if dtypes:
        parser.add_argument("--dtype", type=parse_dtypes, default="float32",
                            help="comma-separated: float32, bfloat16 (default float32)")


def parse_dtypes(text: str) -> list[str]:
    """`--dtype float32,bfloat16` -> ["float32", "bfloat16"] (argparse type: a bad name is a usage error)."""
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16")]
    if bad or not dtypes:
        raise argparse.ArgumentTypeError(f"{text!r}: expected float32, bfloat16 or both, comma-separated")
    return dtypes


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
