"""Training throughput: our Trainer vs HF transformers + torch AdamW on the same weights and batch, same run.

    python -m benchmarks.train [--config small-moe] [--batch 2] [--seq 512] [--steps 5]
        [--warmup 2] [--dtype float32|bfloat16] [--remat none|full|dots] [--torch-threads N] [--json]

One step = forward + backward + global-norm clipping (1.0) + AdamW (lr 1e-5 constant, betas 0.9/0.95, eps 1e-8,
weight decay 0.1 on matrices, not on norms / 1-D parameters) on both sides; the MoE router auxiliary loss is part
of both objectives. Each side runs a first step (ours: includes the jit compile), `--warmup` untimed steps and
`--steps` timed ones; step times are medians (min / max shown too: on a shared machine the min is the less noisy
figure). HF runs float32 eager with torch's default thread count (`--torch-threads` to change it: torch's OpenMP
threads slow down badly when another process holds a core); `--dtype` only sets our compute dtype (master weights
stay float32). HF runs first, then its model and optimizer are freed and ours is loaded from the same files.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import benchmarks.common  # noqa: F401  (offline HF environment variables, before transformers is imported)
import jax
import numpy as np
import torch

from benchmarks.common import add_config_arguments, print_table
from qwen35_jax.hf_reference import build_hf_model, random_tokens, save_hf_model
from qwen35_jax.loading import load_model
from train.config import TrainConfig
from train.data import unpacked_batch
from train.step import Trainer

LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-5, (0.9, 0.95), 1e-8, 0.1, 1.0


# ----- memory (Linux): peak resident set size per phase -----
def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_gib(field: str = "VmHWM") -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def timed_steps(step, first: int, warmup: int, steps: int) -> dict:
    """Runs `step()` (returns the loss as a float, i.e. blocks) first + warmup + steps times."""
    out = {"first_s": [], "losses": []}
    for i in range(first + warmup + steps):
        start = time.perf_counter()
        loss = step()
        elapsed = time.perf_counter() - start
        out["losses"].append(loss)
        if i < first:
            out["first_s"].append(elapsed)
        elif i >= first + warmup:
            out.setdefault("times", []).append(elapsed)
    return out


# ----- HF transformers + torch AdamW -----
def run_hf(hf, tokens: np.ndarray, warmup: int, steps: int) -> dict:
    hf.train()
    hf.zero_grad(set_to_none=True)
    moe = bool(getattr(hf.config, "num_experts", 0))
    decay, no_decay = [], []
    for name, p in hf.named_parameters():
        (decay if p.ndim >= 2 and "norm" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)
    ids = torch.as_tensor(tokens, dtype=torch.long)
    extra = {"output_router_logits": True} if moe else {}

    def step():
        out = hf(ids, labels=ids, **extra)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    result = timed_steps(step, 1, warmup, steps)
    result["params"] = sum(p.numel() for p in hf.parameters())
    result["aux_coef"] = float(getattr(hf.config, "router_aux_loss_coef", 0.0)) if moe else 0.0
    return result  # the optimizer state and gradients go with this frame


# ----- ours -----
def run_ours(folder, tokens: np.ndarray, warmup: int, steps: int, dtype: str, remat: str, loss_chunk: int) -> dict:
    b, seq = tokens.shape
    model = load_model(folder, dtype="float32")
    tc = TrainConfig(learning_rate=LR, warmup_steps=0, min_lr_ratio=1.0, steps=1 + warmup + steps,
                     adam_b1=BETAS[0], adam_b2=BETAS[1], adam_eps=EPS, weight_decay=WEIGHT_DECAY,
                     max_grad_norm=MAX_GRAD_NORM, batch_size=b, seq_len=seq, remat=remat, compute_dtype=dtype,
                     param_dtype="float32", loss_chunk=loss_chunk)
    trainer = Trainer(model, tc)
    del model
    holder = {"state": trainer.init_state()}
    batch = trainer.put_batch(unpacked_batch(tokens))
    jax.block_until_ready(holder["state"])
    metric_log = []

    def step():
        holder["state"], metrics = trainer.train_step(holder["state"], batch)  # the state is donated: rebind
        loss = float(metrics["loss"])  # blocks
        metric_log.append({k: float(v) for k, v in metrics.items()})
        # the objective HF reports: cross-entropy + router aux loss (z-loss coefficient is 0 here)
        return loss + trainer.aux_coef * metric_log[-1].get("aux_loss", 0.0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = timed_steps(step, 1, warmup, steps)
    result["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    jitted = trainer._train_step
    result["jit_cache_size"] = jitted._cache_size() if hasattr(jitted, "_cache_size") else None
    result["ce_first"], result["ce_last"] = metric_log[0]["loss"], metric_log[-1]["loss"]
    result["lr"] = [m["lr"] for m in metric_log]
    result["grad_norm_first"] = metric_log[0]["grad_norm"]
    result["steps_taken"] = int(holder["state"]["step"])
    result["aux_coef"] = float(trainer.aux_coef)
    return result  # the train state goes with this frame


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compile) step")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our compute dtype")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    parser.add_argument("--loss-chunk", type=int, default=TrainConfig.loss_chunk, help="our cross-entropy block")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads for HF (default: torch's own default, all cores)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (tokens use seed + 1)")
    parser.add_argument("--json", action="store_true", help="also print a JSON object")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.seq < 2:
        parser.error("need --steps >= 1, --warmup >= 0, --batch >= 1, --seq >= 2")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory(prefix="qwen35-random-") as folder:
        holder = [build_hf_model(args.config, seed=args.seed)]
        save_hf_model(holder[0], Path(folder))
        report(args, holder, Path(folder))  # report() pops the only reference to the HF model and frees it


def report(args, holder: list, folder):
    hf = holder.pop()
    tokens = random_tokens(hf.config.vocab_size, args.batch, args.seq, seed=args.seed + 1)
    n_tokens = args.batch * args.seq

    # HF first (its model is the one the checkpoint was saved from), freed before ours is loaded
    reset_peak_rss()
    start = time.perf_counter()
    theirs = run_hf(hf, tokens, args.warmup, args.steps)
    theirs["phase_s"] = time.perf_counter() - start
    theirs["peak_rss_gib"] = rss_gib()
    del hf
    gc.collect()
    rss_between = rss_gib("VmRSS")

    reset_peak_rss()
    start = time.perf_counter()
    ours = run_ours(folder, tokens, args.warmup, args.steps, args.dtype, args.remat, args.loss_chunk)
    ours["phase_s"] = time.perf_counter() - start
    ours["peak_rss_gib"] = rss_gib()
    gc.collect()

    hf_step, our_step = statistics.median(theirs["times"]), statistics.median(ours["times"])
    ratio = hf_step / our_step
    compile_s = ours["first_s"][0] - our_step
    print(f"training throughput, CPU ({jax.device_count()} JAX device(s), torch {torch.get_num_threads()} threads); "
          f"config {args.config}, {theirs['params'] / 1e6:.0f}M params; batch {args.batch} x seq {args.seq} = "
          f"{n_tokens} tokens/step; median of {args.steps} timed steps after 1 first + {args.warmup} warmup")
    print(f"ours: compute {args.dtype}, params float32, remat {args.remat}, loss_chunk {args.loss_chunk}; "
          f"HF: float32 eager, train(); AdamW lr {LR} betas {BETAS} wd {WEIGHT_DECAY}, clip {MAX_GRAD_NORM}")
    rows = []
    for name, r, med in (("HF transformers + torch AdamW", theirs, hf_step), ("ours (JAX Trainer)", ours, our_step)):
        rows.append([name, f"{med:.3f}", f"{min(r['times']):.3f}", f"{max(r['times']):.3f}",
                     f"{n_tokens / med:.0f}", f"{r['first_s'][0]:.1f}",
                     "n/a" if r["peak_rss_gib"] is None else f"{r['peak_rss_gib']:.1f}"])
    print_table(["implementation", "step s (median)", "min s", "max s", "tokens/s", "first step s",
                 "peak RSS GiB"], rows)
    print(f"ratio ours / HF (tokens/s): {ratio:.2f}x  (target >= 2x)")
    print(f"our jit compile ~{compile_s:.1f} s (first call {ours['first_s'][0]:.1f} s minus the median step); "
          f"jit cache entries after {len(ours['losses'])} steps: {ours['jit_cache_size']}")
    rel = abs(ours["losses"][0] - theirs["losses"][0]) / abs(theirs["losses"][0])
    rel_last = abs(ours["losses"][-1] - theirs["losses"][-1]) / abs(theirs["losses"][-1])
    print(f"first-step loss (CE + {ours['aux_coef']:g} x router aux): HF {theirs['losses'][0]:.6f}  "
          f"ours {ours['losses'][0]:.6f}  rel diff {rel:.1e}")
    print(f"last-step loss (step {len(ours['losses'])}):            HF {theirs['losses'][-1]:.6f}  "
          f"ours {ours['losses'][-1]:.6f}  rel diff {rel_last:.1e}")
    if ours["warnings"]:
        print("warnings during our steps:", *ours["warnings"], sep="\n  ")
    if args.json:
        print(json.dumps({
            "config": args.config, "batch": args.batch, "seq": args.seq, "tokens_per_step": n_tokens,
            "timed_steps": args.steps, "warmup_steps": args.warmup, "dtype": args.dtype, "remat": args.remat,
            "loss_chunk": args.loss_chunk, "jax_devices": jax.device_count(), "torch_threads": torch.get_num_threads(),
            "params": theirs["params"], "ratio": ratio, "our_compile_s": compile_s,
            "rss_between_phases_gib": rss_between,
            "hf": {"step_s": hf_step, "tokens_per_s": n_tokens / hf_step, "times": theirs["times"],
                   "first_step_s": theirs["first_s"][0], "losses": theirs["losses"],
                   "peak_rss_gib": theirs["peak_rss_gib"], "phase_s": theirs["phase_s"]},
            "ours": {"step_s": our_step, "tokens_per_s": n_tokens / our_step, "times": ours["times"],
                     "first_step_s": ours["first_s"][0], "losses": ours["losses"], "ce_first": ours["ce_first"],
                     "grad_norm_first": ours["grad_norm_first"], "lr": ours["lr"], "steps_taken": ours["steps_taken"],
                     "jit_cache_size": ours["jit_cache_size"], "warnings": ours["warnings"],
                     "peak_rss_gib": ours["peak_rss_gib"], "phase_s": ours["phase_s"]},
        }))


if __name__ == "__main__":
    main()
