"""Prefill (full forward) throughput: ours vs HF transformers on the same weights, same run.

    python -m benchmarks.forward [--config small-moe] [--dtype float32,bfloat16] [--shapes 1x512,4x512] [--repeats 5]

--config: a benchmark config name (benchmarks/configs/: small-moe, small-dense), a model preset name or a
config.json path. --dtype: one row per dtype and shape; both sides hold and run the weights in that dtype.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch
from flax import nnx

from benchmarks.common import add_config_arguments, median_seconds, print_table
from qwen35_jax import load_model
from qwen35_jax.hf_reference import TORCH_DTYPES, random_checkpoint


def jit_forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)
    return forward, state


def measure(hf, folder, dtype: str, shapes: list[tuple[int, int]], repeats: int) -> list[list]:
    """Table rows [dtype, shape, HF tok/s, ours tok/s, ratio, compile s] for one dtype."""
    model = load_model(folder, dtype=dtype)
    forward, state = jit_forward(model)
    hf = hf.to(TORCH_DTYPES[dtype])
    rows = []
    for batch, seq in shapes:
        tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq), dtype=np.int32)
        start = time.perf_counter()
        compiled = forward.lower(state, tokens).compile()
        compile_s = time.perf_counter() - start
        ours = median_seconds(lambda: compiled(state, tokens).block_until_ready(), repeats)
        torch_tokens = torch.as_tensor(tokens, dtype=torch.long)
        with torch.no_grad():
            theirs = median_seconds(lambda: hf(torch_tokens), repeats)
        n = batch * seq
        rows.append([dtype, f"{batch}x{seq}", f"{n / theirs:.0f}", f"{n / ours:.0f}", f"{theirs / ours:.2f}x",
                     f"{compile_s:.1f}"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, dtypes=True)
    parser.add_argument("--shapes", default="1x512,4x512", help="comma-separated BATCHxSEQ")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]

    with random_checkpoint(args.config) as (hf, folder):
        rows = [row for dtype in args.dtype for row in measure(hf, folder, dtype, shapes, args.repeats)]
    print(f"prefill tokens/s, CPU ({jax.device_count()} JAX devices, torch {torch.get_num_threads()} threads), "
          f"median of {args.repeats}; config {args.config}")
    print_table(["dtype", "batch x seq", "HF tok/s", "ours tok/s", "ours/HF", "jit compile s"], rows)


if __name__ == "__main__":
    main()
