"""Prefill (full forward) throughput: ours vs HF transformers on the same weights, same run.

    python -m benchmarks.forward --config ../shared/bench/small-moe.json [--shapes 1x512,4x512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch
from flax import nnx

from qwen35_jax.hf_reference import random_checkpoint
from benchmarks.common import median_seconds, print_table
from qwen35_jax import load_model


def jit_forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)
    return forward, state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="HF text config.json (or preset name)")
    parser.add_argument("--shapes", default="1x512,4x512", help="comma-separated BATCHxSEQ")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    hf, folder = random_checkpoint(args.config)
    model = load_model(folder, dtype="float32")
    forward, state = jit_forward(model)
    vocab = model.config.vocab_size
    rows = []
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        tokens = np.random.default_rng(0).integers(0, vocab, (batch, seq), dtype=np.int32)
        start = time.perf_counter()
        compiled = forward.lower(state, tokens).compile()
        compile_s = time.perf_counter() - start
        ours = median_seconds(lambda: compiled(state, tokens).block_until_ready(), args.repeats)
        torch_tokens = torch.as_tensor(tokens, dtype=torch.long)
        with torch.no_grad():
            theirs = median_seconds(lambda: hf(torch_tokens), args.repeats)
        n = batch * seq
        rows.append([shape, f"{n / theirs:.0f}", f"{n / ours:.0f}", f"{theirs / ours:.2f}x", f"{compile_s:.1f}"])
    print(f"prefill tokens/s, float32, CPU ({jax.device_count()} JAX devices, torch {torch.get_num_threads()} "
          f"threads), median of {args.repeats}; config {args.config}")
    print_table(["batch x seq", "HF tok/s", "ours tok/s", "ours/HF", "jit compile s"], rows)


if __name__ == "__main__":
    main()
