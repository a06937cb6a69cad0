"""Convert checkpoints between HF safetensors and Orbax.

    python -m qwen35_jax.convert --hf-dir DIR --out CKPT [--dtype bfloat16|float32|keep] [--resume] [--overwrite]
    python -m qwen35_jax.convert --to-hf --ckpt CKPT --out DIR

HF -> Orbax checks every tensor name and shape against config.json first (one error listing all problems),
then streams one tensor group at a time into a staging folder that is renamed to CKPT only when complete.
An interrupted conversion leaves nothing loadable at CKPT; --resume (or a plain rerun) clears what it left
and starts again from the first tensor.
"""

from __future__ import annotations

import sys

from qwen35_jax.checkpoint.orbax_io import convert_hf_to_orbax, export_to_hf
from qwen35_jax.cli import argument_parser, command


@command
def main(argv=None) -> int:
    parser = argument_parser("Convert Qwen3.5 checkpoints between HF safetensors and Orbax.", module=__name__)
    parser.add_argument("--hf-dir", help="HF checkpoint folder to convert to Orbax")
    parser.add_argument("--to-hf", action="store_true", help="export an Orbax checkpoint (--ckpt) to HF")
    parser.add_argument("--ckpt", help="Orbax checkpoint to export (with --to-hf)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "keep"], default="bfloat16",
                        help="stored dtype of floating tensors (keep: as in the HF files)")
    parser.add_argument("--resume", action="store_true",
                        help="after an interrupted conversion: clear what it left and redo it (a plain rerun does "
                             "the same; the flag is accepted so scripts can say what they mean)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--shard-size-gb", type=float, default=5.0, help="safetensors shard size (--to-hf)")
    args = parser.parse_args(argv)
    if args.to_hf == bool(args.hf_dir):
        parser.error("give either --hf-dir DIR (HF -> Orbax) or --to-hf --ckpt CKPT (Orbax -> HF)")
    if args.to_hf and not args.ckpt:
        parser.error("--to-hf needs --ckpt CKPT")
    if args.to_hf:
        out = export_to_hf(args.ckpt, args.out, int(args.shard_size_gb * 2**30), overwrite=args.overwrite)
    else:
        out = convert_hf_to_orbax(args.hf_dir, args.out, args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
