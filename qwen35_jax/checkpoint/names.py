"""The one table mapping HF tensor names to our parameter paths, with the layout transforms both ways.

A `Rule` links a group of HF tensors to a group of our parameters (one HF `in_proj_qkv` <-> our q/k/v
projections; HF `gate_proj` + `up_proj` <-> our `gate_up`; 2E per-expert tensors <-> one stacked array).
`to_ours` / `to_hf` work on numpy arrays and on jax arrays / tracers alike, so `jax.eval_shape` of
`to_hf` gives the expected HF shapes without touching data. The HF loader, the Orbax converter and the
HF exporter all go through `checkpoint_rules`. The MTP block (`mtp.*`) is in the table when the config has
one: its experts per expert (`mtp.layers.0.mlp.experts.{e}.gate_proj.weight`, the Qwen3.5 BF16 releases, even
where the main layers are fused) or fused (Qwen3.6), detected separately from the main layers' layout.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from qwen35_jax.config import ModelConfig

Path = tuple  # a parameter path in the NNX state, e.g. ("decoder", "periods", "layers", 0, "mlp", "down")
TEXT_PREFIXES = ("model.language_model.", "model.")
VISION_PREFIX = "model.visual."  # the vision tower's table: qwen35_jax.vision.weights
MTP_PREFIX = "mtp."


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]        # HF tensor names
    ours: tuple[Path, ...]     # our parameter paths
    to_ours: Callable          # (*hf arrays) -> tuple of our arrays
    to_hf: Callable            # (*our arrays) -> tuple of HF arrays
    period: int | None = None  # index on the stacked `layers` axis (None: not stacked)
    layer: int | None = None   # the HF layer index (None: not a layer parameter)

    def stored_keys(self) -> tuple[tuple[str, ...], ...]:
        """Where each of our arrays lives in an Orbax checkpoint: per HF layer, whatever the scan period,
        so one checkpoint restores with any `scan_layers` setting: ("layers", "7", "mlp", "down")."""
        if self.layer is None:
            return tuple(tuple(str(k) for k in p) for p in self.ours)
        return tuple(("layers", str(self.layer), *(str(k) for k in p[4:])) for p in self.ours)


def _np(x):
    return np if isinstance(x, np.ndarray) else jnp


def _same():
    return (lambda w: (w,)), (lambda w: (w,))


def _linear(*out_shape):
    """HF Linear weight (out, in) <-> our kernel [in, *out_shape]."""
    def to_ours(w):
        return (w.T.reshape(w.shape[1], *out_shape),)

    def to_hf(k):
        return (k.reshape(k.shape[0], -1).T,)
    return to_ours, to_hf


def _linear_in(*in_shape):
    """HF Linear weight (out, in) <-> our kernel [*in_shape, out] (output projections)."""
    def to_ours(w):
        return (w.T.reshape(*in_shape, w.shape[0]),)

    def to_hf(k):
        return (k.reshape(-1, k.shape[-1]).T,)
    return to_ours, to_hf


def _split_rows(parts):
    """One HF tensor whose dim 0 concatenates `parts` [(rows, reshape)] <-> several of our kernels."""
    bounds = np.cumsum([0] + [rows for rows, _ in parts])

    def to_ours(w):
        return tuple(w[a:b].T.reshape(w.shape[-1], *shape) for (a, b, (_, shape)) in
                     zip(bounds[:-1], bounds[1:], parts))

    def to_hf(*ks):
        return (_np(ks[0]).concatenate([k.reshape(k.shape[0], -1).T for k in ks], axis=0),)
    return to_ours, to_hf


def _split_conv(parts):
    """HF depthwise conv (C, 1, K) <-> our [K, heads, dim] kernels, one per q/k/v part."""
    bounds = np.cumsum([0] + [rows for rows, _ in parts])

    def to_ours(w):
        kc = w[:, 0, :].T
        return tuple(kc[:, a:b].reshape(kc.shape[0], *shape) for (a, b, (_, shape)) in
                     zip(bounds[:-1], bounds[1:], parts))

    def to_hf(*ks):
        kc = _np(ks[0]).concatenate([k.reshape(k.shape[0], -1) for k in ks], axis=1)
        return (kc.T[:, None, :],)
    return to_ours, to_hf


def _gate_up():
    """HF gate_proj, up_proj (I, H) each <-> our gate_up [H, 2, I]."""
    def to_ours(g, u):
        return (_np(g).stack([g.T, u.T], axis=1),)

    def to_hf(gu):
        return gu[:, 0].T, gu[:, 1].T
    return to_ours, to_hf


def _fused_experts_gate_up():
    """HF experts.gate_up_proj (E, 2I, H), rows [gate; up] <-> our [E, H, 2, I]."""
    def to_ours(w):
        e, two_i, h = w.shape
        return (w.reshape(e, 2, two_i // 2, h).transpose(0, 3, 1, 2),)

    def to_hf(k):
        e, h, _, i = k.shape
        return (k.transpose(0, 2, 3, 1).reshape(e, 2 * i, h),)
    return to_ours, to_hf


def _fused_experts_down():
    """HF experts.down_proj (E, H, I) <-> our [E, I, H]."""
    return (lambda w: (w.transpose(0, 2, 1),)), (lambda k: (k.transpose(0, 2, 1),))


def _per_expert_gate_up(n):
    """HF experts.{e}.gate_proj, then experts.{e}.up_proj (I, H) for all e <-> our [E, H, 2, I]."""
    def to_ours(*ws):
        xp = _np(ws[0])
        return (xp.stack([xp.stack(ws[:n]), xp.stack(ws[n:])], axis=1).transpose(0, 3, 1, 2),)

    def to_hf(k):
        return tuple(k[e, :, 0].T for e in range(n)) + tuple(k[e, :, 1].T for e in range(n))
    return to_ours, to_hf


def _per_expert_down(n):
    """HF experts.{e}.down_proj (H, I) for all e <-> our [E, I, H]."""
    def to_ours(*ws):
        return (_np(ws[0]).stack(ws).transpose(0, 2, 1),)

    def to_hf(k):
        return tuple(k[e].T for e in range(n))
    return to_ours, to_hf


def _mlp_rules(hf: str, ours: Path, hidden: int) -> list:
    return [((f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"), (ours + ("gate_up",),), _gate_up()),
            ((f"{hf}.down_proj.weight",), (ours + ("down",),), _linear(hidden))]


def layer_rules(cfg: ModelConfig, layer_type: str, fused_experts: bool) -> list:
    """[(hf names relative to the layer, our paths relative to the layer, (to_ours, to_hf))]."""
    h = cfg.hidden_size
    rules = [(("input_layernorm.weight",), (("input_layernorm", "weight"),), _same()),
             (("post_attention_layernorm.weight",), (("post_attention_layernorm", "weight"),), _same())]
    if layer_type == "full_attention":
        nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        a = "self_attn"
        rules += [
            ((f"{a}.q_proj.weight",), ((a, "q_proj"),), _linear(nq, 2 * d)),
            ((f"{a}.k_proj.weight",), ((a, "k_proj"),), _linear(nkv, d)),
            ((f"{a}.v_proj.weight",), ((a, "v_proj"),), _linear(nkv, d)),
            ((f"{a}.o_proj.weight",), ((a, "o_proj"),), _linear_in(nq, d)),
            ((f"{a}.q_norm.weight",), ((a, "q_norm", "weight"),), _same()),
            ((f"{a}.k_norm.weight",), ((a, "k_norm", "weight"),), _same()),
        ]
    else:
        nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        parts = [(nk * dk, (nk, dk)), (nk * dk, (nk, dk)), (nv * dv, (nv, dv))]
        a = "linear_attn"
        rules += [
            ((f"{a}.in_proj_qkv.weight",), ((a, "in_proj_q"), (a, "in_proj_k"), (a, "in_proj_v")),
             _split_rows(parts)),
            ((f"{a}.in_proj_z.weight",), ((a, "in_proj_z"),), _linear(nv, dv)),
            ((f"{a}.in_proj_b.weight",), ((a, "in_proj_b"),), _linear(nv)),
            ((f"{a}.in_proj_a.weight",), ((a, "in_proj_a"),), _linear(nv)),
            ((f"{a}.conv1d.weight",), ((a, "conv_q"), (a, "conv_k"), (a, "conv_v")), _split_conv(parts)),
            ((f"{a}.A_log",), ((a, "A_log"),), _same()),
            ((f"{a}.dt_bias",), ((a, "dt_bias"),), _same()),
            ((f"{a}.norm.weight",), ((a, "norm", "weight"),), _same()),
            ((f"{a}.out_proj.weight",), ((a, "out_proj"),), _linear_in(nv, dv)),
        ]
    if not cfg.is_moe:
        return rules + _mlp_rules("mlp", ("mlp",), h)
    n = cfg.num_experts
    rules += [(("mlp.gate.weight",), (("mlp", "router"),), _linear(n)),
              (("mlp.shared_expert_gate.weight",), (("mlp", "shared_expert_gate"),), _linear(1))]
    rules += _mlp_rules("mlp.shared_expert", ("mlp", "shared_expert"), h)
    if fused_experts:
        rules += [(("mlp.experts.gate_up_proj",), (("mlp", "experts_gate_up"),), _fused_experts_gate_up()),
                  (("mlp.experts.down_proj",), (("mlp", "experts_down"),), _fused_experts_down())]
    else:
        names = tuple(f"mlp.experts.{e}.{p}_proj.weight" for p in ("gate", "up") for e in range(n))
        rules += [(names, (("mlp", "experts_gate_up"),), _per_expert_gate_up(n)),
                  (tuple(f"mlp.experts.{e}.down_proj.weight" for e in range(n)), (("mlp", "experts_down"),),
                   _per_expert_down(n))]
    return rules


def mtp_rules(cfg: ModelConfig, fused_experts: bool) -> list[Rule]:
    """The MTP block's rules (`mtp.*` <-> `Qwen35.mtp`, spec section 8): fc, three norms, one full-attention
    layer with the model's MLP / MoE (experts fused or per expert)."""
    rules = [Rule((f"{MTP_PREFIX}fc.weight",), (("mtp", "fc"),), *_linear(cfg.hidden_size))]
    rules += [Rule((f"{MTP_PREFIX}{n}.weight",), (("mtp", n, "weight"),), *_same())
              for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")]
    for hf, ours, (to_ours, to_hf) in layer_rules(cfg, "full_attention", fused_experts):
        rules.append(Rule(tuple(f"{MTP_PREFIX}layers.0.{n}" for n in hf), tuple(("mtp", "layer") + p for p in ours),
                          to_ours, to_hf))
    return rules


def checkpoint_rules(cfg: ModelConfig, text_prefix: str = "model.language_model.",
                     fused_experts: bool = True, mtp_fused_experts: bool = False) -> list[Rule]:
    """Every rule of the text model (and of its MTP block when the config has one), with absolute HF names and
    absolute parameter paths. The defaults are the Qwen3.5 BF16 release layout: main-layer experts fused, MTP
    experts per expert."""
    rules = [Rule((f"{text_prefix}embed_tokens.weight",), (("embed_tokens",),), *_same()),
             Rule((f"{text_prefix}norm.weight",), (("norm", "weight"),), *_same())]
    if not cfg.tie_word_embeddings:
        rules.append(Rule(("lm_head.weight",), (("lm_head",),), *_linear(cfg.vocab_size)))
    period = len(cfg.period)
    stacked = cfg.num_periods > 1
    for i, layer_type in enumerate(cfg.layer_types):
        base = ("decoder", "periods", "layers", i % period)
        for hf, ours, (to_ours, to_hf) in layer_rules(cfg, layer_type, fused_experts):
            rules.append(Rule(tuple(f"{text_prefix}layers.{i}.{n}" for n in hf),
                              tuple(base + p for p in ours), to_ours, to_hf,
                              i // period if stacked else None, i))
    if cfg.mtp_num_hidden_layers:
        rules += mtp_rules(cfg, mtp_fused_experts)
    return rules


class Layout(NamedTuple):
    """An HF checkpoint's naming: `checkpoint_rules(cfg, *layout)`."""

    text_prefix: str
    fused_experts: bool       # main layers: experts.gate_up_proj / down_proj (else experts.{e}.*_proj.weight)
    mtp_fused_experts: bool   # the same for the MTP layer


def detect_layout(names) -> Layout:
    """The layout of an HF checkpoint from its tensor names (main and MTP experts each fused or per expert)."""
    names = list(names)
    prefix = next((p for p in TEXT_PREFIXES if any(n.startswith(p + "layers.") or n == p + "embed_tokens.weight"
                                                   for n in names)), TEXT_PREFIXES[0])
    mtp = [n for n in names if n.startswith(MTP_PREFIX)]
    main = [n for n in names if not n.startswith(MTP_PREFIX)]
    fused = any(n.endswith("mlp.experts.gate_up_proj") for n in main) or not any(".mlp.experts." in n for n in main)
    return Layout(prefix, fused, any(n.endswith("mlp.experts.gate_up_proj") for n in mtp))


def has_mtp_tensors(names) -> bool:
    return any(n.startswith(MTP_PREFIX) for n in names)


def is_skipped(name: str, cfg: ModelConfig) -> bool:
    """Tensors recognised but outside the text model's table, carried as stored by the converter: the vision
    tower's, and `mtp.*` when the config has no MTP block (mtp_num_hidden_layers=0)."""
    return name.startswith(VISION_PREFIX) or (name.startswith(MTP_PREFIX) and not cfg.mtp_num_hidden_layers)
