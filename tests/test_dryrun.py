"""The sharding dry-run: abstract arrays, real shardings, compiled memory figures, clear mesh errors."""

import json
import subprocess
import sys

import pytest

from qwen35_jax.config import ModelConfig
from qwen35_jax.dryrun import main

GIB = 2**30


def dryrun(capsys, *args):
    code = main(list(args) + ["--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


def test_35b_train_on_8_devices(capsys):
    report = dryrun(capsys, "--model", "qwen3.5-35b-a3b", "--devices", "8", "--mesh", "expert=4,tensor=2",
                    "--mode", "train", "--batch", "8", "--seq", "256", "--hbm", "95GiB")
    cfg = ModelConfig.from_hf("qwen3.5-35b-a3b")
    experts = cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    total = 34_660_610_688 * 4  # HF's parameter count of this config, float32
    rest = total - experts
    params = report["params_bytes_per_device"]
    # experts split 8 ways (4 expert x 2 tensor); the rest at most replicated, at least halved by tensor=2
    assert experts / 8 + rest / 2 <= params <= experts / 8 + rest
    assert abs(report["optimizer_state_bytes_per_device"] - 2 * params) < 1e6  # AdamW mu + nu
    assert report["total_bytes_per_device"] > params + report["optimizer_state_bytes_per_device"]
    assert report["fits"] == (report["total_bytes_per_device"] <= 95 * GIB)
    assert report["collectives"]["all-reduce"] > 0 and report["collectives"]["all-gather"] == 0
    assert report["compile_seconds"] > 0


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_inference_modes_and_decode_state_bytes(capsys, mode):
    report = dryrun(capsys, "--model", "tiny-moe", "--devices", "8", "--mesh", "fsdp=2,expert=2,tensor=2",
                    "--mode", mode, "--batch", "4", "--seq", "128")
    if mode == "decode":
        cfg = ModelConfig.from_hf("tiny-moe")
        per_row = 2 * (2 * 128 * cfg.num_key_value_heads * cfg.head_dim * 2)  # 2 attention layers, K+V, bf16
        per_row += 6 * (3 * (2 * 16 + 2 * 16 + 4 * 16) * 2 + 4 * 16 * 16 * 4)  # 6 GDN layers: conv bf16, state fp32
        per_row += 4  # length
        # batch 4 split over fsdp=2; GDN heads (4) and key heads (2) split over tensor=2; 2 KV heads too
        assert report["decode_state_bytes_per_device"] <= 4 * per_row / 2
        assert report["decode_state_bytes_per_device"] >= 4 * per_row / 4


@pytest.mark.parametrize("mesh,devices,message", [
    ("expert=3", "3", "expert=3 does not divide num_experts=256"),
    ("tensor=3", "3", "tensor=3 does not divide num_attention_heads=16"),
    ("expert=16", "8", "needs 16 devices but 8"),
])
def test_invalid_meshes_say_why(capsys, mesh, devices, message):
    code = main(["--model", "qwen3.5-35b-a3b", "--devices", devices, "--mesh", mesh, "--mode", "prefill",
                 "--batch", "1", "--seq", "16"])
    assert code == 2 and message in capsys.readouterr().err


def run_cli(*args):
    """A fresh process: the device count is set before JAX starts."""
    out = subprocess.run([sys.executable, "-m", "qwen35_jax.dryrun", *args, "--json"], capture_output=True,
                         text=True, timeout=3000)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_397b_train_seq_4096():
    report = run_cli("--model", "qwen3.5-397b-a17b", "--devices", "64", "--mesh",
                     "expert=16,tensor=4", "--mode", "train", "--batch", "16", "--seq", "4096", "--hbm", "95GiB")
    assert report["params_bytes_per_device"] < 400e9 * 4 / 16


@pytest.mark.slow
def test_397b_decode_32k_context():
    report = run_cli("--model", "qwen3.5-397b-a17b", "--devices", "64", "--mesh",
                     "expert=16,tensor=4", "--mode", "decode", "--batch", "64", "--seq", "32768", "--hbm", "95GiB")
    assert report["decode_state_bytes_per_device"] > 0 and report["fits"] is not None
