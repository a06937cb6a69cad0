"""Writes benchmarks/dryrun_table.md: does each job fit, and how good is its step, on real slices.

    python -m benchmarks.dryrun_table [--out benchmarks/dryrun_table.md] [--rows 397b] [--no-tpu] [--no-gpu]

Each row runs `python -m qwen35_jax.dryrun` in fresh processes: once on fake CPU devices (XLA:CPU's memory
analysis: an estimate) and, where libtpu is installed (Python 3.12+: `pip install 'qwen35-jax[tpu]'`), once
compiled for the real TPU slice (the TPU compiler's own figures). Train rows compile `train.step.Trainer`'s step
(bf16 compute, float32 master weights + AdamW, remat full, chunked loss); decode rows the engine's decode step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

# (model, job, slice name (v5p names count TensorCores: v5p-64 = 32 chips), chips, chip, HBM, mesh, mode, batch,
#  seq, extra dry-run arguments)
ROWS = [
    ("qwen3.5-397b-a17b", "full FT", "v5p-256", 128, "v5p", "95GiB", "fsdp=32,expert=4", "train", 128, 4096, []),
    ("qwen3.5-397b-a17b", "decode 32K", "v5p-64", 32, "v5p", "95GiB", "expert=16,tensor=2", "decode", 64, 32768, []),
    ("qwen3.5-397b-a17b", "LoRA r16", "8x H200", 8, "h200", "141GiB", "expert=8", "train", 8, 4096,
     ["lora=LORA", "param_dtype=bfloat16"]),
    ("qwen3.5-35b-a3b", "LoRA r16", "1x H200", 1, "h200", "141GiB", "fsdp=1", "train", 8, 4096,
     ["lora=LORA", "param_dtype=bfloat16"]),
    ("qwen3.5-122b-a10b", "full FT", "v5p-256", 128, "v5p", "95GiB", "fsdp=32,expert=4", "train", 128, 4096, []),
    ("qwen3.5-35b-a3b", "full FT", "v5p-64", 32, "v5p", "95GiB", "fsdp=8,expert=4", "train", 128, 4096, []),
]
LORA = '{rank: 16, alpha: 32, targets: [self_attn, linear_attn, shared_expert, mlp.experts]}'  # all LoRA targets


def dryrun(row, platform: str) -> dict:
    """One dry-run in a fresh process; platform: cpu (fake devices), tpu (the slice, libtpu) or gpu (the GPU
    compiler, devices beyond the machine's mocked)."""
    model, _, slice_name, chips, chip, hbm, mesh, mode, batch, seq, extra = row
    where = {"tpu": ["--topology", slice_name], "cpu": ["--devices", str(chips)],
             "gpu": ["--platform", "gpu", "--devices", str(chips)]}[platform]
    extra = [e.replace("LORA", LORA) for e in extra]
    cmd = [sys.executable, "-m", "qwen35_jax.dryrun", "--model", model, *where, "--mesh", mesh, "--mode", mode,
           "--batch", str(batch), "--seq", str(seq), "--hbm", hbm, "--chip", chip, "--json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1][:300] if lines else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n) -> str:
    return f"{n / 2**30:.1f}"


def cells(r: dict | None) -> list[str]:
    if r is None:
        return ["n/a"] * 6
    if "error" in r:
        return [f"error: {r['error']}"] + [""] * 5
    state = r.get("optimizer_state_bytes_per_device", r.get("decode_state_bytes_per_device", 0))
    params = r["params_bytes_per_device"] + r.get("frozen_params_bytes_per_device", 0)
    return [gib(params), gib(state), gib(r["temp_bytes_per_device"]), gib(r["total_bytes_per_device"]),
            "yes" if r["fits"] else "**no**", f"{r['compile_seconds']:.0f}"]


def row_line(row, cpu: dict, tpu: dict | None) -> str:
    """FLOPs, step time and MFU come from the CPU compile: XLA:TPU rewrites matmuls into (base-dilated)
    convolutions and the grouped matmul counts its whole receive buffer, so its HLO overstates FLOPs."""
    model, job, slice_name, chips, chip, hbm, mesh, mode, batch, seq, _ = row
    best = cpu
    flops = ratio = step = mfu = ""
    if "error" not in best:
        per_device = best["flops_per_device"]
        flops = f"{per_device:.2e}"
        ratio = f"{per_device * chips / best['model_flops']:.2f}"
        step = f"{best['estimated_step_s'] * 1e3:.0f}"
        mfu = f"{100 * best['estimated_mfu']:.0f}%" if mode == "train" else ""
    return " | ".join([f"| {model}", job, f"{slice_name} ({chips} chips)", mesh, f"{batch} x {seq}", hbm,
                       *cells(cpu), *cells(tpu), flops, ratio, step, mfu]) + " |"


PREAMBLE = """# Dry-run table

Written by `python -m benchmarks.dryrun_table` (raw reports: `dryrun_table.jsonl`). Each row compiles the step users
run (`train.step.Trainer`'s train step: bf16 compute, float32 master weights + AdamW, remat full, chunked loss; or
`infer.Engine`'s decode step with its own decode-state placement), with abstract arrays, twice: for fake CPU devices
(XLA:CPU's memory analysis, an estimate: CPU upcasts bf16 matmul operands, so its temporaries read high) and, where
the slice is a TPU one, for the real slice by the TPU compiler (libtpu, ahead of time), or where it is a GPU one,
by the GPU compiler on a machine with one NVIDIA GPU (`--platform gpu`: more GPUs than present are mocked hosts;
H200 rows: jax 0.11.2 on one H200, run when a GPU was lent). Slices are named as sold:
TPU v5p names count TensorCores (v5p-256 = 128 chips), v5e / v6e names count chips. "total" = arguments + temporaries
(+ outputs not aliased to donated inputs) per chip at the step's peak; "fits" compares it with the chip's HBM.
FLOPs/device are counted from the CPU-compiled HLO with while-loop trip counts (`qwen35_jax.hlo_cost`; the CPU MoE's
grouped-matmul loops have data-dependent trip counts and count once, the remat recompute counts in full); "x chips /
model FLOPs" near 1 means no device repeats another's work. The step time (compute at the chip's peak + collective
bytes over its interconnect, no overlap, the compute at least the analytic FLOPs at peak; the CPU collectives move padded all-to-all blocks) and MFU
(analytic model FLOPs without recompute / (chips x peak x step): an upper bound, 100% when a one-chip step has no collectives) are rough estimates for the named chip.

"""

HEADER = ["| model | job | slice | mesh | batch | HBM/chip | CPU: params GiB | CPU: opt/state GiB | CPU: temp GiB "
          "| CPU: total GiB | CPU: fits | CPU: compile s | TPU/GPU compiler: params GiB | opt/state GiB | temp GiB | "
          "total GiB | fits | compile s | FLOPs/device | x chips / model FLOPs | est. step ms | "
          "est. MFU |", "|" + "---|" * 22]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("dryrun_table.md")))
    parser.add_argument("--rows", default="", help="only rows whose model name contains this")
    parser.add_argument("--no-tpu", action="store_true", help="skip the TPU-topology compiles")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU compiles (run only where nvidia-smi is)")
    parser.add_argument("--reports", default=str(Path(__file__).with_name("dryrun_table.jsonl")),
                        help="raw dry-run reports, one JSON line per row and platform; rows already there are "
                             "reused (delete the file to recompile everything)")
    parser.add_argument("--cached-only", action="store_true", help="render the rows already in --reports only")
    args = parser.parse_args(argv)
    from qwen35_jax.topology import has_libtpu
    tpu_ok = has_libtpu() and not args.no_tpu
    gpu_ok = shutil.which("nvidia-smi") is not None and not args.no_gpu
    reports = _read_reports(Path(args.reports))
    lines = list(HEADER)
    for row in ROWS:
        if args.rows not in row[0]:
            continue
        results = {}
        chip_platform = "tpu" if row[2].startswith(("v5", "v6")) else "gpu"
        for platform in (chip_platform, "cpu"):
            key = f"{row[0]} | {row[1]} | {row[2]} | {platform}"
            available = {"cpu": True, "tpu": tpu_ok, "gpu": gpu_ok}[platform]
            if key not in reports and available and not args.cached_only:
                reports[key] = dryrun(row, platform)
                with open(args.reports, "a") as f:
                    f.write(json.dumps({"key": key, "report": reports[key]}) + "\n")
            results[platform] = reports.get(key)
        if results["cpu"] is None:  # --cached-only and never compiled
            continue
        lines.append(row_line(row, results["cpu"], results[chip_platform]))
        print(lines[-1], flush=True)
        Path(args.out).write_text(PREAMBLE + "\n".join(lines) + "\n")


def _read_reports(path: Path) -> dict:
    if not path.exists():
        return {}
    return {entry["key"]: entry["report"] for entry in map(json.loads, path.read_text().splitlines())}


if __name__ == "__main__":
    main()
