"""Sharding dry-run of the steps users run, for any model on any mesh, with nothing the model's size allocated.

    python -m qwen35_jax.dryrun --model qwen3.5-397b-a17b --mode train|prefill|decode --mesh fsdp=32,expert=4 \\
        (--devices 128 | --topology v5p-256 | --platform gpu --devices 8) [--batch B] [--seq S] [--chip v5p]
        [--config RECIPE] [--json]
    python -m train.finetune --config RECIPE --dry-run --devices N --mesh SPEC

train: `train.step.Trainer`'s own jitted step built from a TrainConfig (loss chunking, router losses, gradient
accumulation, compute dtype, remat, frozen groups, LoRA); without --config the recipe the fit table uses:
bfloat16 compute, float32 master weights + AdamW, remat full, chunked loss. prefill / decode: `infer.Engine`'s
own prefill-chunk and decode steps with its decode-state placement. Every argument is a ShapeDtypeStruct with
its real sharding; the step is lowered and compiled for the mesh: fake CPU devices (`--devices`), with libtpu
installed a real TPU slice (`--topology`, the TPU compiler's memory analysis; qwen35_jax.topology), or on a
machine with an NVIDIA GPU the GPU compiler (`--platform gpu --devices N`: more devices than the machine has are
mocked as N one-GPU hosts, `jax_mock_gpu_topology`, which compiles but cannot run).
Reports per-device bytes (parameters, optimizer or decode state, compiled temporaries), FLOPs and collective
bytes counted from the compiled HLO with loop trip counts (qwen35_jax.hlo_cost), and for a named chip an
estimated step time and MFU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time

from qwen35_jax.cli import argument_parser, command

UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 1e3, "MB": 1e6, "GB": 1e9}
DEFAULT_RECIPE = {"compute_dtype": "bfloat16", "param_dtype": "float32", "remat": "full", "loss_chunk": 4096}


def parse_bytes(text: str) -> int:
    import re
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B|B)?\s*", text)
    if not m:
        raise ValueError(f"--hbm={text!r}: expected a size like 95GiB or 16GB")
    return int(float(m.group(1)) * UNITS[m.group(2) or ""])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}"
        n /= 1024


def check_mesh(cfg, mesh_sizes: dict, batch: int) -> None:
    """Raises MeshError saying which model dimension an axis does not divide."""
    from qwen35_jax.sharding import MeshError
    tensor, expert = mesh_sizes.get("tensor", 1), mesh_sizes.get("expert", 1)
    checks = [("tensor", tensor, "num_attention_heads", cfg.num_attention_heads),
              ("tensor", tensor, "linear_num_value_heads", cfg.linear_num_value_heads)]
    if cfg.is_moe:
        checks += [("expert", expert, "num_experts", cfg.num_experts),
                   ("tensor", tensor, "moe_intermediate_size", cfg.moe_intermediate_size)]
    elif expert > 1:
        raise MeshError(f"expert={expert}: the model is dense (no experts to place on the expert axis)")
    else:
        checks.append(("tensor", tensor, "intermediate_size", cfg.intermediate_size))
    rows = math.prod(mesh_sizes.get(a, 1) for a in ("data", "fsdp", "expert"))
    checks.append(("data x fsdp x expert", rows, "--batch", batch))
    for axis, size, field, value in checks:
        if value % size:
            raise MeshError(f"mesh axis {axis}={size} does not divide {field}={value}")


def shard_bytes(abstract) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings."""
    import jax
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(abstract))


def compile_train(tc, mesh):
    """(compiled train step, {part: abstract pytree}) of `train.step.Trainer` for TrainConfig `tc`."""
    from qwen35_jax.config import ModelConfig
    from qwen35_jax.loading import resolve_dtype
    from qwen35_jax.nn.model import Qwen35
    from train.step import Trainer
    cfg = ModelConfig.from_hf(tc.model, **tc.model_overrides, scan_layers=tc.scan_layers)
    trainer = Trainer(Qwen35.abstract(cfg, resolve_dtype(tc.param_dtype)), tc, mesh)
    state = trainer.abstract_state()
    lowered = trainer.lower_train_step(state, trainer.abstract_batch(tc.batch_size, tc.seq_len))
    parts = {"params": state["params"], "optimizer_state": state["opt_state"]}
    if trainer.base is not None:  # LoRA: the frozen base weights, an argument of the step
        parts["frozen_params"] = trainer._abstract(trainer.base, trainer.base_shardings)
    return lowered.compile(), parts, cfg


def compile_engine(cfg, mesh, mode: str, batch: int, seq: int, dtype, prefill_chunk: int, moe_backend="auto"):
    """(compiled engine step, {part: abstract pytree}): `infer.Engine`'s prefill chunk or decode step with a
    decode state of `seq` tokens per row, placed as the engine places it."""
    from infer.engine import Engine
    engine = Engine.abstract(cfg, mesh, dtype=dtype, max_len=seq, prefill_chunk=min(prefill_chunk, seq),
                             moe_backend=moe_backend)
    lowered = engine.lower_decode(batch) if mode == "decode" else engine.lower_prefill(batch)
    return lowered.compile(), {"params": engine.params, "decode_state": engine._abstract_state(batch)}


def run(args) -> dict:
    """The report of one dry-run (see the module docstring); `args` as parsed by `build_parser`."""
    import jax
    import jax.numpy as jnp

    from qwen35_jax import hlo_cost
    from qwen35_jax.config import ModelConfig
    from qwen35_jax.sharding import make_mesh, parse_mesh_spec
    from train.config import TrainConfig

    sizes = parse_mesh_spec(args.mesh)
    devices, hbm, chip = _devices(args)
    mesh = make_mesh(sizes, devices)
    backend = args.moe_backend or "auto"  # auto: ragged_dot on a TPU mesh, blocked on CPU and GPU
    start = time.perf_counter()
    if args.mode == "train":
        if args.config or not args.recipe_defaults:
            tc = TrainConfig.load(args.config, args.overrides)
        else:
            tc = TrainConfig.from_dict({**DEFAULT_RECIPE, **dict(_override(o) for o in args.overrides)},
                                       where="command line")
        flags = {"model": args.model, "batch_size": args.batch, "seq_len": args.seq, "remat": args.remat,
                 "compute_dtype": args.compute_dtype, "grad_accum": args.grad_accum, "mesh": args.mesh,
                 "moe_backend": backend}
        tc = dataclasses.replace(tc, **{k: v for k, v in flags.items() if v is not None})
        args.model = tc.model
        check_mesh(ModelConfig.from_hf(tc.model, **tc.model_overrides), sizes, tc.batch_size)
        compiled, parts, cfg = compile_train(tc, mesh)
        batch, seq = tc.batch_size, tc.seq_len
        model_flops = hlo_cost.model_flops(cfg, batch, seq, training=True)
    else:
        batch, seq = args.batch or 8, args.seq or 4096
        cfg = ModelConfig.from_hf(args.model, scan_layers=False)
        check_mesh(cfg, sizes, batch)
        dtype = jnp.dtype(args.compute_dtype or "bfloat16")
        compiled, parts = compile_engine(cfg, mesh, args.mode, batch, seq, dtype, args.prefill_chunk, backend)
        tokens = min(args.prefill_chunk, seq) if args.mode == "prefill" else 1
        model_flops = hlo_cost.model_flops(cfg, batch, tokens, training=False)
    seconds = time.perf_counter() - start
    return _report(args, compiled, parts, mesh, hbm, chip, seconds, batch, seq, model_flops, len(devices))


def _override(item: str):
    from train.config import _parse_override
    return _parse_override(item)


def _platform_name(args) -> str:
    if args.topology:
        return "tpu:" + args.topology
    return "gpu" if args.platform == "gpu" else "cpu (fake devices)"


def _devices(args):
    """(devices, HBM bytes per device or None, Chip or None) for --topology or --devices."""
    import jax

    from qwen35_jax import hlo_cost
    hbm = parse_bytes(args.hbm) if args.hbm else None
    chip = hlo_cost.CHIPS[args.chip] if args.chip else None
    if args.topology:
        from qwen35_jax.topology import parse_slice, topology_devices
        spec = parse_slice(args.topology)
        chip = chip or hlo_cost.CHIPS[spec.generation]
        return topology_devices(args.topology), hbm or spec.hbm_bytes, chip
    if args.devices is None:
        raise ValueError("give --devices N (fake CPU devices) or --topology SLICE (e.g. v5p-256, needs libtpu)")
    if len(jax.devices()) < args.devices:
        raise ValueError(f"--devices {args.devices} but JAX has {len(jax.devices())} devices (set before JAX starts)")
    return jax.devices()[:args.devices], hbm, chip


def _report(args, compiled, parts, mesh, hbm, chip, seconds, batch, seq, model_flops, devices) -> dict:
    from qwen35_jax import hlo_cost
    memory = compiled.memory_analysis()
    report = {f"{name}_bytes_per_device": shard_bytes(part) for name, part in parts.items()}
    arguments = int(memory.argument_size_in_bytes)
    extra_outputs = int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes)
    report["temp_bytes_per_device"] = int(memory.temp_size_in_bytes)
    report["arguments_bytes_per_device"] = arguments
    report["total_bytes_per_device"] = arguments + max(extra_outputs, 0) + int(memory.temp_size_in_bytes)
    cost = hlo_cost.hlo_cost(compiled.as_text())
    report.update({
        "fits": None if hbm is None else report["total_bytes_per_device"] <= hbm, "hbm_bytes": hbm,
        "compile_seconds": round(seconds, 2), "mode": args.mode, "mesh": dict(mesh.shape), "devices": devices,
        "platform": _platform_name(args),
        "batch": batch, "seq": seq, "model": str(args.model),
        "flops_per_device": cost.flops, "model_flops": model_flops,
        "loops_with_unknown_trip_count": len(cost.unknown_trip_counts),
        "collectives": dict(cost.collective_counts), "collective_bytes_per_device": dict(cost.collective_bytes)})
    if chip is not None:  # compute time from at least the analytic FLOPs (the counts can miss data-dependent loops)
        floor = dataclasses.replace(cost, flops=max(cost.flops, int(model_flops / devices)))
        estimate = hlo_cost.estimate_step(floor, chip)
        report["chip"] = args.chip or args.topology.split("-")[0]
        report.update({f"estimated_{k}": v for k, v in estimate.items()})
        report["estimated_mfu"] = hlo_cost.mfu(model_flops, devices, estimate["step_s"], chip)
    return report


def build_parser():
    p = argument_parser("Compile the real train / prefill / decode step of a model on a mesh and report memory, "
                        "FLOPs and collectives per device.", prog="python -m qwen35_jax.dryrun")
    p.add_argument("--model", default=None, help="preset name (e.g. qwen3.5-397b-a17b), config.json path or "
                   "checkpoint folder (train: default the recipe's model)")
    p.add_argument("--devices", type=int, default=None, help="fake CPU devices (the mesh's size); with --platform "
                   "gpu: GPUs (mocked beyond those present)")
    p.add_argument("--platform", choices=["cpu", "gpu"], default="cpu", help="compiler for --devices: cpu (fake "
                   "devices, an estimate) or gpu (the GPU compiler; needs jax with CUDA and one GPU)")
    p.add_argument("--topology", default=None, help="compile for a real TPU slice, e.g. v5p-256 (128 chips), "
                   "v5e-256, v6e-256 (needs libtpu: pip install 'qwen35-jax[tpu]')")
    p.add_argument("--mesh", required=True, help='e.g. "fsdp=32,expert=4" (axes: data, fsdp, expert, tensor)')
    p.add_argument("--mode", choices=["train", "prefill", "decode"], default="train", help="step to compile")
    p.add_argument("--batch", type=int, default=None, help="global batch (train default: the recipe's batch_size)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (decode/prefill: context length)")
    p.add_argument("--hbm", default=None, help="memory per device, e.g. 95GiB (default with --topology: the chip's)")
    p.add_argument("--chip", choices=["v5p", "v5e", "v6e", "h100", "h200"], default=None,
                   help="estimate step time and MFU for this chip (qwen35_jax.hlo_cost.CHIPS)")
    p.add_argument("--config", default=None, help="train: a recipe (YAML path or bundled name) instead of the "
                   "default bf16-compute / remat-full recipe")
    p.add_argument("--remat", choices=["none", "full", "dots"], default=None, help="train: override the remat")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None,
                   help="train: override compute_dtype; prefill/decode: the weights' dtype (default bfloat16)")
    p.add_argument("--grad-accum", type=int, default=None, help="train: micro-batches per step")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prefill: tokens per row per prefill step")
    p.add_argument("--moe-backend", choices=["auto", "ragged", "blocked"], default=None,
                   help="grouped matmul (default auto: ragged_dot for --topology, blocked on CPU and GPU, where "
                        "XLA's ragged_dot materialises dense per-expert work; qwen35_jax.ops.moe)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the report")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="train config overrides")
    return p


def print_report(report: dict) -> None:
    print(f"{report['model']}: {report['mode']}, batch {report['batch']} x {report['seq']}, mesh {report['mesh']} "
          f"on {report['devices']} {report['platform']} devices")
    for key in ("params", "frozen_params", "optimizer_state", "decode_state", "temp", "total"):
        if f"{key}_bytes_per_device" in report:
            print(f"  {key + ' per device':28s} {human(report[f'{key}_bytes_per_device']):>12s}")
    if report["hbm_bytes"]:
        print(f"  {'fits in ' + human(report['hbm_bytes']):28s} {'yes' if report['fits'] else 'NO'}")
    print(f"  FLOPs per device {report['flops_per_device']:.3e} (model {report['model_flops']:.3e} in all)")
    if "estimated_step_s" in report:
        print(f"  estimated step on {report['chip']}: {report['estimated_step_s'] * 1e3:.1f} ms, "
              f"MFU {100 * report['estimated_mfu']:.1f}%")
    print(f"  compile {report['compile_seconds']:.1f} s; collectives {report['collectives']}")


def _use_gpus(count: int) -> None:
    """Compile on the GPU backend with `count` devices: the GPUs present, or (fewer present) `count` mocked
    one-GPU hosts over the first GPU (XLA's mock NCCL: compiles with real memory analysis, never runs)."""
    import subprocess

    import jax
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise ValueError(f"--platform gpu needs an NVIDIA GPU (nvidia-smi -L failed: {err})") from err
    present = sum(line.startswith("GPU ") for line in listed.splitlines())
    jax.config.update("jax_platforms", "cuda")
    if count > present and not jax.config.read("jax_mock_gpu_topology"):  # JAX_MOCK_GPU_TOPOLOGY wins
        jax.config.update("jax_cuda_visible_devices", "0")
        jax.config.update("jax_mock_gpu_topology", f"1x{count}x1")


@command
def main(argv=None) -> int:
    return dry_run(argv)


def dry_run(argv, use_recipe_defaults: bool = True) -> int:
    """The command line's work. use_recipe_defaults: without --config, train mode starts from DEFAULT_RECIPE
    (False: from TrainConfig's own defaults, as `train.finetune --dry-run` does)."""
    args = build_parser().parse_intermixed_args(argv)
    args.recipe_defaults = use_recipe_defaults
    import jax
    if args.platform == "gpu":
        _use_gpus(args.devices or 1)
    else:
        if args.devices:
            try:
                jax.config.update("jax_num_cpu_devices", args.devices)
            except RuntimeError:
                pass  # backends already started (tests): use the devices there are
        jax.config.update("jax_platforms", "cpu")
    if args.mode != "train" and args.model is None:
        raise ValueError("--model is required for prefill and decode")
    report = run(args)
    print_report(report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
