"""The sharding dry-run: abstract arrays, real shardings, compiled memory figures, clear mesh errors."""

import json
import subprocess
import sys

import jax
import pytest
from flax import nnx

from qwen35_jax.config import ModelConfig
from qwen35_jax.dryrun import main
from qwen35_jax.nn.model import Qwen35

GIB = 2**30


def dryrun(capsys, *args):
    code = main(list(args) + ["--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


def test_35b_train_on_8_devices(capsys):
    """The default recipe (bf16 compute, float32 master weights + AdamW, remat full) of Trainer's own step."""
    report = dryrun(capsys, "--model", "qwen3.5-35b-a3b", "--devices", "8", "--mesh", "expert=4,tensor=2",
                    "--mode", "train", "--batch", "8", "--seq", "256", "--hbm", "95GiB")
    cfg = ModelConfig.from_hf("qwen3.5-35b-a3b")
    experts = cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    total = 34_660_610_688 * 4  # HF's parameter count of this config, float32
    rest = total - experts
    params = report["params_bytes_per_device"]
    # experts split 8 ways (4 expert x 2 tensor); everything else FSDP-sharded over the expert axis (4), some of
    # it over tensor too: nothing but tiny vectors is replicated
    assert experts / 8 + rest / 8 <= params <= (experts / 8 + rest / 4) * 1.01
    # AdamW mu + nu of every parameter but the MTP block's (frozen without an MTP loss: no optimizer state), whose
    # share per device lies between an eighth and a quarter of it
    mtp = 4 * sum(x.size for x in jax.tree.leaves(nnx.state(Qwen35.abstract(cfg).mtp)))
    optimizer = report["optimizer_state_bytes_per_device"]
    assert 2 * (params - mtp / 4) - 1e6 <= optimizer <= 2 * (params - mtp / 8) + 1e6
    assert report["total_bytes_per_device"] > params + optimizer
    assert report["fits"] == (report["total_bytes_per_device"] <= 95 * GIB)
    # tokens travel to their experts' owners (all-to-all); FSDP gathers weights; gradients are reduced
    assert report["collectives"]["all-to-all"] > 0 and report["collectives"]["all-gather"] > 0
    assert report["collectives"]["all-reduce"] + report["collectives"].get("reduce-scatter", 0) > 0
    assert report["compile_seconds"] > 0 and report["flops_per_device"] > 0


def spec_param_counts(cfg) -> tuple[int, int]:
    """(routed-expert parameters, all other parameters) of a text model, counted from the weight table of the
    architecture spec (qwen35-architecture.md, "checkpoint tensors"), independently of our modules."""
    h, hk, hv, dk, dv = (cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads,
                         cfg.linear_key_head_dim, cfg.linear_value_head_dim)
    conv_dim = 2 * hk * dk + hv * dv
    gdn = conv_dim * h + 2 * hv * dv * h + 2 * hv * h + conv_dim * cfg.linear_conv_kernel_dim + 2 * hv + dv
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = 2 * hq * hd * h + 2 * hkv * hd * h + h * hq * hd + 2 * hd
    experts = cfg.num_experts * 3 * h * cfg.moe_intermediate_size
    moe_rest = cfg.num_experts * h + 3 * cfg.shared_expert_intermediate_size * h + h
    n_full = cfg.layer_types.count("full_attention")
    n_linear = cfg.num_hidden_layers - n_full
    rest = n_linear * gdn + n_full * attn + cfg.num_hidden_layers * (moe_rest + 2 * h)
    rest += cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h
    return cfg.num_hidden_layers * experts, rest


def test_prefill_params_are_sharded_and_tokens_travel_to_their_experts(capsys):
    """bf16 parameters per device between a perfect 8-way split and (experts split over expert x tensor, the rest
    replicated); the expert-parallel MoE moves tokens to the experts' owners with an all-to-all."""
    report = dryrun(capsys, "--model", "tiny-moe", "--devices", "8", "--mesh", "fsdp=2,expert=2,tensor=2",
                    "--mode", "prefill", "--batch", "4", "--seq", "128")
    assert (report["mode"], report["batch"], report["seq"], report["devices"]) == ("prefill", 4, 128, 8)
    assert report["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    experts, rest = (2 * n for n in spec_param_counts(ModelConfig.from_hf("tiny-moe")))  # bf16 bytes
    params = report["params_bytes_per_device"]
    assert (experts + rest) / 8 <= params <= experts / 4 + rest
    assert "optimizer_state_bytes_per_device" not in report  # the engine's prefill step: params + decode state
    assert report["temp_bytes_per_device"] > 0
    assert report["total_bytes_per_device"] >= params + report["decode_state_bytes_per_device"] + \
        report["temp_bytes_per_device"]
    assert report["collectives"]["all-to-all"] > 0
    assert report["fits"] is None  # no --hbm given


def test_decode_state_bytes(capsys):
    report = dryrun(capsys, "--model", "tiny-moe", "--devices", "8", "--mesh", "fsdp=2,expert=2,tensor=2",
                    "--mode", "decode", "--batch", "4", "--seq", "128")
    cfg = ModelConfig.from_hf("tiny-moe")
    per_row = 2 * (2 * 128 * cfg.num_key_value_heads * cfg.head_dim * 2)  # 2 attention layers, K+V, bf16
    per_row += 6 * (3 * (2 * 16 + 2 * 16 + 4 * 16) * 2 + 4 * 16 * 16 * 4)  # 6 GDN layers: conv bf16, state fp32
    per_row += 4  # length
    # the engine's own placement: batch 4 split over fsdp=2 x expert=2; GDN heads (4), key heads (2) and the 2
    # KV heads split over tensor=2 (the lengths are not)
    assert 4 * per_row / 8 <= report["decode_state_bytes_per_device"] <= 4 * per_row / 4


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
    cfg = ModelConfig.from_hf("qwen3.5-397b-a17b")
    n_full = cfg.layer_types.count("full_attention")
    # Per device, from the spec's shapes: the batch is split over expert=16 (4 rows each); 2 KV heads do not divide
    # tensor=4 (replicated); the GDN heads (64 value, 16 key) split 4 ways. KV and conv state bf16, recurrent
    # state float32, plus the int32 lengths.
    kv = n_full * 2 * 32768 * cfg.num_key_value_heads * cfg.head_dim * 2
    conv = (cfg.linear_conv_kernel_dim - 1) * (2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
                                               + cfg.linear_num_value_heads * cfg.linear_value_head_dim) * 2 // 4
    recurrent = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4 // 4
    expected = 64 // 16 * (kv + (cfg.num_hidden_layers - n_full) * (conv + recurrent) + 4)
    assert report["decode_state_bytes_per_device"] == expected
    assert report["fits"] == (report["total_bytes_per_device"] <= 95 * GIB)


def test_per_device_flops_fall_with_the_mesh(capsys):
    """No replicated compute: the train step's FLOPs per device (counted from the compiled HLO with loop trip
    counts) on 8 devices are an eighth of the one-device step's, within 15%."""
    common = ["--model", "tiny-moe", "--mode", "train", "--batch", "16", "--seq", "256"]
    one = dryrun(capsys, *common, "--devices", "1", "--mesh", "fsdp=1")
    eight = dryrun(capsys, *common, "--devices", "8", "--mesh", "fsdp=2,expert=2,tensor=2")
    assert abs(eight["flops_per_device"] * 8 / one["flops_per_device"] - 1) < 0.15
    assert one["model_flops"] == eight["model_flops"]


def test_finetune_dry_run_compiles_the_runs_own_config(capsys):
    """`train.finetune --dry-run` compiles the step of exactly the config it would train (here the demo recipe's
    model and dtypes, with overrides: gradient accumulation, a loss chunk)."""
    from train.finetune import main as finetune
    code = finetune(["--config", "demo", "--dry-run", "--devices", "8", "--mesh", "fsdp=4,tensor=2",
                     "batch_size=8", "seq_len=32", "grad_accum=2", "loss_chunk=64", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out.strip().splitlines()[-1])
    assert (report["model"], report["batch"], report["seq"]) == ("tiny-moe", 8, 32)
    assert report["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
