"""The inference engine against HF generate and against our own full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from infer import Engine, SamplingParams
from qwen35_jax import load_model
from qwen35_jax.cache import init_decode_state

PROMPTS = [[5, 17, 200, 3, 9, 41, 77], list(range(10, 60)), [250], list(np.arange(100) * 7 % 256)]


def hf_greedy(hf, prompt, n):
    ids = torch.as_tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["tiny-dense", "tiny-moe"])
def setup(request, hf_checkpoint):
    hf, folder = hf_checkpoint(request.param)
    return hf, load_model(folder)


def test_greedy_matches_hf_generate_alone_and_batched(setup):
    hf, model = setup
    engine = Engine(model, max_len=256, prefill_chunk=32)  # 32: the 50/100-token prompts take several chunks
    greedy = SamplingParams.greedy(max_new_tokens=32)
    expected = [hf_greedy(hf, p, 32) for p in PROMPTS]
    batched = engine.generate(PROMPTS, greedy)
    for prompt, exp, res in zip(PROMPTS, expected, batched):
        assert res.token_ids == exp, f"prompt of {len(prompt)} tokens"
        assert res.finish_reason == "length"
    alone = engine.generate([PROMPTS[1]], greedy)[0]
    assert alone.token_ids == expected[1]


def test_decode_compiles_once_per_generation(setup):
    _, model = setup
    engine = Engine(model, max_len=128)
    engine.generate([PROMPTS[0], PROMPTS[2]], SamplingParams.greedy(max_new_tokens=20))
    assert engine.decode_traces == 1
    engine.generate([PROMPTS[2], PROMPTS[0]], SamplingParams(temperature=0.8, top_k=5, max_new_tokens=12, seed=3))
    assert engine.decode_traces == 1  # new parameters and prompts, same shapes: no recompilation


def stepwise_logits(model, tokens, max_len=128, first=1):
    """Prefill tokens[:first], then feed one token at a time; logits at every position [L, V]."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, state, ids):
        m = nnx.merge(graphdef, params)
        hidden, state = m.forward_with_state(ids, state)
        return m.logits(hidden), state

    state = init_decode_state(model.config, 1, max_len, jnp.float32)
    out, state = step(params, state, jnp.asarray([tokens[:first]]))
    logits = [out[0]]
    for t in tokens[first:]:
        out, state = step(params, state, jnp.asarray([[t]]))
        logits.append(out[0])
    return np.concatenate(logits), state


def test_incremental_decode_logits_equal_full_forward(setup):
    _, model = setup
    tokens = PROMPTS[3][:70]
    full = np.asarray(model(jnp.asarray([tokens])))[0]
    for first in (1, 40):
        got, state = stepwise_logits(model, tokens, first=first)
        assert np.abs(got - full).max() <= 1e-4
        assert int(state["lengths"][0]) == 70


def test_prefill_a_then_b_equals_prefill_a_plus_b(setup):
    _, model = setup
    a, b = PROMPTS[1], PROMPTS[3][:30]
    empty = init_decode_state(model.config, 1, 128, jnp.float32)
    h_ab, s_ab = model.forward_with_state(jnp.asarray([a + b]), empty)
    h_a, s_a = model.forward_with_state(jnp.asarray([a]), empty)
    h_b, s_b = model.forward_with_state(jnp.asarray([b]), s_a)
    np.testing.assert_allclose(model.logits(h_b), model.logits(h_ab[:, len(a):]), atol=1e-4)
    for x, y in zip(jax.tree.leaves(s_b), jax.tree.leaves(s_ab)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=1e-4)


def test_padding_never_enters_the_state(setup):
    """A right-padded row (n_valid < T) leaves the same state as the unpadded prompt."""
    _, model = setup
    empty = init_decode_state(model.config, 1, 64, jnp.float32)
    prompt = PROMPTS[0]
    _, exact = model.forward_with_state(jnp.asarray([prompt]), empty)
    padded = jnp.asarray([prompt + [99] * 9])
    _, state = model.forward_with_state(padded, empty, jnp.asarray([len(prompt)]))
    assert int(state["lengths"][0]) == len(prompt)
    for layer_exact, layer in zip(exact["layers"], state["layers"]):
        for name in layer:
            if name in ("k", "v"):  # padded positions are beyond the length: compare the real ones
                np.testing.assert_allclose(layer[name][..., :len(prompt), :, :],
                                           layer_exact[name][..., :len(prompt), :, :], atol=1e-5)
            else:
                np.testing.assert_allclose(layer[name], layer_exact[name], atol=1e-5, err_msg=name)


def test_seeded_sampling_is_reproducible_and_stop_tokens_stop(setup):
    _, model = setup
    engine = Engine(model, max_len=128)
    params = SamplingParams(temperature=1.0, seed=11, max_new_tokens=16)
    first = engine.generate([PROMPTS[0]], params)[0]
    again = engine.generate([PROMPTS[0]], params)[0]
    assert first.token_ids == again.token_ids
    stop_at = first.token_ids[5]
    stopped = engine.generate([PROMPTS[0]], SamplingParams(temperature=1.0, seed=11, max_new_tokens=16,
                                                           stop_token_ids=(stop_at,)))[0]
    cut = first.token_ids.index(stop_at)
    assert stopped.token_ids == first.token_ids[:cut + 1] and stopped.finish_reason == "stop"


def test_bad_input(setup):
    _, model = setup
    engine = Engine(model, max_len=64)
    with pytest.raises(ValueError, match="exceeds max_len=64"):
        engine.generate([list(range(65))])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]])
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 256\)"):
        engine.generate([[1, 256]])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        engine.generate(["text"])


def test_generation_stops_when_the_state_is_full(setup):
    _, model = setup
    engine = Engine(model, max_len=16)
    result = engine.generate([list(range(10))], SamplingParams.greedy(max_new_tokens=50))[0]
    # every state slot is used: the prompt, then all generated tokens but the last (never fed back)
    assert result.finish_reason == "length" and 10 + len(result.token_ids) - 1 == 16


def test_engine_on_a_mesh_matches_single_device(hf_checkpoint):
    """Parameters sharded (experts over 4 devices, heads/MLP over 2): the same greedy tokens."""
    from qwen35_jax.sharding import make_mesh
    _, folder = hf_checkpoint("tiny-moe")
    params = SamplingParams.greedy(max_new_tokens=12)
    single = Engine.load(folder, max_len=128).generate(PROMPTS[:2], params)
    mesh = make_mesh("expert=4,tensor=2")
    sharded_engine = Engine.load(folder, max_len=128, mesh=mesh)
    experts = sharded_engine.model.decoder.periods.layers[0].mlp.experts_gate_up[...]
    assert {s.data.nbytes for s in experts.addressable_shards} == {experts.nbytes // 8}
    sharded = sharded_engine.generate(PROMPTS[:2], params)
    assert [r.token_ids for r in sharded] == [r.token_ids for r in single]


def test_engine_decode_state_is_sharded_and_stays_so(hf_checkpoint):
    """The engine's own placement: 4 rows split over expert=4 (the batch rule), heads over tensor=2; after
    prefill and decoding the state keeps that placement, and the tokens equal the single-device engine's
    (4 rows: the MoE dispatches tokens by all-to-all during prefill and by gather + reduce-scatter in decode)."""
    from qwen35_jax.sharding import make_mesh
    _, folder = hf_checkpoint("tiny-moe")
    prompts = PROMPTS  # 4 prompts of 7, 50, 1 and 100 tokens
    params = SamplingParams.greedy(max_new_tokens=6)
    single = Engine.load(folder, max_len=128).generate(prompts, params)
    engine = Engine.load(folder, max_len=128, mesh=make_mesh("expert=4,tensor=2"))
    state = engine.init_state(4)
    rows_per_device = lambda x: x.sharding.shard_shape(x.shape)[0]  # noqa: E731
    k = state["layers"][3]["k"]  # [batch, max_len, kv_heads, head_dim]
    assert rows_per_device(k) == 1 and rows_per_device(state["layers"][0]["recurrent"]) == 1
    assert k.sharding.shard_shape(k.shape)[2] == engine.config.num_key_value_heads // 2
    sharded = engine.generate(prompts, params)
    assert [r.token_ids for r in sharded] == [r.token_ids for r in single]
    final = engine.last_state
    assert rows_per_device(final["layers"][3]["k"]) == 1 and rows_per_device(final["layers"][0]["conv_v"]) == 1
