"""Orbax checkpoints: HF -> Orbax -> logits, Orbax -> HF -> transformers, sharded restore, bad input."""

import copy
import json
import multiprocessing
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwen35_jax import load_model
from qwen35_jax.checkpoint.orbax_io import convert_hf_to_orbax, export_to_hf, is_orbax_checkpoint
from qwen35_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFolder
from qwen35_jax.convert import main as convert_main
from qwen35_jax.hf_reference import build_hf_model, hf_logits, load_hf_model, random_tokens, save_hf_model
from qwen35_jax.sharding import make_mesh
from test_checkpoint import released_layout, tensors_of, write_sharded

TOKENS = random_tokens(256, 2, 30, seed=5)


@pytest.fixture(scope="module")
def converted(hf_checkpoint, tmp_path_factory):
    """tiny-moe (per-expert HF layout) converted to Orbax in float32."""
    hf, folder = hf_checkpoint("tiny-moe")
    out = tmp_path_factory.mktemp("orbax") / "tiny-moe.ckpt"
    assert convert_main(["--hf-dir", str(folder), "--out", str(out), "--dtype", "float32"]) == 0
    return hf, out


def test_hf_to_orbax_logits(converted):
    hf, out = converted
    assert is_orbax_checkpoint(out)
    model = load_model(out)
    assert np.abs(np.asarray(model(jnp.asarray(TOKENS))) - hf_logits(hf, TOKENS)).max() <= 1e-4
    unrolled = load_model(out, scan_layers=False)  # per-layer storage restores into either layout
    assert unrolled.config.num_periods == 1
    assert np.abs(np.asarray(unrolled(jnp.asarray(TOKENS))) - hf_logits(hf, TOKENS)).max() <= 1e-4


def test_restore_on_a_mesh_shards_experts(converted):
    hf, out = converted
    mesh = make_mesh("expert=4,tensor=2")
    model = load_model(out, mesh=mesh)
    experts = model.decoder.periods.layers[0].mlp.experts_gate_up[...]
    assert experts.shape == (2, 8, 64, 2, 32)
    shard_bytes = {s.data.nbytes for s in experts.addressable_shards}
    assert shard_bytes == {experts.nbytes // 8}  # 1/4 of the experts x 1/2 of the intermediate dim
    assert np.abs(np.asarray(model(jnp.asarray(TOKENS))) - hf_logits(hf, TOKENS)).max() <= 1e-4


def test_orbax_to_hf_loads_in_transformers(converted, tmp_path):
    hf, out = converted
    exported = tmp_path / "exported"
    assert convert_main(["--to-hf", "--ckpt", str(out), "--out", str(exported)]) == 0
    names = SafetensorsFolder(exported).names()
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in names)  # the released (fused) layout
    assert all(n.startswith(("model.language_model.", "lm_head.")) for n in names)
    reloaded = load_hf_model(exported)
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), hf_logits(hf, TOKENS), atol=1e-5)


def test_released_layout_tied_embeddings_vision_and_mtp_carried(hf_checkpoint, tmp_path):
    """Fused experts under model.language_model., vision + MTP tensors, bfloat16 storage, tied weights."""
    hf = build_hf_model("tiny-moe", tie_word_embeddings=True, seed=1)
    src = save_hf_model(hf, tmp_path / "src")
    tensors = released_layout(tensors_of(src), 8)
    released = write_sharded(tensors, tmp_path / "released", src)
    out = tmp_path / "ckpt"
    convert_hf_to_orbax(released, out, "bfloat16", progress=False)
    # bf16-stored weights computed in float32: exactly HF in float32 with every weight rounded to bfloat16
    # (float32 parity, measured 4e-7); the rounding itself moves the logits by less than HF's own bf16 run does.
    model = load_model(out, dtype="float32")
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    rounded = copy.deepcopy(hf)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert np.abs(ours - hf_logits(rounded, TOKENS)).max() <= 1e-4
    reference = hf_logits(hf, TOKENS)
    storage_error = np.abs(ours - reference).max()
    hf_bf16_error = np.abs(hf_logits(copy.deepcopy(hf).to(torch.bfloat16), TOKENS) - reference).max()
    assert 1e-4 < storage_error <= hf_bf16_error  # really rounded; no worse than HF's own bf16 model
    exported = export_to_hf(out, tmp_path / "exported", progress=False)
    names = set(SafetensorsFolder(exported).names())
    assert "model.visual.patch_embed.proj.weight" in names and "mtp.fc.weight" in names
    assert "lm_head.weight" not in names
    assert json.loads((exported / "config.json").read_text())["tie_word_embeddings"] is True


def test_conversion_checks_before_writing(hf_checkpoint, tmp_path):
    _, folder = hf_checkpoint("tiny-dense")
    tensors = tensors_of(folder)
    del tensors["model.layers.1.linear_attn.in_proj_a.weight"]
    tensors["model.layers.2.mlp.down_proj.weight"] = np.zeros((64, 3), np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad / "config.json")
    from safetensors.numpy import save_file
    save_file(tensors, bad / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"(?s)2 problems.*missing tensor model\.layers\.1\.linear_attn"
                                              r"\.in_proj_a\.weight.*model\.layers\.2\.mlp\.down_proj\.weight"):
        convert_hf_to_orbax(bad, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob("out*"))


def _convert_in_child(folder, out):
    convert_hf_to_orbax(folder, out, "float32", progress=False, batch_bytes=1)


def test_killed_conversion_leaves_nothing_loadable_and_rerun_works(hf_checkpoint, tmp_path):
    hf, folder = hf_checkpoint("tiny-moe")
    out = tmp_path / "ckpt"
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_convert_in_child, args=(folder, out))
    child.start()
    staging = list(tmp_path.glob("ckpt-converting*"))
    for _ in range(600):  # wait until the child is writing, then kill it
        staging = list(tmp_path.glob("ckpt-converting*"))
        if staging or not child.is_alive():
            break
        child.join(0.1)
    os.kill(child.pid, 9)
    child.join()
    assert staging, "the child never started writing"
    assert not out.exists()
    with pytest.raises(CheckpointError):
        load_model(out)
    assert convert_main(["--hf-dir", str(folder), "--out", str(out), "--dtype", "float32", "--resume"]) == 0
    assert not list(tmp_path.glob("ckpt-converting*"))
    assert np.abs(np.asarray(load_model(out)(jnp.asarray(TOKENS))) - hf_logits(hf, TOKENS)).max() <= 1e-4


def test_bad_orbax_inputs(converted, tmp_path):
    _, out = converted
    assert convert_main(["--hf-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert convert_main(["--hf-dir", str(out), "--out", str(out)]) == 2  # exists
    with pytest.raises(CheckpointError, match="not an Orbax checkpoint"):
        export_to_hf(tmp_path, tmp_path / "y")
