"""`python -m benchmarks.device_check`: does the model hold on the accelerator JAX sees, and how fast is it?

Runs on whatever `jax.devices()` gives (GPU, TPU, or the CPU with small sizes, to prove the script works):

1. parity: the tiny dense and MoE models on the accelerator against the same weights run on the CPU backend,
   float32 (HIGHEST precision by the model's policy; bound 1e-5 x max(1, largest |logit|)) and bfloat16 (bound:
   1.5 x the CPU's own bfloat16-vs-float32 error, at least 2^-8 of the largest logit);
2. the `ragged_dot` MoE backend under the expert-parallel `shard_map` (experts over all devices present)
   against the CPU's blocked backend, float32;
3. throughput of `benchmarks/configs/small-moe.json` in bfloat16: prefill, decode (unstacked layers, donated
   state, as the engine runs them) and a train step (`train.step.Trainer`), with achieved TFLOP/s and HBM
   GB/s beside the chip's peak. FLOPs are counted analytically (matmuls with the active experts, attention
   over the causal context, the Gated DeltaNet state update); bytes are a lower bound (weights touched once
   per step plus the decode state read and written).

Ends with one JSON object (the last line). Needs no torch and no network.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 4)  # the CPU backend (reference, and the mesh when no accelerator)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import add_config_arguments, median_seconds  # noqa: E402
from qwen35_jax.cache import init_decode_state, state_bytes  # noqa: E402
from qwen35_jax.config import ModelConfig  # noqa: E402
from qwen35_jax.nn.model import Qwen35, unstack_layers  # noqa: E402
from qwen35_jax.ops.expert_parallel import moe_experts_parallel  # noqa: E402
from qwen35_jax.ops.moe import moe_experts, route  # noqa: E402
from qwen35_jax.sharding import make_mesh  # noqa: E402

# Dense bf16 peak (TFLOP/s) and HBM bandwidth (GB/s) per chip, by a substring of `device_kind`, most specific
# first (vendor data sheets: NVIDIA H200/H100 SXM, A100 80GB SXM; Google Cloud TPU system architecture pages).
PEAKS = (("H200", 989.0, 4800.0), ("H100", 989.0, 3350.0), ("A100", 312.0, 2039.0), ("L4", 121.0, 300.0),
         ("TPU v6", 918.0, 1640.0), ("TPU v5p", 459.0, 2765.0), ("TPU v5 lite", 197.0, 819.0),
         ("TPU v5e", 197.0, 819.0), ("TPU v4", 275.0, 1228.0))


def chip_peak(device) -> tuple[float | None, float | None]:
    kind = getattr(device, "device_kind", "")
    return next(((tf, bw) for name, tf, bw in PEAKS if name.lower() in kind.lower()), (None, None))


# ----- 1. parity ---------------------------------------------------------------------------------------------
def random_model(cfg: ModelConfig, dtype, seed: int = 0) -> Qwen35:
    """A seeded random model; norm weights and dt_bias perturbed so a wrong formula would show."""
    model = Qwen35(cfg, dtype, nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("weight", "dt_bias"):
            key, sub = jax.random.split(key)
            value = variable.get_value()
            variable.set_value(value + (0.1 * jax.random.normal(sub, value.shape)).astype(value.dtype))
    return model


def cast_model(model: Qwen35, dtype) -> Qwen35:
    """The same weights as a new model of another dtype (`model` is left as it is)."""
    graphdef, state = nnx.split(Qwen35.abstract(model.config, dtype))
    source = dict(nnx.to_flat_state(nnx.state(model)))
    for path, variable in nnx.to_flat_state(state):
        variable.set_value(jnp.asarray(source[path].get_value(), dtype))
    return nnx.merge(graphdef, state)


def logits_on(model: Qwen35, tokens: np.ndarray, device) -> np.ndarray:
    """float32 logits [B, L, V] of `model` run on `device`."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, device)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).astype(jnp.float32))
    return np.asarray(fn(state, jax.device_put(jnp.asarray(tokens), device)))


def parity(preset: str, accel, cpu, seq: int = 48) -> dict:
    cfg = ModelConfig.from_hf(preset)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, seq), dtype=np.int32)
    f32 = random_model(cfg, jnp.float32)
    bf16 = cast_model(f32, jnp.bfloat16)
    ref = logits_on(f32, tokens, cpu)
    scale = float(np.abs(ref).max())
    err_f32 = float(np.abs(logits_on(f32, tokens, accel) - ref).max())
    err_bf16_cpu = float(np.abs(logits_on(bf16, tokens, cpu) - ref).max())
    err_bf16 = float(np.abs(logits_on(bf16, tokens, accel) - ref).max())
    bound_f32 = 1e-5 * max(1.0, scale)
    bound_bf16 = max(1.5 * err_bf16_cpu, 2.0**-8 * scale)
    return {"preset": preset, "max_abs_logit": scale, "float32_err": err_f32, "float32_bound": bound_f32,
            "bfloat16_err": err_bf16, "bfloat16_cpu_err": err_bf16_cpu, "bfloat16_bound": bound_bf16,
            "passed": err_f32 <= bound_f32 and err_bf16 <= bound_bf16}


# ----- 2. expert-parallel ragged_dot MoE ---------------------------------------------------------------------
def moe_check(devices, cpu, tokens: int = 256, hidden: int = 64, inter: int = 32, top_k: int = 4) -> dict:
    n = len(devices)
    experts = 8 * n
    keys = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(keys[0], (tokens, hidden), jnp.float32)
    router = jax.random.normal(keys[1], (hidden, experts), jnp.float32)
    w1 = 0.1 * jax.random.normal(keys[2], (experts, hidden, 2, inter), jnp.float32)
    w2 = 0.1 * jax.random.normal(keys[3], (experts, inter, hidden), jnp.float32)
    with jax.default_matmul_precision("highest"):
        weights, ids = jax.jit(lambda x, r: route(x @ r, top_k))(*jax.device_put((x, router), cpu))
        ref = jax.jit(lambda *a: moe_experts(*a, backend="blocked"))(*jax.device_put((x, weights, ids, w1, w2), cpu))
        mesh = make_mesh({"expert": n}, devices)
        with jax.set_mesh(mesh):
            fn = jax.jit(lambda *a: moe_experts_parallel(*a, mesh, backend="ragged"))
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            out = fn(*jax.device_put((x, weights, ids, w1, w2), replicated))
    err = float(np.abs(np.asarray(out) - np.asarray(ref)).max())
    scale = float(np.abs(np.asarray(ref)).max())
    return {"devices": n, "experts": experts, "tokens": tokens, "max_abs_err": err, "max_abs_out": scale,
            "bound": 1e-5 * max(1.0, scale), "passed": err <= 1e-5 * max(1.0, scale)}


# ----- 3. throughput -----------------------------------------------------------------------------------------
def matmul_params_per_token(model: Qwen35) -> float:
    """Multiply-accumulates per token in the weight matmuls (active experts only; no embedding, no lm_head)."""
    cfg, total = model.config, 0.0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        if value.ndim < 2 or path[0] in ("embed_tokens", "lm_head") or "conv_" in str(path[-1]):
            continue
        share = cfg.num_experts_per_tok / cfg.num_experts if str(path[-1]).startswith("experts_") else 1.0
        total += value.size * share
    return total


def mixing_flops_per_token(cfg: ModelConfig, context: float) -> float:
    """Attention over `context` keys (QK^T and PV) plus the Gated DeltaNet state read/update, per token."""
    n_attn = sum(t == "full_attention" for t in cfg.layer_types)
    n_gdn = cfg.num_hidden_layers - n_attn
    attn = 4.0 * cfg.num_attention_heads * cfg.head_dim * context * n_attn
    gdn = 6.0 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * n_gdn
    return attn + gdn


def param_bytes(model: Qwen35, experts_touched: float = 1.0) -> float:
    total = 0.0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        share = experts_touched if str(path[-1]).startswith("experts_") else 1.0
        total += value.size * value.dtype.itemsize * share
    return total


def rates(flops: float, nbytes: float, seconds: float, peak) -> dict:
    tflops, gbs = flops / seconds / 1e12, nbytes / seconds / 1e9
    out = {"seconds": seconds, "tflops": tflops, "hbm_gbs_lower_bound": gbs}
    if peak[0]:
        out.update(peak_tflops=peak[0], peak_hbm_gbs=peak[1], mfu=tflops / peak[0], hbm_util=gbs / peak[1])
    return out


def bench_prefill(model, batch: int, seq: int, repeats: int, peak) -> dict:
    """The engine's prefill: forward_with_state over an empty state, logits of each row's last token."""
    graphdef, params = nnx.split(model)
    cfg = model.config

    @jax.jit
    def prefill(params, state, tokens):
        m = nnx.merge(graphdef, params)
        hidden, state = m.forward_with_state(tokens, state)
        return m.logits(hidden[:, -1]), state

    tokens = jnp.zeros((batch, seq), jnp.int32)
    state = init_decode_state(cfg, batch, seq, model.dtype)
    seconds = median_seconds(lambda: jax.block_until_ready(prefill(params, state, tokens)), repeats)
    n = batch * seq
    flops = 2 * n * matmul_params_per_token(model) + n * mixing_flops_per_token(cfg, seq / 2)
    flops += 2 * batch * cfg.hidden_size * cfg.vocab_size
    return {"batch": batch, "seq": seq, "tokens_per_s": n / seconds,
            **rates(flops, param_bytes(model) + state_bytes(state), seconds, peak)}


def bench_decode(model, batch: int, context: int, steps: int, peak) -> dict:
    """Greedy one-token steps at `context` tokens already in the state (donated, as the engine runs them)."""
    graphdef, params = nnx.split(model)
    cfg = model.config

    def step(params, state, tokens):
        m = nnx.merge(graphdef, params)
        hidden, state = m.forward_with_state(tokens[:, None], state)
        return jnp.argmax(m.logits(hidden[:, 0]), axis=-1).astype(jnp.int32), state
    step = jax.jit(step, donate_argnums=1)

    state = init_decode_state(cfg, batch, context + steps + 8, model.dtype)
    state["lengths"] = jnp.full((batch,), context, jnp.int32)
    tokens = jnp.zeros((batch,), jnp.int32)
    tokens, state = step(params, state, tokens)  # compile
    jax.block_until_ready(tokens)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tokens, state = step(params, state, tokens)
        jax.block_until_ready(tokens)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    flops = batch * (2 * matmul_params_per_token(model) + mixing_flops_per_token(cfg, context)
                     + 2 * cfg.hidden_size * cfg.vocab_size)
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    touched = 1.0 if not e else 1 - (1 - k / e) ** batch  # expected share of experts some row routes to
    kv_read = sum(x.nbytes * context / x.shape[-3] for layer in state["layers"] for name, x in layer.items()
                  if name in ("k", "v"))
    gdn_rw = 2 * sum(x.nbytes for layer in state["layers"] for name, x in layer.items() if name not in ("k", "v"))
    return {"batch": batch, "context": context, "ms_per_step": 1e3 * seconds, "tokens_per_s": batch / seconds,
            **rates(flops, param_bytes(model, touched) + kv_read + gdn_rw, seconds, peak)}


def bench_train(model_f32, batch: int, seq: int, repeats: int, peak) -> dict:
    """One optimizer step of `train.step.Trainer` (float32 master weights, bfloat16 compute, AdamW)."""
    from train.config import TrainConfig
    from train.step import Trainer
    tc = TrainConfig(batch_size=batch, seq_len=seq, steps=repeats + 2, compute_dtype="bfloat16",
                     param_dtype="float32", warmup_steps=0)
    trainer = Trainer(model_f32, tc)
    holder = {"state": trainer.init_state()}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model_f32.config.vocab_size, (batch, seq + 1), dtype=np.int32)
    batch_arrays = trainer.put_batch({
        "input_ids": ids[:, :-1], "targets": ids[:, 1:], "positions": np.broadcast_to(np.arange(seq), (batch, seq)),
        "segment_ids": np.ones((batch, seq), np.int32), "loss_mask": np.ones((batch, seq), np.float32)})

    def run():
        holder["state"], metrics = trainer.train_step(holder["state"], batch_arrays)
        jax.block_until_ready(metrics["loss"])
    seconds = median_seconds(run, repeats)
    cfg, n = model_f32.config, batch * seq
    forward = 2 * n * matmul_params_per_token(model_f32) + n * mixing_flops_per_token(cfg, seq / 2)
    forward += 2 * n * cfg.hidden_size * cfg.vocab_size
    nbytes = 3 * param_bytes(model_f32) + 2 * 2 * param_bytes(model_f32)  # weights, grads, AdamW moments
    return {"batch": batch, "seq": seq, "tokens_per_s": n / seconds, **rates(3 * forward, nbytes, seconds, peak)}


def throughput(config: str, accel, sizes: dict) -> dict:
    peak = chip_peak(accel)
    cfg = ModelConfig.from_hf(config)
    with jax.default_device(accel):
        model_f32 = random_model(cfg, jnp.float32)
        model = unstack_layers(cast_model(model_f32, jnp.bfloat16))
        out = {"config": str(config), "dtype": "bfloat16",
               "prefill": bench_prefill(model, sizes["prefill_batch"], sizes["prefill_seq"], sizes["repeats"], peak),
               "decode": bench_decode(model, sizes["decode_batch"], sizes["decode_context"], sizes["decode_steps"],
                                      peak)}
        del model
        out["train"] = bench_train(model_f32, sizes["train_batch"], sizes["train_seq"], sizes["repeats"], peak)
    return out


ACCELERATOR_SIZES = {"prefill_batch": 8, "prefill_seq": 2048, "decode_batch": 32, "decode_context": 2048,
                     "decode_steps": 32, "train_batch": 8, "train_seq": 2048, "repeats": 5}
CPU_SIZES = {"prefill_batch": 1, "prefill_seq": 64, "decode_batch": 1, "decode_context": 64,
             "decode_steps": 4, "train_batch": 1, "train_seq": 64, "repeats": 2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser)  # the throughput model
    parser.add_argument("--small", action="store_true", help="CPU-sized throughput runs even on an accelerator")
    parser.add_argument("--skip-throughput", action="store_true", help="parity and MoE checks only")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    accel, cpu = jax.devices()[0], jax.devices("cpu")[0]
    devices = jax.devices()
    print(f"accelerator: {accel.platform} {getattr(accel, 'device_kind', '')} x {len(devices)}; "
          f"jax {jax.__version__}", flush=True)
    report = {"platform": accel.platform, "device_kind": getattr(accel, "device_kind", ""),
              "device_count": len(devices), "jax": jax.__version__, "parity": []}
    for preset in ("tiny-dense", "tiny-moe"):
        row = parity(preset, accel, cpu)
        report["parity"].append(row)
        print(f"parity {preset}: float32 {row['float32_err']:.2e} (bound {row['float32_bound']:.1e}), bfloat16 "
              f"{row['bfloat16_err']:.2e} (bound {row['bfloat16_bound']:.1e}, CPU bf16 {row['bfloat16_cpu_err']:.2e})"
              f" {'ok' if row['passed'] else 'FAIL'}", flush=True)
    report["moe_ragged_expert_parallel"] = moe = moe_check(devices, cpu)
    print(f"ragged_dot MoE, expert-parallel over {moe['devices']} device(s): max err {moe['max_abs_err']:.2e} "
          f"(bound {moe['bound']:.1e}) {'ok' if moe['passed'] else 'FAIL'}", flush=True)
    if not args.skip_throughput:
        sizes = CPU_SIZES if args.small or accel.platform == "cpu" else ACCELERATOR_SIZES
        report["throughput"] = tp = throughput(args.config, accel, sizes)
        for name in ("prefill", "decode", "train"):
            row = tp[name]
            peak = f" of {row['peak_tflops']:.0f} peak" if "peak_tflops" in row else ""
            print(f"{name:8s} {row['tokens_per_s']:12.1f} tokens/s  {row['tflops']:8.3f} TFLOP/s{peak}  "
                  f">= {row['hbm_gbs_lower_bound']:8.1f} GB/s", flush=True)
    report["passed"] = all(r["passed"] for r in report["parity"]) and moe["passed"]
    report["wall_s"] = time.perf_counter() - start
    print(json.dumps(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
