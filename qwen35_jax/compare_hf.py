"""Compare our logits with HF transformers' on the same checkpoint and the same random tokens.

    python -m qwen35_jax.compare_hf --hf-dir DIR [--dtype float32|bfloat16] [--seq-len N] [--batch B] [--json]
    python -m qwen35_jax.compare_hf --tiny tiny-moe      # builds a random tiny model first (the demo)

Prints max / mean abs logit error and top-1 agreement; exits 1 when the max error is above tolerance.
With --json the last line is one JSON object with max_abs_err, mean_abs_err, top1_agreement (and more).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# float32: both sides compute the same math in fp32; 1e-4 leaves room for summation order over many layers.
# bfloat16: both sides round every matmul output and residual to bf16 (8 mantissa bits, relative step 2^-8);
# differences in rounding order compound over layers, so allow a few bf16 steps of the largest logit.
TOLERANCE = {"float32": lambda scale: 1e-4, "bfloat16": lambda scale: 4 * 2.0**-8 * max(1.0, scale)}


def compare(hf_dir: str | Path, dtype: str = "float32", seq_len: int = 64, batch: int = 2, seed: int = 0) -> dict:
    """Runs both models on the same random tokens; returns the error figures."""
    from qwen35_jax import load_model
    from qwen35_jax.hf_reference import hf_logits, load_hf_model, random_tokens

    ours = load_model(hf_dir, dtype=dtype)
    tokens = random_tokens(ours.config.vocab_size, batch, seq_len, seed)
    graphdef, state = nnx.split(ours)
    ours_logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(tokens))
    ours_logits = np.asarray(ours_logits.astype(jnp.float32))
    ref = hf_logits(load_hf_model(hf_dir, dtype), tokens)
    err = np.abs(ours_logits - ref)
    scale = float(np.abs(ref).max())
    return {
        "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
        "top1_agreement": float(np.mean(ours_logits.argmax(-1) == ref.argmax(-1))),
        "max_abs_logit": scale, "tolerance": TOLERANCE[dtype](scale),
        "dtype": dtype, "batch": batch, "seq_len": seq_len,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compare our logits with HF transformers' logits.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", help="HF checkpoint folder (config.json + safetensors)")
    source.add_argument("--tiny", metavar="PRESET", help="build a random HF model from a preset (tiny-dense, tiny-moe)")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, help="max abs logit error allowed (default: per dtype)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args(argv)
    if args.seq_len < 1 or args.batch < 1:
        parser.error("--seq-len and --batch must be >= 1")
    with contextlib.ExitStack() as cleanup:
        if args.tiny:
            from qwen35_jax.hf_reference import random_checkpoint
            hf_dir = cleanup.enter_context(random_checkpoint(args.tiny))[1]  # a temporary folder, removed after
        else:
            hf_dir = args.hf_dir
        result = compare(hf_dir, args.dtype, args.seq_len, args.batch, args.seed)
    if args.tolerance is not None:
        result["tolerance"] = args.tolerance
    result["passed"] = result["max_abs_err"] <= result["tolerance"]
    print(f"{hf_dir}: {args.dtype}, batch {args.batch} x {args.seq_len} tokens")
    print(f"max abs logit error  {result['max_abs_err']:.3e}  (tolerance {result['tolerance']:.1e}, "
          f"largest |logit| {result['max_abs_logit']:.3f})")
    print(f"mean abs logit error {result['mean_abs_err']:.3e}")
    print(f"top-1 agreement      {result['top1_agreement']:.4f}")
    print("PASS" if result["passed"] else "FAIL: error above tolerance")
    if args.json:
        print(json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
