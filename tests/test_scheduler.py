"""The serving core (continuous batching, prefix cache) against isolated `Engine.generate` runs."""

import jax
import numpy as np
import pytest

from infer import Engine, SamplingParams
from infer.scheduler import EngineCore, QueueFull, ShuttingDown, backend_compiles
from qwen35_jax import load_model


@pytest.fixture(scope="module")
def engine(hf_checkpoint):
    _, folder = hf_checkpoint("tiny-moe")
    return Engine(load_model(folder), max_len=128, prefill_chunk=16)


def run(core, prompts, params, logprobs=None):
    """Submits everything at once; returns each request's outputs once the core has drained."""
    outs = [[] for _ in prompts]
    for i, (p, sp) in enumerate(zip(prompts, params)):
        core.submit(p, sp, outs[i].append, logprobs=logprobs)
    core.start()
    assert core.drain(120)
    return outs


def mixed_prompts(vocab, count, seed=0):
    """Prompts of 1..70 tokens; every other one starts with the same 40-token system prefix."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab, 40).tolist()
    prompts = []
    for i, n in enumerate(rng.integers(1, 30, count)):
        tail = rng.integers(0, vocab, int(n)).tolist()
        prompts.append(system + tail if i % 2 else tail)
    return prompts


@pytest.mark.parametrize("cache_bytes", [0, 1 << 24])
def test_greedy_equals_isolated_generate(engine, cache_bytes):
    """12 requests over 4 slots (admitted as slots free up), mixed lengths, some with stop ids: each gets exactly
    the tokens of `Engine.generate` on its prompt alone, with the prefix cache off and on (on: hits happen)."""
    prompts = mixed_prompts(engine.config.vocab_size, 12)
    lengths = [3 + 5 * i % 29 for i in range(12)]
    params = [SamplingParams.greedy(max_new_tokens=n) for n in lengths]
    expected = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    for i in (1, 4):  # stop on a token the greedy run makes mid-way: the device must stop there too
        params[i] = SamplingParams.greedy(max_new_tokens=lengths[i], stop_token_ids=(expected[i][2],))
        expected[i] = expected[i][:expected[i].index(expected[i][2]) + 1]
    core = EngineCore(engine, max_batch=4, decode_steps=4, prefix_cache_bytes=cache_bytes)
    outs = run(core, prompts, params)
    for i, (out, exp) in enumerate(zip(outs, expected)):
        assert [o.token_id for o in out] == exp, f"request {i}"
        assert out[-1].finish_reason == ("stop" if i in (1, 4) else "length")
        assert [o.completion_tokens for o in out] == list(range(1, len(exp) + 1))
    stats = core.stats()
    assert stats["running"] == stats["waiting"] == 0 and sorted(core.free) == [0, 1, 2, 3]
    assert stats["generation_tokens_total"] == sum(map(len, expected))
    if cache_bytes:
        assert stats["prefix_cache_hits"] >= 4 and stats["prefix_cache_hit_tokens"] >= 4 * 32
        assert 0 < stats["prefix_cache_bytes"] <= cache_bytes
    else:
        assert stats["prefix_cache_hits"] == 0


def test_prefix_cache_evicts_to_its_budget(engine):
    """A budget of 1.5 of the largest snapshot: older snapshots are evicted, the budget holds, results stay exact."""
    prompts = mixed_prompts(engine.config.vocab_size, 6, seed=1)
    params = [SamplingParams.greedy(max_new_tokens=4)] * 6
    expected = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    probe = EngineCore(engine, max_batch=1, prefix_cache_bytes=1 << 30)
    run(probe, prompts[1:2], params[:1])
    one = max(sum(x.nbytes for x in jax.tree.leaves(s)) for s in probe.cache.entries.values())
    core = EngineCore(engine, max_batch=2, prefix_cache_bytes=int(one * 1.5))
    outs = run(core, prompts, params)
    assert [[o.token_id for o in out] for out in outs] == expected
    assert core.cache.evictions > 0 and 0 < core.cache.bytes <= one * 1.5


def test_seeded_sampling_equals_isolated_generate(engine):
    """Per-slot sampling parameters and per-row step keys: a seeded sampled request gives the tokens it gives
    alone, whatever shares the batch (temperature, top-k/p, min-p and penalties all on)."""
    prompts = mixed_prompts(engine.config.vocab_size, 6, seed=2)
    params = [SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, min_p=0.01,
                             presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, seed=100 + i)
              for i in range(6)]
    params[3] = SamplingParams.greedy(max_new_tokens=12)
    expected = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    outs = run(EngineCore(engine, max_batch=3, decode_steps=3), prompts, params)
    assert [[o.token_id for o in out] for out in outs] == expected


def test_no_retrace_after_warmup(hf_checkpoint):
    """200 requests of varied prompt lengths (1..150, several prefill widths and cache hits), output lengths and
    sampling settings trace nothing after warm-up, and XLA compiles nothing (eager ops included)."""
    _, folder = hf_checkpoint("tiny-moe")
    engine = Engine(load_model(folder), max_len=160, prefill_chunk=64)
    core = EngineCore(engine, max_batch=8, decode_steps=4, prefix_cache_bytes=1 << 24)
    core.warmup()
    before, compiles = core.trace_counts(), backend_compiles()
    rng = np.random.default_rng(3)
    system = rng.integers(0, 256, 64).tolist()
    prompts, params = [], []
    for i in range(200):
        tail = rng.integers(0, 256, int(rng.integers(1, 86))).tolist()
        prompts.append(system + tail if i % 3 == 0 else tail)
        params.append(SamplingParams(max_new_tokens=int(rng.integers(1, 7)), temperature=float(i % 2),
                                     top_k=int(i % 5), seed=i, stop_token_ids=(int(i % 256),)))
    outs = run(core, prompts, params, logprobs=2)
    assert all(out and out[-1].finish_reason in ("stop", "length") for out in outs)
    assert core.trace_counts() == before
    assert backend_compiles() == compiles
    assert core.stats()["prefix_cache_hits"] > 0


def test_logprobs_match_the_full_forward(engine):
    """The first token's logprobs (host, from the prefill logits) and the decoded ones (device) equal the
    log-softmax of the model's full forward over prompt + generated tokens; top ids in order."""
    prompt = list(range(3, 40))
    outs = run(EngineCore(engine, max_batch=2), [prompt], [SamplingParams.greedy(max_new_tokens=8)], logprobs=5)[0]
    tokens = [o.token_id for o in outs]
    logits = np.asarray(jax.jit(engine.model)(jax.numpy.asarray([prompt + tokens])))[0, len(prompt) - 1:-1]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for k, out in enumerate(outs):
        assert abs(out.logprob - logp[k, tokens[k]]) < 1e-4
        assert [i for i, _ in out.top_logprobs] == np.argsort(-logp[k])[:5].tolist()
        np.testing.assert_allclose([v for _, v in out.top_logprobs], np.sort(logp[k])[::-1][:5], atol=1e-4)


def test_cancel_frees_the_slot_and_the_queue_is_bounded(engine):
    """One slot: a cancelled long request gives its slot to the next at once; a full queue raises QueueFull;
    a drained core raises ShuttingDown."""
    core = EngineCore(engine, max_batch=1, max_queue=2)
    seen = []

    def on_first(out):
        seen.append(out.token_id)
        if len(seen) == 2:
            long_request.cancel()
    long_request = core.submit(list(range(5, 25)), SamplingParams.greedy(max_new_tokens=100), on_first)
    short = []
    core.submit([7, 8, 9], SamplingParams.greedy(max_new_tokens=5), short.append)
    with pytest.raises(QueueFull, match="max_queue=2"):
        core.submit([1], SamplingParams.greedy(max_new_tokens=1), lambda out: None)
    core.start()
    assert core.drain(60)
    assert len(seen) < 100 and long_request.done
    expected = engine.generate([[7, 8, 9]], SamplingParams.greedy(max_new_tokens=5))[0].token_ids
    assert [o.token_id for o in short] == expected
    assert core.stats()["running"] == 0 and core.free == [0]
    with pytest.raises(ShuttingDown):
        core.submit([1], SamplingParams.greedy(max_new_tokens=1), lambda out: None)


def test_bad_requests_are_refused_with_the_reason(engine):
    core = EngineCore(engine, max_batch=1)
    for prompt, match in [([], "empty prompt"), ([1, 9999], "outside the vocabulary"),
                          (list(range(1, 130)), "max_len is 128")]:
        with pytest.raises(ValueError, match=match):
            core.submit(prompt, SamplingParams.greedy(), lambda out: None)
    with pytest.raises(ValueError, match="logprobs=21"):
        core.submit([1], SamplingParams.greedy(), lambda out: None, logprobs=21)
