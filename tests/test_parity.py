"""Full-model logits against HF transformers in float32 (tiny random dense and MoE models)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen35_jax import ModelConfig, load_model
from qwen35_jax.checkpoint.hf_loader import load_hf
from qwen35_jax.hf_reference import build_hf_model, hf_logits, random_tokens, save_hf_model

TOL = 1e-4  # the bar; measured errors are ~3e-7


def jitted(model):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    return lambda tokens: np.asarray(fn(state, jnp.asarray(tokens)))


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_logits_match_hf(hf_checkpoint, preset):
    hf, folder = hf_checkpoint(preset)
    ours = jitted(load_model(folder))
    for seq in (1, 37, 64, 150):
        tokens = random_tokens(256, 2, seq, seed=seq)
        ref = hf_logits(hf, tokens)
        err = np.abs(ours(tokens) - ref).max()
        assert err <= TOL, f"{preset} seq {seq}: max abs logit error {err:.2e}"
        assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero tensors


def test_scanned_and_unrolled_layers_agree(hf_checkpoint):
    _, folder = hf_checkpoint("tiny-moe")
    tokens = random_tokens(256, 2, 40)
    scanned = load_hf(folder, jnp.float32, ModelConfig.from_hf(folder))
    unrolled = load_hf(folder, jnp.float32, ModelConfig.from_hf(folder, scan_layers=False))
    assert scanned.config.num_periods == 2 and unrolled.config.num_periods == 1
    np.testing.assert_allclose(jitted(scanned)(tokens), jitted(unrolled)(tokens), atol=1e-6)


def test_irregular_layer_types_and_tied_embeddings(tmp_path):
    """layer_types that do not repeat run as a plain loop; tied embeddings reuse embed_tokens."""
    types = ["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"]
    hf = build_hf_model("tiny-dense", num_hidden_layers=5, layer_types=types, tie_word_embeddings=True)
    ours = load_model(save_hf_model(hf, tmp_path))
    assert ours.config.num_periods == 1 and ours.config.tie_word_embeddings
    tokens = random_tokens(256, 2, 70)
    assert np.abs(jitted(ours)(tokens) - hf_logits(hf, tokens)).max() <= TOL


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_bfloat16_forward_tracks_float32(hf_checkpoint, preset):
    """bf16 weights and activations against the fp32 model.

    Tolerance: the reference's own bf16 rounding error. HF run in bf16 differs from HF in fp32 by E_hf
    (8 mantissa bits rounded at every matmul and residual; MoE routing near-ties can flip an expert, so
    E_hf is ~0.04 for the MoE model against ~0.007 for the dense one). Our bf16 path must stay within
    1.5 x E_hf of our fp32 logits and of HF's bf16 logits: not noisier than HF's own bf16 path."""
    import torch
    hf, folder = hf_checkpoint(preset)
    tokens = random_tokens(256, 2, 64)
    f32 = jitted(load_model(folder, dtype="float32"))(tokens)
    b16_model = load_model(folder, dtype="bfloat16", compute_dtype="bfloat16")  # genuine bf16 compute on CPU
    assert b16_model.embed_tokens[...].dtype == jnp.bfloat16
    b16 = jitted(b16_model)(tokens).astype(np.float32)
    hf_f32 = hf_logits(hf, tokens)
    hf_b16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), tokens)  # the session's HF model stays float32
    hf_own_error = np.abs(hf_b16 - hf_f32).max()
    assert 0 < hf_own_error < 0.1 * np.abs(hf_f32).max()
    assert np.abs(b16 - f32).max() <= 1.5 * hf_own_error
    assert np.abs(b16 - hf_b16).max() <= 1.5 * hf_own_error
