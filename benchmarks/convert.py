"""HF -> Orbax conversion: throughput and peak memory, beside HF transformers loading the same folder.

    python -m benchmarks.convert [--layers 8] [--workdir DIR] [--keep]

Builds a synthetic HF checkpoint of a mid-size MoE config (random bf16, released layout: fused experts,
several shards), converts it in a subprocess, then loads it with `from_pretrained` in another, and prints
MB/s and peak RSS of each (from the child's rusage). Target: conversion peak RSS < 2 x largest tensor + 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from benchmarks.common import print_table
from qwen35_jax.checkpoint.hf_loader import abstract_model, layer_shape
from qwen35_jax.checkpoint.names import checkpoint_rules
from qwen35_jax.config import ModelConfig

MID_MOE = {
    "model_type": "qwen3_5_moe_text", "vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 8,
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 1024,
    "shared_expert_intermediate_size": 1024, "tie_word_embeddings": False, "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
}


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of the released layout with its shape (via the name table)."""
    _, _, variables = abstract_model(cfg, jnp.float32)
    shapes = {}
    for rule in checkpoint_rules(cfg):
        ours = [jax.ShapeDtypeStruct(layer_shape(variables[p], rule), jnp.float32) for p in rule.ours]
        for name, s in zip(rule.hf, jax.eval_shape(rule.to_hf, *ours)):
            shapes[name] = s.shape
    return shapes


def write_synthetic(folder: Path, cfg: ModelConfig, shard_bytes: int) -> tuple[int, int]:
    """Random bf16 tensors in shards; returns (total bytes, largest tensor bytes)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**MID_MOE, "num_hidden_layers": cfg.num_hidden_layers,
                                                    "architectures": ["Qwen3_5MoeForCausalLM"],
                                                    "layer_types": list(cfg.layer_types)}))
    rng = np.random.default_rng(0)
    shard, shard_size, weight_map, files, total, largest = {}, 0, {}, [], 0, 0

    def flush():
        nonlocal shard, shard_size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, folder / name)
        files.append((name, list(shard)))
        shard, shard_size = {}, 0

    for name, shape in hf_tensor_shapes(cfg).items():
        bits = rng.integers(0x3C00, 0x3F00, size=shape, dtype=np.uint16)  # finite bf16 values near 0.01..1
        shard[name] = bits.view(ml_dtypes.bfloat16)
        shard_size += bits.nbytes
        total, largest = total + bits.nbytes, max(largest, bits.nbytes)
        if shard_size >= shard_bytes:
            flush()
    if shard:
        flush()
    for i, (name, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(folder / name, folder / final)
        weight_map.update({n: final for n in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return total, largest


def run_measured(args: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{args} failed with status {status}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


HF_LOAD = ("import sys, torch; from transformers import Qwen3_5MoeForCausalLM; "
           "Qwen3_5MoeForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="an empty or new folder for the files (default: a temporary folder)")
    parser.add_argument("--layers", type=int, default=8, help="layers of the synthetic model (8: ~4.9 GB)")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args(argv)
    if args.workdir and Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty; give an empty or new folder")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qwen35-convert-bench-"))
    try:
        measure(work, args.layers)
    finally:
        if args.keep:
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def measure(work: Path, layers: int) -> None:
    cfg = ModelConfig.from_hf({**MID_MOE, "num_hidden_layers": layers})
    total, largest = write_synthetic(work / "hf", cfg, shard_bytes=1 << 30)
    ours_s, ours_rss = run_measured([sys.executable, "-m", "qwen35_jax.convert", "--hf-dir", str(work / "hf"),
                                     "--out", str(work / "orbax"), "--dtype", "keep"])
    hf_s, hf_rss = run_measured([sys.executable, "-c", HF_LOAD, str(work / "hf")])
    mb = total / 2**20
    gib = 2**30
    print(f"synthetic MoE checkpoint: {total / gib:.2f} GiB in {len(list((work / 'hf').glob('*.safetensors')))} "
          f"shards, largest tensor {largest / gib:.2f} GiB; target peak RSS < {(2 * largest + gib) / gib:.2f} GiB")
    print_table(["", "seconds", "MB/s", "peak RSS GiB"], [
        ["ours: convert HF -> Orbax", f"{ours_s:.1f}", f"{mb / ours_s:.0f}", f"{ours_rss / gib:.2f}"],
        ["HF transformers: from_pretrained", f"{hf_s:.1f}", f"{mb / hf_s:.0f}", f"{hf_rss / gib:.2f}"],
    ])


if __name__ == "__main__":
    main()
