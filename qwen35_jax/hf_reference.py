"""HF transformers as the numerical reference: seeded random models built in-process, logits.

Needs the `[test]` extra (torch, transformers); imported only by compare_hf, tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig,  # noqa: E402
                          Qwen3_5TextConfig)

from qwen35_jax.config import _read_source  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_text_config(source: str | dict, **overrides):
    """An HF text config from a preset name / path / dict (architectures and model_type dropped)."""
    data = dict(_read_source(source)[0])
    data.update(overrides)
    data.pop("architectures", None)
    moe = data.pop("model_type", "").startswith("qwen3_5_moe") or "num_experts" in data
    return (Qwen3_5MoeTextConfig if moe else Qwen3_5TextConfig)(**data)


def build_hf_model(source: str | dict, seed: int = 0, dtype=torch.float32, **overrides):
    """A seeded random HF causal LM in eval mode. Norm weights and A_log/dt_bias are randomised too, so
    that a wrong (1 + w) or a dropped bias shows in the logits."""
    cfg = hf_text_config(source, **overrides)
    torch.manual_seed(seed)
    cls = Qwen3_5MoeForCausalLM if getattr(cfg, "num_experts", 0) else Qwen3_5ForCausalLM
    model = cls(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("dt_bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


TINY_VISION = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=64)
TINY_VISION_TOKENS = dict(vision_start_token_id=250, vision_end_token_id=251, image_token_id=252, video_token_id=253)


def build_hf_multimodal(source: str | dict, seed: int = 0, vision: dict | None = None,
                        token_ids: dict | None = None, **overrides):
    """A seeded random HF `Qwen3_5(Moe)ForConditionalGeneration` in float32 eval mode: the text model of
    `source` (a text preset) with a small vision tower (TINY_VISION, out_hidden_size = the text hidden size)
    and the multimodal token ids of TINY_VISION_TOKENS (inside a tiny preset's vocabulary) or `token_ids` (a
    tokenizer's ids of the four special tokens, keyed like TINY_VISION_TOKENS). Norm weights and
    dt_bias are randomised as in `build_hf_model`, the vision LayerNorms too."""
    from transformers import (Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig,
                              Qwen3_5MoeForConditionalGeneration)
    text = hf_text_config(source, **overrides)
    moe = bool(getattr(text, "num_experts", 0))
    vision_cfg = {**TINY_VISION, "out_hidden_size": text.hidden_size, **(vision or {})}
    config_cls, model_cls = ((Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration) if moe
                             else (Qwen3_5Config, Qwen3_5ForConditionalGeneration))
    config = config_cls(text_config=text.to_dict(), vision_config=vision_cfg, **(token_ids or TINY_VISION_TOKENS),
                        tie_word_embeddings=text.tie_word_embeddings)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("dt_bias") or "norm" in name and "visual" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model, folder: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


@contextlib.contextmanager
def random_checkpoint(source: str | dict, seed: int = 0, **overrides):
    """`with random_checkpoint(...) as (model, folder)`: a seeded random HF model and a temporary folder holding
    its save_pretrained files; the folder is removed on exit."""
    model = build_hf_model(source, seed=seed, **overrides)
    with tempfile.TemporaryDirectory(prefix="qwen35-random-") as folder:
        yield model, save_hf_model(model, Path(folder))


def mtp_tensor_shapes(text: dict, layout: str = "per_expert") -> dict[str, tuple[int, ...]]:
    """{name: shape} of the `mtp.*` tensors of an HF text config dict (spec sections 8 and 9, written out here
    independently of the name table): fc, three norms, one full-attention layer with the model's MLP, or MoE
    with experts "per_expert" (`experts.{e}.gate_proj.weight`, ...) or "fused" (`experts.gate_up_proj`)."""
    h, nq, nkv, d = (text[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
    p = "mtp.layers.0."
    shapes = {"mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,),
              "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.norm.weight": (h,),
              p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
              p + "self_attn.q_proj.weight": (2 * nq * d, h), p + "self_attn.k_proj.weight": (nkv * d, h),
              p + "self_attn.v_proj.weight": (nkv * d, h), p + "self_attn.o_proj.weight": (h, nq * d),
              p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}

    def mlp(prefix, inner):
        return {f"{prefix}.gate_proj.weight": (inner, h), f"{prefix}.up_proj.weight": (inner, h),
                f"{prefix}.down_proj.weight": (h, inner)}
    if not text.get("num_experts"):
        return shapes | mlp(p + "mlp", text["intermediate_size"])
    n, inner = text["num_experts"], text["moe_intermediate_size"]
    shapes |= {p + "mlp.gate.weight": (n, h), p + "mlp.shared_expert_gate.weight": (1, h)}
    shapes |= mlp(p + "mlp.shared_expert", text["shared_expert_intermediate_size"])
    if layout == "fused":
        return shapes | {p + "mlp.experts.gate_up_proj": (n, 2 * inner, h), p + "mlp.experts.down_proj": (n, h, inner)}
    for e in range(n):
        shapes |= mlp(f"{p}mlp.experts.{e}", inner)
    return shapes


def add_mtp_tensors(folder: str | Path, layout: str = "per_expert", seed: int = 0,
                    std: float = 0.02) -> dict[str, np.ndarray]:
    """Writes seeded random float32 `mtp.*` tensors (`mtp_tensor_shapes`) into an HF checkpoint folder, as the
    file `mtp.safetensors` (added to the index when there is one), and sets `mtp_num_hidden_layers: 1` in its
    config.json (transformers neither saves nor loads the MTP block). Matrices ~ N(0, std), norm weights
    0.1 * N(0, 1) (zero-centred offsets). The same seed gives the same weights in either layout (the fused
    tensors are the per-expert ones stacked, gate rows then up rows). Returns {name: array}."""
    from safetensors.numpy import save_file
    folder = Path(folder)
    data = json.loads((folder / "config.json").read_text())
    text = data.get("text_config", data)
    rng = np.random.default_rng(seed)
    tensors = {name: (0.1 if len(shape) == 1 else std) * rng.standard_normal(shape).astype(np.float32)
               for name, shape in mtp_tensor_shapes(text, "per_expert").items()}
    if layout == "fused" and text.get("num_experts"):
        tensors = _fuse_experts(tensors, text["num_experts"])
    assert {n: t.shape for n, t in tensors.items()} == mtp_tensor_shapes(text, layout)
    save_file(tensors, folder / "mtp.safetensors", metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data_index = json.loads(index.read_text())
        data_index["weight_map"].update({name: "mtp.safetensors" for name in tensors})
        index.write_text(json.dumps(data_index, indent=2))
    text["mtp_num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    return tensors


def _fuse_experts(tensors: dict, n: int) -> dict:
    """Per-expert MTP expert tensors -> `experts.gate_up_proj` (E, 2I, H) and `experts.down_proj` (E, H, I)."""
    p = "mtp.layers.0.mlp.experts."
    out = {k: v for k, v in tensors.items() if not k.startswith(p)}
    gate, up, down = ([tensors[f"{p}{e}.{w}_proj.weight"] for e in range(n)] for w in ("gate", "up", "down"))
    out[p + "gate_up_proj"] = np.concatenate([np.stack(gate), np.stack(up)], axis=1)
    out[p + "down_proj"] = np.stack(down)
    return out


def load_hf_model(folder: str | Path, dtype: str = "float32"):
    """An HF checkpoint folder as a transformers causal LM (text tower only) in eval mode."""
    data = json.loads((Path(folder) / "config.json").read_text())
    cfg = hf_text_config(data.get("text_config", data))
    if "text_config" in data and "tie_word_embeddings" in data:
        cfg.tie_word_embeddings = data["tie_word_embeddings"]
    cls = Qwen3_5MoeForCausalLM if getattr(cfg, "num_experts", 0) else Qwen3_5ForCausalLM
    return cls.from_pretrained(folder, config=cfg, dtype=TORCH_DTYPES[dtype]).eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """tokens: int [B, L] -> float32 logits [B, L, vocab]."""
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def random_tokens(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int32)
