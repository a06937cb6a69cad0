"""Generation speed: ours vs HF `generate` on the same weights, same run (greedy, CPU).

    python -m benchmarks.generate [--config small-moe] [--dtype float32,bfloat16] [--contexts 256,2048,8192]
    python -m benchmarks.generate --model runs/demo-mtp/run/final --speculative 3 [--prompts-file data.jsonl]

Prints time to first token and decode tokens/s at batch 1 and 8 (prompt 128, 64 new tokens) with the
ratios, then our decode ms/token at several context lengths (GDN layers cost the same at every length;
only the attention layers grow). One row per dtype: both sides hold and run the weights in that dtype.
--config: a benchmark config name (benchmarks/configs/: small-moe, small-dense), a model preset name or a
config.json path.

--speculative K: ours only, plain greedy decoding beside speculative decoding with the checkpoint's MTP block
(K drafts per step), same prompts, same run: decode tokens/s of each, their ratio, the mean acceptance length
(tokens per verify step), and whether the tokens are equal (they must be). --model: a checkpoint with MTP
weights (e.g. the demo trained with `mtp_loss_weight`); prompts from --prompts-file (JSON lines with "prompt" or
"text", or plain lines; default: random token ids, which a trained MTP cannot predict).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import torch

from benchmarks.common import add_config_arguments, median_seconds, print_table
from infer import Engine, SamplingParams
from qwen35_jax import load_model
from qwen35_jax.hf_reference import TORCH_DTYPES, random_checkpoint


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


def batch_rows(hf, model, dtype: str, args) -> list[list]:
    """Table rows [dtype, batch, HF TTFT, ours TTFT, ratio, HF tok/s, ours tok/s, ratio], one per batch size."""
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = np.random.default_rng(batch).integers(0, model.config.vocab_size, (batch, args.prompt_len))
        engine = Engine(model, max_len=args.prompt_len + args.new_tokens + 8, prefill_chunk=512)
        o_ttft, o_step = ours_times(engine, prompts.tolist(), args.new_tokens, args.repeats)
        h_ttft, h_step = hf_times(hf, prompts, args.new_tokens, args.repeats)
        rows.append([dtype, batch, f"{h_ttft * 1e3:.0f}", f"{o_ttft * 1e3:.0f}", f"{h_ttft / o_ttft:.2f}x",
                     f"{batch / h_step:.1f}", f"{batch / o_step:.1f}", f"{h_step / o_step:.2f}x"])
    return rows


def context_rows(model, dtype: str, contexts: str) -> list[list]:
    """Table rows [dtype, context, our decode ms/token, bench s] at batch 1."""
    rows = []
    for context in (int(c) for c in contexts.split(",")):
        engine = Engine(model, max_len=context + 40, prefill_chunk=2048)
        prompt = np.random.default_rng(context).integers(0, model.config.vocab_size, (1, context)).tolist()
        start = time.perf_counter()
        _, step = ours_times(engine, prompt, 33, 1)
        rows.append([dtype, context, f"{step * 1e3:.1f}", f"{time.perf_counter() - start:.0f}"])
    return rows


def file_prompts(engine: Engine, path: str, n: int) -> list[list[int]]:
    """The first n prompts of a JSONL ("prompt" or "text" field) or plain-text file, tokenized."""
    import json
    lines = [line for line in open(path, encoding="utf-8").read().splitlines() if line.strip()][:n]
    texts = []
    for line in lines:
        try:
            row = json.loads(line)
            texts.append(row.get("prompt") or row.get("text") if isinstance(row, dict) else line)
        except json.JSONDecodeError:
            texts.append(line)
    return [engine.tokenizer.encode(t) for t in texts]


def decode_run(engine: Engine, prompts, params: SamplingParams, batch: int) -> tuple[float, list, float | None]:
    """The prompts in groups of `batch`, one after another: (decode tokens/s: tokens after each row's first over
    the time from a group's first token to its last, the generated token ids, mean acceptance length)."""
    tokens = seconds = 0.0
    outputs, acceptance = [], []
    for start in range(0, len(prompts), batch):
        group = prompts[start:start + batch]
        rows, stamps = [[] for _ in group], []
        for event in engine.stream(group, params):
            stamps.append(time.perf_counter())
            rows[event.index].append(event.token_id)
            if event.finish_reason is not None and event.mean_acceptance_length is not None:
                acceptance.append(event.mean_acceptance_length)
        tokens += sum(len(r) for r in rows) - len(group)
        seconds += stamps[-1] - stamps[0]
        outputs += rows
    return tokens / max(seconds, 1e-9), outputs, (statistics.mean(acceptance) if acceptance else None)


def speculative_rows(args) -> list[list]:
    """Table rows [batch, K, plain tok/s, speculative tok/s, ratio, mean acceptance length, same tokens]: greedy,
    median over --repeats runs of each, alternated, after a compile run. With --prompts-file the prompts run to
    their EOS (at most --new-tokens), --prompt-count of them; else --new-tokens random-prompt tokens each (EOS
    ignored)."""
    rows = []
    plain = Engine.load(args.model, max_len=args.max_len)
    spec = Engine.load(args.model, max_len=args.max_len, num_speculative_tokens=args.speculative)
    for batch in (int(b) for b in args.batches.split(",")):
        if args.prompts_file:
            prompts = file_prompts(plain, args.prompts_file, args.prompt_count)
            params = SamplingParams.greedy(max_new_tokens=args.new_tokens)
        else:
            prompts = np.random.default_rng(batch).integers(0, plain.config.vocab_size,
                                                            (batch, args.prompt_len)).tolist()
            params = SamplingParams.greedy(max_new_tokens=args.new_tokens, ignore_eos=True)
        engines = {"plain": plain, "spec": spec}
        for engine in engines.values():
            decode_run(engine, prompts[:batch], params, batch)  # compiles
        # alternated (plain, speculative, plain, ...) so that both see the same drift in the machine's load
        results = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, engine in engines.items():
                results[name].append(decode_run(engine, prompts, params, batch))
        runs = {name: (statistics.median(r[0] for r in rs), rs[0][1], rs[0][2]) for name, rs in results.items()}
        (plain_rate, expected, _), (spec_rate, got, acceptance) = runs["plain"], runs["spec"]
        rows.append([batch, args.speculative, len(prompts), f"{plain_rate:.1f}", f"{spec_rate:.1f}",
                     f"{spec_rate / plain_rate:.2f}x", f"{acceptance:.2f}", "yes" if expected == got else "NO"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, dtypes=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--contexts", default="256,2048,8192", help="comma-separated; empty to skip")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speculative", type=int, default=0, metavar="K",
                        help="compare plain and speculative (K MTP drafts per step) decoding of --model")
    parser.add_argument("--model", help="checkpoint with MTP weights (with --speculative)")
    parser.add_argument("--prompts-file", help="prompts for --speculative: JSON lines ('prompt'/'text') or lines")
    parser.add_argument("--max-len", type=int, default=1024, help="decode state length (with --speculative)")
    parser.add_argument("--prompt-count", type=int, default=64, help="prompts taken from --prompts-file")
    args = parser.parse_args(argv)
    if args.speculative:
        if not args.model:
            parser.error("--speculative needs --model (a checkpoint with MTP weights)")
        rows = speculative_rows(args)
        print(f"greedy decoding tokens/s (after each row's first token), at most {args.new_tokens} new tokens, "
              f"median of {args.repeats}; {args.model} ({jax.default_backend()})")
        print_table(["batch", "K", "prompts", "plain decode tok/s", "speculative decode tok/s", "speculative/plain",
                     "mean acceptance length", "same tokens"], rows)
        return

    rows, by_context = [], []
    with random_checkpoint(args.config) as (hf, folder):
        for dtype in args.dtype:
            model = load_model(folder, dtype=dtype)
            rows += batch_rows(hf.to(TORCH_DTYPES[dtype]), model, dtype, args)
            by_context += context_rows(model, dtype, args.contexts) if args.contexts else []
    print(f"greedy generation, CPU, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}; config {args.config}")
    print_table(["dtype", "batch", "HF TTFT ms", "ours TTFT ms", "TTFT HF/ours", "HF decode tok/s",
                 "ours decode tok/s", "ours/HF"], rows)
    if by_context:
        print(f"\nours: decode ms/token at batch 1 by context length ({jax.default_backend()})")
        print_table(["dtype", "context", "decode ms/token", "bench s"], by_context)


if __name__ == "__main__":
    main()
