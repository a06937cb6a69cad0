"""Writes benchmarks/dryrun_table.md: per-device memory of every MoE preset on real accelerator slices.

    python -m benchmarks.dryrun_table [--out benchmarks/dryrun_table.md] [--models 397b]

Each row runs `python -m qwen35_jax.dryrun` in a fresh process (its own fake-device count): decode (batch 64,
32K context) and train (global batch 256 x 4096, remat full, AdamW in float32), compiled on this CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SLICES = [  # name, chips, HBM per chip, {mode: mesh}: decode favours expert x tensor, training data parallelism
    ("TPU v5p-64", 64, "95GiB", {"decode": "expert=16,tensor=4", "train": "fsdp=16,expert=4"}),
    ("TPU v5p-256", 256, "95GiB", {"decode": "data=4,expert=16,tensor=4", "train": "fsdp=64,expert=4"}),
    ("TPU v5e-256", 256, "16GiB", {"decode": "data=4,expert=16,tensor=4", "train": "fsdp=64,expert=4"}),
    ("8x H200", 8, "141GiB", {"decode": "expert=4,tensor=2", "train": "fsdp=2,expert=4"}),
]
MODELS = ["qwen3.5-35b-a3b", "qwen3.5-122b-a10b", "qwen3.5-397b-a17b"]
MODES = [("decode", 64, 32768), ("train", 256, 4096)]


def dryrun(model, chips, hbm, mesh, mode, batch, seq) -> dict:
    out = subprocess.run([sys.executable, "-m", "qwen35_jax.dryrun", "--model", model, "--devices", str(chips),
                          "--mesh", mesh, "--mode", mode, "--batch", str(batch), "--seq", str(seq), "--hbm", hbm,
                          "--json"], capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n) -> str:
    return f"{n / 2**30:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("dryrun_table.md")))
    parser.add_argument("--models", default=",".join(m.split("-", 1)[1] for m in MODELS),
                        help="comma-separated suffixes, e.g. 397b-a17b")
    args = parser.parse_args(argv)
    models = [m for m in MODELS if m.split("-", 1)[1] in args.models.split(",")]
    lines = ["# Dry-run table", "",
             "Per-device bytes from `python -m qwen35_jax.dryrun` (fake CPU devices, abstract arrays, XLA memory "
             "analysis of the compiled step; MoE compiled with the blocked grouped matmul). Decode: batch 64, 32K "
             "context, bf16 weights. Train: global batch 256 x 4096, float32 weights + AdamW, remat full. "
             "Regenerate with `python -m benchmarks.dryrun_table`.", "",
             "| model | slice | mesh | mode | params GiB | opt/state GiB | temp GiB | total GiB | HBM | fits | "
             "compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        for name, chips, hbm, meshes in SLICES:
            for mode, batch, seq in MODES:
                mesh = meshes[mode]
                r = dryrun(model, chips, hbm, mesh, mode, batch, seq)
                if "error" in r:
                    row = f"| {model} | {name} | {mesh} | {mode} | error: {r['error']} |||||||"
                else:
                    extra = r.get("optimizer_state_bytes_per_device", r.get("decode_state_bytes_per_device", 0))
                    row = (f"| {model} | {name} | {mesh} | {mode} | {gib(r['params_bytes_per_device'])} | "
                           f"{gib(extra)} | {gib(r['temp_bytes_per_device'])} | {gib(r['total_bytes_per_device'])} | "
                           f"{hbm} | {'yes' if r['fits'] else 'no'} | {r['compile_seconds']:.0f} |")
                print(row, flush=True)
                lines.append(row)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
