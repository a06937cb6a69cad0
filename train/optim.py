r"""The optimizer: AdamW with warmup + cosine decay, selective weight decay, clipping, frozen groups.

`frozen` patterns (and LoRA `targets`, `train.lora`) are regexes over HF-style tensor names with real layer
indices, as HF's causal LM names them: `model.embed_tokens.weight`, `model.layers.3.mlp.gate.weight`,
`model.layers.0.linear_attn.in_proj_qkv.weight`, `model.layers.3.mlp.experts.gate_up_proj`, `lm_head.weight`,
the MTP block's `mtp.fc.weight`, `mtp.layers.0.self_attn.q_proj.weight`, `mtp.layers.0.mlp.experts.0.gate_proj.weight`
(its experts per expert) when the model has one (`^(?!mtp\.)` freezes everything else), and the vision tower's
`model.visual.blocks.0.attn.qkv.weight` when it is trained. With scanned layers one such
name is one slice of a stacked parameter along its `layers` axis, so the frozen mask
of a stacked parameter is a boolean per slice [num_periods]."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qwen35_jax.checkpoint.names import Rule, checkpoint_rules


def param_names(params) -> dict:
    """A tree like `params` whose leaves are the parameters' NNX path names, e.g.
    "decoder/periods/layers/0/mlp/router" (what the weight-decay mask looks at)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "/".join(str(k) for k in _keys(path)), params)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def hf_rules(cfg) -> list[Rule]:
    """The checkpoint name table with HF's causal-LM names (`model.` prefix, fused experts): the names `frozen`
    and LoRA `targets` match, each rule tying HF tensors to our parameter paths and `layers` slice."""
    return checkpoint_rules(cfg, "model.", fused_experts=True)


def example_names(names: list[str]) -> list[str]:
    """One name of each kind (layer 0's and the first attention layer's), to show what names look like."""
    seen, out = set(), []
    for name in names:
        kind = re.sub(r"layers\.\d+\.", "layers.N.", name)
        if kind not in seen and not name.endswith("norm.weight"):
            seen.add(kind)
            out.append(name)
    return out[:12]


def select_names(names: list[str], patterns: list[str], key: str) -> set[str]:
    """The names matching any regex in `patterns` (re.search). A pattern that is not a regex or matches no name
    raises TrainConfigError (naming `key` and showing what names look like)."""
    from train.config import TrainConfigError
    try:
        compiled = [re.compile(p) for p in patterns]
    except (re.error, TypeError) as e:
        raise TrainConfigError(f"{key}={patterns}: not a list of regular expressions ({e})", key=key) from None
    unused = [c.pattern for c in compiled if not any(c.search(n) for n in names)]
    if unused:
        raise TrainConfigError(f"{key}: {unused} match no parameter; names look like {example_names(names)}",
                               key=key)
    return {n for n in names if any(c.search(n) for c in compiled)}


def frozen_mask(cfg, params, patterns: list[str]) -> dict:
    """A tree like `params` of numpy bool arrays: [num_periods] (one per slice of the stacked `layers` axis) for
    stacked parameters, [] for the others; True = frozen. A parameter holding several HF tensors (gate_up:
    gate_proj + up_proj; in_proj_q/k/v: in_proj_qkv) is frozen only with all of them. Errors (TrainConfigError):
    a pattern that is not a regex or matches nothing, a partly matched fused tensor, everything frozen."""
    from train.config import TrainConfigError
    rules = [(r.hf, r.ours, r.period) for r in hf_rules(cfg)] + _vision_rules(cfg, params)
    matched = select_names([n for hf, _, _ in rules for n in hf], patterns, "frozen")
    slices = set()
    for hf, ours, period in rules:
        hit = [n in matched for n in hf]
        if any(hit) and not all(hit):
            raise TrainConfigError(f"frozen: {[n for n, h in zip(hf, hit) if h]} are stored together with "
                                   f"{[n for n, h in zip(hf, hit) if not h]}: freeze them together",
                                   key="frozen")
        if all(hit):
            slices.update((tuple(p), period) for p in ours)

    def leaf(path, p):
        path = _keys(path)
        if (path, None) in slices:
            return np.ones((), bool)
        stacked = (path[:3] == ("decoder", "periods", "layers") and cfg.num_periods > 1) or path[:2] == VISION_BLOCKS
        if not stacked:
            return np.zeros((), bool)
        return np.array([(path, i) in slices for i in range(p.shape[0])])
    mask = jax.tree_util.tree_map_with_path(leaf, params)
    if patterns and all(m.all() for m in jax.tree.leaves(mask)):
        raise TrainConfigError(f"frozen={patterns}: these patterns freeze every parameter", key="frozen")
    return mask


VISION_BLOCKS = ("visual", "blocks")  # the vision tower's stacked blocks, when a trainer trains it (`visual`)


def _vision_rules(cfg, params) -> list[tuple[tuple[str], tuple[tuple], int | None]]:
    """(HF names, our paths, `layers` slice) of the vision tower's tensors (`model.visual.*`) when `params` hold
    it under `visual`, else none."""
    if not any(_keys(p)[:1] == ("visual",) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]):
        return []
    from qwen35_jax.vision.weights import vision_rules
    return [((r.hf,), (("visual", *r.ours),), r.layer) for r in vision_rules(cfg.vision)]


def slice_mask(mask: np.ndarray, ndim: int) -> np.ndarray:
    """A per-slice mask [num_periods] (or []) shaped to broadcast over a parameter of `ndim` dimensions."""
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def freeze(params, frozen):
    """Frozen parameters (and frozen slices of stacked ones) as constants to the gradient: their gradients are
    exactly zero (and so not part of the clipped norm)."""
    def one(p, m):
        if m.all():
            return jax.lax.stop_gradient(p)
        if m.any():
            return jnp.where(slice_mask(m, p.ndim), jax.lax.stop_gradient(p), p)
        return p
    return jax.tree.map(one, params, frozen)


def zero_frozen_slices(frozen) -> optax.GradientTransformation:
    """Zeroes the updates of frozen slices of partly frozen parameters (AdamW's weight decay would move them)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: jnp.where(slice_mask(m, u.ndim), 0, u) if m.any() else u,
                            updates, frozen), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def plain_values(variables):
    """nnx State of Variables -> the same State holding the bare arrays (what jit and optax see); bare arrays
    pass through."""
    return jax.tree.map(lambda v: v.get_value() if is_variable(v) else v, variables, is_leaf=is_variable)


def _layer_ndim(variable) -> int:
    """Dimensions of one layer's parameter (the stacked `layers` axis not counted)."""
    axes = variable.get_metadata().get("out_sharding") or ()
    return variable.get_value().ndim - sum(1 for a in axes if a == "layers")


def matrix_mask(variables) -> dict:
    """True for matrices: parameters with >= 2 dimensions per layer (the stacked `layers` axis not counted)."""
    return jax.tree.map(lambda v: _layer_ndim(v) >= 2, variables, is_leaf=is_variable)


def decay_mask(variables) -> dict:
    """True for parameters that get weight decay: matrices that are not norm weights."""
    names = param_names(plain_values(variables))
    return jax.tree.map(lambda name, m: m and "norm" not in name, names, matrix_mask(variables))


def learning_rate_schedule(tc) -> optax.Schedule:
    """Linear warmup from 0 to tc.learning_rate over tc.warmup_steps, then cosine decay to
    tc.learning_rate * tc.min_lr_ratio at tc.steps."""
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, tc.warmup_steps, max(tc.steps, tc.warmup_steps + 1),
        end_value=tc.learning_rate * tc.min_lr_ratio)


def make_optimizer(tc, variables, frozen: dict | None = None) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay on `decay_mask` params) after global-norm clipping.

    variables: the trained nnx State of Variables (their axis metadata decides what is a matrix); frozen: a
    `frozen_mask` or None. Wholly frozen parameters get no update and no optimizer state; frozen slices of
    stacked ones get zero gradients (`freeze`, so they are not part of the clipped norm) and zero updates."""
    train = optax.chain(
        optax.clip_by_global_norm(tc.max_grad_norm) if tc.max_grad_norm > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(tc), b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps,
                    weight_decay=tc.weight_decay, mask=decay_mask(variables)))
    masks = [] if frozen is None else jax.tree.leaves(frozen)
    if not any(m.any() for m in masks):
        return train
    labels = jax.tree.map(lambda m: "frozen" if m.all() else "train", frozen)
    tx = optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)
    if any(m.any() and not m.all() for m in masks):
        tx = optax.chain(tx, zero_frozen_slices(frozen))
    return tx
