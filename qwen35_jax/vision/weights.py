"""The name table between HF `model.visual.*` tensors and `VisionEncoder` parameters, with the loader and
exporter built on it.

Every HF tensor maps to exactly one of our parameters: either the same values reshaped (biases, norms,
pos_embed) or a Linear/Conv weight (out, in...) stored as a kernel [in..., out...] (transpose + reshape).
Block tensors go to slice `layer` of the stacked `blocks` parameters. HF's Qwen3.5 has no checkpoint
conversion mapping for the vision tower: released checkpoints and `save_pretrained` both name it
`model.visual.`, the only prefix accepted.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen35_jax.checkpoint.safetensors_io import CheckpointError
from qwen35_jax.config import VisionConfig
from qwen35_jax.vision.encoder import VisionEncoder

PREFIX = "model.visual."


@dataclasses.dataclass(frozen=True)
class VisionRule:
    hf: str                        # HF tensor name, prefix included
    hf_shape: tuple[int, ...]      # its shape in an HF checkpoint
    ours: tuple[str, ...]          # our parameter path in the encoder's state
    layer: int | None = None       # index on the stacked "layers" axis (None: not a block parameter)
    linear: bool = False           # HF (out, in...) weight <-> our kernel [in..., out...]

    def to_ours(self, w, shape: tuple[int, ...]):
        """The HF array -> our (per-layer) array of `shape`."""
        if self.linear:
            w = w.reshape(w.shape[0], -1).T
        return w.reshape(shape)

    def to_hf(self, k):
        """Our (per-layer) array -> the HF array of `hf_shape`."""
        if self.linear:
            k = k.reshape(-1, self.hf_shape[0]).T
        return k.reshape(self.hf_shape)


def _block_rules(vcfg: VisionConfig, layer: int) -> list[VisionRule]:
    dv, inter = vcfg.hidden_size, vcfg.intermediate_size
    name = f"{PREFIX}blocks.{layer}."
    table = [  # (HF suffix, HF shape, our path below blocks, linear)
        ("norm1.weight", (dv,), ("norm1", "weight"), False),
        ("norm1.bias", (dv,), ("norm1", "bias"), False),
        ("attn.qkv.weight", (3 * dv, dv), ("attn", "qkv"), True),
        ("attn.qkv.bias", (3 * dv,), ("attn", "qkv_bias"), False),
        ("attn.proj.weight", (dv, dv), ("attn", "proj"), True),
        ("attn.proj.bias", (dv,), ("attn", "proj_bias"), False),
        ("norm2.weight", (dv,), ("norm2", "weight"), False),
        ("norm2.bias", (dv,), ("norm2", "bias"), False),
        ("mlp.linear_fc1.weight", (inter, dv), ("mlp", "fc1"), True),
        ("mlp.linear_fc1.bias", (inter,), ("mlp", "fc1_bias"), False),
        ("mlp.linear_fc2.weight", (dv, inter), ("mlp", "fc2"), True),
        ("mlp.linear_fc2.bias", (dv,), ("mlp", "fc2_bias"), False),
    ]
    return [VisionRule(name + suffix, shape, ("blocks", *path), layer, linear)
            for suffix, shape, path, linear in table]


def vision_rules(vcfg: VisionConfig) -> list[VisionRule]:
    """The full name table of the encoder for `vcfg`, in checkpoint order."""
    dv, out = vcfg.hidden_size, vcfg.out_hidden_size
    merged = dv * vcfg.spatial_merge_size ** 2
    patch = (dv, vcfg.in_channels, vcfg.temporal_patch_size, vcfg.patch_size, vcfg.patch_size)
    rules = [
        VisionRule(PREFIX + "patch_embed.proj.weight", patch, ("patch_embed",), linear=True),
        VisionRule(PREFIX + "patch_embed.proj.bias", (dv,), ("patch_bias",)),
        VisionRule(PREFIX + "pos_embed.weight", (vcfg.num_position_embeddings, dv), ("pos_embed",)),
    ]
    for layer in range(vcfg.depth):
        rules += _block_rules(vcfg, layer)
    return rules + [
        VisionRule(PREFIX + "merger.norm.weight", (dv,), ("merger", "norm", "weight")),
        VisionRule(PREFIX + "merger.norm.bias", (dv,), ("merger", "norm", "bias")),
        VisionRule(PREFIX + "merger.linear_fc1.weight", (merged, merged), ("merger", "fc1"), linear=True),
        VisionRule(PREFIX + "merger.linear_fc1.bias", (merged,), ("merger", "fc1_bias")),
        VisionRule(PREFIX + "merger.linear_fc2.weight", (out, merged), ("merger", "fc2"), linear=True),
        VisionRule(PREFIX + "merger.linear_fc2.bias", (out,), ("merger", "fc2_bias")),
    ]


def check_vision_tensors(tensors: Mapping[str, np.ndarray], rules: list[VisionRule]) -> None:
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped `model.visual.*` tensor
    (tensors outside the vision tower are not looked at)."""
    present = {name for name in tensors if name.startswith(PREFIX)}
    problems = []
    for rule in rules:
        if rule.hf not in present:
            problems.append(f"missing tensor {rule.hf}")
        elif tuple(np.shape(tensors[rule.hf])) != rule.hf_shape:
            problems.append(f"tensor {rule.hf} has shape {list(np.shape(tensors[rule.hf]))}, "
                            f"expected {list(rule.hf_shape)} from the vision config")
    problems += [f"unexpected tensor {name}" for name in sorted(present - {r.hf for r in rules})]
    if problems:
        raise CheckpointError(f"vision tower tensors do not match the vision config ({len(problems)} problems):"
                              "\n  " + "\n  ".join(problems))


def load_vision(tensors: Mapping[str, np.ndarray], vcfg: VisionConfig, dtype=jnp.float32) -> VisionEncoder:
    """A VisionEncoder of `dtype` from HF-named tensors (a whole checkpoint's mapping is fine: only
    `model.visual.*` is read, and all of it must be used)."""
    rules = vision_rules(vcfg)
    check_vision_tensors(tensors, rules)
    graphdef, state = nnx.split(VisionEncoder.abstract(vcfg, dtype))
    variables = {tuple(path): v for path, v in nnx.to_flat_state(state)}
    arrays = {p: np.empty(v.get_value().shape, v.get_value().dtype) for p, v in variables.items()}
    for rule in rules:
        target = arrays[rule.ours] if rule.layer is None else arrays[rule.ours][rule.layer]
        target[...] = rule.to_ours(np.asarray(tensors[rule.hf]), target.shape).astype(target.dtype)
    unfilled = sorted(set(variables) - {r.ours for r in rules})
    assert not unfilled, f"vision name table misses parameters {unfilled}"
    for path, variable in variables.items():
        variable.set_value(jnp.asarray(arrays.pop(path)))
    return nnx.merge(graphdef, state)


def vision_to_hf(encoder: VisionEncoder) -> dict[str, np.ndarray]:
    """HF tensor name -> array in HF's shape (the encoder's dtype), for every `model.visual.*` tensor."""
    values = {tuple(path): v.get_value() for path, v in nnx.to_flat_state(nnx.state(encoder, nnx.Param))}
    out = {}
    for rule in vision_rules(encoder.config):
        value = np.asarray(values[rule.ours])
        out[rule.hf] = np.ascontiguousarray(rule.to_hf(value if rule.layer is None else value[rule.layer]))
    return out
