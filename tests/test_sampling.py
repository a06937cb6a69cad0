"""The sampler with fixed seeds, against the definitions of each filter and penalty."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.sampling import SamplingParams, apply_penalties, batch_arrays, filter_logits, sample

VOCAB = 50


def draw(params: SamplingParams, logits, n=200, seed=0, counts=None, seen=None):
    """n samples for one row (steps 0..n-1)."""
    p = batch_arrays([params], [seed])
    counts = jnp.zeros((1, VOCAB), jnp.int32) if counts is None else counts
    seen = jnp.zeros((1, VOCAB), bool) if seen is None else seen
    fn = jax.jit(sample)
    return np.array([int(fn(logits[None], counts, seen, p, s)[0]) for s in range(n)])


LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=VOCAB) * 2, jnp.float32)


def test_greedy_is_argmax():
    assert set(draw(SamplingParams.greedy(), LOGITS, n=5)) == {int(jnp.argmax(LOGITS))}


def test_top_k_never_leaves_top_k():
    top5 = set(np.argsort(-np.asarray(LOGITS))[:5])
    got = draw(SamplingParams(temperature=2.0, top_k=5), LOGITS, n=300)
    assert set(got) <= top5 and len(set(got)) > 1


def test_top_p_never_leaves_nucleus():
    probs = np.asarray(jax.nn.softmax(LOGITS))
    order = np.argsort(-probs)
    nucleus = set(order[: np.searchsorted(np.cumsum(probs[order]), 0.7) + 1])
    got = draw(SamplingParams(temperature=1.0, top_p=0.7), LOGITS, n=300)
    assert set(got) <= nucleus and len(set(got)) > 1


def test_min_p_filter():
    probs = np.asarray(jax.nn.softmax(LOGITS))
    allowed = set(np.flatnonzero(probs >= 0.2 * probs.max()))
    got = draw(SamplingParams(min_p=0.2), LOGITS, n=300)
    assert set(got) <= allowed and len(set(got)) > 1


def test_same_seed_same_tokens_and_different_seed_differs():
    params = SamplingParams(temperature=1.5)
    a, b, c = draw(params, LOGITS, seed=7), draw(params, LOGITS, seed=7), draw(params, LOGITS, seed=8)
    assert (a == b).all() and (a != c).any()


def test_sampling_follows_the_distribution():
    got = draw(SamplingParams(temperature=1.0), LOGITS, n=2000)
    probs = np.asarray(jax.nn.softmax(LOGITS))
    freq = np.bincount(got, minlength=VOCAB) / len(got)
    assert np.abs(freq - probs).max() < 0.05


def test_penalties_as_defined():
    logits = jnp.asarray([[2.0, -1.0, 0.5, 3.0]])
    counts = jnp.asarray([[2, 1, 0, 0]])
    seen = jnp.asarray([[True, True, True, False]])  # token 2 only in the prompt
    p = batch_arrays([SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)], [0])
    got = np.asarray(apply_penalties(logits, counts, seen, p))
    expected = [2.0 / 2 - 0.25 * 2 - 0.5, -1.0 * 2 - 0.25 - 0.5, 0.5 / 2, 3.0]
    np.testing.assert_allclose(got[0], expected, atol=1e-6)


def test_filters_keep_the_best_token_even_with_tiny_top_p():
    p = batch_arrays([SamplingParams(top_p=1e-6, top_k=1)], [0])
    kept = np.isfinite(np.asarray(filter_logits(LOGITS[None], p)))[0]
    assert kept.sum() == 1 and kept[int(jnp.argmax(LOGITS))]


def test_presets():
    """The presets are Qwen3.5's published settings and change nothing else; the generate CLI picks the thinking
    one for chats (unless --no-thinking) and the non-thinking one otherwise, each flag overriding one value.

    References: the released generation_config.json (thinking: temperature 0.6, top_k 20, top_p 0.95; the
    architecture spec, section 10) and the model card's instruct (non-thinking) settings: temperature 0.7,
    top_p 0.8, top_k 20, presence_penalty 1.5."""
    from infer.generate import build_parser, sampling_from_args
    default = SamplingParams()
    thinking = dataclasses.replace(default, temperature=0.6, top_k=20, top_p=0.95)
    non_thinking = dataclasses.replace(default, temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5)
    assert SamplingParams.thinking() == thinking and SamplingParams.non_thinking() == non_thinking
    assert SamplingParams.thinking(top_k=5, seed=3) == dataclasses.replace(thinking, top_k=5, seed=3)

    def cli(*flags):
        return sampling_from_args(build_parser().parse_args(["--model", "m", *flags]))
    expected = {(): non_thinking, ("--prompt", "x", "--chat"): thinking,
                ("--prompt", "x", "--chat", "--no-thinking"): non_thinking, ("--interactive",): thinking,
                ("--interactive", "--no-thinking"): non_thinking}
    for flags, preset in expected.items():
        assert cli(*flags) == dataclasses.replace(preset, max_new_tokens=256), flags
    assert cli("--chat", "--temperature", "0", "--top-k", "7", "--stop", "END", "--max-new-tokens", "9") == \
        dataclasses.replace(thinking, temperature=0.0, top_k=7, stop=("END",), max_new_tokens=9)


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(stop=[""]), "stop"),
])
def test_invalid_values_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
