"""Training: gradient parity with HF torch, packing, resume, sharding, frozen groups, overfitting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwen35_jax.checkpoint.names import checkpoint_rules
from qwen35_jax.hf_reference import build_hf_model, save_hf_model
from qwen35_jax.loading import load_model
from train.config import TrainConfig
from train.step import Trainer


def unpacked_batch(tokens: np.ndarray) -> dict:
    """Rows holding one document each, no padding: what HF's `labels=input_ids` loss sees."""
    b, l = tokens.shape
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    mask = np.ones((b, l), np.float32)
    mask[:, -1] = 0
    return {"input_ids": tokens, "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)),
            "segment_ids": np.ones((b, l), np.int32), "targets": targets, "loss_mask": mask}


def hf_grads(hf_model, tokens):
    hf_model.train()
    hf_model.zero_grad()
    ids = torch.as_tensor(tokens, dtype=torch.long)
    moe = hasattr(hf_model.config, "num_experts")
    out = hf_model(ids, labels=ids, **({"output_router_logits": True} if moe else {}))
    out.loss.backward()
    hf_model.eval()
    return float(out.loss.detach()), {n: p.grad.numpy() for n, p in hf_model.named_parameters()}


def as_hf(cfg, tree) -> dict:
    """Our parameter-shaped tree -> {HF name: array}, through the checkpoint name table."""
    flat = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    out = {}
    for rule in checkpoint_rules(cfg, "model.", fused_experts=True):
        ours = [flat[p] if rule.period is None else flat[p][rule.period] for p in rule.ours]
        out.update(zip(rule.hf, (np.asarray(x) for x in rule.to_hf(*ours))))
    return out


def moderate_decay_checkpoint(preset, folder):
    """A random HF model whose Gated DeltaNet decay rates A = exp(A_log) lie in [0.05, 1] (HF's init draws them
    from [0, 16]: heads with A near 16 forget everything within a token, their decay gradients vanish to ~1e-7
    of the others and are float32 rounding noise in both implementations; moderate rates test that path)."""
    hf_model = build_hf_model(preset, seed=0)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(0.05, 1.0)))
    return hf_model, save_hf_model(hf_model, folder)


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_loss_and_gradients_match_hf(tmp_path, preset):
    hf_model, folder = moderate_decay_checkpoint(preset, tmp_path)
    tokens = np.random.default_rng(3).integers(0, 256, size=(2, 40), dtype=np.int32)
    hf_loss, expected = hf_grads(hf_model, tokens)
    model = load_model(folder)
    trainer = Trainer(model, TrainConfig(loss_chunk=32))  # 3 cross-entropy blocks: chunking is exercised
    grads, metrics = jax.jit(trainer.grads)(trainer.init_state()["params"], trainer.put_batch(unpacked_batch(tokens)))
    objective = metrics["loss"] + trainer.aux_coef * metrics.get("aux_loss", 0.0)
    assert abs(float(objective) - hf_loss) <= 1e-5 * abs(hf_loss)
    got = as_hf(model.config, grads)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(got) == set(expected) - tied
    worst = max(np.linalg.norm(got[n] - expected[n]) / np.linalg.norm(expected[n]) for n in got)
    assert worst <= 1e-4, worst
