"""LoRA: forward against independently merged weights, PEFT's parameter count and loading of our export, the merge
CLI, and `train.finetune` runs on 8 devices (LoRA and full fine-tuning) that resume exactly."""

import copy
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from qwen35_jax.hf_reference import hf_logits, random_tokens
from qwen35_jax.loading import load_model
from train.config import TrainConfig, TrainConfigError
from train.step import Trainer

TARGETS = [r"self_attn\.", r"linear_attn\.", r"shared_expert\.", r"mlp\.experts\."]
LORA = {"rank": 4, "alpha": 8, "targets": TARGETS}
PEFT_MODULES = (r".*\.(self_attn\.[qkvo]_proj|linear_attn\.(in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj)|"
                r"shared_expert\.(gate|up|down)_proj)")
PEFT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def random_adapters(trainer, seed=1, scale=0.05):
    """Adapters with A and B both random (B = 0 would hide every mistake in the merge)."""
    leaves, tree = jax.tree.flatten(trainer.init_state()["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def lora_logits(trainer, adapters, tokens):
    """The training forward's logits: base + adapters through the trainer's cast (merged per period in the scan)."""
    tree, hook = trainer._cast(adapters, trainer.base)
    model = nnx.merge(trainer.graphdef, tree)
    return np.asarray(model.logits(model.train_hidden_states(tokens, **hook)[0]))


def numpy_merged_hf_model(hf_model, trainer, adapters):
    """A copy of the HF model with W + (alpha/r) (A @ B)^T per target, computed in numpy from the adapter arrays."""
    merged = copy.deepcopy(hf_model)
    params = dict(merged.named_parameters())
    scale = LORA["alpha"] / LORA["rank"]
    with torch.no_grad():
        for t in trainer.lora.targets:
            node = adapters
            for k in t.key:
                node = node[k]
            a, b = np.asarray(node["lora_a"], np.float64), np.asarray(node["lora_b"], np.float64)
            delta = np.einsum("...ir,...ro->...oi", a, b) * scale
            params[t.name].add_(torch.as_tensor(delta, dtype=torch.float32))
    return merged


@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    hf_model, folder = hf_checkpoint("tiny-moe")
    trainer = Trainer(load_model(folder), TrainConfig(lora=LORA))
    return hf_model, folder, trainer, random_adapters(trainer)


def test_forward_equals_the_model_with_independently_merged_weights(tiny, tmp_path):
    hf_model, folder, trainer, adapters = tiny
    tokens = random_tokens(256, 2, 24)
    merged = numpy_merged_hf_model(hf_model, trainer, adapters)
    merged.save_pretrained(tmp_path / "merged")
    expected = np.asarray(load_model(tmp_path / "merged")(tokens))
    error = float(np.abs(lora_logits(trainer, adapters, tokens) - expected).max())
    print(f"LoRA forward vs numpy-merged weights: max abs error {error:.2e}")
    assert error <= 1e-5
    fresh = trainer.init_state()["params"]  # B = 0: the base model exactly
    np.testing.assert_array_equal(lora_logits(trainer, fresh, tokens), np.asarray(load_model(folder)(tokens)))


def test_trainable_parameter_count_equals_pefts(tiny):
    from peft import LoraConfig, get_peft_model
    hf_model, _, trainer, _ = tiny
    ours = sum(x.size for x in jax.tree.leaves(trainer.init_state()["params"]))
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules=PEFT_MODULES, target_parameters=PEFT_PARAMETERS))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    print(f"trainable parameters: ours {ours}, PEFT {trainable}")
    assert ours == trainable


def test_peft_export_loads_into_peft_and_merges(tiny, tmp_path):
    from peft import PeftModel

    from train.lora import export_peft, main
    hf_model, folder, trainer, adapters = tiny
    tokens = random_tokens(256, 2, 24, seed=2)
    ours = lora_logits(trainer, adapters, tokens)
    adapter_dir = export_peft(trainer.lora, adapters, tmp_path / "adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert "model.layers.0.linear_attn.in_proj_qkv" in config["target_modules"]
    assert "model.layers.3.mlp.experts.gate_up_proj" in config["target_parameters"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), adapter_dir).eval()
    error = float(np.abs(hf_logits(peft_model, tokens) - ours).max())
    print(f"PEFT-loaded export vs ours: max abs logits error {error:.2e}")
    assert error <= 1e-4
    assert main(["merge", "--base", str(folder), "--adapter", str(adapter_dir), "--out", str(tmp_path / "m")]) == 0
    error = float(np.abs(np.asarray(load_model(tmp_path / "m")(tokens)) - ours).max())
    print(f"merge CLI checkpoint vs ours: max abs logits error {error:.2e}")
    assert error <= 1e-5


def test_config_errors_are_clear():
    from test_train import small_model
    with pytest.raises(TrainConfigError, match=r"'lora': missing \['targets'\]"):
        TrainConfig(lora={"rank": 4, "alpha": 8})
    with pytest.raises(TrainConfigError, match=r"rank=0 is not a positive integer"):
        TrainConfig(lora={"rank": 0, "alpha": 8, "targets": ["q_proj"]})
    with pytest.raises(TrainConfigError, match=r"with lora the whole base model is frozen"):
        TrainConfig(lora=LORA, frozen=["lm_head"])
    with pytest.raises(TrainConfigError, match=r"match no parameter.*adaptable.*in_proj_qkv"):
        Trainer(small_model(), TrainConfig(lora={**LORA, "targets": ["embed_tokens"]}))


# ---- runs on 8 fake devices: a two-period MoE (8 layers, scanned) -------------------------------------------
# full fine-tuning's resume is also tested on one device (test_train) and its sharded step against one device
# (test_train_equivalence): its 8-device run is in `-m slow`
@pytest.mark.parametrize("mode", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_run_on_8_devices_resumes_exactly(tmp_path, bpe_folder, mode):
    from test_train import logged, max_diff, run_config

    from train.finetune import run
    extra = dict(model_overrides={"vocab_size": 512}, mesh="fsdp=2,expert=2,tensor=2", eval_data=[])
    if mode == "lora":
        extra.update(lora=LORA, learning_rate=1e-2)
    straight = run(run_config(tmp_path, bpe_folder, "straight", **extra), progress=False)
    run(run_config(tmp_path, bpe_folder, "resumed", **extra), progress=False, stop_after=3)
    resumed = run(run_config(tmp_path, bpe_folder, "resumed", **extra), resume=True, progress=False)
    a, b = logged(tmp_path, "straight"), logged(tmp_path, "resumed")
    assert [e["step"] for e in a] == [e["step"] for e in b] == list(range(1, 7))
    assert [e["loss"] for e in a] == [e["loss"] for e in b] and a[-1]["loss"] < a[0]["loss"]
    assert max_diff(nnx.state(load_model(straight["final"])), nnx.state(load_model(resumed["final"]))) == 0.0
    import ast
    meta = json.loads((tmp_path / "resumed" / "checkpoints" / "6" / "state" / "_METADATA").read_text())
    keys = [ast.literal_eval(k) for k in meta["tree_metadata"]]  # ('params', 'layers', '0', ..., 'lora_a')
    arrays = [k for k in keys if k[0] == "params" or "mu" in k or "nu" in k]
    if mode == "lora":  # adapters and their Adam moments only
        assert arrays and all(k[-1] in ("lora_a", "lora_b") for k in arrays)
        assert (tmp_path / "resumed" / "adapter" / "adapter_model.safetensors").exists()
    else:
        assert any("experts_gate_up" in k for k in arrays)


def test_the_merge_runs_per_period_inside_the_layer_scan():
    """No merged copy of every targeted weight: the LoRA merge runs per period inside the (remat'd) layer scan, so
    the compiled step's temporaries grow with depth by less than the added periods' merged weights, which a merge
    of the whole stacked tree before the model has to hold (measured on tiny-moe, 2 -> 4 periods adding 1.27 MB of
    merged bfloat16 weights: temporaries +0.88 MB; with the whole-tree merge +4.49 MB)."""
    from qwen35_jax.config import ModelConfig
    from qwen35_jax.nn.model import Qwen35

    def step(periods):
        cfg = ModelConfig.from_hf("tiny-moe", num_hidden_layers=4 * periods,
                                  layer_types=(["linear_attention"] * 3 + ["full_attention"]) * periods)
        trainer = Trainer(Qwen35.abstract(cfg), TrainConfig(lora=LORA, remat="full", compute_dtype="bfloat16"))
        compiled = trainer.lower_train_step(trainer.abstract_state(), trainer.abstract_batch(1, 8)).compile()
        merged_bytes = sum(int(np.prod(t.shape)) for t in trainer.lora.targets) * 2  # bfloat16
        return compiled.memory_analysis().temp_size_in_bytes, merged_bytes

    (temp2, merged2), (temp4, merged4) = step(2), step(4)
    assert temp4 - temp2 < merged4 - merged2, (temp2, temp4, merged2, merged4)
