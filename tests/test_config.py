"""Configs: every preset reads, HF round trip, and bad configs fail with one error naming the field."""

import json

import jax.numpy as jnp
import pytest
from flax import nnx
from transformers import Qwen3_5Config, Qwen3_5MoeConfig

from qwen35_jax import ConfigError, ModelConfig
from qwen35_jax.config import PRESET_DIR
from qwen35_jax.nn.model import Qwen35

# The architecture spec's table of released checkpoints (qwen35-architecture.md, 1.2 "Released checkpoints"):
# H, layers (linear/full), Hq/Hkv, Hk/Hv (linear), dense I, E, top-k, moe I, shared I, tied, vision
# (depth/hidden/ffn/heads) -> out. An independent transcription: the preset JSON files must agree with it.
SPEC_TABLE = """
qwen3.5-0.8b      | 1024 | 24 (18/6)  | 8/2  | 16/16 | 3584  | -   | -  | -    | -    | true  | 12/768/3072/12 -> 1024
qwen3.5-2b        | 2048 | 24 (18/6)  | 8/2  | 16/16 | 6144  | -   | -  | -    | -    | true  | 24/1024/4096/16 -> 2048
qwen3.5-4b        | 2560 | 32 (24/8)  | 16/4 | 16/32 | 9216  | -   | -  | -    | -    | true  | 24/1024/4096/16 -> 2560
qwen3.5-9b        | 4096 | 32 (24/8)  | 16/4 | 16/32 | 12288 | -   | -  | -    | -    | false | 27/1152/4304/16 -> 4096
qwen3.5-27b       | 5120 | 64 (48/16) | 24/4 | 16/48 | 17408 | -   | -  | -    | -    | false | 27/1152/4304/16 -> 5120
qwen3.5-35b-a3b   | 2048 | 40 (30/10) | 16/2 | 16/32 | -     | 256 | 8  | 512  | 512  | false | 27/1152/4304/16 -> 2048
qwen3.5-122b-a10b | 3072 | 48 (36/12) | 32/2 | 16/64 | -     | 256 | 8  | 1024 | 1024 | false | 27/1152/4304/16 -> 3072
qwen3.5-397b-a17b | 4096 | 60 (45/15) | 32/2 | 16/64 | -     | 512 | 10 | 1024 | 1024 | false | 27/1152/4304/16 -> 4096
"""


def spec_rows() -> dict[str, dict]:
    rows = {}
    for line in filter(None, SPEC_TABLE.strip().splitlines()):
        name, h, layers, attn, linear, dense, e, k, moe, shared, tied, vision = (c.strip() for c in line.split("|"))
        n, split = layers.split(" ")
        lin, full = split.strip("()").split("/")
        depth_hid_ffn_heads, out = vision.split(" -> ")
        num = lambda x: 0 if x == "-" else int(x)  # noqa: E731
        rows[name] = {
            "hidden_size": int(h), "num_hidden_layers": int(n), "linear": int(lin), "full": int(full),
            "num_attention_heads": int(attn.split("/")[0]), "num_key_value_heads": int(attn.split("/")[1]),
            "linear_num_key_heads": int(linear.split("/")[0]), "linear_num_value_heads": int(linear.split("/")[1]),
            "intermediate_size": num(dense), "num_experts": num(e), "num_experts_per_tok": num(k),
            "moe_intermediate_size": num(moe), "shared_expert_intermediate_size": num(shared),
            "tie_word_embeddings": tied == "true",
            "vision": tuple(int(x) for x in depth_hid_ffn_heads.split("/")) + (int(out),)}
    return rows


SPEC = spec_rows()


@pytest.mark.parametrize("preset", sorted(SPEC))
def test_released_presets(preset):
    """Every released preset against the spec's table, plus the values the spec says all checkpoints share."""
    cfg = ModelConfig.from_hf(preset)
    row = SPEC[preset]
    for field, value in row.items():
        if field in ("linear", "full", "vision"):
            continue
        if field == "intermediate_size" and cfg.is_moe:
            continue  # unused by MoE models (HF keeps its class default)
        assert getattr(cfg, field) == value, field
    assert (cfg.layer_types.count("linear_attention"), cfg.layer_types.count("full_attention")) == \
        (row["linear"], row["full"])
    assert cfg.period == ("linear_attention",) * 3 + ("full_attention",) and cfg.num_periods == row["full"]
    shared = (cfg.head_dim, cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim,
              cfg.rope_theta, cfg.partial_rotary_factor, cfg.rotary_dim, cfg.mrope_section,
              cfg.max_position_embeddings, cfg.vocab_size, cfg.rms_norm_eps, cfg.hidden_act, cfg.mtp_num_hidden_layers)
    assert shared == (256, 128, 128, 4, 1e7, 0.25, 64, (11, 11, 10), 262144, 248320, 1e-6, "silu", 1)
    v = cfg.vision
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == row["vision"]
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.num_position_embeddings) == (16, 2, 2, 2304)
    # the same file through a path, and through HF's own config class, agree
    assert ModelConfig.from_hf(PRESET_DIR / f"{preset}.json") == cfg
    hf_cls = Qwen3_5MoeConfig if cfg.is_moe else Qwen3_5Config
    hf_text = hf_cls(**json.loads((PRESET_DIR / f"{preset}.json").read_text())).text_config
    assert hf_text.layer_types == list(cfg.layer_types) and hf_text.hidden_size == cfg.hidden_size


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


@pytest.mark.parametrize("option,where", [("remat", "train_hidden_states"), ("moe_backend", "forward_with_state")])
def test_runtime_options_are_not_config_fields(option, where):
    """remat and moe_backend change how a call computes, not the model: they are arguments of the calls."""
    with pytest.raises(ConfigError, match=rf"^{option}='full' is a runtime option.*{where}"):
        ModelConfig.from_hf("tiny-moe", **{option: "full"})


def test_bad_runtime_options_name_the_value_and_the_choices():
    model = Qwen35(ModelConfig.from_hf("tiny-moe"), jnp.float32, nnx.Rngs(0))
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"^remat='fulll': expected one of \('none', 'full', 'dots'\)$"):
        model.train_hidden_states(tokens, remat="fulll")
    expected = r"^moe_backend='dense': expected one of \('auto', 'ragged', 'blocked', 'gather'\)$"
    with pytest.raises(ValueError, match=expected):
        model(tokens, moe_backend="dense")


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
