"""Sharding dry-run: compile a step of any model on any mesh with fake CPU devices and abstract arrays.

    python -m qwen35_jax.dryrun --model qwen3.5-397b-a17b --devices 64 \\
        --mesh expert=16,tensor=4 --mode train|prefill|decode --batch B --seq S [--hbm 95GiB] [--json]

Nothing the size of the model is allocated: parameters, optimizer state and decode state are
ShapeDtypeStructs with their real shardings; the step is lowered and compiled by XLA for the mesh.
Prints per-device bytes (parameters, optimizer state, decode state, compiled temporaries), the total
against --hbm, compile time and the collectives in the compiled HLO. --json: the last line is one object.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time

from qwen35_jax.cli import argument_parser, command

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def parse_bytes(text: str) -> int:
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
    data = mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1)
    checks.append(("data x fsdp", data, "--batch", batch))
    for axis, size, field, value in checks:
        if value % size:
            raise MeshError(f"mesh axis {axis}={size} does not divide {field}={value}")


def shard_bytes(abstract, float_bytes: int | None = None) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (float leaves counted at
    `float_bytes` each when given: the deployment dtype rather than the compiled one)."""
    import jax
    import jax.numpy as jnp
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape)
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        itemsize = float_bytes if floating and float_bytes is not None else leaf.dtype.itemsize
        total += math.prod(shape) * itemsize
    return total


def build_step(cfg, mesh, mode: str, batch: int, seq: int, remat: str = "full", moe_backend: str = "blocked"):
    """(step function, its abstract arguments, {part name: abstract pytree}) for one step of `mode`; remat
    applies to the train step, moe_backend to every mode."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding

    from qwen35_jax.cache import decode_state_axes, decode_state_shapes
    from qwen35_jax.nn.model import Qwen35
    from qwen35_jax.sharding import logical_spec, variable_sharding

    # Compiled in float32 in every mode: XLA:CPU upcasts bf16 matmul operands to float32, which would add a
    # float32 copy of every weight to the temporaries; inference bytes are reported at bf16 (run()).
    dtype = jnp.float32
    graphdef, state = nnx.split(Qwen35.abstract(cfg, dtype))
    params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                         sharding=variable_sharding(v, mesh)),
                          state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    batch_spec = logical_spec(("batch", None), (batch, seq), mesh)
    tokens = jax.ShapeDtypeStruct((batch, seq if mode != "decode" else 1), jnp.int32,
                                  sharding=NamedSharding(mesh, batch_spec))
    parts = {"params": params}

    if mode == "prefill":
        def step(params, tokens):
            model = nnx.merge(graphdef, params)
            return model.logits(model.hidden_states(tokens, moe_backend=moe_backend)[:, -1])
        return step, (params, tokens), parts
    if mode == "decode":
        shapes = decode_state_shapes(cfg, batch, seq, dtype)
        cache = jax.tree.map(lambda axes, s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=NamedSharding(mesh, logical_spec(axes, s.shape, mesh))),
            decode_state_axes(cfg), shapes, is_leaf=lambda x: isinstance(x, tuple))
        parts["decode_state"] = cache

        def step(params, cache, tokens):
            model = nnx.merge(graphdef, params)
            hidden, cache = model.forward_with_state(tokens, cache, moe_backend=moe_backend)
            return model.logits(hidden[:, 0]), cache
        return step, (params, cache, tokens), parts
    tx = optax.adamw(1e-5)
    opt = jax.tree_util.tree_map_with_path(_follow_params(params, mesh), jax.eval_shape(tx.init, params))
    parts["optimizer_state"] = opt

    def step(params, opt, tokens):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            hidden, _ = model.train_hidden_states(tokens[:, :-1], remat=remat, moe_backend=moe_backend)
            logits = model.logits(hidden).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss
    return step, (params, opt, tokens), parts


def _follow_params(params, mesh):
    """Optimizer leaves whose path ends with a parameter's path (Adam's mu / nu) take its sharding;
    the rest (step counts) are replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    by_path = {tuple(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}

    def place(path, s):
        path = tuple(path)
        match = next((by_path[path[i:]] for i in range(len(path)) if path[i:] in by_path), None)
        sharding = match.sharding if match is not None and match.shape == s.shape else \
            NamedSharding(mesh, PartitionSpec())
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
    return place


def run(model: str, devices: int, mesh_spec: str, mode: str, batch: int, seq: int, hbm: int | None,
        remat: str = "full", moe_backend: str = "blocked") -> dict:
    import jax
    from qwen35_jax.config import ModelConfig
    from qwen35_jax.sharding import make_mesh, parse_mesh_spec

    # decode as the engine does: one module per layer, so the donated state is updated in place (a scan
    # over stacked layers would write a second copy of the whole state)
    cfg = ModelConfig.from_hf(model, scan_layers=mode != "decode")
    sizes = parse_mesh_spec(mesh_spec)
    check_mesh(cfg, sizes, batch)
    if len(jax.devices()) < devices:
        raise ValueError(f"--devices {devices} but JAX has {len(jax.devices())} devices (set before JAX starts)")
    mesh = make_mesh(sizes, jax.devices()[:devices])
    step, args, parts = build_step(cfg, mesh, mode, batch, seq, remat, moe_backend)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=tuple(range(len(args) - 1))).lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    # inference runs bf16 weights and KV/conv state (the recurrent state stays float32); training float32
    report = {f"{name}_bytes_per_device": shard_bytes(part, 2 if mode != "train" and name == "params" else None)
              for name, part in parts.items()}
    if "decode_state" in parts:
        report["decode_state_bytes_per_device"] = sum(
            shard_bytes(leaf, 4 if name == "recurrent" else 2) for layer in parts["decode_state"]["layers"]
            for name, leaf in layer.items()) + shard_bytes(parts["decode_state"]["lengths"])
    report["temp_bytes_per_device"] = int(getattr(memory, "temp_size_in_bytes", 0))
    report["total_bytes_per_device"] = sum(report.values())
    report.update({"fits": None if hbm is None else report["total_bytes_per_device"] <= hbm, "hbm_bytes": hbm,
                   "compile_seconds": round(seconds, 2), "mode": mode, "mesh": dict(mesh.shape),
                   "devices": devices, "batch": batch, "seq": seq, "model": str(model),
                   "collectives": {c: len(re.findall(rf"\b{c}(?:-start)?\(", hlo)) for c in COLLECTIVES}})
    return report


@command
def main(argv=None) -> int:
    p = argument_parser("Compile one step of a model on a fake-device mesh and report memory.")
    p.add_argument("--model", required=True,
                   help="preset name (e.g. qwen3.5-397b-a17b), config.json path or checkpoint folder")
    p.add_argument("--devices", type=int, required=True, help="fake CPU devices (the mesh's size)")
    p.add_argument("--mesh", required=True, help='e.g. "expert=16,tensor=4" (axes: data, fsdp, expert, tensor)')
    p.add_argument("--mode", choices=["train", "prefill", "decode"], default="train", help="step to compile")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (decode: context length)")
    p.add_argument("--hbm", default=None, help="memory per device, e.g. 95GiB")
    p.add_argument("--remat", choices=["none", "full", "dots"], default="full", help="train-mode remat policy")
    p.add_argument("--moe-backend", choices=["ragged", "blocked"], default="blocked",
                   help="grouped matmul to compile (XLA:CPU's lowering of ragged_dot, what TPU/GPU run, "
                        "materialises dense per-expert temporaries and overstates memory ~7x: hence blocked)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the report")
    args = p.parse_args(argv)
    import jax
    try:
        jax.config.update("jax_num_cpu_devices", args.devices)
    except RuntimeError:
        pass  # backends already started (tests): use the devices there are
    jax.config.update("jax_platforms", "cpu")
    report = run(args.model, args.devices, args.mesh, args.mode, args.batch, args.seq,
                 parse_bytes(args.hbm) if args.hbm else None, args.remat, args.moe_backend)
    print(f"{report['model']}: {args.mode}, batch {args.batch} x {args.seq}, mesh {report['mesh']}")
    for key in ("params", "optimizer_state", "decode_state", "temp", "total"):
        if f"{key}_bytes_per_device" in report:
            print(f"  {key + ' per device':28s} {human(report[f'{key}_bytes_per_device']):>12s}")
    if report["hbm_bytes"]:
        print(f"  {'fits in ' + args.hbm:28s} {'yes' if report['fits'] else 'NO'}")
    print(f"  compile {report['compile_seconds']:.1f} s; collectives {report['collectives']}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
