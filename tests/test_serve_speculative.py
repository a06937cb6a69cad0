"""Speculative decoding in the serving core and the server (`infer.scheduler`, `infer.slot_steps`): token for token
the plain greedy `Engine.generate` tokens, the target model's logprobs, the prefix cache with the MTP cache in its
snapshots, per-request acceptance, and the numbers over HTTP.

The drafts are the plain greedy continuation with the j-th draft of a step corrupted where (d + j) % 3 == 0, d being
the real MTP block's first draft of that step: every acceptance length 0..K occurs, and the pattern follows the
MTP cache the core builds (prefill, carry). The expected acceptance replays it with d from the MTP's full-sequence
forward (`MTP.__call__` over the main model's hidden states). The drafter finds a row's request by its sampling
key (seed), whatever slot it sits in."""

import threading

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_serve import ServerThread

import infer.speculative as speculative
from infer import Engine, SamplingParams
from infer.scheduler import EngineCore, backend_compiles
from infer.serve import create_app, main
from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.model import Qwen35

K, MAX_LEN, CHUNK = 2, 128, 16
NEW = (48, 40, 48, 44, 48)       # max_new_tokens per request; the last arrives while the others decode
PROMPT_LENGTHS = (5, 9, 20, 13, 90)  # (+ 32 shared tokens for 1 and 3); the last one fills the cache (MAX_LEN)
STOP_AT = 3, 20                  # request 3 stops on the token its greedy run makes at index 20
LOGPROBS = 1, 3                  # request 1 asks for 3 top logprobs
SEEDS = [100 + i for i in range(len(NEW))]


def oracle_drafter(table, keys, vocab):
    """A `draft_tokens` stand-in (the real MTP runs first, for its cache and its first draft d): row b's request
    is the one whose seed key equals sampling["key"][b]; its drafts are that request's greedy tokens, the j-th
    + 1 where (d + j) % 3 == 0."""
    real = speculative.draft_tokens

    def drafts(model, state, carry, counts, seen, sampling, step, k, moe_backend):
        mtp_drafts, _, state = real(model, state, carry, counts, seen, sampling, step, k, moe_backend)
        request = jnp.argmax(jnp.all(sampling["key"][:, None] == keys[None], axis=-1), axis=1)
        at = jnp.minimum(state["lengths"][:, None] + 1 + jnp.arange(k)[None], table.shape[1] - 1)
        true = table[request[:, None], at]
        chosen = jnp.where((mtp_drafts[:, :1] + jnp.arange(k)[None]) % 3 == 0, (true + 1) % vocab, true)
        return chosen, jax.nn.one_hot(chosen, vocab, dtype=jnp.float32), state
    return drafts


def reference(engine, sequences):
    """(log-softmax of the main model's logits [B, T, V], the MTP's greedy draft at each position [B, T - 1]) from
    full-sequence forwards over right-padded token sequences."""
    width = max(map(len, sequences))
    ids = jnp.asarray([seq + [0] * (width - len(seq)) for seq in sequences], jnp.int32)

    def forward(params, ids):
        model = nnx.merge(engine.graphdef, params)
        hidden = model.hidden_states(ids)
        mtp = model.mtp(hidden[:, :-1], model.embed(ids[:, 1:]))
        return jax.nn.log_softmax(model.logits(hidden), axis=-1), jnp.argmax(model.logits(mtp), axis=-1)
    return jax.device_get(jax.jit(forward)(engine.params, ids))


def replayed_acceptance(prompt_length, n_tokens, mtp_drafts):
    """Mean tokens per verify step of a request that made n_tokens (the first from the prefill), the drafter's
    pattern replayed: a step starting with L tokens in the state accepts the drafts before the first j with
    (mtp_drafts[L - 1] + j) % 3 == 0, then the target's token, capped by what the request still makes."""
    length, made, steps = prompt_length, 1, 0
    while made < n_tokens:
        accepted = next((j for j in range(K) if (mtp_drafts[length - 1] + j) % 3 == 0), K)
        emitted = min(accepted + 1, n_tokens - made)
        length, made, steps = length + emitted, made + emitted, steps + 1
    return (n_tokens - 1) / steps


@pytest.fixture(scope="module")
def setup():
    """(prompts, params, expected greedy tokens, expected acceptance, reference log-probs, the started core)."""
    model = Qwen35(ModelConfig.from_hf("tiny-moe", mtp_num_hidden_layers=1), rngs=nnx.Rngs(0))
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    system = rng.integers(0, vocab, 2 * CHUNK).tolist()   # shared by requests 1 and 3: prefix-cache hits
    prompts = [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]
    prompts[1], prompts[3] = system + prompts[1], system + prompts[3]
    params = [SamplingParams.greedy(max_new_tokens=n, ignore_eos=True, seed=s) for n, s in zip(NEW, SEEDS)]
    plain = Engine(model, max_len=MAX_LEN, prefill_chunk=CHUNK)
    expected = [r.token_ids for r in plain.generate(prompts, params)]
    assert len(prompts[4]) + len(expected[4]) == MAX_LEN + 1   # stopped by the cache, not max_new_tokens
    i, at = STOP_AT
    params[i] = SamplingParams.greedy(max_new_tokens=NEW[i], ignore_eos=True, seed=SEEDS[i],
                                      stop_token_ids=(expected[i][at],))
    expected[i] = expected[i][:expected[i].index(expected[i][at]) + 1]
    table = np.zeros((len(prompts), MAX_LEN + K + 2), np.int32)
    for row, (p, t) in enumerate(zip(prompts, expected)):
        table[row, :len(p) + len(t)] = p + t
    keys = jnp.stack([jax.random.key_data(jax.random.PRNGKey(s)) for s in SEEDS])
    engine = Engine(model, max_len=MAX_LEN, prefill_chunk=CHUNK, num_speculative_tokens=K)
    logp, mtp_drafts = reference(engine, [p + t for p, t in zip(prompts, expected)])
    acceptance = [replayed_acceptance(len(p), len(t), d) for p, t, d in zip(prompts, expected, mtp_drafts)]
    core = EngineCore(engine, max_batch=4, decode_steps=2, prefix_cache_bytes=1 << 24)
    with pytest.MonkeyPatch.context() as patch:   # the block traces (and so keeps) the oracle drafter
        patch.setattr(speculative, "draft_tokens", oracle_drafter(jnp.asarray(table), keys, vocab))
        core.warmup()
    yield prompts, params, expected, acceptance, logp, core.start(warmup=False)
    core.drain(30)


def test_speculative_core_gives_the_plain_greedy_tokens(setup):
    """Four requests at once (mixed lengths, a shared prefix, a stop token, logprobs) and a fifth arriving while
    they decode (and fills the cache): each gets exactly the plain greedy tokens and the replayed acceptance,
    its logprobs are the target model's; nothing compiles after warm-up."""
    prompts, params, expected, acceptance, logp, core = setup
    traces, compiles = core.trace_counts(), backend_compiles()
    outs = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def collect(i):
        def on_output(out):
            outs[i].append(out)
            if i == 0 and len(outs[0]) == 10:                 # the late request arrives mid-decode
                core.submit(prompts[4], params[4], collect(4))
            if out.finish_reason is not None:
                done[i].set()
        return on_output
    for i in range(4):
        core.submit(prompts[i], params[i], collect(i), logprobs=LOGPROBS[1] if i == LOGPROBS[0] else None)
    assert all(event.wait(120) for event in done)
    for i, (out, exp) in enumerate(zip(outs, expected)):
        assert [o.token_id for o in out] == exp, f"request {i}"
        assert out[-1].finish_reason == ("stop" if i == STOP_AT[0] else "length")
        assert out[-1].mean_acceptance_length == pytest.approx(acceptance[i]), f"request {i}"
    assert np.mean([o[-1].mean_acceptance_length for o in outs]) > 1.5   # multi-token steps all the way
    stats = core.stats()
    assert stats["prefix_cache_hits"] >= 1 and stats["prefix_cache_hit_tokens"] >= 2 * CHUNK
    assert stats["generation_tokens_total"] == sum(map(len, expected))
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"] \
        == K * stats["spec_decode_num_drafts"]
    assert core.trace_counts() == traces and backend_compiles() == compiles
    i, n = LOGPROBS
    tokens, logp = expected[i], logp[i, len(prompts[i]) - 1:]
    for k, out in enumerate(outs[i]):
        assert abs(out.logprob - logp[k, tokens[k]]) < 1e-4, k
        assert [t for t, _ in out.top_logprobs] == np.argsort(-logp[k])[:n].tolist()
        np.testing.assert_allclose([v for _, v in out.top_logprobs], np.sort(logp[k])[::-1][:n], atol=1e-4)


def test_speculative_server_reports_acceptance(setup):
    """Over HTTP: the same tokens, `usage.mean_acceptance_length`, the spec-decode counters on /metrics; a bad
    --speculative is refused before anything loads."""
    prompts, params, expected, acceptance, _, core = setup
    http = ServerThread(create_app(core, core.engine, "tiny"))
    try:
        reply = httpx.post(http.url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompts[0], "max_tokens": NEW[0], "temperature": 0, "seed": SEEDS[0],
            "ignore_eos": True, "return_token_ids": True}).json()
        assert reply["choices"][0]["token_ids"] == expected[0]
        assert reply["usage"]["mean_acceptance_length"] == pytest.approx(acceptance[0])
        metrics = http.metrics()
        drafts = metrics["qwen35_spec_decode_num_drafts_total"]
        assert metrics["qwen35_spec_decode_num_draft_tokens_total"] == K * drafts > 0
        assert 0 < metrics["qwen35_spec_decode_num_accepted_tokens_total"] < K * drafts
    finally:
        http.stop()
    assert main(["--model", "/no/such/folder", "--speculative", "5"]) == 2


def test_sampled_requests_on_the_speculative_core_equal_the_engine_alone():
    """Sampled requests (temperature with top-k, top-p with a presence penalty, min-p) and a greedy one, at once
    in a 4-slot speculative core: each gets exactly the tokens the speculative `Engine.generate` gives its seed
    alone (per-request keys: the same whatever slot and neighbours), drafts of the random MTP are accepted
    (sampled acceptance runs), and every token of the top-k request is within the target model's top k."""
    model = Qwen35(ModelConfig.from_hf("tiny-moe", mtp_num_hidden_layers=1), rngs=nnx.Rngs(3))
    vocab = model.config.vocab_size
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (7, 19, 4, 30)]
    params = [SamplingParams(max_new_tokens=24, temperature=0.8, top_k=3, seed=1, ignore_eos=True),
              SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, presence_penalty=0.5, seed=2,
                             ignore_eos=True),
              SamplingParams.greedy(max_new_tokens=16, seed=3, ignore_eos=True),
              SamplingParams(max_new_tokens=22, temperature=1.3, min_p=0.05, seed=4, ignore_eos=True)]
    engine = Engine(model, max_len=MAX_LEN, prefill_chunk=CHUNK, num_speculative_tokens=K)
    alone = [engine.generate([p], [q])[0] for p, q in zip(prompts, params)]
    core = EngineCore(engine, max_batch=4, decode_steps=2).start()
    try:
        outs = [[] for _ in prompts]
        done = [threading.Event() for _ in prompts]

        def collect(i):
            def on_output(out):
                outs[i].append(out)
                if out.finish_reason is not None:
                    done[i].set()
            return on_output
        for i, (p, q) in enumerate(zip(prompts, params)):
            core.submit(p, q, collect(i))
        assert all(event.wait(120) for event in done)
    finally:
        core.drain(30)
    for i, (out, expected) in enumerate(zip(outs, alone)):
        assert [o.token_id for o in out] == expected.token_ids, f"request {i}"
        assert out[-1].mean_acceptance_length == pytest.approx(expected.mean_acceptance_length), f"request {i}"
    assert max(r.mean_acceptance_length for r in alone[:2] + alone[3:]) > 1.2   # sampled drafts were accepted
    logp, _ = reference(engine, [prompts[0] + alone[0].token_ids])
    top3 = np.argsort(-logp[0], axis=-1)[:, :3]
    for t, token in enumerate(alone[0].token_ids):
        assert token in top3[len(prompts[0]) - 1 + t], t
