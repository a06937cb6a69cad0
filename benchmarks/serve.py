"""Serving benchmark: the engine core (continuous batching, prefix cache) vs the static engine and HF, same run.

    python -m benchmarks.serve [--config small-moe] [--requests 32] [--rates 2,8,inf] [--quick]

Builds a seeded random-weight model from the config, saves it once and loads the same weights into ours
(`qwen35_jax.load_model`) and HF transformers. The workload: N requests with random token prompts (lengths uniform
in --prompt-lens) and output lengths (uniform in --output-lens), greedy, ignore_eos, arriving as a Poisson process at
each rate in --rates (requests/s; inf = all at once). Measured:

  * engine core (`infer.scheduler.EngineCore`, warmed up; compile time excluded) at each rate: throughput (generated
    tokens / wall time from the first arrival to the last completion), TTFT p50/p99 (arrival -> first token) and
    inter-token gaps p50/p99. With decode_steps K the host receives a request's tokens in bursts of K per device call,
    so the raw gaps are ~0 within a burst and one device call between bursts: both the raw gaps and the per-request
    mean time per output token (TPOT = (last - first) / (n - 1)) are printed.
  * (a) the same requests through the static `Engine.generate`, one request at a time (sequentially, each its own
    prompt and length), and as one static batch of all N (each row its own max_new_tokens; the batch runs until its
    longest row ends).
  * (b) HF transformers' continuous batching (`init_continuous_batching`) on the same weights; if it cannot run
    Qwen3.5's hybrid cache its error is printed and HF `generate` on left-padded batches (of --hf-batch, greedy,
    max_new_tokens = the longest request of the batch) stands in, counting only each request's own tokens; it runs
    the first --hf-requests of the N requests (default 8: HF's reference PyTorch linear-attention kernels on CPU
    take ~6 minutes for all 32), and its figure is a throughput (tok/s) on that subset.
  * shared-prefix TTFT: requests = the same --system-len-token system prompt + a distinct 16..64-token tail, one at a
    time, through a core with the prefix cache on (after one request has populated it) and off.

Targets (issue 12): at 16+ concurrent requests core throughput >= 3x the static engine one request at a time and
>= 2x HF's continuous batching (or its stand-in); prefix-cache TTFT >= 5x better. The last line is one JSON object of
all figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time

import jax
import numpy as np
import torch

from benchmarks.common import add_config_arguments, print_table
from infer import Engine, SamplingParams
from infer.scheduler import EngineCore
from qwen35_jax import load_model
from qwen35_jax.hf_reference import random_checkpoint


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("..")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO..HI with 1 <= LO <= HI")
    return lo, hi


def parse_rates(text: str) -> list[float]:
    try:
        rates = [math.inf if r.strip() == "inf" else float(r) for r in text.split(",") if r.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers or inf") from e
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive rates")
    return rates


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, float), q)) if len(values) else float("nan")


def workload(n: int, prompt_lens, output_lens, vocab: int, seed: int):
    """[(prompt_ids, max_new_tokens)] * n, seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(prompt_lens[0], prompt_lens[1] + 1))
        out.append((rng.integers(0, vocab, length).tolist(), int(rng.integers(output_lens[0], output_lens[1] + 1))))
    return out


def arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Arrival offsets in seconds (a Poisson process at `rate`/s, the first at 0; all 0 for inf)."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def run_core(core: EngineCore, requests, offsets) -> dict:
    """Submits `requests` at `offsets` (s) to a started core; per-request arrival and token times."""
    n = len(requests)
    stamps = [[] for _ in range(n)]
    arrived = [0.0] * n
    done = [threading.Event() for _ in range(n)]

    def sink(i):
        def on_output(out):
            stamps[i].append(time.perf_counter())
            if out.finish_reason is not None:
                done[i].set()
        return on_output

    params = [SamplingParams.greedy(max_new_tokens=m, ignore_eos=True) for _, m in requests]
    start = time.perf_counter()
    for i, (prompt, _) in enumerate(requests):
        delay = start + offsets[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        arrived[i] = time.perf_counter()
        core.submit(prompt, params[i], sink(i))
    for event in done:
        event.wait()
    end = max(s[-1] for s in stamps)
    tokens = sum(len(s) for s in stamps)
    ttft = [s[0] - a for s, a in zip(stamps, arrived)]
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    tpot = [(s[-1] - s[0]) / (len(s) - 1) for s in stamps if len(s) > 1]
    return {"tokens": tokens, "wall_s": end - arrived[0], "tok_s": tokens / (end - arrived[0]),
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "itl_p50_ms": pct(gaps, 50) * 1e3, "itl_p99_ms": pct(gaps, 99) * 1e3,
            "tpot_p50_ms": pct(tpot, 50) * 1e3, "tpot_p99_ms": pct(tpot, 99) * 1e3,
            "max_concurrent": max_concurrent(arrived, [s[-1] for s in stamps])}


def max_concurrent(starts, ends) -> int:
    events = sorted([(t, 1) for t in starts] + [(t, -1) for t in ends], key=lambda e: (e[0], e[1]))
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def static_sequential(engine: Engine, requests) -> dict:
    tokens = 0
    start = time.perf_counter()
    for prompt, m in requests:
        tokens += len(engine.generate([prompt], SamplingParams.greedy(max_new_tokens=m, ignore_eos=True))[0].token_ids)
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


def static_batch(engine: Engine, requests) -> dict:
    params = [SamplingParams.greedy(max_new_tokens=m, ignore_eos=True) for _, m in requests]
    start = time.perf_counter()
    results = engine.generate([p for p, _ in requests], params)
    wall = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


def hf_continuous(hf, requests) -> dict:
    """HF's continuous batching (`init_continuous_batching`); raises what it raises."""
    from transformers import GenerationConfig
    config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                              max_new_tokens=max(m for _, m in requests))
    manager = hf.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        start = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=m) for p, m in requests]
        tokens = 0
        for _ in ids:
            result = manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError("HF continuous batching returned no result")
            tokens += len(result.generated_tokens)
        wall = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


def hf_padded(hf, requests, batch: int) -> dict:
    """HF `generate` on left-padded batches of `batch` (greedy, max_new_tokens = the longest of the batch);
    only each request's own tokens count."""
    tokens, wall = 0, 0.0
    for i in range(0, len(requests), batch):
        group = requests[i:i + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(group):
            ids[row, width - len(p):] = torch.as_tensor(p)
            mask[row, width - len(p):] = 1
        new = max(m for _, m in group)
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                        pad_token_id=0)
        wall += time.perf_counter() - start
        tokens += sum(m for _, m in group)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


def prefix_ttft(engine: Engine, args, vocab: int, cache_bytes: int) -> dict:
    """TTFT (ms) of --prefix-requests requests, one at a time, each the shared system prompt + its own tail."""
    rng = np.random.default_rng(7)
    system = rng.integers(0, vocab, args.system_len).tolist()
    tails = [rng.integers(0, vocab, int(rng.integers(16, 65))).tolist() for _ in range(args.prefix_requests + 1)]
    core = EngineCore(engine, max_batch=2, decode_steps=args.decode_steps, prefix_cache_bytes=cache_bytes).start()
    params = SamplingParams.greedy(max_new_tokens=2, ignore_eos=True)
    ttfts = []
    try:
        for i, tail in enumerate(tails):  # the first populates the cache (or warms up, cache off): not counted
            first, done = [], threading.Event()

            def on_output(out, first=first, done=done):
                if not first:
                    first.append(time.perf_counter())
                if out.finish_reason is not None:
                    done.set()
            start = time.perf_counter()
            core.submit(system + tail, params, on_output)
            done.wait()
            if i:
                ttfts.append((first[0] - start) * 1e3)
        stats = core.stats()
    finally:
        core.drain(60)
    return {"ttft_p50_ms": statistics.median(ttfts), "ttft_p99_ms": pct(ttfts, 99),
            "hit_tokens": stats["prefix_cache_hit_tokens"], "hits": stats["prefix_cache_hits"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--requests", type=int, default=32, help="N requests per rate")
    parser.add_argument("--prompt-lens", type=parse_range, default=(32, 256), help="LO..HI prompt tokens")
    parser.add_argument("--output-lens", type=parse_range, default=(16, 64), help="LO..HI new tokens")
    parser.add_argument("--rates", type=parse_rates, default=parse_rates("2,8,inf"), help="requests/s; inf = all at once")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--decode-steps", type=int, default=4)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--hf-batch", type=int, default=8, help="HF padded generate batch size (stand-in)")
    parser.add_argument("--hf-requests", type=int, default=8,
                        help="the HF padded stand-in runs the first this many of the N requests (0 = all N; HF's "
                             "reference kernels on CPU make all 32 take ~6 minutes)")
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--prefix-requests", type=int, default=8)
    parser.add_argument("--skip-static-batch", action="store_true", help="skip the one static batch of all N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a short run (~4 minutes, ~1.5 of them loading and compiling): 16 requests, prompts 32..128, "
                             "outputs 16..32, rate inf, no static batch, HF on 8 requests, 2 prefix requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.prompt_lens, args.output_lens = 16, (32, 128), (16, 32)
        args.rates, args.prefix_requests, args.hf_requests, args.skip_static_batch = [math.inf], 2, 8, True

    figures: dict = {"config": args.config, "requests": args.requests, "prompt_lens": list(args.prompt_lens),
                     "output_lens": list(args.output_lens), "max_batch": args.max_batch,
                     "decode_steps": args.decode_steps, "prefill_chunk": args.prefill_chunk,
                     "rates": [str(r) for r in args.rates], "backend": jax.default_backend(),
                     "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    with random_checkpoint(args.config) as (hf, folder):
        hf.eval()
        model = load_model(folder, dtype="float32")
    vocab = model.config.vocab_size
    requests = workload(args.requests, args.prompt_lens, args.output_lens, vocab, args.seed)
    total_new = sum(m for _, m in requests)
    max_len = args.prompt_lens[1] + args.output_lens[1] + 8
    print(f"serving benchmark: config {args.config}, float32, {jax.default_backend()}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  N={args.requests} requests, prompts {args.prompt_lens[0]}..{args.prompt_lens[1]} tokens, outputs "
          f"{args.output_lens[0]}..{args.output_lens[1]} tokens ({total_new} in all), greedy, ignore_eos, random "
          f"token ids")
    print(f"  core: max_batch {args.max_batch}, decode_steps {args.decode_steps}, prefill_chunk "
          f"{args.prefill_chunk}, max_len {max_len}; Poisson arrivals at {', '.join(figures['rates'])} req/s "
          f"(inf = all at once)", flush=True)

    # ---- engine core at each rate --------------------------------------------------------------
    engine = Engine(model, max_len=max_len, prefill_chunk=args.prefill_chunk)
    core = EngineCore(engine, max_batch=args.max_batch, max_queue=max(256, args.requests),
                      decode_steps=args.decode_steps)
    start = time.perf_counter()
    core.start()
    run_core(core, requests[:2], [0.0, 0.0])  # the host path once (not timed)
    figures["core_warmup_s"] = time.perf_counter() - start
    core_rows = []
    for i, rate in enumerate(args.rates):
        result = run_core(core, requests, arrivals(args.requests, rate, args.seed + 1 + i))
        figures[f"core_rate_{rate}"] = result
        core_rows.append([str(rate), result["max_concurrent"], f"{result['wall_s']:.1f}", f"{result['tok_s']:.1f}",
                          f"{result['ttft_p50_ms']:.0f}", f"{result['ttft_p99_ms']:.0f}",
                          f"{result['itl_p50_ms']:.1f}", f"{result['itl_p99_ms']:.1f}",
                          f"{result['tpot_p50_ms']:.1f}", f"{result['tpot_p99_ms']:.1f}"])
        print(f"  core at {rate} req/s: {result['tok_s']:.1f} tok/s", flush=True)
    core.drain(60)

    # ---- (a) static engine ---------------------------------------------------------------------
    static_engine = Engine(model, max_len=max_len, prefill_chunk=args.prefill_chunk)
    for length in sorted({min(args.prefill_chunk, max(16, 1 << (len(p) - 1).bit_length())) for p, _ in requests}):
        static_engine.generate([[1] * length], SamplingParams.greedy(max_new_tokens=2, ignore_eos=True))  # compile
    figures["static_sequential"] = seq = static_sequential(static_engine, requests)
    print(f"  static engine, one request at a time: {seq['tok_s']:.1f} tok/s", flush=True)
    if not args.skip_static_batch:
        static_batch(static_engine, [(p, 2) for p, _ in requests])  # compile the batch-N shapes
        figures["static_batch"] = sb = static_batch(static_engine, requests)
        print(f"  static engine, one batch of {args.requests}: {sb['tok_s']:.1f} tok/s", flush=True)

    # ---- (b) HF --------------------------------------------------------------------------------
    try:
        figures["hf_continuous"] = hf_continuous(hf, requests)
        figures["hf_baseline"] = "continuous_batching"
        hf_label = "HF continuous batching"
    except Exception as e:  # Qwen3.5's linear-attention layers: no paged cache for them
        figures["hf_continuous_error"] = f"{type(e).__name__}: {e}"
        print(f"  HF continuous batching (init_continuous_batching) failed: {type(e).__name__}: {e}")
        subset = requests[:args.hf_requests or len(requests)]
        hf_padded(hf, [(p[:16], 2) for p, _ in subset[:args.hf_batch]], args.hf_batch)  # warm-up
        figures["hf_padded"] = hf_padded(hf, subset, args.hf_batch)
        figures["hf_padded"]["requests"] = len(subset)
        figures["hf_baseline"] = f"padded_generate_batch_{args.hf_batch}_first_{len(subset)}"
        hf_label = f"HF generate, left-padded batches of {args.hf_batch}" + (
            f" (first {len(subset)} of the {len(requests)} requests)" if len(subset) < len(requests) else "")
    hf_result = figures.get("hf_continuous") or figures["hf_padded"]
    print(f"  {hf_label}: {hf_result['tok_s']:.1f} tok/s", flush=True)

    # ---- shared-prefix TTFT ------------------------------------------------------------------------
    prefix_engine = Engine(model, max_len=args.system_len + 64 + 16, prefill_chunk=args.prefill_chunk)
    off = prefix_ttft(prefix_engine, args, vocab, 0)
    on = prefix_ttft(prefix_engine, args, vocab, 1 << 30)
    figures["prefix_off"], figures["prefix_on"] = off, on
    figures["prefix_ttft_ratio"] = off["ttft_p50_ms"] / on["ttft_p50_ms"]

    # ---- report ----------------------------------------------------------------------------------
    print(f"\nengine core (max in system = most requests arrived and not finished at once, running or queued; "
          f"compile/warm-up {figures['core_warmup_s']:.0f} s, excluded). ITL = raw gaps between "
          f"consecutive tokens of a request: with decode_steps={args.decode_steps} tokens reach the host in bursts "
          f"of {args.decode_steps} (gaps ~0 inside a burst, one device call between bursts), so ITL p50 is "
          f"misleadingly low; TPOT = per-request (last - first token) / (tokens - 1).")
    print_table(["rate req/s", "max in system", "wall s", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                 "ITL p99 ms", "TPOT p50 ms", "TPOT p99 ms"], core_rows)
    print("\nbaselines (same requests, same weights, same run):")
    rows = [["static Engine.generate, one request at a time", f"{seq['wall_s']:.1f}", f"{seq['tok_s']:.1f}"]]
    if "static_batch" in figures:
        rows.append([f"static Engine.generate, one batch of {args.requests}", f"{figures['static_batch']['wall_s']:.1f}",
                     f"{figures['static_batch']['tok_s']:.1f}"])
    rows.append([hf_label, f"{hf_result['wall_s']:.1f}", f"{hf_result['tok_s']:.1f}"])
    print_table(["baseline", "wall s", "useful tok/s"], rows)
    print(f"\nshared {args.system_len}-token system prompt + 16..64-token tails, one request at a time, "
          f"{args.prefix_requests} requests (after one that populates the cache), prefill_chunk {args.prefill_chunk}:")
    print_table(["prefix cache", "TTFT p50 ms", "TTFT p99 ms", "hit tokens"],
                [["off", f"{off['ttft_p50_ms']:.0f}", f"{off['ttft_p99_ms']:.0f}", off["hit_tokens"]],
                 ["on (1 GiB)", f"{on['ttft_p50_ms']:.0f}", f"{on['ttft_p99_ms']:.0f}", on["hit_tokens"]]])
    print(f"  TTFT off/on: {figures['prefix_ttft_ratio']:.1f}x")

    # ---- targets ---------------------------------------------------------------------------------
    busy = [(r, figures[f"core_rate_{r}"]) for r in args.rates if figures[f"core_rate_{r}"]["max_concurrent"] >= 16]
    print("\ntargets (issue 12):")
    targets = {}
    if busy:
        rate, best = max(busy, key=lambda x: x[1]["max_concurrent"])
        vs_static = best["tok_s"] / seq["tok_s"]
        vs_hf = best["tok_s"] / hf_result["tok_s"]
        targets = {"rate": str(rate), "vs_static_sequential": vs_static, "vs_hf": vs_hf,
                   "vs_static_met": vs_static >= 3, "vs_hf_met": vs_hf >= 2}
        print(f"  core at {rate} req/s ({best['max_concurrent']} requests in system at once): {vs_static:.2f}x the static engine one "
              f"at a time (target >= 3x): {'MET' if vs_static >= 3 else 'NOT MET'}")
        print(f"  core at {rate} req/s: {vs_hf:.2f}x {hf_label} (target >= 2x vs HF continuous batching"
              f"{'' if 'hf_continuous' in figures else ', which cannot run Qwen3.5: compared with its stand-in'}): "
              f"{'MET' if vs_hf >= 2 else 'NOT MET'}")
    else:
        print("  no rate reached 16 concurrent requests: throughput targets not evaluated")
    ratio = figures["prefix_ttft_ratio"]
    targets.update({"prefix_ttft_ratio": ratio, "prefix_met": ratio >= 5})
    print(f"  prefix cache TTFT {ratio:.1f}x better (target >= 5x): {'MET' if ratio >= 5 else 'NOT MET'}")
    figures["targets"] = targets
    figures["total_s"] = time.perf_counter() - t0
    print(f"(total {figures['total_s']:.0f} s)")
    print(json.dumps(figures, default=float))


if __name__ == "__main__":
    main()
