"""Model configuration: frozen dataclasses read from HF-style config.json files.

`ModelConfig.from_hf` accepts a checkpoint folder, a config.json path, a dict (top-level multimodal with a
`text_config`, or text-only) or a preset name (`preset_names()`, for example `"qwen3.5-35b-a3b"`): the presets
are package data, `qwen35_jax/presets/NAME.json`, so they load from an installed wheel too.
Every check raises `ConfigError` naming the field, its value and what was expected.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from pathlib import Path
from typing import Any

PRESET_DIR = importlib.resources.files("qwen35_jax") / "presets"  # package data: NAME.json per preset
LAYER_TYPES = ("linear_attention", "full_attention")
SUPPORTED_ROPE_TYPES = ("default",)
SUPPORTED_ACTIVATIONS = ("silu",)
# Options of a call, not of the model: passing one to ModelConfig is a ConfigError saying where it goes.
RUNTIME_OPTIONS = {
    "remat": "pass remat=... to Qwen35.train_hidden_states (training: the TrainConfig key `remat`)",
    "moe_backend": "pass moe_backend=... to the model call (Qwen35.__call__, hidden_states, "
                   "train_hidden_states, forward_with_state)",
}

# HF-config fields read only to check them: this implementation computes with the one value given (with what
# it means); any other value would load and silently compute something else, so it is a ConfigError.
FIXED_FIELDS = {
    "attention_bias": (False, "attention projections without biases, as every released checkpoint"),
    "attention_dropout": (0.0, "no attention dropout"),
    "attn_output_gate": (True, "the sigmoid output gate of Qwen3.5 attention, always on (HF ignores the field)"),
    "norm_topk_prob": (True, "top-k routing weights renormalised to sum 1 (HF always renormalises)"),
    "mamba_ssm_dtype": ("float32", "a float32 Gated DeltaNet recurrent state"),
    "mtp_use_dedicated_embeddings": (False, "an MTP block sharing the model's embeddings"),
    "decoder_sparse_step": (1, "an MoE block in every layer of an MoE model"),
    "mlp_only_layers": ([], "an MoE block in every layer of an MoE model"),
    "use_qk_norm": (True, "per-head q/k RMSNorm in every attention layer"),
    "output_gate_type": (None, "the Qwen3.5 attention output gate (this Qwen3.6 field is not supported)"),
}
FIXED_ROPE_FIELDS = {
    "mrope_interleaved": (True, "the interleaved mRoPE layout (HF hard-codes it and ignores the field)"),
}
FIXED_VISION_FIELDS = {
    "deepstack_visual_indexes": ([], "no DeepStack feature injection (Qwen3.5 has none, unlike Qwen3-VL)"),
}
# HF-config fields that do not change what the model computes (kept out of ModelConfig on purpose).
NON_ARCHITECTURAL_FIELDS = {
    "use_cache": "inference always keeps a decode state (qwen35_jax.cache)",
    "pad_token_id": "a tokenizer setting", "bos_token_id": "a tokenizer setting",
    "eos_token_id": "a tokenizer / generation setting",
    "output_router_logits": "training: the router losses are set by the train config (train.config)",
    "dtype": "the storage dtype: chosen when loading (load_model(dtype=...))",
    "full_attention_interval": "only builds layer_types when a config has none",
}


class ConfigError(ValueError):
    """A config that cannot describe a Qwen3.5 model; the message names the field and the source."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT encoder's shape (`qwen35_jax.vision.encoder`) and the multimodal token ids (top-level fields of
    an HF config, kept here because only a model with a vision tower uses them)."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 1152
    num_position_embeddings: int = 2304
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054


VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Qwen3.5 text decoder (dense when `num_experts == 0`, sparse MoE otherwise)."""

    vocab_size: int = 248320
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.001
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    layer_types: tuple[str, ...] = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    mtp_num_hidden_layers: int = 0
    vision: VisionConfig | None = None
    # Not part of HF configs: the parameter layout (periods stacked for a layer scan, or one module per layer).
    scan_layers: bool = True

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        validate(self)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def period(self) -> tuple[str, ...]:
        """The repeating block of layer types the decoder scans over (the whole list if irregular)."""
        types, n = self.layer_types, len(self.layer_types)
        if not self.scan_layers:
            return types
        for p in range(1, n + 1):
            if n % p == 0 and types == types[:p] * (n // p):
                return types[:p]
        return types

    @property
    def num_periods(self) -> int:
        return self.num_hidden_layers // len(self.period)

    # ---- HF interop ----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | Path | dict, **overrides) -> ModelConfig:
        """Reads a preset name, a checkpoint folder, a config.json path or an HF config dict."""
        data, where = _read_source(source)
        return cls.from_dict(data, where=where, **overrides)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config", **overrides) -> ModelConfig:
        top = data
        text = dict(data.get("text_config", data))
        if "tie_word_embeddings" in top:
            text["tie_word_embeddings"] = top["tie_word_embeddings"]
        kwargs = _text_kwargs(text, where)
        if isinstance(top.get("vision_config"), dict):
            kwargs["vision"] = _vision_config(top["vision_config"], where, top)
        runtime = sorted(set(overrides) & set(RUNTIME_OPTIONS))
        if runtime:
            name = runtime[0]
            raise ConfigError(f"{name}={overrides[name]!r} is a runtime option, not a model config field: "
                              f"{RUNTIME_OPTIONS[name]}")
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """The HF config dict: top-level multimodal when a vision config is present, else text-only."""
        text = {
            "model_type": "qwen3_5_moe_text" if self.is_moe else "qwen3_5_text",
            "architectures": ["Qwen3_5MoeForCausalLM" if self.is_moe else "Qwen3_5ForCausalLM"],
            "rope_parameters": {
                "rope_type": "default", "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
                "mrope_section": list(self.mrope_section), "mrope_interleaved": True,
            },
            "layer_types": list(self.layer_types),
        }
        skip = {"layer_types", "rope_theta", "partial_rotary_factor", "mrope_section", "vision",
                "scan_layers"}
        skip |= {"intermediate_size"} if self.is_moe else {
            "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "shared_expert_intermediate_size", "router_aux_loss_coef"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                text[f.name] = getattr(self, f.name)
        if self.vision is None:
            return text
        kind = "qwen3_5_moe" if self.is_moe else "qwen3_5"
        text.pop("architectures")
        return {
            "architectures": ["Qwen3_5MoeForConditionalGeneration" if self.is_moe
                              else "Qwen3_5ForConditionalGeneration"],
            "model_type": kind, "tie_word_embeddings": self.tie_word_embeddings,
            **{k: getattr(self.vision, k) for k in VISION_TOKEN_FIELDS},
            "text_config": text,
            "vision_config": {"model_type": kind, **{k: v for k, v in dataclasses.asdict(self.vision).items()
                                                     if k not in VISION_TOKEN_FIELDS}},
        }


def default_layer_types(num_layers: int, interval: int = 4) -> tuple[str, ...]:
    """HF's default: every `interval`-th layer is full attention, the rest Gated DeltaNet."""
    return tuple("linear_attention" if (i + 1) % interval else "full_attention" for i in range(num_layers))


def preset_names() -> tuple[str, ...]:
    """The bundled presets, by name (`qwen35_jax/presets/NAME.json`, installed as package data)."""
    return tuple(sorted(p.name.removesuffix(".json") for p in PRESET_DIR.iterdir() if p.name.endswith(".json")))


def _read_source(source) -> tuple[dict, str]:
    """(config dict, where it came from) for a dict, a preset name, a checkpoint folder or a config.json path."""
    if isinstance(source, dict):
        return source, "config dict"
    path = Path(source)
    if not path.exists() and isinstance(source, str) and source in preset_names():
        path = PRESET_DIR / f"{source}.json"
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config at {source!r}: expected a checkpoint folder with config.json, "
                          f"a config.json path, or a preset name ({', '.join(preset_names())})")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _text_kwargs(text: dict, where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(ModelConfig)} - {"vision", "layer_types", "mrope_section"}
    kwargs = {k: text[k] for k in names if k in text}
    if "layer_types" in text:
        kwargs["layer_types"] = tuple(text["layer_types"])
    elif "num_hidden_layers" in text:
        kwargs["layer_types"] = default_layer_types(text["num_hidden_layers"],
                                                    text.get("full_attention_interval", 4))
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    _check_fixed(text, FIXED_FIELDS, where)
    _check_fixed(rope, FIXED_ROPE_FIELDS, where, prefix="rope_parameters.")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{where}: rope_parameters.rope_type={rope_type!r} is not supported "
                          f"(expected one of {SUPPORTED_ROPE_TYPES})")
    for key, field in (("rope_theta", "rope_theta"), ("partial_rotary_factor", "partial_rotary_factor"),
                       ("mrope_section", "mrope_section")):
        if key in rope:
            kwargs[field] = rope[key]
        elif key in text:
            kwargs[field] = text[key]
    if "num_experts" in text and text.get("model_type", "").startswith("qwen3_5_text"):
        kwargs.pop("num_experts")  # a dense config never has experts
    return kwargs


def _check_fixed(data: dict, fixed: dict, where: str, prefix: str = "") -> None:
    """Raises ConfigError for the first field of `data` that differs from its one supported value."""
    for name, (supported, meaning) in fixed.items():
        if name in data and not _same(data[name], supported):
            raise ConfigError(f"{where}: {prefix}{name}={data[name]!r} is not supported: this implementation "
                              f"computes {meaning} ({prefix}{name}={supported!r})")


def _same(value, supported) -> bool:
    """JSON-level equality that keeps bools apart from numbers (`0 == False` in Python)."""
    if isinstance(supported, bool) or isinstance(value, bool):
        return value is supported
    return value == supported


def _vision_config(vision: dict, where: str, top: dict) -> VisionConfig:
    """The vision_config dict's encoder fields plus the top-level multimodal token ids."""
    _check_fixed(vision, FIXED_VISION_FIELDS, where, prefix="vision_config.")
    names = {f.name for f in dataclasses.fields(VisionConfig)} - set(VISION_TOKEN_FIELDS)
    kwargs = {k: v for k, v in vision.items() if k in names}
    kwargs.update({k: top[k] for k in VISION_TOKEN_FIELDS if k in top})
    return VisionConfig(**kwargs)


def validate(c: ModelConfig) -> None:
    """Raises ConfigError naming the first field that cannot describe a Qwen3.5 model."""
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
                 "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name}={value!r}: expected a positive integer")
    if len(c.layer_types) != c.num_hidden_layers:
        raise ConfigError(f"layer_types has {len(c.layer_types)} entries: expected num_hidden_layers="
                          f"{c.num_hidden_layers}")
    bad = sorted({t for t in c.layer_types if t not in LAYER_TYPES})
    if bad:
        raise ConfigError(f"layer_types contains {bad}: expected only {LAYER_TYPES}")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ConfigError(f"num_attention_heads={c.num_attention_heads} is not a multiple of "
                          f"num_key_value_heads={c.num_key_value_heads}")
    if c.linear_num_value_heads % c.linear_num_key_heads:
        raise ConfigError(f"linear_num_value_heads={c.linear_num_value_heads} is not a multiple of "
                          f"linear_num_key_heads={c.linear_num_key_heads}")
    if c.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"hidden_act={c.hidden_act!r}: expected one of {SUPPORTED_ACTIVATIONS}")
    rot = c.rotary_dim
    if rot <= 0 or rot % 2 or rot > c.head_dim:
        raise ConfigError(f"partial_rotary_factor={c.partial_rotary_factor} gives rotary dim {rot}: "
                          f"expected an even number in (0, head_dim={c.head_dim}]")
    if len(c.mrope_section) != 3 or sum(c.mrope_section) != rot // 2:
        raise ConfigError(f"mrope_section={list(c.mrope_section)} must have 3 entries summing to rotary_dim/2="
                          f"{rot // 2} (head_dim={c.head_dim} x partial_rotary_factor={c.partial_rotary_factor})")
    if c.mtp_num_hidden_layers not in (0, 1):
        raise ConfigError(f"mtp_num_hidden_layers={c.mtp_num_hidden_layers!r}: expected 0 (no MTP block) or 1 "
                          "(one MTP layer, as every released checkpoint has)")
    if c.is_moe:
        for name in ("num_experts_per_tok", "moe_intermediate_size"):
            if getattr(c, name) <= 0:
                raise ConfigError(f"{name}={getattr(c, name)!r}: expected a positive integer for an MoE model")
        if c.num_experts_per_tok > c.num_experts:
            raise ConfigError(f"num_experts_per_tok={c.num_experts_per_tok} exceeds num_experts={c.num_experts}")
    elif c.intermediate_size <= 0:
        raise ConfigError(f"intermediate_size={c.intermediate_size!r}: expected a positive integer for a dense "
                          "model (or set num_experts for an MoE model)")
