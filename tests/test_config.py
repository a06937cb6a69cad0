"""Configs: every preset reads, HF round trip, and bad configs fail with one error naming the field."""

import json

import pytest
from transformers import Qwen3_5Config, Qwen3_5MoeConfig

from qwen35_jax import ConfigError, ModelConfig
from qwen35_jax.config import PRESET_DIR

RELEASED = {  # preset: (hidden, layers, experts, top-k, tied)
    "qwen3.5-0.8b": (1024, 24, 0, 0, True), "qwen3.5-2b": (2048, 24, 0, 0, True),
    "qwen3.5-4b": (2560, 32, 0, 0, True), "qwen3.5-9b": (4096, 32, 0, 0, False),
    "qwen3.5-27b": (5120, 64, 0, 0, False), "qwen3.5-35b-a3b": (2048, 40, 256, 8, False),
    "qwen3.5-122b-a10b": (3072, 48, 256, 8, False), "qwen3.5-397b-a17b": (4096, 60, 512, 10, False),
}


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_released_presets(preset):
    cfg = ModelConfig.from_hf(preset)
    hidden, layers, experts, top_k, tied = RELEASED[preset]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok,
            cfg.tie_word_embeddings) == (hidden, layers, experts, top_k, tied)
    assert cfg.period == ("linear_attention",) * 3 + ("full_attention",)
    assert cfg.num_periods == layers // 4 and cfg.rotary_dim == 64 and cfg.vision is not None
    assert cfg.vision.out_hidden_size == hidden
    # the same file through a path, and through HF's own config class, agree
    assert ModelConfig.from_hf(PRESET_DIR / f"{preset}.json") == cfg
    hf_cls = Qwen3_5MoeConfig if experts else Qwen3_5Config
    hf_text = hf_cls(**json.loads((PRESET_DIR / f"{preset}.json").read_text())).text_config
    assert hf_text.layer_types == list(cfg.layer_types) and hf_text.hidden_size == hidden


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe", "qwen3.5-35b-a3b", "qwen3.5-4b"])
def test_to_hf_round_trips_and_hf_accepts_it(preset):
    cfg = ModelConfig.from_hf(preset)
    exported = cfg.to_hf()
    assert ModelConfig.from_hf(exported) == cfg
    hf_cls = Qwen3_5MoeConfig if cfg.is_moe else Qwen3_5Config
    hf = hf_cls(**exported) if "text_config" in exported else None
    if hf is not None:
        assert hf.text_config.num_hidden_layers == cfg.num_hidden_layers


def test_checkpoint_folder_and_layer_types_default(tmp_path):
    data = json.loads((PRESET_DIR / "tiny-dense.json").read_text())
    del data["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps({"text_config": data, "tie_word_embeddings": True}))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.layer_types[3] == "full_attention" and cfg.layer_types[:3] == ("linear_attention",) * 3
    assert cfg.tie_word_embeddings  # the top-level flag wins, as in HF


def bad(**changes):
    data = json.loads((PRESET_DIR / "tiny-moe.json").read_text())
    data.update(changes)
    return data


@pytest.mark.parametrize("changes,field", [
    (dict(linear_num_value_heads=3), "linear_num_value_heads"),
    (dict(num_attention_heads=3), "num_attention_heads"),
    (dict(layer_types=["linear_attention"] * 5), "layer_types"),
    (dict(layer_types=["linear_attention"] * 7 + ["sliding_attention"]), "layer_types"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                           "mrope_section": [11, 11, 10]}), "mrope_section"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_bad_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf(bad(**changes))


def test_missing_and_unreadable_configs(tmp_path):
    with pytest.raises(ConfigError, match="preset name"):
        ModelConfig.from_hf(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    data = json.loads((PRESET_DIR / "tiny-dense.json").read_text())
    del data["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_hf(data)
