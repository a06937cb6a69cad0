"""Every field of HF's Qwen3.5 text configs (and of the released configs) is read, checked or knowingly ignored:
a value this implementation does not compute is a ConfigError naming the field, never a silent change."""

import json

import jax.numpy as jnp
import pytest
from flax import nnx
from transformers import PreTrainedConfig, Qwen3_5MoeTextConfig, Qwen3_5TextConfig

from qwen35_jax import ConfigError, ModelConfig
from qwen35_jax.config import (FIXED_FIELDS, FIXED_ROPE_FIELDS, FIXED_VISION_FIELDS, NON_ARCHITECTURAL_FIELDS,
                               PRESET_DIR, preset_names)
from qwen35_jax.nn.model import Qwen35

# Read by ModelConfig under another name or as structure.
STRUCTURE = {"rope_parameters", "model_type", "architectures", "rope_theta", "partial_rotary_factor"}
ROPE_READ = {"rope_type", "rope_theta", "partial_rotary_factor", "mrope_section"}


def text_config(preset: str) -> dict:
    data = json.loads((PRESET_DIR / f"{preset}.json").read_text())
    return data.get("text_config", data)


def accounted_for() -> set[str]:
    import dataclasses
    return ({f.name for f in dataclasses.fields(ModelConfig)} | set(FIXED_FIELDS) | set(NON_ARCHITECTURAL_FIELDS)
            | STRUCTURE)


@pytest.mark.parametrize("hf_class", [Qwen3_5TextConfig, Qwen3_5MoeTextConfig])
def test_every_hf_text_config_field_is_accounted_for(hf_class):
    hf_fields = set(hf_class.__annotations__) - set(PreTrainedConfig.__annotations__)  # the class's own fields
    assert {"attention_bias", "hidden_act", "rope_parameters"} <= hf_fields
    missing = sorted(hf_fields - accounted_for())
    assert not missing, f"HF fields neither read, checked nor listed as non-architectural: {missing}"


@pytest.mark.parametrize("preset", [p for p in preset_names() if p.startswith("qwen3.5")])
def test_every_released_config_field_is_accounted_for(preset):
    text = text_config(preset)
    assert not sorted(set(text) - accounted_for())
    assert not sorted(set(text["rope_parameters"]) - ROPE_READ - set(FIXED_ROPE_FIELDS))


def with_field(name, value, where="text"):
    data = json.loads((PRESET_DIR / "qwen3.5-35b-a3b.json").read_text())
    if where == "rope":
        data["text_config"]["rope_parameters"][name] = value
    elif where == "vision":
        data["vision_config"][name] = value
    else:
        data["text_config"][name] = value
    return data


UNSUPPORTED = [("attention_bias", True, "text"), ("attention_dropout", 0.1, "text"),
               ("attn_output_gate", False, "text"), ("norm_topk_prob", False, "text"),
               ("mamba_ssm_dtype", "bfloat16", "text"), ("mtp_use_dedicated_embeddings", True, "text"),
               ("decoder_sparse_step", 2, "text"), ("mlp_only_layers", [0, 3], "text"),
               ("use_qk_norm", False, "text"), ("output_gate_type", "swish", "text"),
               ("norm_topk_prob", 0, "text"),  # not the boolean true
               ("mrope_interleaved", False, "rope"), ("deepstack_visual_indexes", [8, 16], "vision")]


@pytest.mark.parametrize("name,value,where", UNSUPPORTED)
def test_unsupported_values_are_errors_naming_field_value_and_what_is_supported(name, value, where):
    fixed = {**FIXED_FIELDS, **FIXED_ROPE_FIELDS, **FIXED_VISION_FIELDS}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf(with_field(name, value, where))
    message = str(e.value)
    assert f"{name}={value!r}" in message and "not supported" in message
    assert f"{name}={fixed[name][0]!r}" in message  # the one value that is supported


@pytest.mark.parametrize("name", sorted(FIXED_FIELDS))
def test_supported_values_load(name):
    supported = FIXED_FIELDS[name][0]
    assert ModelConfig.from_hf(with_field(name, supported)) == ModelConfig.from_hf("qwen3.5-35b-a3b")


def test_initializer_range_sets_the_random_init():
    """HF draws Linear/Embedding/expert weights from N(0, initializer_range); so does a random Qwen35."""
    for std in (0.02, 0.1):
        cfg = ModelConfig.from_hf({**text_config("tiny-moe"), "initializer_range": std})
        assert cfg.to_hf()["initializer_range"] == std
        model = Qwen35(cfg, jnp.float32, nnx.Rngs(0))
        for name, w in (("embed", model.embed_tokens), ("router", model.decoder.periods.layers[0].mlp.router),
                        ("q_proj", model.decoder.periods.layers[3].self_attn.q_proj)):
            measured = float(jnp.std(w[...]))
            assert abs(measured - std) < 0.1 * std, (name, measured, std)
