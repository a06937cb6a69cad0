"""Training: gradient parity with HF torch, packing, resume, sharding, frozen groups, overfitting."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qwen35_jax.checkpoint.names import checkpoint_rules
from qwen35_jax.hf_reference import build_hf_model, save_hf_model
from qwen35_jax.loading import load_model
from train.config import TrainConfig
from train.data import unpacked_batch
from train.step import Trainer


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



def test_bfloat16_compute_loss_is_as_close_to_float32_as_hfs(tmp_path):
    """compute_dtype=bfloat16 (float32 master weights, matrices cast for the forward/backward) against float32:
    bf16 keeps 8 mantissa bits (~0.4% per rounding), so the loss moves by a fraction of a percent; the bound is
    twice what HF's own bf16 model moves on the same weights and tokens, plus 1e-3 (both errors are that small)."""
    hf_model, folder = moderate_decay_checkpoint("tiny-moe", tmp_path)
    tokens = np.random.default_rng(6).integers(0, 256, size=(2, 40), dtype=np.int32)
    ids = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        hf32 = float(hf_model(ids, labels=ids).loss)
        hf16 = float(hf_model.to(torch.bfloat16)(ids, labels=ids).loss)
    model = load_model(folder)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        trainer = Trainer(model, TrainConfig(compute_dtype=dtype))
        _, metrics = jax.jit(trainer.grads)(trainer.init_state()["params"], trainer.put_batch(unpacked_batch(tokens)))
        losses[dtype] = float(metrics["loss"])
    assert abs(losses["float32"] - hf32) <= 1e-5 * hf32
    assert abs(losses["bfloat16"] - losses["float32"]) <= 2 * abs(hf16 - hf32) + 1e-3

# ---- our own training behaviour (no HF needed) -----------------------------------------------------------
SMALL = {"num_hidden_layers": 4, "layer_types": ["linear_attention"] * 3 + ["full_attention"]}


def small_model(preset="tiny-moe", seed=0):
    from flax import nnx

    from qwen35_jax.config import ModelConfig
    from qwen35_jax.nn.model import Qwen35
    return Qwen35(ModelConfig.from_hf(preset, **SMALL), jnp.float32, nnx.Rngs(seed))


def small_model_two_periods(seed=0):
    """tiny-moe as it is: 8 layers, 2 scanned periods."""
    from flax import nnx

    from qwen35_jax.config import ModelConfig
    from qwen35_jax.nn.model import Qwen35
    return Qwen35(ModelConfig.from_hf("tiny-moe"), jnp.float32, nnx.Rngs(seed))


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def max_diff(a, b) -> float:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    return max(float(np.abs(fa[k] - fb[k]).max()) for k in fa)


def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients():
    """Rows of 128 tokens: packed documents cross the delta rule's 64-token chunk edges."""
    from train.data import pack_documents
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 256, n).astype(np.int32) for n in (70, 17, 45, 9, 21, 90)]
    docs = [(d, np.ones(len(d), bool)) for d in docs]
    packed = pack_documents(docs, 128)                                # several documents per row
    alone = [pack_documents([d], 128) for d in docs]
    alone = {k: np.concatenate([a[k] for a in alone]) for k in packed}  # one document per row
    assert len(packed["input_ids"]) < len(alone["input_ids"]) == len(docs)
    trainer = Trainer(small_model(), TrainConfig())
    params = trainer.init_state()["params"]
    grads_fn = jax.jit(trainer.grads)
    g_packed, m_packed = grads_fn(params, trainer.put_batch(packed))
    g_alone, m_alone = grads_fn(params, trainer.put_batch(alone))
    for key in ("loss", "aux_loss", "z_loss", "tokens"):
        assert abs(float(m_packed[key]) - float(m_alone[key])) <= 1e-5 * abs(float(m_alone[key])), key
    assert max_diff(g_packed, g_alone) <= 1e-5


def test_gradient_accumulation_equals_one_big_batch():
    """Micro-batches with different numbers of counted tokens: each is normalised by the step's total count, so
    the accumulated gradient is the big batch's (a per-micro-batch mean would not be). MoE, router loss off (the
    load-balancing loss is per micro-batch by design)."""
    from train.data import pack_documents
    rng = np.random.default_rng(1)
    docs = [(rng.integers(1, 256, n).astype(np.int32), np.ones(n, bool)) for n in (24, 20, 9, 3, 15, 12)]
    batch = pack_documents(docs, 24)
    assert len(batch["input_ids"]) == 4 and batch["loss_mask"][:2].sum() != batch["loss_mask"][2:].sum()
    model = small_model()
    one = Trainer(model, TrainConfig(batch_size=4, router_aux_loss_coef=0.0))
    two = Trainer(model, TrainConfig(batch_size=4, grad_accum=2, router_aux_loss_coef=0.0))
    params = one.init_state()["params"]
    g1, m1 = jax.jit(one.grads)(params, one.put_batch(batch))
    g2, m2 = jax.jit(two.grads)(params, two.put_batch(batch))
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-6 and max_diff(g1, g2) <= 1e-6


def test_frozen_parameters_do_not_move_and_norms_get_no_weight_decay():
    rng = np.random.default_rng(3)
    batch = unpacked_batch(rng.integers(0, 256, (2, 16)).astype(np.int32))
    tc = TrainConfig(batch_size=2, warmup_steps=0, frozen=[r"model\.embed_tokens\.", r"mlp\.gate\.weight"],
                     weight_decay=0.5)
    trainer = Trainer(small_model(), tc)
    before = flat(trainer.init_state()["params"])
    state, _ = trainer.train_step(trainer.init_state(), trainer.put_batch(batch))
    after = flat(state["params"])
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert not any("embed_tokens" in k or "'router'" in k for k in moved)
    assert any("lm_head" in k for k in moved) and any("experts_down" in k for k in moved)
    from train.optim import decay_mask
    from flax import nnx
    decayed = flat(decay_mask(nnx.state(small_model())))
    assert not any(v for k, v in decayed.items() if "norm" in k or "A_log" in k or "dt_bias" in k)
    assert all(v for k, v in decayed.items() if "experts" in k or "proj" in k)


def test_frozen_layers_of_a_scanned_model_are_per_real_layer():
    """tiny-moe: 8 layers = 2 periods of 4, scanned. Freezing layer 5 (period 1, slot 1) and layer 2's routed experts
    (period 0, slot 2) keeps exactly those slices of the stacked parameters (weight decay on: it would move them),
    their gradients are zero (so outside the clipped norm), and every other slice moves."""
    batch = unpacked_batch(np.random.default_rng(3).integers(0, 256, (2, 16)).astype(np.int32))
    tc = TrainConfig(batch_size=2, warmup_steps=0, weight_decay=0.5, learning_rate=1e-2,
                     frozen=[r"model\.layers\.5\.", r"model\.layers\.2\.mlp\.experts\."])
    trainer = Trainer(small_model_two_periods(), tc)
    state = trainer.init_state()
    grads, _ = jax.jit(trainer.grads)(state["params"], trainer.put_batch(batch))
    before = flat(state["params"])
    state, _ = trainer.train_step(state, trainer.put_batch(batch))
    after, grads = flat(state["params"]), flat(grads)
    layers = [k for k in before if "'periods'" in k]
    for k in layers:
        slot = int(re.search(r"\['layers'\]\[(\d)\]", k).group(1))
        for period in (0, 1):
            layer = 4 * period + slot
            frozen = layer == 5 or (layer == 2 and "experts_" in k)
            same = np.array_equal(before[k][period], after[k][period])
            assert same == frozen, (k, layer)
            assert (not grads[k][period].any()) == frozen, (k, layer)


def test_frozen_patterns_report_what_names_look_like():
    from train.config import TrainConfigError
    with pytest.raises(TrainConfigError, match=r"match no parameter; names look like .*model\.layers\.0\.linear_attn"):
        Trainer(small_model(), TrainConfig(frozen=["decoder/periods"]))
    with pytest.raises(TrainConfigError, match=r"stored together with .*up_proj"):
        Trainer(small_model(), TrainConfig(frozen=[r"layers\.0\.mlp\.shared_expert\.gate_proj"]))


def test_non_finite_loss_leaves_the_state_unchanged():
    model = small_model("tiny-dense")
    trainer = Trainer(model, TrainConfig(batch_size=2, warmup_steps=0))
    state = trainer.init_state()
    state["params"]["norm"]["weight"] = state["params"]["norm"]["weight"].at[0].set(jnp.nan)
    before = flat(state["params"])
    batch = unpacked_batch(np.random.default_rng(4).integers(0, 256, (2, 16)).astype(np.int32))
    state, metrics = trainer.train_step(state, trainer.put_batch(batch))
    assert not np.isfinite(float(metrics["loss"])) and int(state["step"]) == 0
    after = flat(state["params"])
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)


def test_loss_falls_when_overfitting_a_small_dataset():
    from train.data import pack_documents
    rng = np.random.default_rng(5)
    docs = [(rng.integers(1, 256, 20).astype(np.int32), np.ones(20, bool)) for _ in range(8)]
    batch = pack_documents(docs, 40)  # 4 rows of 2 documents
    trainer = Trainer(small_model("tiny-dense"), TrainConfig(batch_size=4, steps=40, warmup_steps=5,
                                                             learning_rate=1e-2, weight_decay=0.0))
    state, device_batch, losses = trainer.init_state(), trainer.put_batch(batch), []
    for _ in range(40):
        state, metrics = trainer.train_step(state, device_batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 5.0 and losses[-1] < 0.2 * losses[0], losses


# ---- runs: python -m train.finetune ------------------------------------------------------------------------
def write_texts(path, n=24):
    from conftest import CORPUS
    import json
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS[:n]))
    return str(path)


def run_config(tmp_path, bpe_folder, name, **overrides) -> TrainConfig:
    values = dict(model="tiny-moe", model_overrides={**SMALL, "vocab_size": 512}, tokenizer=str(bpe_folder),
                  train_data=[write_texts(tmp_path / "train.jsonl")], eval_data=[write_texts(tmp_path / "eval.jsonl", 4)],
                  seq_len=32, batch_size=4, steps=6, save_every=3, eval_every=3, warmup_steps=2,
                  learning_rate=1e-3, output_dir=str(tmp_path / name))
    values.update(overrides)
    return TrainConfig(**values)


def logged(tmp_path, name) -> list[dict]:
    import json
    return [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]


def test_resume_is_exact(tmp_path, bpe_folder):
    from train.config import TrainConfigError
    from train.finetune import run
    straight = run(run_config(tmp_path, bpe_folder, "straight"), progress=False)
    run(run_config(tmp_path, bpe_folder, "resumed"), progress=False, stop_after=3)
    assert not (tmp_path / "resumed" / "final").exists()
    with pytest.raises(TrainConfigError, match="--resume"):
        run(run_config(tmp_path, bpe_folder, "resumed"), progress=False)
    with pytest.raises(TrainConfigError, match=r"cannot resume exactly: learning_rate: 0.001 -> 0.002"):
        run(run_config(tmp_path, bpe_folder, "resumed", learning_rate=2e-3), resume=True, progress=False)
    resumed = run(run_config(tmp_path, bpe_folder, "resumed"), resume=True, progress=False)
    a, b = logged(tmp_path, "straight"), logged(tmp_path, "resumed")
    assert [e["step"] for e in a] == [e["step"] for e in b] == list(range(1, 7))
    assert [e["loss"] for e in a] == [e["loss"] for e in b]
    assert a[-1]["loss"] < a[0]["loss"] and straight["eval_loss"] == resumed["eval_loss"]
    final_a, final_b = load_model(straight["final"]), load_model(resumed["final"])
    from flax import nnx
    assert max_diff(nnx.state(final_a), nnx.state(final_b)) == 0.0


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, bpe_folder):
    from train.checkpoint import RunCheckpoints
    from train.finetune import TrainingDiverged, run
    tc = run_config(tmp_path, bpe_folder, "diverging", learning_rate=1e30, warmup_steps=0, save_every=1,
                    max_grad_norm=0.0, eval_data=[])
    with pytest.raises(TrainingDiverged, match=r"step 2: loss=.*not finite.*Last good checkpoint: step 1"):
        run(tc, progress=False)
    checkpoints = RunCheckpoints(tmp_path / "diverging" / "checkpoints")
    assert checkpoints.latest_step() == 1


@pytest.mark.parametrize("line, overrides, message", [
    ('{"text": "ok"}\n{"text": "broken",}\n', [], r"train\.jsonl:2: malformed JSON"),
    ('{"txt": "no field"}\n', [], r"train\.jsonl:1: expected a 'text'"),
    ('{"text": "' + "long text " * 40 + '"}\n', ["overflow=reject"], r"train\.jsonl:1: .*longer than seq_len"),
    ('{"text": "ok"}\n', ["learning_rte=0.1"], r"unknown config key\(s\) \['learning_rte'\]"),
    ('{"text": "ok"}\n', ["frozen=[embed_tokns]"], r"frozen: \['embed_tokns'\] match no parameter"),
    ('{"text": "ok"}\n', ["frozen=[.]"], r"freeze every parameter"),
    ('{"text": "ok"}\n', ["train_data=[1]"], r"'train_data': expected a list of strings"),
])
def test_cli_reports_bad_input(tmp_path, bpe_folder, capsys, line, overrides, message):
    from train.finetune import main
    (tmp_path / "train.jsonl").write_text(line)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny-moe\ntokenizer: {bpe_folder}\ntrain_data: {tmp_path / 'train.jsonl'}\n"
                      f"seq_len: 32\nmodel_overrides: {{vocab_size: 512}}\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["--config", str(config), "--no-progress", *overrides]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_checkpoint_master_weights_keep_param_dtype(hf_checkpoint):
    """param_dtype is the master weights' dtype even on CPU, where inference loads compute in float32."""
    from train.finetune import build_model
    _, folder = hf_checkpoint("tiny-dense")
    model = build_model(TrainConfig(model=str(folder), param_dtype="bfloat16"))
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
