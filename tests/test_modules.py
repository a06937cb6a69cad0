"""Per-module parity with HF transformers (float32): norms, Gated DeltaNet, gated attention, MoE, MLP."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwen35_jax import ModelConfig
from qwen35_jax.checkpoint.hf_loader import load_hf
from qwen35_jax.nn.decoder import Context
from qwen35_jax.ops.attention import causal_mask

TOL = 1e-5


@pytest.fixture(scope="module", params=["tiny-dense", "tiny-moe"])
def pair(request, hf_checkpoint):
    """(HF model, our model with unstacked layers so each layer is addressable)."""
    hf, folder = hf_checkpoint(request.param)
    return hf, load_hf(folder, jnp.float32, ModelConfig.from_hf(folder, scan_layers=False))


def hidden(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def run_hf(module, *args, **kwargs):
    with torch.no_grad():
        out = module(*(torch.as_tensor(a) for a in args), **kwargs)
    return (out[0] if isinstance(out, tuple) else out).numpy()


def test_norms(pair):
    hf, ours = pair
    x = hidden((2, 37, 64))
    assert np.abs(np.asarray(ours.norm(x)) - run_hf(hf.model.norm, x)).max() <= TOL
    layer_hf, layer = hf.model.layers[0], ours.decoder.periods.layers[0]
    got = layer.input_layernorm(x)
    assert np.abs(np.asarray(got) - run_hf(layer_hf.input_layernorm, x)).max() <= TOL
    z = hidden((2, 37, 4, 16), seed=1)
    v = hidden((2, 37, 4, 16), seed=2)
    got = layer.linear_attn.norm(v, z)
    assert np.abs(np.asarray(got) - run_hf(layer_hf.linear_attn.norm, v, z)).max() <= TOL


@pytest.mark.parametrize("seq", [1, 37, 150])
def test_gated_deltanet_layer(pair, seq):
    hf, ours = pair
    x = hidden((2, seq, 64), seed=seq)
    got, state = ours.decoder.periods.layers[0].linear_attn(x)
    ref = run_hf(hf.model.layers[0].linear_attn, x)
    assert np.abs(np.asarray(got) - ref).max() <= TOL
    assert state["recurrent"].shape == (2, 4, 16, 16) and state["recurrent"].dtype == jnp.float32


def test_gated_attention_layer_with_mrope_positions(pair):
    """Distinct T/H/W position rows exercise the interleaved mRoPE slot layout."""
    hf, ours = pair
    b, seq = 2, 37
    x = hidden((b, seq, 64))
    rng = np.random.default_rng(3)
    positions = np.cumsum(rng.integers(0, 3, size=(3, b, seq)), axis=-1).astype(np.int32)
    cos_hf, sin_hf = hf.model.rotary_emb(torch.as_tensor(x), torch.as_tensor(positions, dtype=torch.long))
    ref = run_hf(hf.model.layers[3].self_attn, x, position_embeddings=(cos_hf, sin_hf), attention_mask=None)
    cos, sin = ours.rope(jnp.asarray(positions))
    assert np.abs(np.asarray(cos) - cos_hf.numpy()).max() <= 1e-6
    got, cache = ours.decoder.periods.layers[3].self_attn(x, Context(cos, sin, causal_mask(seq)[None]))
    assert cache is None
    assert np.abs(np.asarray(got) - ref).max() <= TOL


def test_feed_forward_block(pair):
    hf, ours = pair
    x = hidden((2, 37, 64))
    got = ours.decoder.periods.layers[1].mlp(x)
    assert np.abs(np.asarray(got) - run_hf(hf.model.layers[1].mlp, x)).max() <= TOL
