"""MTP training (`mtp_loss_weight`): the loss on a packed batch against a per-document reference, the MTP router in the
MoE losses, the trunk untouched by a weight of 0 (and the MTP block frozen then), the MTP block of the demo model
trained alone, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.decoder import sequence_context
from qwen35_jax.nn.model import Qwen35
from train.config import RECIPE_DIR, TrainConfig, TrainConfigError
from train.data import pack_documents
from train.loss import load_balancing_loss, mtp_targets, router_z_loss
from train.step import Trainer

SMALL = {"num_hidden_layers": 4, "layer_types": ["linear_attention"] * 3 + ["full_attention"]}
MTP_ALONE = [r"^(?!mtp\.)"]  # freezes every tensor but mtp.*: the documented recipe for training the MTP block alone


def model(mtp: int = 1, preset: str = "tiny-dense", **overrides) -> Qwen35:
    cfg = ModelConfig.from_hf(preset, **{**SMALL, **overrides}, mtp_num_hidden_layers=mtp)
    return Qwen35(cfg, jnp.float32, nnx.Rngs(0))


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def documents(seed: int, lengths_prompts) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, learn) per document: the first `prompt` tokens not learned."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, 256, n).astype(np.int32), np.arange(n) >= prompt) for n, prompt in lengths_prompts]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_losses(m: Qwen35, docs, steps: int = 1) -> dict:
    """Means over the documents, each run alone (one per row, right-padded; padding after a document changes nothing
    before it): the next-token loss over learned tokens t+1, and the MTP loss over (hidden_i, token i+1) -> token
    i+2 with token i+2 learned, in numpy from the logits of `model.logits(model.mtp(...))`. With steps S > 1 the MTP
    is chained S times, step s fed step s-1's output one position back; its position i counts when the chain's
    start i-(s-1) is in the document."""
    width = max(len(ids) for ids, _ in docs)
    ids = np.zeros((len(docs), width), np.int32)
    for row, (d, _) in enumerate(docs):
        ids[row, :len(d)] = d

    @jax.jit
    def logits(ids):
        hidden = m.hidden_states(ids)
        following = m.embed(jnp.pad(ids[:, 1:], ((0, 0), (0, 1))))
        chained, h = [], hidden
        for _ in range(steps):
            out = m.mtp(h, following)
            chained.append(m.logits(out))
            h = jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1)
        return m.logits(hidden), chained
    main, chained = logits(ids)
    main = log_softmax(np.asarray(main, np.float64))
    sums = {"loss": [0.0, 0], "mtp_loss": [0.0, 0]}
    for row, (d, learn) in enumerate(docs):
        for i in range(len(d)):
            if i + 1 < len(d) and learn[i + 1]:
                sums["loss"][0] -= main[row, i, d[i + 1]]
                sums["loss"][1] += 1
            for step, logp in enumerate(chained):
                if i + 2 < len(d) and learn[i + 2] and i - step >= 0:
                    sums["mtp_loss"][0] -= log_softmax(np.asarray(logp[row, i], np.float64))[d[i + 2]]
                    sums["mtp_loss"][1] += 1
    return {key: total / count for key, (total, count) in sums.items()} | {"mtp_tokens": sums["mtp_loss"][1]}


@pytest.mark.parametrize("steps", [1, 3])
def test_mtp_loss_on_a_packed_batch_equals_the_per_document_reference(steps):
    """Rows of 24 tokens holding 2-3 documents each and padding, prompts not learned, two micro-batches with
    different MTP target counts: the MTP loss is the mean over the step of -log p(token i+2 | hidden_i, token i+1),
    never across a document (a 2-token document has no MTP target, a 3-token one at most one). With
    mtp_draft_steps 3, the chained steps' targets join the mean, none of them starting in another document."""
    docs = documents(0, [(9, 3), (6, 0), (11, 5), (4, 1), (2, 0), (7, 2), (3, 0), (10, 4), (5, 5), (8, 0)])
    batch = pack_documents(docs, 24)
    rows = len(batch["input_ids"])
    batch = {k: np.concatenate([v, np.zeros((rows % 2,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    assert (batch["segment_ids"].max(1) >= 2).sum() >= 2 and (batch["segment_ids"] == 0).any()
    m = model()
    trainer = Trainer(m, TrainConfig(batch_size=len(batch["input_ids"]), grad_accum=2, mtp_loss_weight=0.7,
                                     mtp_draft_steps=steps))
    _, metrics = jax.jit(trainer.grads)(trainer.init_state()["params"], trainer.put_batch(batch))
    expected = reference_losses(m, docs, steps)
    assert int(metrics["mtp_tokens"]) == expected["mtp_tokens"]
    for key in ("loss", "mtp_loss"):
        assert abs(float(metrics[key]) - expected[key]) <= 1e-5 * expected[key], key
    if steps == 1:
        half = len(batch["input_ids"]) // 2  # the normaliser is the step's: the micro-batches' counts differ
        counts = np.asarray(mtp_targets({k: jnp.asarray(v) for k, v in batch.items()})[1]).reshape(2, half, -1)
        assert counts.sum((1, 2))[0] != counts.sum((1, 2))[1] and counts.sum() == expected["mtp_tokens"]
    else:
        assert expected["mtp_tokens"] < steps * reference_losses(m, docs, 1)["mtp_tokens"]


def test_the_mtp_router_joins_the_moe_losses():
    """tiny-moe, whose MTP layer has the MoE: with the MTP term on, the step's load-balancing and z losses are those
    of the trunk's MoE layers and the MTP layer together, the MTP router counted at the positions the MTP loss
    trains. Reference: each document alone in a row, right-padded, the MTP layer run on its input with a mask built
    here. With the MTP term off, they are the trunk's alone."""
    docs = documents(2, [(9, 3), (6, 0), (11, 5), (4, 1), (7, 2), (3, 0)])
    batch = pack_documents(docs, 24)
    m = model(preset="tiny-moe")
    width = max(len(d) for d, _ in docs)
    ids, segments, trained = (np.zeros((len(docs), width), dtype) for dtype in (np.int32, np.int32, np.float32))
    for row, (d, learn) in enumerate(docs):
        ids[row, :len(d)], segments[row, :len(d)] = d, 1
        trained[row, :max(len(d) - 2, 0)] = learn[2:]  # position i trains on token i+2
    hidden, trunk = m.train_hidden_states(jnp.asarray(ids), segment_ids=jnp.asarray(segments), router_stats=True)
    following = m.embed(jnp.pad(jnp.asarray(ids)[:, 1:], ((0, 0), (0, 1))))
    x = jnp.concatenate([m.mtp.pre_fc_norm_embedding(following), m.mtp.pre_fc_norm_hidden(hidden)], -1) @ m.mtp.fc[...]
    ctx = sequence_context(m.config, ids.shape, segment_ids=jnp.asarray(segments), token_mask=jnp.asarray(trained))
    mtp = m.mtp.layer(x, ctx)[2]
    both = jax.tree.map(jnp.add, trunk, mtp)
    e = m.config.num_experts
    for weight, stats in ((0.5, both), (0.0, trunk)):
        trainer = Trainer(m, TrainConfig(batch_size=len(batch["input_ids"]), mtp_loss_weight=weight))
        _, metrics = jax.jit(trainer.grads)(trainer.init_state()["params"], trainer.put_batch(batch))
        np.testing.assert_allclose(float(metrics["aux_loss"]), float(load_balancing_loss(stats, e)), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["z_loss"]), float(router_z_loss(stats)), rtol=1e-5)
    assert float(mtp["tokens"]) == trained.sum() > 0 and float(load_balancing_loss(trunk, e)) != float(
        load_balancing_loss(both, e))


def test_weight_zero_leaves_the_trunk_gradients_as_without_mtp_and_freezes_the_mtp_block():
    """The same trunk with and without an MTP block: with mtp_loss_weight 0 the gradients of every trunk parameter
    are identical, the MTP block's are zero, and a train step with weight decay leaves it bit-equal."""
    docs = documents(1, [(12, 4), (9, 0), (7, 2), (14, 0)])
    batch = pack_documents(docs, 24)
    tc = TrainConfig(batch_size=len(batch["input_ids"]), warmup_steps=0, weight_decay=0.5, learning_rate=1e-2)
    with_mtp, without = Trainer(model(1), tc), Trainer(model(0), tc)
    state = with_mtp.init_state()
    params, plain = flat(state["params"]), flat(without.init_state()["params"])
    trunk = [k for k in params if not k.startswith("['mtp']")]
    assert sorted(trunk) == sorted(plain) and all(np.array_equal(params[k], plain[k]) for k in trunk)
    g_with = flat(jax.jit(with_mtp.grads)(state["params"], with_mtp.put_batch(batch))[0])
    g_without = flat(jax.jit(without.grads)(without.init_state()["params"], without.put_batch(batch))[0])
    assert all(np.array_equal(g_with[k], g_without[k]) for k in trunk)
    assert all(not g_with[k].any() for k in params if k not in trunk)
    state, metrics = with_mtp.train_step(state, with_mtp.put_batch(batch))
    after = flat(state["params"])
    assert "mtp_loss" not in metrics and int(state["step"]) == 1
    assert all(np.array_equal(params[k], after[k]) for k in params if k not in trunk)
    assert not any(np.array_equal(params[k], after[k]) for k in trunk)


def test_the_mtp_block_of_the_demo_model_trains_alone():
    """The demo recipe's model with an MTP block, trunk frozen by `frozen: ['^(?!mtp\\.)']` (embeddings and lm_head,
    shared with the MTP block, too), weight decay on: a few steps on one batch lower the MTP loss, move every MTP
    matrix, and leave every trunk parameter bit-equal."""
    recipe = TrainConfig.load(RECIPE_DIR / "demo.yaml")
    m = model(1, recipe.model, **recipe.model_overrides)
    rng = np.random.default_rng(2)
    docs = [(rng.integers(1, 32, n).astype(np.int32), np.arange(n) >= 3) for n in rng.integers(6, 14, 16)]
    batch = pack_documents(docs, 32)
    tc = TrainConfig(batch_size=len(batch["input_ids"]), warmup_steps=0, learning_rate=1e-2, weight_decay=0.1,
                     mtp_loss_weight=1.0, frozen=MTP_ALONE)
    trainer = Trainer(m, tc)
    state, device_batch, losses = trainer.init_state(), trainer.put_batch(batch), []
    before = flat(state["params"])
    for _ in range(6):
        state, metrics = trainer.train_step(state, device_batch)
        losses.append(float(metrics["mtp_loss"]))
    after = flat(state["params"])
    assert losses[-1] < 0.8 * losses[0], losses
    for k in before:
        if k.startswith("['mtp']"):
            assert "norm" in k or not np.array_equal(before[k], after[k]), k
        else:
            assert np.array_equal(before[k], after[k]), k


def test_config_errors():
    with pytest.raises(TrainConfigError, match="mtp_loss_weight.*expected a number >= 0"):
        TrainConfig(mtp_loss_weight=-0.1)
    with pytest.raises(TrainConfigError, match="'mtp_draft_steps': expected a positive integer, got 0"):
        TrainConfig(mtp_loss_weight=0.5, mtp_draft_steps=0)
    with pytest.raises(TrainConfigError, match="training the MTP block with LoRA is not supported"):
        TrainConfig(mtp_loss_weight=0.5, lora={"rank": 4, "alpha": 8, "targets": ["q_proj"]})
    with pytest.raises(TrainConfigError, match=r"mtp_loss_weight=0.5: the model has no MTP block .*mtp_num_hidden"):
        Trainer(model(0), TrainConfig(mtp_loss_weight=0.5))
    with pytest.raises(TrainConfigError, match="which mtp_loss_weight=0 keeps frozen too"):
        Trainer(model(1), TrainConfig(frozen=MTP_ALONE))
