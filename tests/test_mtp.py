"""The MTP block: its `mtp.*` tensors in both expert layouts, its forward against a numpy re-derivation of spec
section 8, conversion round trips, checkpoints without MTP tensors, and the cached forward."""

import json
import logging
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from qwen35_jax import load_model
from qwen35_jax.cache import init_decode_state
from qwen35_jax.checkpoint.orbax_io import convert_hf_to_orbax, export_to_hf
from qwen35_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFolder
from qwen35_jax.hf_reference import add_mtp_tensors, random_tokens

CASES = [("tiny-dense", "per_expert"), ("tiny-moe", "per_expert"), ("tiny-moe", "fused")]


@pytest.fixture(scope="module")
def mtp_checkpoint(hf_checkpoint, tmp_path_factory):
    """(folder, {mtp name: array}, loaded float32 model) of a tiny HF checkpoint with MTP tensors added."""
    cache = {}

    def get(preset: str, layout: str):
        if (preset, layout) not in cache:
            folder = tmp_path_factory.mktemp(f"{preset}-mtp-{layout}")
            shutil.copytree(hf_checkpoint(preset)[1], folder, dirs_exist_ok=True)
            tensors = add_mtp_tensors(folder, layout, seed=1)
            cache[preset, layout] = folder, tensors, load_model(folder)
        return cache[preset, layout]
    return get


def mtp_params(model) -> dict:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model.mtp, nnx.Param))}


def tensors_in(folder, prefix="mtp.") -> dict:
    f = SafetensorsFolder(folder)
    return {n: np.array(f.get(n)) for n in f.names() if n.startswith(prefix)}


# ---- (a) every mtp.* tensor is consumed, in both expert layouts -------------------------------------------------

@pytest.mark.parametrize("preset,layout", CASES)
def test_every_mtp_tensor_is_consumed(mtp_checkpoint, monkeypatch, preset, layout):
    folder, tensors, _ = mtp_checkpoint(preset, layout)
    read = set()
    get = SafetensorsFolder.get
    monkeypatch.setattr(SafetensorsFolder, "get", lambda self, name: read.add(name) or get(self, name))
    model = load_model(folder)
    assert set(tensors_in(folder)) == set(tensors)
    assert {n for n in read if n.startswith("mtp.")} == set(tensors)
    assert model.config.mtp_num_hidden_layers == 1
    np.testing.assert_array_equal(np.asarray(model.mtp.fc[...]), tensors["mtp.fc.weight"].T)
    if layout == "fused":  # the same weights stored fused load into the same parameters, bit for bit
        ours, per_expert = mtp_params(model), mtp_params(mtp_checkpoint(preset, "per_expert")[2])
        assert ours.keys() == per_expert.keys()
        for path in ours:
            np.testing.assert_array_equal(ours[path], per_expert[path], err_msg=str(path))


def test_bad_mtp_tensors_are_listed(mtp_checkpoint, tmp_path):
    folder, tensors, _ = mtp_checkpoint("tiny-moe", "per_expert")
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tensors = dict(tensors)
    del tensors["mtp.layers.0.mlp.experts.3.up_proj.weight"]
    tensors["mtp.fc.weight"] = tensors["mtp.fc.weight"][:, :64]
    tensors["mtp.layers.1.input_layernorm.weight"] = np.zeros(64, np.float32)
    save_file(tensors, bad / "mtp.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    for text in ("missing tensor mtp.layers.0.mlp.experts.3.up_proj.weight",
                 "tensor mtp.fc.weight in mtp.safetensors has shape [64, 64], expected [64, 128]",
                 "unexpected tensor mtp.layers.1.input_layernorm.weight"):
        assert text in str(e.value)


# ---- (b) the forward against a numpy re-derivation of spec section 8 --------------------------------------------

def rms(x, w, eps=1e-6):
    """Zero-centred RMSNorm (section 2.1)."""
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1 + w)


def silu(x):
    return x / (1 + np.exp(-x))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rope(x, pos3, c):
    """Partial interleaved mRoPE (section 3.3). x [B, T, heads, D]; pos3 [3, B, T]."""
    rot = int(c["head_dim"] * c["rope_parameters"]["partial_rotary_factor"])
    half, sec = rot // 2, c["rope_parameters"]["mrope_section"]
    inv_freq = 1 / c["rope_parameters"]["rope_theta"] ** (np.arange(0, rot, 2) / rot)
    i = np.arange(half)
    row = np.where((i % 3 == 1) & (i < 3 * sec[1]), 1, np.where((i % 3 == 2) & (i < 3 * sec[2]), 2, 0))
    angle = np.moveaxis(pos3[row], 0, -1) * inv_freq  # [B, T, half]: slot i from position row `row[i]`
    cos, sin = (f(np.concatenate([angle, angle], -1))[:, :, None] for f in (np.cos, np.sin))
    xr, xp = x[..., :rot], x[..., rot:]
    rotated = np.concatenate([-xr[..., half:], xr[..., :half]], -1)
    return np.concatenate([xr * cos + rotated * sin, xp], -1)


def attention(x, t, pos3, mask, c):
    """Gated attention (sections 3.1-3.2); t: the layer's HF tensors by name below `self_attn.`."""
    b, n, _ = x.shape
    nq, nkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    qg = (x @ t["q_proj.weight"].T).reshape(b, n, nq, 2 * d)
    q, gate = qg[..., :d], qg[..., d:].reshape(b, n, nq * d)
    k = (x @ t["k_proj.weight"].T).reshape(b, n, nkv, d)
    v = (x @ t["v_proj.weight"].T).reshape(b, n, nkv, d)
    q, k = rope(rms(q, t["q_norm.weight"]), pos3, c), rope(rms(k, t["k_norm.weight"]), pos3, c)
    kv_of = np.arange(nq) // (nq // nkv)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k[:, :, kv_of]) / np.sqrt(d)
    probs = softmax(np.where(mask[:, None], scores, -np.inf))
    out = np.einsum("bhqk,bkhd->bqhd", probs, v[:, :, kv_of]).reshape(b, n, nq * d)
    return (out * sigmoid(gate)) @ t["o_proj.weight"].T


def mlp(x, t, prefix):
    return (silu(x @ t[f"{prefix}gate_proj.weight"].T) * (x @ t[f"{prefix}up_proj.weight"].T)) @ \
        t[f"{prefix}down_proj.weight"].T


def moe(x, t, c):
    """Sparse MoE (section 5.2) from per-expert tensors; t: the layer's HF tensors by name below `mlp.`."""
    p = softmax(x @ t["gate.weight"].T)
    top = np.argsort(-p, -1)[..., :c["num_experts_per_tok"]]
    w = np.take_along_axis(p, top, -1)
    w = w / w.sum(-1, keepdims=True)
    routed = sum(((top == e) * w).sum(-1, keepdims=True) * mlp(x, t, f"experts.{e}.")
                 for e in range(c["num_experts"]))
    return routed + mlp(x, t, "shared_expert.") * sigmoid(x @ t["shared_expert_gate.weight"].T)


def mtp_reference(t, embed, hidden, next_ids, pos3, mask, c):
    """Section 8: [norm_emb(embed[x_{i+1}]), norm_hidden(h_i)] @ fc.T -> full-attention layer -> norm."""
    def below(prefix):
        return {n[len(prefix):]: v for n, v in t.items() if n.startswith(prefix)}
    layer = below("mtp.layers.0.")
    u = np.concatenate([rms(embed[next_ids], t["mtp.pre_fc_norm_embedding.weight"]),
                        rms(hidden, t["mtp.pre_fc_norm_hidden.weight"])], -1) @ t["mtp.fc.weight"].T
    x = u + attention(rms(u, layer["input_layernorm.weight"]), below("mtp.layers.0.self_attn."), pos3, mask, c)
    h = rms(x, layer["post_attention_layernorm.weight"])
    x = x + (moe(h, below("mtp.layers.0.mlp."), c) if c.get("num_experts") else mlp(h, layer, "mlp."))
    return rms(x, t["mtp.norm.weight"])


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_forward_equals_numpy_reference(mtp_checkpoint, preset):
    """Dense: two packed documents in row 0 (text positions restarting, attention within a document); MoE: mRoPE
    positions with distinct T/H/W rows."""
    folder, tensors, model = mtp_checkpoint(preset, "per_expert")
    c = json.loads((folder / "config.json").read_text())
    batch, seq = 2, 11
    tokens = random_tokens(c["vocab_size"], batch, seq, seed=3)
    next_ids = random_tokens(c["vocab_size"], batch, seq, seed=4)
    hidden = np.asarray(model.hidden_states(tokens))  # the main model's final-normed hidden states
    if preset == "tiny-dense":
        segment_ids = np.array([[1] * 4 + [2] * 7, [1] * 11], np.int32)
        positions = np.array([list(range(4)) + list(range(7)), list(range(11))], np.int32)
        pos3 = np.broadcast_to(positions, (3, batch, seq))
    else:
        segment_ids = None
        positions = pos3 = np.stack([np.broadcast_to(np.arange(seq) + 5 * r, (batch, seq))
                                     for r in (0, 1, 2)]).astype(np.int32)
    seg = np.ones((batch, seq)) if segment_ids is None else segment_ids
    mask = np.tril(np.ones((seq, seq), bool)) & (seg[:, :, None] == seg[:, None, :])
    got = np.asarray(model.mtp(hidden, model.embed(next_ids), positions, segment_ids))
    f64 = {n: v.astype(np.float64) for n, v in tensors.items()}
    main = SafetensorsFolder(folder)
    embed, lm_head = (np.asarray(main.get(f"{n}.weight"), np.float64) for n in ("model.embed_tokens", "lm_head"))
    want = mtp_reference(f64, embed, hidden.astype(np.float64), next_ids, pos3, mask, c)
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(np.asarray(model.logits(got)) - want @ lm_head.T).max() <= 1e-5


# ---- (c) HF -> Orbax -> HF leaves every mtp.* tensor bit-equal, in the source's layout ----------------------------

@pytest.mark.parametrize("preset,layout", CASES)
def test_conversion_round_trip_is_bit_equal(mtp_checkpoint, tmp_path, preset, layout):
    folder, tensors, model = mtp_checkpoint(preset, layout)
    ckpt = convert_hf_to_orbax(folder, tmp_path / "ckpt", "keep", progress=False)
    exported = tensors_in(export_to_hf(ckpt, tmp_path / "exported", progress=False))
    assert exported.keys() == tensors.keys()
    for name, value in tensors.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    restored, loaded = mtp_params(load_model(ckpt)), mtp_params(model)
    assert restored.keys() == loaded.keys()
    assert all(np.array_equal(restored[p], loaded[p]) for p in loaded)


# ---- (d) a config with MTP but a checkpoint without its tensors -------------------------------------------------

def test_missing_mtp_tensors_turn_mtp_off_once(hf_checkpoint, tmp_path, caplog):
    folder = tmp_path / "no-mtp"
    shutil.copytree(hf_checkpoint("tiny-dense")[1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))

    def warnings():
        found = [r for r in caplog.records if r.levelno == logging.WARNING and "mtp" in r.getMessage()]
        caplog.clear()
        return len(found)
    with caplog.at_level(logging.WARNING):
        model = load_model(folder)
        assert model.mtp is None and model.config.mtp_num_hidden_layers == 0 and warnings() == 1
        ckpt = convert_hf_to_orbax(folder, tmp_path / "ckpt", "keep", progress=False)
        assert warnings() == 1
        restored = load_model(ckpt)
        assert restored.mtp is None and warnings() == 1
    with pytest.raises(ValueError, match="no MTP block"):
        init_decode_state(model.config, 1, 8, mtp=True)


# ---- (e) the cached forward, step by step, equals the full-sequence forward --------------------------------------

def test_cached_forward_equals_full_forward(mtp_checkpoint):
    """Row 0 prefills 4 rows then steps one at a time; row 1 prefills 2 (2 padding rows) then steps; both end at
    the full length and every output equals the full-sequence forward's."""
    _, _, model = mtp_checkpoint("tiny-moe", "per_expert")
    batch, seq = 2, 9
    rng = np.random.default_rng(5)
    hidden = rng.standard_normal((batch, seq, 64)).astype(np.float32)
    embeds = np.asarray(model.embed(random_tokens(256, batch, seq, seed=6)))
    full = np.asarray(model.mtp(hidden, embeds))
    step = nnx.jit(lambda mtp, h, e, s, n: mtp.forward_with_state(h, e, s, n))
    state = init_decode_state(model.config, batch, 16, mtp=True)
    first = np.array([4, 2])
    out, state = step(model.mtp, hidden[:, :4], embeds[:, :4], state, first)
    got = [list(np.asarray(out)[b, :first[b]]) for b in range(batch)]
    rows = np.arange(batch)
    while min(len(g) for g in got) < seq:
        index = np.minimum([len(g) for g in got], seq - 1)
        n_valid = np.array([len(g) < seq for g in got], np.int32)
        out, state = step(model.mtp, hidden[rows, index][:, None], embeds[rows, index][:, None], state, n_valid)
        for b in np.flatnonzero(n_valid):
            got[b].append(np.asarray(out)[b, 0])
    assert list(np.asarray(state["mtp"]["lengths"])) == [seq, seq]
    assert np.abs(np.asarray(got) - full).max() <= 1e-5
