"""HF checkpoint loading: released layouts (fused experts, multimodal prefix, shards) and bad checkpoints."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from qwen35_jax import load_model
from qwen35_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFolder
from qwen35_jax.hf_reference import hf_logits, random_tokens


def tensors_of(folder):
    f = SafetensorsFolder(folder)
    return {n: np.array(f.get(n)) for n in f.names()}


def released_layout(tensors, num_experts):
    """Per-expert HF save -> the BF16 release layout: `model.language_model.` prefix, fused experts,
    plus vision and MTP tensors the text model must recognise and skip."""
    out = {}
    for name, value in tensors.items():
        if ".mlp.experts." in name:
            continue
        out[name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name] = value
    layers = {n.split(".layers.")[1].split(".")[0] for n in tensors if ".mlp.experts.0.gate_proj" in n}
    for i in layers:
        p = f"model.layers.{i}.mlp.experts"
        gate = np.stack([tensors[f"{p}.{e}.gate_proj.weight"] for e in range(num_experts)])
        up = np.stack([tensors[f"{p}.{e}.up_proj.weight"] for e in range(num_experts)])
        down = np.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(num_experts)])
        q = f"model.language_model.layers.{i}.mlp.experts"
        out[f"{q}.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        out[f"{q}.down_proj"] = down
    out["model.visual.patch_embed.proj.weight"] = np.zeros((4, 3, 2, 16, 16), np.float32)
    out["mtp.fc.weight"] = np.zeros((64, 128), np.float32)
    return out


def write_sharded(tensors, folder, config_src, shards=3):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_src / "config.json", folder / "config.json")
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: np.ascontiguousarray(tensors[n]) for n in names[s::shards]}
        save_file(part, folder / file)
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_released_layout_loads_with_same_logits(hf_checkpoint, tmp_path):
    hf, folder = hf_checkpoint("tiny-moe")
    tensors = tensors_of(folder)
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in tensors)  # HF saves per-expert
    released = write_sharded(released_layout(tensors, 8), tmp_path / "released", folder)
    tokens = random_tokens(256, 2, 30)
    got = np.asarray(load_model(released)(jnp.asarray(tokens)))
    assert np.abs(got - hf_logits(hf, tokens)).max() <= 1e-4


@pytest.fixture
def dense_tensors(hf_checkpoint):
    _, folder = hf_checkpoint("tiny-dense")
    return tensors_of(folder), folder


def expect_error(tmp_path, tensors, config_src, match):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(config_src / "config.json", folder / "config.json")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=match):
        load_model(folder)


def test_missing_tensor(dense_tensors, tmp_path):
    tensors, src = dense_tensors
    del tensors["model.layers.2.linear_attn.in_proj_z.weight"]
    expect_error(tmp_path, tensors, src, r"missing tensor model\.layers\.2\.linear_attn\.in_proj_z\.weight")


def test_wrong_shape(dense_tensors, tmp_path):
    tensors, src = dense_tensors
    tensors["model.layers.3.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)
    expect_error(tmp_path, tensors, src,
                 r"model\.layers\.3\.self_attn\.k_proj\.weight in model\.safetensors has shape \[32, 64\], "
                 r"expected \[64, 64\]")


def test_unknown_key(dense_tensors, tmp_path):
    tensors, src = dense_tensors
    tensors["model.layers.0.mystery.weight"] = np.zeros(3, np.float32)
    expect_error(tmp_path, tensors, src, r"unexpected tensor model\.layers\.0\.mystery\.weight")


def test_all_problems_in_one_error(dense_tensors, tmp_path):
    tensors, src = dense_tensors
    del tensors["model.norm.weight"]
    tensors["extra"] = np.zeros(1, np.float32)
    expect_error(tmp_path, tensors, src, r"2 problems")


def test_truncated_file(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("tiny-dense")
    folder = tmp_path / "ckpt"
    shutil.copytree(src, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file: tensor"):
        load_model(folder)


def test_corrupt_header(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("tiny-dense")
    folder = tmp_path / "ckpt"
    shutil.copytree(src, folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:12] = b"\xff\xfe{["
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load_model(folder)


def test_missing_shard(dense_tensors, tmp_path):
    tensors, src = dense_tensors
    folder = write_sharded(tensors, tmp_path / "sharded", src)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing .*model-00002-of-00003\.safetensors"):
        load_model(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_model(tmp_path / "absent")
