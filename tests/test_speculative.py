"""Speculative decoding with the MTP block (infer.speculative): the acceptance rule keeps the target distribution,
greedy speculative decoding equals plain greedy decoding token for token and state for state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import infer.speculative as speculative
from infer import Engine, SamplingParams
from infer.speculative import accept, emitted_count
from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.model import Qwen35

VOCAB, K, DRAWS = 6, 2, 40000


def test_rejection_sampling_keeps_the_target_distribution():
    """Drafts drawn from q, accepted by `accept`: the first emitted token follows p_0 and, in steps that emit
    two or more tokens, the second follows p_1 (chi-square, 40,000 draws; p and q far apart)."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(VOCAB) * 0.7, size=K + 1)   # target, per position
    q = rng.dirichlet(np.ones(VOCAB) * 0.7, size=K)       # draft, per position
    keys = jax.random.split(jax.random.key(1), DRAWS)
    draft_keys = jax.random.split(jax.random.key(2), (DRAWS, K))
    drafts = jax.vmap(jax.vmap(lambda key, probs: jax.random.categorical(key, jnp.log(probs))), in_axes=(0, None))(
        draft_keys, jnp.asarray(q, jnp.float32)).astype(jnp.int32)
    accepted, tokens = accept(drafts, jnp.broadcast_to(jnp.asarray(q, jnp.float32), (DRAWS, K, VOCAB)),
                              jnp.broadcast_to(jnp.asarray(p, jnp.float32), (DRAWS, K + 1, VOCAB)), keys)
    accepted, tokens = np.asarray(accepted), np.asarray(tokens)
    first = np.bincount(tokens[:, 0], minlength=VOCAB)
    assert stats.chisquare(first, p[0] * DRAWS).pvalue > 1e-3
    two = accepted >= 1
    second = np.bincount(tokens[two, 1], minlength=VOCAB)
    assert stats.chisquare(second, p[1] * two.sum()).pvalue > 1e-3
    # and the test can tell: the drafts alone do not follow p
    assert stats.chisquare(np.bincount(np.asarray(drafts)[:, 0], minlength=VOCAB), p[0] * DRAWS).pvalue < 1e-6


def test_greedy_acceptance_is_exact_match_and_emission_stops_at_limits_and_stop_tokens():
    eye = np.eye(VOCAB, dtype=np.float32)
    target = jnp.asarray(eye[[[1, 2, 3], [1, 4, 3], [5, 2, 3]]])     # argmax per position, 3 rows
    drafts = jnp.asarray([[1, 2], [1, 2], [1, 2]], jnp.int32)
    accepted, tokens = accept(drafts, jnp.asarray(eye[np.asarray(drafts)]), target, jax.random.split(jax.random.key(0), 3))
    np.testing.assert_array_equal(accepted, [2, 1, 0])
    np.testing.assert_array_equal(tokens, [[1, 2, 3], [1, 4, 0], [5, 0, 0]])
    no_draws = accept(drafts, jnp.asarray(eye[np.asarray(drafts)]), target, jax.random.split(jax.random.key(0), 3),
                      sampled=False)  # the all-greedy path draws no random numbers and decides the same
    np.testing.assert_array_equal(no_draws[0], accepted)
    np.testing.assert_array_equal(no_draws[1], tokens)
    stop = jnp.asarray([[-1], [1], [-1]], jnp.int32)
    np.testing.assert_array_equal(emitted_count(accepted, tokens, jnp.asarray([3, 3, 3]), stop), [3, 1, 1])
    np.testing.assert_array_equal(emitted_count(accepted, tokens, jnp.asarray([2, 3, 1]), stop[:, :0] - 1), [2, 2, 1])


# ---- the engine ---------------------------------------------------------------------------------------------

MAX_LEN, NEW = 320, 256
PROMPT_LENGTHS = (3, 17, 40, 9, 1, 28, 64, 12)  # batch 8, mixed


def mtp_model(seed=0) -> Qwen35:
    """tiny-moe (Gated DeltaNet + attention + MoE) with a random MTP block: its drafts are mostly rejected."""
    return Qwen35(ModelConfig.from_hf("tiny-moe", mtp_num_hidden_layers=1), rngs=nnx.Rngs(seed))


def prompts(vocab, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def plain_run():
    """(model, prompts, plain greedy tokens, plain final state) for 256 new tokens at batch 8."""
    model = mtp_model()
    engine = Engine(model, max_len=MAX_LEN, prefill_chunk=32)
    batch = prompts(model.config.vocab_size)
    results = engine.generate(batch, SamplingParams.greedy(max_new_tokens=NEW, ignore_eos=True))
    return model, batch, [r.token_ids for r in results], jax.device_get(engine.last_state)


def continuation_table(batch, expected, width) -> jax.Array:
    """int [B, width]: each row's prompt then its plain greedy tokens (what `oracle_drafts` reads), zero-padded."""
    table = np.zeros((len(batch), width), np.int32)
    for i, (p, t) in enumerate(zip(batch, expected)):
        table[i, :len(p) + len(t)] = p + t
    return jnp.asarray(table)


def oracle_drafts(table, vocab, k, corrupt_every):
    """A draft_tokens stand-in: the plain greedy continuation (table [B, N]: prompt + generated tokens), every
    position whose hash hits `corrupt_every` changed, so acceptance lengths vary over 0..K; the real MTP still
    runs for its cache."""
    real = speculative.draft_tokens

    def drafts(model, state, carry, counts, seen, sampling, step, k_, moe_backend):
        _, _, state = real(model, state, carry, counts, seen, sampling, step, k_, moe_backend)
        at = state["lengths"][:, None] + 1 + jnp.arange(k)[None]
        true = jnp.take_along_axis(table, jnp.minimum(at, table.shape[1] - 1), axis=1)
        wrong = ((at * 7919) % 97) < 97 // corrupt_every
        chosen = jnp.where(wrong, (true + 1) % vocab, true)
        return chosen, jax.nn.one_hot(chosen, vocab, dtype=jnp.float32), state
    return drafts


# The two runs compute the same float32 arithmetic with different matmul shapes (K+1 tokens per verify vs 1 per
# step), so the states differ by rounding: measured at most 1.19e-6 over 256 tokens (values up to ~2: 5 ulps).
# The bound leaves room for other jax versions' kernels; selecting the state one token off changes the tokens.
STATE_ATOL = 4e-6


def assert_same_state(spec_state, plain_state, lengths):
    np.testing.assert_array_equal(spec_state["lengths"], plain_state["lengths"])
    for spec_layer, plain_layer in zip(spec_state["layers"], plain_state["layers"]):
        for name, plain in plain_layer.items():
            spec = np.asarray(spec_layer[name])
            if name in ("k", "v"):  # entries past each row's length are free
                for b, n in enumerate(lengths):
                    np.testing.assert_allclose(spec[..., b, :n, :, :], plain[..., b, :n, :, :], atol=STATE_ATOL,
                                               rtol=0)
            else:
                np.testing.assert_allclose(spec, plain, atol=STATE_ATOL, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("drafter", ["mtp", "oracle"])
def test_speculative_greedy_equals_plain_greedy_tokens_and_state(plain_run, monkeypatch, k, drafter):
    """256 new tokens at batch 8, mixed prompt lengths: the tokens and the final decode state (GDN conv and
    recurrent states, attention KV up to each row's length) equal plain greedy decoding's, both with the random
    MTP (nearly every draft rejected) and with oracle drafts corrupted at some positions (every acceptance
    length 0..K taken)."""
    model, batch, expected, plain_state = plain_run
    if drafter == "oracle":
        table = continuation_table(batch, expected, MAX_LEN + 8)
        monkeypatch.setattr(speculative, "draft_tokens", oracle_drafts(table, model.config.vocab_size, k,
                                                                      corrupt_every=3))
    engine = Engine(model, max_len=MAX_LEN, prefill_chunk=32, num_speculative_tokens=k)
    results = engine.generate(batch, SamplingParams.greedy(max_new_tokens=NEW, ignore_eos=True))
    assert [r.token_ids for r in results] == expected
    means = [r.mean_acceptance_length for r in results]
    assert all(1.0 <= m <= k + 1 for m in means)
    if drafter == "oracle":
        assert np.mean(means) > 1.5  # most drafts accepted: the selection at every index is exercised
    assert_same_state(jax.device_get(engine.last_state), plain_state,
                      [len(p) + NEW - 1 for p in batch])


def test_speculative_greedy_with_penalties_equals_plain(monkeypatch):
    """Repetition, presence and frequency penalties see the accepted drafts one by one (each verify position
    penalised with the counts before it): tokens still equal plain greedy decoding's (oracle drafts, K=3)."""
    model = mtp_model(seed=3)
    batch = prompts(model.config.vocab_size, seed=4)[:2]
    params = SamplingParams.greedy(max_new_tokens=40, ignore_eos=True, repetition_penalty=1.3,
                                   presence_penalty=0.5, frequency_penalty=0.3)
    expected = [r.token_ids for r in Engine(model, max_len=128, prefill_chunk=32).generate(batch, params)]
    table = continuation_table(batch, expected, 160)
    monkeypatch.setattr(speculative, "draft_tokens", oracle_drafts(table, model.config.vocab_size, 3,
                                                                  corrupt_every=4))
    results = Engine(model, max_len=128, prefill_chunk=32, num_speculative_tokens=3).generate(batch, params)
    assert [r.token_ids for r in results] == expected
    assert np.mean([r.mean_acceptance_length for r in results]) > 1.5


def test_sampled_speculative_decoding_is_seeded_and_stays_in_the_filters():
    """Sampled rows (temperature, top-k 3) with K=2: the same seeds give the same tokens, and every token is one of
    the top 3 of the target model given the tokens before it (a plain forward over the output)."""
    model = mtp_model(seed=5)
    batch = prompts(model.config.vocab_size, seed=6)[:2]
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=3, seed=11, ignore_eos=True)
    engine = Engine(model, max_len=96, prefill_chunk=32, num_speculative_tokens=2)
    first, second = engine.generate(batch, params), engine.generate(batch, params)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    for prompt, result in zip(batch, first):
        ids = np.asarray(prompt + result.token_ids, np.int32)[None]
        logits = np.asarray(model(jnp.asarray(ids)))[0, len(prompt) - 1:-1]
        top3 = np.argsort(-logits, axis=-1)[:, :3]
        assert all(t in row for t, row in zip(result.token_ids, top3))


def test_speculative_decoding_on_a_mesh_equals_single_device_plain(monkeypatch):
    """Experts over expert=4, heads over tensor=2, 4 rows (one per expert shard): speculative greedy decoding with
    oracle drafts (K=3, acceptance lengths 0..3) gives the single-device plain greedy tokens, and the decode state
    keeps the engine's placement (rows over expert, KV heads over tensor)."""
    from qwen35_jax.sharding import make_mesh
    model = mtp_model(seed=7)
    batch = prompts(model.config.vocab_size, seed=8)[:4]
    params = SamplingParams.greedy(max_new_tokens=24, ignore_eos=True)
    expected = [r.token_ids for r in Engine(model, max_len=128, prefill_chunk=32).generate(batch, params)]
    table = continuation_table(batch, expected, 160)
    monkeypatch.setattr(speculative, "draft_tokens", oracle_drafts(table, model.config.vocab_size, 3,
                                                                  corrupt_every=3))
    engine = Engine(model, max_len=128, prefill_chunk=32, mesh=make_mesh("expert=4,tensor=2"),
                    num_speculative_tokens=3)
    results = engine.generate(batch, params)
    assert [r.token_ids for r in results] == expected
    assert np.mean([r.mean_acceptance_length for r in results]) > 1.5
    k = engine.last_state["layers"][3]["k"]  # [batch, max_len, kv_heads, head_dim]
    assert k.sharding.shard_shape(k.shape)[0] == 1
    assert k.sharding.shard_shape(k.shape)[2] == model.config.num_key_value_heads // 2
    assert engine.last_state["mtp"]["k"].sharding.shard_shape(engine.last_state["mtp"]["k"].shape)[0] == 1
