"""Compare our logits with HF transformers' on the same checkpoint and the same random tokens.

    python -m qwen35_jax.compare_hf --hf-dir DIR [--dtype float32|bfloat16] [--seq-len N] [--batch B] [--json]
    python -m qwen35_jax.compare_hf --tiny tiny-moe      # builds a random tiny model first (the demo)

Prints max / mean abs logit error and top-1 agreement against HF in float32; exits 1 when the max error is
above tolerance. With --json the last line is one JSON object with max_abs_err, mean_abs_err, top1_agreement,
tolerance, passed (and more). Needs the `[test]` extra (torch, transformers) and an HF folder (config.json +
safetensors): export an Orbax checkpoint first with `python -m qwen35_jax.convert --to-hf`.

Tolerances (both judged against HF in float32):
- float32: both sides compute the same float32 math; they differ by summation order and library
  transcendentals, a few float32 ulps of the values involved per operation, compounding over layers. That
  scales with the activations, hence with the logits: a trained model's logits are far larger than a random
  one's. The bound is FLOAT32_RELATIVE of the largest |logit| (never below FLOAT32_RELATIVE): ~800 ulps of
  the scale, while a conversion bug (a wrong norm, a transposed or misplaced tensor, a dropped bias) moves
  logits by a sizeable fraction of it.
- bfloat16: both sides round every matmul output and residual to 8 mantissa bits, so both differ from the
  float32 forward by rounding noise, which can be large on a trained model. HF's own bf16 error (HF in bf16
  against HF in float32, same tokens) measures that noise for this checkpoint; ours must be no noisier, within
  BF16_MULTIPLE for the maximum of a different sample of the same noise (tests/test_parity.py uses the
  same bound). Ours is loaded as `load_model` loads it: on CPU that computes in float32 from the bfloat16
  weights (qwen35_jax.precision), so there only the storage rounds and ours is the less noisy side.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen35_jax.checkpoint.orbax_io import is_orbax_checkpoint
from qwen35_jax.checkpoint.safetensors_io import CheckpointError
from qwen35_jax.cli import argument_parser, command
from qwen35_jax.loading import load_model

FLOAT32_RELATIVE = 1e-4
BF16_MULTIPLE = 1.5
DTYPES = ("bfloat16", "float32")


def hf_folder(path: str | Path) -> Path:
    """`path` if it is an HF checkpoint folder; else a CheckpointError saying what it is instead."""
    path = Path(path)
    if is_orbax_checkpoint(path):
        raise CheckpointError(f"{path}: an Orbax checkpoint, but compare_hf needs an HF folder (config.json + "
                              "safetensors) that transformers can load: export one with `python -m "
                              f"qwen35_jax.convert --to-hf --ckpt {path} --out DIR` and compare DIR")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder (expected an HF checkpoint folder: config.json + safetensors)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not an HF checkpoint folder (no config.json)")
    return path


def reference():
    """qwen35_jax.hf_reference (HF transformers on torch), or an ImportError saying how to install it."""
    try:
        from qwen35_jax import hf_reference
    except ImportError as e:
        raise ImportError(f"compare_hf runs HF transformers as the reference and needs torch and transformers "
                          f"({e}): install them with `pip install -e '.[test]'`") from None
    return hf_reference


def our_logits(model, tokens: np.ndarray) -> np.ndarray:
    """int [B, L] -> float32 logits [B, L, vocab] of our model, jitted."""
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(tokens))
    return np.asarray(logits.astype(jnp.float32))


def compare(hf_dir: str | Path, dtype: str = "float32", seq_len: int = 64, batch: int = 2, seed: int = 0) -> dict:
    """Runs our model in `dtype` and HF's in float32 (and, for bfloat16, in bfloat16 too) on the same random
    tokens; returns the error figures and the tolerance (see the module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {list(DTYPES)}")
    folder, ref = hf_folder(hf_dir), reference()
    model = load_model(folder, dtype=dtype)
    tokens = ref.random_tokens(model.config.vocab_size, batch, seq_len, seed)
    ours = our_logits(model, tokens)
    del model
    hf = ref.load_hf_model(folder, "float32")
    hf_f32 = ref.hf_logits(hf, tokens)
    err = np.abs(ours - hf_f32)
    scale = float(np.abs(hf_f32).max())
    result = {"max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
              "top1_agreement": float(np.mean(ours.argmax(-1) == hf_f32.argmax(-1))), "max_abs_logit": scale,
              "dtype": dtype, "batch": batch, "seq_len": seq_len}
    if dtype == "float32":
        result["tolerance"] = FLOAT32_RELATIVE * max(1.0, scale)
        result["tolerance_rule"] = f"{FLOAT32_RELATIVE:g} x largest |logit| {scale:.3g}"
        return result
    hf_b16 = ref.hf_logits(hf.to(ref.TORCH_DTYPES["bfloat16"]), tokens)
    own = float(np.abs(hf_b16 - hf_f32).max())
    result.update(hf_bf16_err=own, hf_bf16_top1_agreement=float(np.mean(hf_b16.argmax(-1) == hf_f32.argmax(-1))),
                  max_abs_err_vs_hf_bf16=float(np.abs(ours - hf_b16).max()), tolerance=BF16_MULTIPLE * own,
                  tolerance_rule=f"{BF16_MULTIPLE:g} x HF's own bf16 error {own:.3g}")
    return result


def report(result: dict, source) -> None:
    print(f"{source}: ours in {result['dtype']} against HF in float32, batch {result['batch']} x "
          f"{result['seq_len']} tokens")
    print(f"max abs logit error  {result['max_abs_err']:.3e}  (tolerance {result['tolerance']:.3e}: "
          f"{result['tolerance_rule']})")
    print(f"mean abs logit error {result['mean_abs_err']:.3e}")
    print(f"top-1 agreement      {result['top1_agreement']:.4f}")
    if result["dtype"] == "bfloat16":
        print(f"HF bf16 vs HF fp32   max abs {result['hf_bf16_err']:.3e}, top-1 agreement "
              f"{result['hf_bf16_top1_agreement']:.4f}")
        print(f"ours vs HF bf16      max abs {result['max_abs_err_vs_hf_bf16']:.3e}")
    print("PASS" if result["passed"] else "FAIL: error above tolerance")


@command
def main(argv=None) -> int:
    parser = argument_parser("Compare our logits with HF transformers' logits.", module=__name__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", help="HF checkpoint folder (config.json + safetensors)")
    source.add_argument("--tiny", metavar="PRESET", help="build a random HF model from a preset (tiny-dense, tiny-moe)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="our model's storage dtype (computed as load_model does)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2, help="sequences")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    parser.add_argument("--tolerance", type=float,
                        help="max abs logit error allowed (default: per dtype, see the module docstring)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args(argv)
    if args.seq_len < 1 or args.batch < 1:
        parser.error("--seq-len and --batch must be >= 1")
    with contextlib.ExitStack() as cleanup:
        if args.tiny:
            hf_dir = cleanup.enter_context(reference().random_checkpoint(args.tiny))[1]  # removed after
        else:
            hf_dir = args.hf_dir
        result = compare(hf_dir, args.dtype, args.seq_len, args.batch, args.seed)
    if args.tolerance is not None:
        result["tolerance"], result["tolerance_rule"] = args.tolerance, "--tolerance"
    result["passed"] = result["max_abs_err"] <= result["tolerance"]
    report(result, args.tiny or hf_dir)
    if args.json:
        print(json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
