"""Generation speed: ours vs HF `generate` on the same weights, same run (greedy, float32, CPU).

    python -m benchmarks.generate --config ../shared/bench/small-moe.json [--contexts 256,2048,8192]

Prints time to first token and decode tokens/s at batch 1 and 8 (prompt 128, 64 new tokens) with the
ratios, then our decode ms/token at several context lengths (GDN layers cost the same at every length;
only the attention layers grow).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import torch

from qwen35_jax.hf_reference import random_checkpoint
from benchmarks.common import median_seconds, print_table
from infer import Engine, SamplingParams
from qwen35_jax import load_model


def ours_times(engine: Engine, prompts, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(time to first token, seconds per decode step), medians, from the stream's event times."""
    params = SamplingParams.greedy(max_new_tokens=new_tokens, ignore_eos=True)
    ttfts, steps = [], []
    for _ in range(repeats + 1):  # the first run compiles
        start = time.perf_counter()
        stamps = [time.perf_counter() for e in engine.stream(prompts, params) if e.index == 0]
        ttfts.append(stamps[0] - start)
        steps.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return statistics.median(ttfts[1:]), statistics.median(steps[1:])


def hf_times(hf, prompts: np.ndarray, new_tokens: int, repeats: int) -> tuple[float, float]:
    ids = torch.as_tensor(prompts, dtype=torch.long)

    def run(n):
        def go():
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
        return go
    ttft = median_seconds(run(1), repeats)
    total = median_seconds(run(new_tokens), repeats)
    return ttft, (total - ttft) / (new_tokens - 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--contexts", default="256,2048,8192")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    hf, folder = random_checkpoint(args.config)
    model = load_model(folder, dtype="float32")
    vocab = model.config.vocab_size
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = np.random.default_rng(batch).integers(0, vocab, (batch, args.prompt_len))
        engine = Engine(model, max_len=args.prompt_len + args.new_tokens + 8, prefill_chunk=512)
        o_ttft, o_step = ours_times(engine, prompts.tolist(), args.new_tokens, args.repeats)
        h_ttft, h_step = hf_times(hf, prompts, args.new_tokens, args.repeats)
        rows.append([batch, f"{h_ttft * 1e3:.0f}", f"{o_ttft * 1e3:.0f}", f"{h_ttft / o_ttft:.2f}x",
                     f"{batch / h_step:.1f}", f"{batch / o_step:.1f}", f"{h_step / o_step:.2f}x"])
    print(f"greedy generation, float32, CPU, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}; config {args.config}")
    print_table(["batch", "HF TTFT ms", "ours TTFT ms", "TTFT HF/ours", "HF decode tok/s", "ours decode tok/s",
                 "ours/HF"], rows)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        engine = Engine(model, max_len=context + 40, prefill_chunk=2048)
        prompt = np.random.default_rng(context).integers(0, vocab, (1, context)).tolist()
        start = time.perf_counter()
        _, step = ours_times(engine, prompt, 33, 1)
        rows.append([context, f"{step * 1e3:.1f}", f"{time.perf_counter() - start:.0f}"])
    print(f"\nours: decode ms/token at batch 1 by context length ({jax.default_backend()})")
    print_table(["context", "decode ms/token", "bench s"], rows)


if __name__ == "__main__":
    main()
